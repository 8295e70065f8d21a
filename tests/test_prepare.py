"""Tests of onnx_squeeze.prepare: BN folding, onnxsim isolation, signature, constants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnx_squeeze import prepare as prepare_module
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.records import BN_SCALE_KEY, bn_scale
from onnx_squeeze.runtime import create_session, input_specs, random_feed

try:  # zoo.py is written in parallel; the zoo tests skip until it exists
    from onnx_squeeze import zoo
except ImportError:  # pragma: no cover - depends on the tree
    zoo = None

FLOAT = onnx.TensorProto.FLOAT
NO_SIM = PrepareSettings(simplify=False)
OPSET = 17


# ------------------------------------------------------------------------------------------
# helpers


def _bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> list:
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    return [
        numpy_helper.from_array(gamma.astype(np.float32), f"{prefix}.gamma"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}.beta"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}.mean"),
        numpy_helper.from_array(
            rng.uniform(0.2, 2.0, channels).astype(np.float32), f"{prefix}.var"
        ),
    ]


def _bn_node(x: str, y: str, prefix: str = "bn", epsilon: float = 1e-3) -> onnx.NodeProto:
    inputs = [x, f"{prefix}.gamma", f"{prefix}.beta", f"{prefix}.mean", f"{prefix}.var"]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=epsilon)


def _model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _same_shape_model(nodes, shape: list, initializers) -> onnx.ModelProto:
    """A model from ``nodes`` whose input ``x`` and output ``y`` have the same float shape."""
    x, y = (helper.make_tensor_value_info(name, FLOAT, shape) for name in "xy")
    return _model(nodes, [x], [y], initializers)


def _run(model: ir.Model | onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return create_session(model, "cpu", optimization="none").run(None, feed)


def _feed(model: ir.Model, seed: int = 1, batch: int = 2) -> dict[str, np.ndarray]:
    specs = input_specs(model)
    overrides = {
        s.name: [batch if not isinstance(d, int) else d for d in s.shape]
        for s in specs
        if s.shape and not isinstance(s.shape[0], int)
    }
    return random_feed(specs, np.random.default_rng(seed), overrides)


def _prepare_and_compare(
    proto: onnx.ModelProto, settings: PrepareSettings = NO_SIM, rtol=1e-4, atol=1e-5
):
    original = ir.from_proto(proto)
    feed = _feed(original)
    expected = _run(proto, feed)
    prepared, report = prepare(ir.from_proto(proto), settings)
    onnx.checker.check_model(ir.to_proto(prepared), full_check=True)
    actual = _run(prepared, feed)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    return prepared, report


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _expected_scale(initializers, prefix="bn", epsilon=1e-3) -> np.ndarray:
    arrays = {t.name: numpy_helper.to_array(t) for t in initializers}
    gamma = arrays[f"{prefix}.gamma"].astype(np.float64)
    var = arrays[f"{prefix}.var"].astype(np.float64)
    return np.abs(gamma) / np.sqrt(var + epsilon)


def _conv_bn(
    rank: int = 2, bias: bool = True, group: int = 1, channels_in: int = 4, channels: int = 6
):
    rng = np.random.default_rng(0)
    kernel = [3] * rank
    weight = rng.standard_normal([channels, channels_in // group, *kernel]).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "conv.weight")]
    conv_inputs = ["x", "conv.weight"]
    if bias:
        initializers.append(
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "conv.bias")
        )
        conv_inputs.append("conv.bias")
    initializers += _bn_params(rng, channels)
    nodes = [
        helper.make_node(
            "Conv", conv_inputs, ["c"], name="conv", group=group, pads=[1] * (2 * rank)
        ),
        _bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    spatial = [7] * rank
    x = helper.make_tensor_value_info("x", FLOAT, ["N", channels_in, *spatial])
    y = helper.make_tensor_value_info("y", FLOAT, ["N", channels, *spatial])
    return _model(nodes, [x], [y], initializers), initializers


# ------------------------------------------------------------------------------------------
# BatchNormalization folding


@pytest.mark.parametrize(
    ("rank", "bias", "group", "channels_in", "channels"),
    [
        (2, True, 1, 4, 6),
        (2, False, 1, 4, 6),
        (2, True, 6, 6, 6),  # depthwise
        (2, False, 2, 4, 6),  # grouped
        (1, True, 1, 3, 5),  # Conv1d
        (3, False, 1, 2, 3),  # Conv3d
    ],
)
def test_conv_bn_is_folded(rank, bias, group, channels_in, channels):
    proto, initializers = _conv_bn(rank, bias, group, channels_in, channels)
    prepared, report = _prepare_and_compare(proto)

    assert _ops(prepared) == ["Conv", "Relu"]
    assert [(r.node, r.op_type, r.action) for r in report.records] == [("conv", "Conv", "folded")]
    assert report.records[0].detail == "BatchNormalization 'bn' folded"
    conv = prepared.graph.node(0)
    np.testing.assert_allclose(bn_scale(conv), _expected_scale(initializers), rtol=1e-6)
    assert len(json.loads(conv.metadata_props[BN_SCALE_KEY])) == channels
    assert conv.inputs[1].name == "conv.weight"  # updated in place: only this Conv uses it
    assert conv.inputs[2] is not None and conv.inputs[2].shape == ir.Shape([channels])
    assert conv.inputs[2].name == ("conv.bias" if bias else "conv.bias_folded")
    assert "bn.gamma" not in prepared.graph.initializers  # BN parameters removed


def test_bn_scale_survives_serialization():
    proto, initializers = _conv_bn()
    prepared, _ = prepare(ir.from_proto(proto), NO_SIM)
    reloaded = ir.from_proto(onnx.load_from_string(ir.to_proto(prepared).SerializeToString()))
    np.testing.assert_allclose(
        bn_scale(reloaded.graph.node(0)), _expected_scale(initializers), rtol=1e-6
    )


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), ()])
def test_gemm_bn_is_folded(trans_b, c_shape):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "fc.weight"), *_bn_params(rng, 5)]
    inputs = ["x", "fc.weight"]
    if c_shape is not None:
        c = rng.standard_normal(c_shape).astype(np.float32)
        initializers.append(numpy_helper.from_array(np.asarray(c), "fc.bias"))
        inputs.append("fc.bias")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=0.7, beta=1.3),
        _bn_node("g", "y"),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 5])],
        initializers,
    )
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["Gemm"]
    assert [r.action for r in report.records] == ["folded"]
    gemm = prepared.graph.node(0)
    assert gemm.attributes["beta"].value == 1.0
    # The BN output was a graph output: the name stays.
    assert gemm.outputs[0].name == "y"
    assert [v.name for v in prepared.graph.outputs] == ["y"]
    np.testing.assert_allclose(bn_scale(gemm), _expected_scale(initializers), rtol=1e-6)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_is_folded(group):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "up.weight"), *_bn_params(rng, 6)]
    nodes = [
        helper.make_node(
            "ConvTranspose", ["x", "up.weight"], ["u"], name="up", group=group, strides=[2, 2]
        ),
        _bn_node("u", "y"),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 6, 11, 11])],
        initializers,
    )
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["ConvTranspose"]
    assert [r.action for r in report.records] == ["folded"]


def test_bn_not_folded_when_conv_output_feeds_another_node():
    proto, _ = _conv_bn()
    graph = proto.graph
    graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side_relu"))
    graph.output.append(helper.make_tensor_value_info("side", FLOAT, ["N", 6, 7, 7]))
    prepared, report = _prepare_and_compare(proto)

    assert "BatchNormalization" in _ops(prepared)
    assert [(r.node, r.action) for r in report.records] == [("bn", "skipped")]
    assert "also used elsewhere" in report.records[0].detail
    assert BN_SCALE_KEY not in prepared.graph.node(0).metadata_props


def test_shared_weight_is_copied_and_both_fold():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(weight, "shared.weight"),
        *_bn_params(rng, 4, "bn_a"),
        *_bn_params(rng, 4, "bn_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "shared.weight"], ["a"], name="conv_a", pads=[1] * 4),
        _bn_node("a", "a_bn", "bn_a"),
        helper.make_node("Conv", ["a_bn", "shared.weight"], ["b"], name="conv_b", pads=[1] * 4),
        _bn_node("b", "y", "bn_b"),
    ]
    proto = _same_shape_model(nodes, ["N", 4, 6, 6], initializers)
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["Conv", "Conv"]
    assert [(r.node, r.action) for r in report.records] == [
        ("conv_a", "folded"),
        ("conv_b", "folded"),
    ]
    weights = [node.inputs[1] for node in prepared.graph]
    assert weights[0] is not weights[1]
    assert weights[0].name == "conv_a.weight_folded"
    assert weights[1].name == "shared.weight"  # the last user gets the original, in place
    np.testing.assert_allclose(
        bn_scale(prepared.graph.node(1)), _expected_scale(initializers, "bn_b"), rtol=1e-6
    )


def test_bn_after_add_or_graph_input_is_skipped():
    rng = np.random.default_rng(6)
    initializers = [*_bn_params(rng, 3, "bn_in"), *_bn_params(rng, 3, "bn_add")]
    nodes = [
        _bn_node("x", "n", "bn_in"),
        helper.make_node("Add", ["n", "x"], ["s"], name="add"),
        _bn_node("s", "y", "bn_add"),
    ]
    proto = _same_shape_model(nodes, ["N", 3, 4, 4], initializers)
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["BatchNormalization", "Add", "BatchNormalization"]
    reasons = {r.node: r.detail for r in report.records if r.skipped}
    assert "graph input" in reasons["bn_in"]
    assert "Add" in reasons["bn_add"]


def test_bn_with_non_constant_conv_weight_is_skipped():
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn_node("c", "y")]
    proto = _model(
        nodes,
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", 2, 4, 4]),
            helper.make_tensor_value_info("w", FLOAT, [3, 2, 1, 1]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3, 4, 4])],
        _bn_params(rng, 3),
    )
    prepared, report = _prepare_and_compare(proto)
    assert "BatchNormalization" in _ops(prepared)
    assert "not a constant initializer" in report.skipped[0].detail


def test_training_mode_bn_is_skipped():
    proto, _ = _conv_bn()
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    prepared, report = prepare(ir.from_proto(proto), NO_SIM)
    assert "BatchNormalization" in _ops(prepared)
    assert "training mode" in report.skipped[0].detail


def test_fold_batchnorm_can_be_turned_off():
    proto, _ = _conv_bn()
    prepared, report = _prepare_and_compare(proto, PrepareSettings(fold_batchnorm=False))
    assert "BatchNormalization" in _ops(prepared)  # onnxsim does not fuse it either
    assert report.records == []


def test_only_main_graph_is_folded_and_subgraphs_survive():
    proto, _ = _conv_bn(channels_in=3, channels=3)
    rng = np.random.default_rng(8)
    branch_init = [
        numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "bw"),
        *_bn_params(rng, 3, "bn_branch"),
    ]
    then_graph = helper.make_graph(
        [
            helper.make_node("Conv", ["y", "bw"], ["tc"], name="branch_conv"),
            _bn_node("tc", "t_out", "bn_branch"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", FLOAT, ["N", 3, 7, 7])],
        branch_init,
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", FLOAT, ["N", 3, 7, 7])],
    )
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []))
    graph.node.append(
        helper.make_node(
            "If", ["flag"], ["z"], name="if", then_branch=then_graph, else_branch=else_graph
        )
    )
    graph.output.append(helper.make_tensor_value_info("z", FLOAT, ["N", 3, 7, 7]))
    onnx.checker.check_model(proto, full_check=True)

    original = ir.from_proto(proto)
    prepared, report = prepare(ir.from_proto(proto), NO_SIM)
    onnx.checker.check_model(ir.to_proto(prepared), full_check=True)
    assert _ops(prepared) == ["Conv", "Relu", "If"]
    assert [r.node for r in report.changed] == ["conv"]
    branch = prepared.graph.node(2).attributes["then_branch"].as_graph()
    assert [n.op_type for n in branch] == ["Conv", "BatchNormalization"]
    for flag in (True, False):
        feed = {**_feed(original), "flag": np.array(flag)}
        for a, e in zip(_run(prepared, feed), _run(proto, feed), strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_no_op_model_is_left_alone():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
        [],
    )
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["Relu"]
    assert report.records == [] and report.notes == []
    assert report.name == "prepare"


# ------------------------------------------------------------------------------------------
# Constants, shape inference, settings


def test_constants_are_folded_without_onnxsim():
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((5, 4)).astype(np.float32)
    quantized = rng.integers(-8, 8, (5, 5)).astype(np.int8)
    nodes = [
        helper.make_node(
            "Constant", [], ["w_t"], value=numpy_helper.from_array(weight, "w_t_value")
        ),
        helper.make_node("Transpose", ["w_t"], ["w"], name="transpose"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["dq"], name="dq"),
        helper.make_node("MatMul", ["h", "dq"], ["y"], name="matmul2"),
    ]
    initializers = [
        numpy_helper.from_array(quantized, "q"),
        numpy_helper.from_array(np.array(0.05, np.float32), "q_scale"),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 5])],
        initializers,
    )
    prepared, report = _prepare_and_compare(proto)
    assert _ops(prepared) == ["MatMul", "DequantizeLinear", "MatMul"]  # DQ is not baked in
    assert prepared.graph.initializers["w"].shape == ir.Shape([4, 5])
    assert any("constant folding: 1 node" in note for note in report.notes)


def test_shape_inference_failure_is_noted():
    nodes = [helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes,
        "bad",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", 3]),
            helper.make_tensor_value_info("z", onnx.TensorProto.INT64, ["N", 3]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    _, report = prepare(ir.from_proto(proto), NO_SIM)
    assert any(note.startswith("shape inference failed") for note in report.notes)


def test_shape_inference_fills_intermediate_shapes():
    proto, _ = _conv_bn()
    prepared, _ = prepare(
        ir.from_proto(proto), PrepareSettings(simplify=False, fold_batchnorm=False)
    )
    conv_out = prepared.graph.node(0).outputs[0]
    assert conv_out.shape is not None and list(conv_out.shape)[1:] == [6, 7, 7]


@pytest.mark.parametrize(
    "settings",
    [{"simplify_timeout": 0}, {"simplify_timeout": -1.0}, {"simplify_max_bytes": 0}],
)
def test_bad_settings_are_rejected(settings):
    with pytest.raises(SettingsError):
        PrepareSettings(**settings)


# ------------------------------------------------------------------------------------------
# onnxsim in a child process


def _dynamic_model() -> onnx.ModelProto:
    """Conv+BN followed by a flatten that depends on the dynamic batch (Shape/Gather/Concat)."""
    proto, _ = _conv_bn()
    graph = proto.graph
    graph.output.pop()
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", ["y"], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
            helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
            helper.make_node("Identity", ["y"], ["y_id"], name="identity"),
            helper.make_node("Reshape", ["y_id", "flat_shape"], ["flat"], name="flatten"),
        ]
    )
    graph.output.append(helper.make_tensor_value_info("flat", FLOAT, ["N", "features"]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_onnxsim_keeps_dynamic_batch_and_bn_scale():
    proto = _dynamic_model()
    original = ir.from_proto(proto)
    prepared, report = _prepare_and_compare(proto, PrepareSettings())
    assert prepared is not original
    assert any(note.startswith("onnxsim:") for note in report.notes), report.notes
    assert not any("skipped" in note for note in report.notes)
    assert "Identity" not in _ops(prepared) and "BatchNormalization" not in _ops(prepared)
    assert [(r.node, r.action) for r in report.records] == [("conv", "folded")]
    conv = next(n for n in prepared.graph if n.op_type == "Conv")
    assert bn_scale(conv) is not None
    # Signature: names, types and declared shapes (with symbolic names) unchanged.
    assert [(v.name, v.dtype, v.shape) for v in prepared.graph.inputs] == [
        (v.name, v.dtype, v.shape) for v in original.graph.inputs
    ]
    assert [(v.name, v.dtype, v.shape) for v in prepared.graph.outputs] == [
        (v.name, v.dtype, v.shape) for v in original.graph.outputs
    ]
    assert prepared.graph.inputs[0].shape[0] == ir.SymbolicDim("N")
    # Still dynamic: another batch size runs and agrees.
    feed = _feed(original, batch=5)
    for a, e in zip(_run(prepared, feed), _run(proto, feed), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def _check_fallback(report, expected_note: str, proto: onnx.ModelProto, prepared: ir.Model):
    assert any(note.startswith(expected_note) for note in report.notes), report.notes
    # BN folding and cleanup still ran on the unsimplified model.
    assert "BatchNormalization" not in _ops(prepared)
    assert "Identity" in _ops(prepared)
    onnx.checker.check_model(ir.to_proto(prepared), full_check=True)
    feed = _feed(ir.from_proto(proto))
    for a, e in zip(_run(prepared, feed), _run(proto, feed), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("needs_init", [False, True])
def test_the_onnxsim_child_imports_the_simplifier_alone_else_the_package(tmp_path, needs_init):
    """The child skips onnxsim's __init__ (0.8's imports PyTorch and its quantizers), and where
    the simplifier module needs what __init__ defines, imports the package after all."""
    package = tmp_path / "site" / "onnxsim"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import sys\nsys.stderr.write('INIT RAN\\n')\nFROM_INIT = 1\n"
        "from onnxsim.onnx_simplifier import simplify\n"
    )
    (package / "onnx_simplifier.py").write_text(
        ("from onnxsim import FROM_INIT\n" if needs_init else "") + "import shutil\n"
        "def simplify(source, output_path, **options):\n"
        "    shutil.copyfile(source, output_path)\n"
        "    return None, True\n"
    )
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    source.write_bytes(b"model")
    finished = subprocess.run(
        [*prepare_module._SIMPLIFY_COMMAND, str(source), str(target), "{}"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert target.read_bytes() == b"model"
    assert ("INIT RAN" in finished.stderr) is needs_init


@pytest.mark.parametrize(
    ("script", "note"),
    [
        ("import os; os.abort()", "onnxsim skipped: crashed (SIGABRT)"),
        ("raise SystemExit('boom')", "onnxsim skipped: failed (exit code 1): boom"),
        ("pass", "onnxsim skipped: it exited without writing a model"),
        (
            "import sys; open(sys.argv[2], 'wb').write(b'not a model')",
            "onnxsim skipped: its result cannot be read",
        ),
    ],
)
def test_onnxsim_failure_keeps_the_model(monkeypatch, script, note):
    monkeypatch.setattr(prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", script])
    proto = _dynamic_model()
    original = ir.from_proto(proto)
    prepared, report = prepare(original, PrepareSettings())
    assert prepared is original
    _check_fallback(report, note, proto, prepared)


def test_onnxsim_hang_times_out(monkeypatch):
    monkeypatch.setattr(
        prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    proto = _dynamic_model()
    prepared, report = prepare(ir.from_proto(proto), PrepareSettings(simplify_timeout=0.5))
    _check_fallback(report, "onnxsim skipped: timed out after 0.5 s", proto, prepared)
    assert report.seconds < 30


_LIMITS_SCRIPT = """
import ctypes, resource, sys
death = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(death))  # PR_GET_PDEATHSIG
raise SystemExit(f"limit {resource.getrlimit(resource.RLIMIT_AS)[0]} death {death.value}")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="prctl and RLIMIT_AS are Linux's")
def test_onnxsim_child_is_bounded_and_dies_with_the_tool(monkeypatch):
    """Runaway folding stops at an address-space limit (30 nested Ifs took it to 6.3 GB), and
    the kernel kills the child when the tool dies (a SIGKILLed tool left it running)."""
    monkeypatch.setattr(prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", _LIMITS_SCRIPT])
    proto = _dynamic_model()
    _, report = prepare(ir.from_proto(proto), PrepareSettings())
    note = next(n for n in report.notes if n.startswith("onnxsim skipped"))
    assert f"limit {4 << 30} death {int(signal.SIGKILL)}" in note


def test_real_onnxsim_with_tiny_timeout():
    proto = _dynamic_model()
    prepared, report = prepare(ir.from_proto(proto), PrepareSettings(simplify_timeout=0.01))
    _check_fallback(report, "onnxsim skipped: timed out after 0.01 s", proto, prepared)


def test_model_above_size_limit_is_not_simplified():
    proto = _dynamic_model()
    prepared, report = prepare(ir.from_proto(proto), PrepareSettings(simplify_max_bytes=100))
    _check_fallback(report, "onnxsim skipped: the model has", proto, prepared)


_FIX_BATCH_SCRIPT = """\
import sys, onnx
model = onnx.load(sys.argv[1])
model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
onnx.save(model, sys.argv[2])
"""

_RENAME_DIM_SCRIPT = """\
import sys, onnx
model = onnx.load(sys.argv[1])
model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch_size"
model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch_size"
onnx.save(model, sys.argv[2])
"""


def test_onnxsim_result_that_fixes_the_batch_is_rejected(monkeypatch):
    monkeypatch.setattr(
        prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", _FIX_BATCH_SCRIPT]
    )
    proto = _dynamic_model()
    original = ir.from_proto(proto)
    prepared, report = prepare(original, PrepareSettings())
    assert prepared is original
    _check_fallback(report, "onnxsim skipped: its result was rejected", proto, prepared)
    assert "input 'x'" in report.notes[-1] or any("input 'x'" in n for n in report.notes)


_CONTRIB_OP_SCRIPT = """\
import sys, onnx
model = onnx.load(sys.argv[1])
relu = next(n for n in model.graph.node if n.op_type == "Relu")
relu.op_type, relu.domain = "FastGelu", "com.microsoft"
model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
onnx.save(model, sys.argv[2])
"""


def test_onnxsim_result_with_contrib_ops_is_rejected(monkeypatch):
    monkeypatch.setattr(
        prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", _CONTRIB_OP_SCRIPT]
    )
    proto = _dynamic_model()
    prepared, report = prepare(ir.from_proto(proto), PrepareSettings())
    _check_fallback(report, "onnxsim skipped: its result was rejected", proto, prepared)
    assert any("com.microsoft" in note for note in report.notes)


def test_renamed_symbolic_dims_are_restored(monkeypatch):
    monkeypatch.setattr(
        prepare_module, "_SIMPLIFY_COMMAND", [sys.executable, "-c", _RENAME_DIM_SCRIPT]
    )
    proto = _dynamic_model()
    prepared, report = prepare(ir.from_proto(proto), PrepareSettings())
    assert prepared.graph.inputs[0].shape[0] == ir.SymbolicDim("N")
    assert prepared.graph.outputs[0].shape[0] == ir.SymbolicDim("N")
    assert any("kept the declared shapes" in note for note in report.notes)


# ------------------------------------------------------------------------------------------
# zoo models


def _zoo_names() -> tuple[str, ...]:
    return tuple(getattr(zoo, "NAMES", ())) if zoo is not None else ()


@pytest.mark.skipif(not _zoo_names(), reason="onnx_squeeze.zoo is not available yet")
@pytest.mark.parametrize("name", _zoo_names() or ("none",))
def test_zoo_model_prepares_losslessly(name):
    original = zoo.small(name)
    proto = ir.to_proto(original)
    feed = _feed(original, seed=2)
    expected = _run(proto, feed)

    prepared, report = prepare(ir.from_proto(proto))
    onnx.checker.check_model(ir.to_proto(prepared), full_check=True)
    actual = _run(prepared, feed)
    for a, e in zip(actual, expected, strict=True):
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4 * scale)

    assert [v.name for v in prepared.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in prepared.graph.outputs] == [v.name for v in original.graph.outputs]
    assert [v.shape for v in prepared.graph.inputs] == [v.shape for v in original.graph.inputs]
    # onnxsim's runtime-specific fusions (com.microsoft Attention, ...) stay off.
    assert {n.domain for n in prepared.graph} <= {n.domain for n in original.graph}
    skipped = {r.node for r in report.skipped}
    for node in prepared.graph:
        if node.op_type != "BatchNormalization":
            continue
        producer = node.inputs[0].producer()
        if any(key in name.lower() for key in ("resnet", "mobilenet", "depthwise")):
            assert producer is None or producer.op_type != "Conv", f"{node.name} after a Conv"
        assert node.name in skipped, f"{node.name} left without a reason"
