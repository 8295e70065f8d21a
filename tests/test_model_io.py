"""Loading and saving: bad files give clear errors, saves are atomic, external data round-trips."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnx_squeeze import model_io, runtime, scratch
from onnx_squeeze.errors import InputError, SettingsError


def matmul_model(rows: int = 16, cols: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[N,rows] @ W[rows,cols] with a symbolic batch dim."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.create_session(model, optimization="none").run(None, {"x": x})[0]


def test_load_from_path_proto_and_ir(tmp_path):
    proto = matmul_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    from_path = model_io.load(path)
    from_proto = model_io.load(proto)
    assert model_io.load(from_proto) is from_proto
    x = np.ones((2, 16), np.float32)
    np.testing.assert_array_equal(run(from_path, x), run(from_proto, x))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n",
            "git-LFS pointer",
        ),
        (b"\xff\xfe this is not a protobuf at all \x00\x01", "not a valid ONNX protobuf"),
    ],
)
def test_bad_files_are_named_with_a_fix(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        model_io.load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_protobuf(tmp_path):
    data = matmul_model(64, 64).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid ONNX protobuf"):
        model_io.load(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="is a folder"):
        model_io.load(tmp_path)


def test_empty_graph_is_refused():
    graph = helper.make_graph([], "g", [], [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="no nodes"):
        model_io.load(proto)


def test_custom_domain_is_named():
    proto = matmul_model()
    proto.graph.node.append(
        helper.make_node("Frobnicate", ["y"], ["z"], name="frob", domain="com.acme")
    )
    proto.opset_import.append(helper.make_opsetid("com.acme", 1))
    with pytest.raises(InputError, match=r"'frob'.*com\.acme"):
        model_io.check_runnable(model_io.load(proto))


def test_save_inline_round_trip_and_no_leftovers(tmp_path):
    model = model_io.load(matmul_model())
    target = model_io.save(model, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(model_io.load(target), x), run(model, x))


def test_save_external_data_round_trip(tmp_path):
    model = model_io.load(matmul_model(256, 256))
    target = model_io.save(model, tmp_path / "ext.onnx", external_data=True)
    names = sorted(os.listdir(tmp_path))
    assert (
        len(names) == 2
        and names[0] == "ext.onnx"
        and re.fullmatch(r"ext\.onnx\.\w{8}\.data", names[1])
    )
    assert os.path.getsize(tmp_path / "ext.onnx") < 10_000
    assert model_io.file_size(target) > 256 * 256 * 4
    loaded = model_io.load(target)
    x = np.ones((1, 256), np.float32)
    np.testing.assert_array_equal(run(loaded, x), run(model, x))
    # A model with external weights saved inline elsewhere carries its weights along.
    other = tmp_path / "sub"
    other.mkdir()
    inline = model_io.save(loaded, other / "inline.onnx", external_data=False)
    assert os.listdir(other) == ["inline.onnx"]
    np.testing.assert_array_equal(run(model_io.load(inline), x), run(model, x))


def test_refuses_to_overwrite_input_unless_forced(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(), path)
    before = path.read_bytes()
    model = model_io.load(path)
    with pytest.raises(SettingsError, match="refusing to overwrite the input"):
        model_io.save(model, path, input_path=path)
    assert path.read_bytes() == before
    model_io.save(model, path, input_path=path, force=True)
    assert onnx.load(path).graph.node[0].op_type == "MatMul"


def test_failed_save_leaves_existing_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def broken_save(*args, **kwargs):
        with open(args[1], "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", broken_save)
    with pytest.raises(SettingsError, match=r"out\.onnx: cannot be written \(disk full\); nothing"):
        model_io.save(model_io.load(matmul_model()), target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_missing_output_folder(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        model_io.save(model_io.load(matmul_model()), tmp_path / "no" / "out.onnx")


@pytest.mark.slow
def test_model_over_2gb_round_trips_with_external_data(tmp_path):
    """Weights of 2.18 GB: saved with external data automatically, loaded memory-mapped, run."""
    rows, cols = 16, 34_000_000  # 16 * 34e6 * 4 bytes = 2.18 GB > 2 GiB
    weight = np.zeros((rows, cols), np.float32)
    weight[:, :4] = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["N", rows]))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["N", 4]))
    matmul = ir.node("MatMul", [x, w], name="mm")
    starts = ir.Value(name="starts", const_value=ir.tensor(np.array([0], np.int64), name="starts"))
    ends = ir.Value(name="ends", const_value=ir.tensor(np.array([4], np.int64), name="ends"))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([1], np.int64), name="axes"))
    sliced = ir.Node(
        "", "Slice", [matmul.outputs[0], starts, ends, axes], outputs=[y], name="slice"
    )
    graph = ir.Graph(
        [x],
        [y],
        nodes=[matmul, sliced],
        initializers=[w, starts, ends, axes],
        opset_imports={"": 17},
    )
    model = ir.Model(graph, ir_version=9)
    target = model_io.save(model, tmp_path / "big.onnx")
    del model, weight
    assert model_io.file_size(target) > 2**31
    loaded = model_io.load(target)
    assert model_io.initializer_bytes(loaded) > 2**31
    out = runtime.create_session(loaded).run(None, {"x": np.ones((1, rows), np.float32)})[0]
    np.testing.assert_allclose(
        out[0], np.arange(rows * 4, dtype=np.float32).reshape(rows, 4).sum(0)
    )


def _data_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".data"))


def test_model_and_data_commit_as_one_unit(tmp_path, monkeypatch):
    """A kill between writing the data and committing the model leaves the old pair working;
    a completed save replaces the old pair and removes the old data."""
    small, large = model_io.load(matmul_model(16, 16)), model_io.load(matmul_model(16, 16))
    large.graph.initializers["w"].const_value = ir.tensor(
        np.full((16, 16), 2, np.float32), name="w"
    )
    target = model_io.save(small, tmp_path / "m.onnx", external_data=True)
    first = _data_files(tmp_path)
    x = np.ones((1, 16), np.float32)
    expected = run(small, x)
    real_replace = os.replace

    def killed_at_commit(source, destination):
        if Path(destination) == target:
            raise KeyboardInterrupt  # the process dies after the data, before the model
        real_replace(source, destination)

    monkeypatch.setattr(model_io.os, "replace", killed_at_commit)
    with pytest.raises(KeyboardInterrupt):
        model_io.save(large, target, external_data=True)
    monkeypatch.setattr(model_io.os, "replace", real_replace)
    np.testing.assert_array_equal(run(model_io.load(target), x), expected)  # old pair intact
    assert first[0] in _data_files(tmp_path)
    model_io.save(large, target, external_data=True)
    np.testing.assert_array_equal(run(model_io.load(target), x), run(large, x))
    assert first[0] not in _data_files(tmp_path)  # the replaced pair's data is gone


def test_two_saves_to_one_path_never_mix_their_data(tmp_path):
    a, b = model_io.load(matmul_model(16, 16)), model_io.load(matmul_model(16, 16))
    b.graph.initializers["w"].const_value = ir.tensor(np.full((16, 16), 3, np.float32), name="w")
    target = tmp_path / "m.onnx"
    model_io.save(a, target, external_data=True)
    model_io.save(b, target, external_data=True)
    x = np.ones((1, 16), np.float32)
    np.testing.assert_array_equal(run(model_io.load(target), x), run(b, x))
    assert len(_data_files(tmp_path)) == 1


def test_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_io.scratch, "staging", refused)  # a read-only folder
    with pytest.raises(SettingsError, match=r"o\.onnx: cannot be written \(Permission denied\)"):
        model_io.save(model_io.load(matmul_model()), tmp_path / "o.onnx")
    assert os.listdir(tmp_path) == []


def test_folders_of_killed_runs_are_swept_and_live_ones_kept(tmp_path):
    """A SIGKILLed run cannot remove its temporary folders: the next run does."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = int(dead.stdout)
    (tmp_path / f"onnx-squeeze.pid{gone}.sim.abc").mkdir()
    (tmp_path / f".o.onnx.onnx-squeeze.pid{gone}.xyz").mkdir()
    mine = tmp_path / f"onnx-squeeze.pid{os.getpid()}.sim.def"
    mine.mkdir()
    users = tmp_path / "onnx-squeeze-2024-results"
    users.mkdir()
    scratch.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, users.name])
