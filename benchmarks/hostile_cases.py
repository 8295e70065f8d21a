"""Hostile and malformed inputs for the CLI (issue 23), one :class:`Case` each: what the issue's
probe found and what must-have 1-5 name. :mod:`benchmarks.hostile_judge` runs and judges them
(``benchmarks/robustness.py --hostile`` prints the table; ``tests/test_hostile_cases.py`` runs
each as a test). Every model is built here with the ``onnx`` API, a few KB at most.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# A file beside (never inside) the model's folder that no case may read.
CANARY = b"onnx-squeeze canary: outside the model's folder\n" * 100
MODEL, OUT, IMAGES = "model/model.onnx", "out/out.onnx", "model/images"
DATA, NPY = "model/data.npz", "model/data.npy"
OUTSIDE = "outside/canary.bin"
PICKLE_RAN = "outside/pickle-ran"  # created by a pickled payload if it is ever unpickled

INSPECT = ("inspect", "{m}")
COMPRESS = (
    "compress",
    "{m}",
    "-o",
    "{o}",
    "--prune-weights",
    "0.5",
    "--runs",
    "1",
    "--no-simplify",
)
SIMPLIFY = ("compress", "{m}", "-o", "{o}", "--fp16", "--no-compare")
INT8 = ("compress", "{m}", "-o", "{o}", "--int8", "--calib", "{d}", "--no-simplify")
COMPARE = ("compare", "{m}", "{m}", "--runs", "1")
BENCH = ("bench", "{m}", "--runs", "1", "--warmup", "0")


@dataclasses.dataclass(frozen=True)
class Case:
    """``build(root)`` writes the case's files under ``root`` (the model at :data:`MODEL`);
    each command is CLI words (``{m}`` the model, ``{o}`` the output, ``{d}`` an .npz, ``{n}``
    an .npy, ``{i}`` an image folder, ``{x}`` a file in a missing folder) with the exit codes that count as handled."""

    name: str
    build: Callable[[Path], None]
    commands: tuple[tuple[tuple[str, ...], frozenset[int]], ...]
    run_timeout: float | None = None  # seconds a model run may take (the Loop of 2**40 trips)


def _cmd(words: Sequence[str], *exits: int) -> tuple[tuple[str, ...], frozenset[int]]:
    return tuple(words), frozenset(exits or (1,))


REFUSED = (_cmd(INSPECT), _cmd(COMPRESS))  # a model no command may work on


def words(command: Sequence[str], root: Path) -> list[str]:
    paths = {"m": MODEL, "o": OUT, "d": DATA, "n": NPY, "i": IMAGES, "x": "missing/out.onnx"}
    return [word.format(**{k: str(root / v) for k, v in paths.items()}) for word in command]


# ---------------------------------------------------------------------------------- models


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def mlp(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """x[1,8] -> MatMul w1 -> Add b1 -> Relu -> MatMul w2 -> y[1,4]."""
    rng = _rng()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _save(root: Path, model: onnx.ModelProto | bytes) -> None:
    path = root / MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())


def _model_case(name: str, make: Callable[[], onnx.ModelProto | bytes], *commands) -> Case:
    return Case(name, lambda root: _save(root, make()), tuple(commands) or REFUSED)


def _mutated(
    change: Callable[[onnx.ModelProto], None], **settings
) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        model = mlp(**settings)
        change(model)
        return model

    return make


def _external(location: str, offset: int = 0, length: int | None = None, nested: bool = False):
    """w1 (8x16 floats, 512 bytes) read from ``location``; with ``nested`` the first MatMul and
    w1 sit in both branches of an If."""

    def change(model: onnx.ModelProto) -> None:
        w1 = model.graph.initializer[0]
        w1.ClearField("raw_data")
        w1.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset)}
        if length is not None:
            entries["length"] = str(length)
        for key, value in entries.items():
            w1.external_data.add(key=key, value=value)
        if nested:
            branch = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w1"], ["hb"])],
                "branch",
                [],
                [helper.make_tensor_value_info("hb", TensorProto.FLOAT, [1, 16])],
                [w1],
            )
            flag = helper.make_tensor("flag", TensorProto.BOOL, [], [True])
            node = helper.make_node(
                "If", ["flag"], ["h"], then_branch=branch, else_branch=branch, name="if"
            )
            del model.graph.initializer[0]
            model.graph.initializer.append(flag)
            model.graph.node[0].CopyFrom(node)

    return change


def _external_case(name: str, location: str, data: bytes | None = None, **kwargs) -> Case:
    def build(root: Path) -> None:
        target = location.replace("{outside}", str(root / OUTSIDE))
        if data is not None:
            (root / "model" / target).write_bytes(data)
        _save(root, _mutated(_external(target, **kwargs))())

    return Case(name, build, (_cmd(INSPECT), _cmd(SIMPLIFY)))


def _inside_external(root: Path) -> None:
    """w1's bytes in ``w.bin`` beside the model, where they belong."""
    (root / "model").mkdir(parents=True, exist_ok=True)
    model = mlp()
    (root / "model" / "w.bin").write_bytes(model.graph.initializer[0].raw_data)
    _save(root, _mutated(_external("w.bin"))())


def _symlink_case() -> Case:
    def build(root: Path) -> None:
        (root / "model").mkdir(parents=True, exist_ok=True)
        (root / "model" / "link.bin").symlink_to(root / OUTSIDE)
        _save(root, _mutated(_external("link.bin"))())

    return Case(
        "external data: a link leading out of the folder", build, (_cmd(INSPECT), _cmd(SIMPLIFY))
    )


def _cycle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "r"


def _undefined(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[1] = "nowhere"


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node[2].output[0] = "h"


def _short_initializer(model: onnx.ModelProto) -> None:
    w1 = model.graph.initializer[0]
    w1.raw_data = w1.raw_data[:100]


def _dims_swapped(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].dims[:] = [16, 8, 2]


def _input_dim(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = value

    return change


def _batch_zero(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 0


def _weights(value: float) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        array = numpy_helper.to_array(model.graph.initializer[0]).copy()
        array[3, 5] = value
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(array, "w1"))

    return change


def _op(op_type: str, domain: str = "") -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = op_type
        model.graph.node[2].domain = domain

    return change


def _no_outputs(model: onnx.ModelProto) -> None:
    del model.graph.output[:]


def _no_opset(model: onnx.ModelProto) -> None:
    del model.opset_import[:]


def _ir3() -> onnx.ModelProto:
    """IR version 3, opset 8: every initializer also listed among the graph inputs."""
    model = mlp(opset=8, ir_version=3)
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    return model


def _not_utf8() -> bytes:
    data = mlp().SerializeToString()
    at = data.index(b"Relu")
    return data[:at] + b"\xff\xfe" + data[at + 2 :]


def _graph(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _x(*dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))


def _y(*dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))


def _ints(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _sum_into_x(node: onnx.NodeProto, extra=()) -> onnx.ModelProto:
    """y = x + sum(node's output): a huge tensor summed away again (as the probe's model)."""
    return _graph(
        [
            node,
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0, name="sum"),
            helper.make_node("Add", ["x", "s"], ["y"], name="add"),
        ],
        [_x(1, 8)],
        [_y(1, 8)],
        extra,
    )


def _constant_of_shape() -> onnx.ModelProto:
    """A 1 GiB ConstantOfShape in a model of a few hundred bytes."""
    return _sum_into_x(
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big"],
            name="fill",
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
        [_ints("shape", [2**28])],
    )


def _expand() -> onnx.ModelProto:
    return _sum_into_x(
        helper.make_node("Expand", ["x", "shape"], ["big"], name="expand"),
        [_ints("shape", [2**27, 8])],
    )


def _tile() -> onnx.ModelProto:
    return _sum_into_x(
        helper.make_node("Tile", ["x", "repeats"], ["big"], name="tile"),
        [_ints("repeats", [2**26, 1])],
    )


def _reshape() -> onnx.ModelProto:
    """A Reshape of x[1,8] to a shape of 2**40 elements."""
    return _graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        [_x(1, 8)],
        [_y(2**37, 8)],
        [_ints("shape", [2**37, 8])],
    )


def _expand_at_run_time() -> onnx.ModelProto:
    """Expand x to (2**38 * (1 + max|x|), 8): a size no static check can see (8 TB or more)."""
    return _graph(
        [
            helper.make_node("Abs", ["x"], ["abs"]),
            helper.make_node("ReduceMax", ["abs"], ["max"], keepdims=0),
            helper.make_node("Add", ["max", "one"], ["scale"]),
            helper.make_node("Mul", ["scale", "huge"], ["rows_float"]),
            helper.make_node("Cast", ["rows_float"], ["rows_scalar"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["rows_scalar", "one_dim"], ["rows"]),
            helper.make_node("Concat", ["rows", "width"], ["shape"], axis=0),
            helper.make_node("Expand", ["x", "shape"], ["big"], name="expand"),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [_x(1, 8)],
        [_y(1, 8)],
        [
            numpy_helper.from_array(np.array(1, np.float32), "one"),
            numpy_helper.from_array(np.array(2.0**38, np.float32), "huge"),
            _ints("one_dim", [1]),
            _ints("width", [8]),
        ],
    )


def endless_loop() -> onnx.ModelProto:
    """y = x + 2**40, one Add per trip of a Loop."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 8]),
        ],
    )
    return _graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body, name="loop")],
        [_x(1, 8)],
        [_y(1, 8)],
        [
            _ints("trip", 2**40),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.ones(1, np.float32), "one"),
        ],
    )


def _nested_ifs(depth: int = 30) -> onnx.ModelProto:
    """``depth`` Ifs nested in their then-branches, each branch adding one to x."""
    inner = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["out0"])],
        "leaf",
        [],
        [helper.make_tensor_value_info("out0", TensorProto.FLOAT, [1, 8])],
    )
    for level in range(1, depth + 1):
        other = helper.make_graph(
            [helper.make_node("Sub", ["x", "one"], [f"else{level}"])],
            f"else{level}",
            [],
            [helper.make_tensor_value_info(f"else{level}", TensorProto.FLOAT, [1, 8])],
        )
        node = helper.make_node(
            "If", ["flag"], [f"out{level}"], then_branch=inner, else_branch=other, name=f"if{level}"
        )
        inner = helper.make_graph(
            [node],
            f"level{level}",
            [],
            [helper.make_tensor_value_info(f"out{level}", TensorProto.FLOAT, [1, 8])],
        )
    model = _graph(
        list(inner.node),
        [_x(1, 8)],
        [helper.make_tensor_value_info(f"out{depth}", TensorProto.FLOAT, [1, 8])],
        [
            numpy_helper.from_array(np.array(True), "flag"),
            numpy_helper.from_array(np.ones(1, np.float32), "one"),
        ],
    )
    return model


def _gemm_without_c() -> onnx.ModelProto:
    """Opset 7, where Gemm's C is required, written without it (the probe's low-rank case)."""
    rng = _rng()
    return _graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm")],
        [_x(1, 64)],
        [_y(1, 64)],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")],
        opset=7,
    )


def _unshaped_detector() -> onnx.ModelProto:
    """A conv net whose image input declares a type and no shape at all."""
    rng = _rng()
    model = _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Sigmoid", ["c"], ["y"], name="boxes"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )
    return model


def _zero_size_initializer() -> onnx.ModelProto:
    return _graph(
        [helper.make_node("Concat", ["x", "empty"], ["y"], axis=1, name="concat")],
        [_x(1, 8)],
        [_y(1, 8)],
        [numpy_helper.from_array(np.zeros((1, 0), np.float32), "empty")],
    )


# ------------------------------------------------------------------------------------ data


class _Payload:
    """Unpickling this creates :data:`PICKLE_RAN` (code run from a data file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _data_case(name: str, write: Callable[[Path], None], *commands) -> Case:
    def build(root: Path) -> None:
        _save(root, mlp())
        write(root)

    return Case(name, build, tuple(_cmd(c) for c in commands))


def _npz(**arrays) -> Callable[[Path], None]:
    return lambda root: np.savez(root / DATA, **arrays)


def _calib(kind: str) -> Callable[[Path], None]:
    x = _rng().standard_normal((4, 8)).astype(np.float32)
    if kind == "nan":
        x[1, 2] = np.nan
    elif kind == "inf":
        x[2, 3] = np.inf
    elif kind == "empty":
        x = x[:0]

    def write(root: Path) -> None:
        np.savez(root / DATA, x=x)
        if kind == "truncated":
            data = (root / DATA).read_bytes()
            (root / DATA).write_bytes(data[: len(data) // 2])

    return write


def _pickled(suffix: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        payload = np.empty(shape, dtype=object)
        payload[:] = _Payload(str(root / PICKLE_RAN))
        path = root / (DATA if suffix == ".npz" else NPY)
        with path.open("wb") as handle:
            if suffix == ".npy":
                np.lib.format.write_array(handle, payload, allow_pickle=True)
            else:
                np.savez(handle, x=payload)

    return write


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` gray pixels; the pixel data is one row's
    worth (a decoder that trusts the header allocates it all)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _image_model() -> onnx.ModelProto:
    rng = _rng()
    return _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        [_x(1, 3, 16, 16)],
        [_y(1, 4, 14, 14)],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )


def _image_case(name: str, image: bytes) -> Case:
    def build(root: Path) -> None:
        _save(root, _image_model())
        (root / IMAGES).mkdir(parents=True, exist_ok=True)
        (root / IMAGES / "a.png").write_bytes(image)

    compress = ("{i}" if word == "{d}" else word for word in (*INT8, "--runs", "1"))
    return Case(name, build, (_cmd(compress),))


PICKLE_COMMANDS = (
    (*INT8, "--runs", "1"),
    (*COMPRESS, "--eval", "{d}"),
    ("compare", "{m}", "{m}", "--inputs", "{d}", "--runs", "1"),
)


def _strings() -> onnx.ModelProto:
    """y = x for 4 strings: numpy's object arrays are what such an input's data would be."""
    return _graph(
        [helper.make_node("Identity", ["x"], ["y"], name="identity")],
        [helper.make_tensor_value_info("x", TensorProto.STRING, [4])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [4])],
    )


def _pickle_case(suffix: str, strings: bool) -> Case:
    """Pickled objects shaped as the model's input wants: 4 samples of 8 floats, or the one
    sample of 4 strings of a string input (no dtype mismatch stops it first)."""

    def build(root: Path) -> None:
        _save(root, _strings() if strings else mlp())
        _pickled(suffix, (4,) if strings else (4, 8))(root)

    placeholder = "{d}" if suffix == ".npz" else "{n}"
    commands = tuple(
        _cmd([placeholder if word == "{d}" else word for word in command])
        for command in PICKLE_COMMANDS
    )
    model = "a string" if strings else "a float"
    return Case(f"data: pickled objects in {suffix} for {model} input", build, commands)


# ----------------------------------------------------------------------------- the cases


CASES: tuple[Case, ...] = (
    # external data (must have 1)
    _external_case("external data: absolute location outside", "{outside}"),
    _external_case("external data: location climbing out with ..", "../outside/canary.bin"),
    _symlink_case(),
    _external_case("external data: in an If branch, outside", "../outside/canary.bin", nested=True),
    _external_case("external data: missing file", "missing.bin"),
    _external_case("external data: short file", "w.bin", data=b"\0" * 100),
    _external_case("external data: offset past the end", "w.bin", data=b"\0" * 512, offset=4096),
    _external_case("external data: negative length", "w.bin", data=b"\0" * 512, length=-4),
    _external_case("external data: length not its size", "w.bin", data=b"\0" * 1024, length=1024),
    # broken files
    _model_case("file: empty", lambda: b""),
    _model_case("file: not a protobuf", lambda: b"hello, this is text\n" * 10),
    _model_case("file: truncated protobuf", lambda: mlp().SerializeToString()[:150]),
    _model_case("file: git-LFS pointer", lambda: b"version https://git-lfs.github.com/spec/v1\n"),
    _model_case("file: op type not UTF-8", _not_utf8),
    Case("file: a folder", lambda root: (root / MODEL).mkdir(parents=True), REFUSED),
    Case("file: missing", lambda root: None, REFUSED),
    # structure (must have 2)
    _model_case("graph: a cycle", _mutated(_cycle)),
    _model_case("graph: a value nothing defines", _mutated(_undefined)),
    _model_case("graph: two nodes write one value", _mutated(_duplicate_output)),
    _model_case("graph: no outputs", _mutated(_no_outputs)),
    _model_case("graph: no default opset", _mutated(_no_opset)),
    _model_case(
        "graph: unknown op", _mutated(_op("NoSuchOp")), _cmd(INSPECT, 0, 1), _cmd(COMPRESS)
    ),
    _model_case(
        "graph: custom-domain op",
        _mutated(_op("Relu", "com.example")),
        _cmd(INSPECT, 0, 1),
        _cmd(COMPRESS),
    ),
    _model_case("tensor: data shorter than its dims", _mutated(_short_initializer)),
    _model_case("tensor: dims not matching the data", _mutated(_dims_swapped)),
    _model_case(
        "tensor: zero-size initializer",
        _zero_size_initializer,
        _cmd(INSPECT, 0),
        _cmd(COMPRESS, 0, 1),
    ),
    _model_case(
        "input: a zero batch", _mutated(_batch_zero), _cmd(INSPECT, 0, 1), _cmd(COMPRESS, 0, 1)
    ),
    _model_case("input: a dim of 2**40", _mutated(_input_dim(2**40))),
    _model_case("input: strings", _strings, _cmd(INSPECT, 0), _cmd(COMPRESS, 0, 1)),
    _model_case("weights: NaN", _mutated(_weights(np.nan)), _cmd(INSPECT, 0), _cmd(COMPRESS)),
    _model_case("weights: Inf", _mutated(_weights(np.inf)), _cmd(INSPECT, 0), _cmd(COMPRESS)),
    _model_case(
        "ir_version 3 (initializers among the inputs)",
        _ir3,
        _cmd(INSPECT, 0),
        _cmd(COMPRESS, 0, 1),
        _cmd(SIMPLIFY, 0, 1),
    ),
    _model_case(
        "opset 7 Gemm without C through low-rank",
        _gemm_without_c,
        _cmd(("compress", "{m}", "-o", "{o}", "--low-rank", "macs=0.3", "--runs", "1"), 0, 1),
    ),
    _model_case(
        "input without a shape (compare, bench)",
        _unshaped_detector,
        _cmd(INSPECT, 0),
        _cmd(COMPARE),
        _cmd(BENCH),
    ),
    # sizes and time (must have 3)
    _model_case(
        "ConstantOfShape of 1 GiB", _constant_of_shape, _cmd(INSPECT), _cmd(SIMPLIFY), _cmd(COMPARE)
    ),
    _model_case("Expand to 4 GiB", _expand, _cmd(INSPECT), _cmd(SIMPLIFY), _cmd(COMPARE)),
    _model_case("Tile to 2 GiB", _tile, _cmd(INSPECT), _cmd(SIMPLIFY), _cmd(COMPARE)),
    _model_case("Reshape to 2**40 elements", _reshape, _cmd(INSPECT), _cmd(COMPARE)),
    _model_case(
        "Expand to a size computed at run time (8 TB)",
        _expand_at_run_time,
        _cmd(INSPECT, 0),
        _cmd(COMPARE),
        _cmd(COMPRESS),
    ),
    Case(
        "Loop of 2**40 trips",
        lambda root: _save(root, endless_loop()),
        (_cmd(COMPRESS), _cmd(COMPARE)),
        run_timeout=2,
    ),
    _model_case("30 nested Ifs through the simplifier", _nested_ifs, _cmd(SIMPLIFY, 0, 1)),
    # data files (must have 5)
    *(
        _data_case(f"calibration: {what}", _calib(kind), INT8)
        for what, kind in (
            ("NaN", "nan"),
            ("Inf", "inf"),
            ("no samples", "empty"),
            ("truncated .npz", "truncated"),
        )
    ),
    _pickle_case(".npz", strings=False),
    _pickle_case(".npy", strings=False),
    _pickle_case(".npz", strings=True),
    _pickle_case(".npy", strings=True),
    _image_case("images: a decompression bomb (2**32 pixels)", _png(65536, 65536)),
    _image_case("images: 100 M pixels (above our limit, below Pillow's)", _png(10000, 10000)),
    _image_case("images: not an image", b"GIF89a but not really"),
    # output (must have 4)
    Case(
        "output: the input itself",
        lambda root: _save(root, mlp()),
        (_cmd(("compress", "{m}", "-o", "{m}", "--prune-weights", "0.5", "--no-simplify")),),
    ),
    Case(
        "output: folder missing",
        lambda root: _save(root, mlp()),
        (
            _cmd(
                (
                    "compress",
                    "{m}",
                    "-o",
                    "{o}/../missing/out.onnx",
                    "--prune-weights",
                    "0.5",
                    "--no-simplify",
                )
            ),
        ),
    ),
    # a valid model for contrast: every command works
    _model_case(
        "valid: the plain model",
        mlp,
        _cmd(INSPECT, 0),
        _cmd(COMPRESS, 0),
        _cmd((*COMPRESS, "--external-data"), 0),
    ),
    Case(
        "valid: external data inside the folder",
        _inside_external,
        (_cmd(INSPECT, 0), _cmd(SIMPLIFY, 0), _cmd((*COMPRESS, "--external-data"), 0)),
    ),
)


def build(case: Case, root: Path) -> None:
    """Write the case's files under ``root`` (``model/``, ``outside/``, and empty ``out/`` and
    ``work/``, the working folder)."""
    for folder in ("model", "out", "outside", "work"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / OUTSIDE).write_bytes(CANARY)
    case.build(root)
