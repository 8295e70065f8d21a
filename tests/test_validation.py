"""Malformed models are refused up front with one line naming the node or tensor (exit 1),
never an internal error from deep inside cloning, a pass or onnxruntime (issue 23)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_squeeze import model_io

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
W = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")


def _model(nodes, initializers=(), inputs=(X,), ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", list(inputs), [Y], list(initializers))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version
    )


def _short_weight() -> TensorProto:
    tensor = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    tensor.dims[:] = [8, 4]  # 16 values for 32 places
    return tensor


def _nan_weight() -> TensorProto:
    weight = np.eye(4, dtype=np.float32)
    weight[1, 2] = np.nan
    return numpy_helper.from_array(weight, "w")


CASES = {
    "cycle": (
        _model(
            [
                helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                helper.make_node("Relu", ["a"], ["b"], name="relu"),
                helper.make_node("Identity", ["a"], ["y"], name="out"),
            ]
        ),
        "is on a cycle",
    ),
    "undefined value": (
        _model([helper.make_node("Add", ["x", "nope"], ["y"], name="add")]),
        "node 'add' reads 'nope', which no node, input or initializer defines",
    ),
    "data shorter than dims": (
        _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_short_weight()]),
        "initializer 'w': its data does not fill its declared shape 8×4",
    ),
    "input of 2**40 elements": (
        _model(
            [helper.make_node("Relu", ["x"], ["y"], name="relu")],
            inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2**20, 2**20])],
        ),
        "more than this machine's memory",
    ),
    "NaN weight": (
        _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_nan_weight()]),
        "node 'mm': its weight holds NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_model_is_exit_1_one_line_nothing_written(case, tmp_path):
    proto, message = CASES[case]
    source = tmp_path / "m.onnx"
    source.write_bytes(proto.SerializeToString())
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "onnx_squeeze", "compress", str(source)]
    done = subprocess.run(
        [*command, "-o", str(out / "o.onnx"), "--prune-weights", "0.5", "--runs", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    # one error line, the last (progress lines such as "prepare, then ..." may come before)
    errors = [line for line in done.stderr.splitlines() if line.startswith("onnx-squeeze:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in done.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert list(out.iterdir()) == []


def test_ir_version_3_is_upgraded_and_the_result_passes_the_checker(tmp_path):
    """IR 3 wants initializers among the inputs; this export does not list them. Loading
    lifts it to IR 4, where that is valid, so passes that add initializers stay valid."""
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [W], ir_version=3)
    source = tmp_path / "m.onnx"
    source.write_bytes(proto.SerializeToString())
    model = model_io.load(source)
    assert model.ir_version == 4
    saved = model_io.save(model, tmp_path / "o.onnx")
    onnx.checker.check_model(onnx.load(saved), full_check=True)


def test_a_pass_that_does_not_reach_subgraph_layers_warns(tmp_path):
    """A stateful model's whole body may sit in an If branch: a pass that leaves it alone says
    so as a warning, not a quiet 'nothing to quantize'."""
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["b"], name="mm")],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
    )
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["flag"]),  # known only at run time
            helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [X],
        [Y],
        [zero, W],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = tmp_path / "m.onnx"
    source.write_bytes(proto.SerializeToString())
    import onnx_squeeze as sq

    recipe = sq.Recipe.from_cli(["prune_channels:ratio=0.5"])
    result = sq.compress(str(source), recipe, runs=1)
    assert any("weight layers sit inside If/Loop/Scan bodies" in w for w in result.warnings)


def test_a_minus_one_dimension_is_dynamic_not_an_error(tmp_path):
    """Paddle exports write dim_value -1 for dynamic dimensions (the corpus's ppocr_cls)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    proto = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], inputs=[x])
    source = tmp_path / "m.onnx"
    source.write_bytes(proto.SerializeToString())
    assert len(model_io.load(source).graph) == 1


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (10, "input 'x' holds NaN or Inf values (in the batch from sample 3)"),
        (0, "holds no samples"),
    ],
)
def test_nan_or_empty_calibration_data_is_one_line_exit_1(tmp_path, samples, message):
    """NaN in calibration data broke the histograms (exit 2); empty data ended in StopIteration."""
    source = tmp_path / "m.onnx"
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [W])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    source.write_bytes(proto.SerializeToString())
    data = np.random.default_rng(0).standard_normal((samples, 4)).astype(np.float32)
    if samples:
        data[3, 1] = np.nan
    np.savez(tmp_path / "calib.npz", x=data)
    out = tmp_path / "o.onnx"
    command = [sys.executable, "-m", "onnx_squeeze", "compress", str(source), "-o", str(out)]
    done = subprocess.run(
        [*command, "--int8", "--calib", str(tmp_path / "calib.npz"), "--runs", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert not out.exists()
