"""Memory bounds on untrusted models and data (issue 23, must-haves 3 and 5): tensors whose size
is known before a run are refused at load past a limit scaled to the model (settable), one that
only a run reveals ends as a one-line RunLimitError, constant folding never makes a tensor it
would throw away, and images are refused by their header past a pixel count."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import hostile_cases
from onnx_squeeze import model_io, prepare, runtime, validation
from onnx_squeeze.calibration import images
from onnx_squeeze.errors import InputError, RunLimitError
from onnx_squeeze.records import PassReport


def test_a_huge_constant_shape_is_refused_at_load_naming_the_node(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(hostile_cases._constant_of_shape(), path)
    with pytest.raises(InputError, match=r"node 'fill' \(ConstantOfShape\) makes 'big' .*1\.0 GiB"):
        model_io.load(path)


def test_the_tensor_limit_scales_with_the_model_and_is_settable(monkeypatch, tmp_path):
    small = ir.from_proto(hostile_cases.mlp())
    assert validation.tensor_limit_bytes(small) == validation.TENSOR_FLOOR_BYTES
    weights = ir.from_proto(hostile_cases.mlp())
    big = np.zeros((1024, 1024, 4), np.float32)  # 16 MiB of weights: 64x is 1 GiB
    weights.graph.initializers["w1"].const_value = ir.tensor(big, name="w1")
    assert validation.tensor_limit_bytes(weights) >= 2**30
    monkeypatch.setenv("ONNX_SQUEEZE_MAX_TENSOR_BYTES", str(2**31))
    path = tmp_path / "m.onnx"
    onnx.save(hostile_cases._constant_of_shape(), path)
    model_io.load(path)  # 1 GiB is allowed now


def test_a_size_only_a_run_reveals_is_one_line_run_limit_error():
    session = runtime.create_session(hostile_cases._expand_at_run_time())
    with pytest.raises(RunLimitError, match=r"ran out of memory in node 'expand' \(Expand\)"):
        session.run(None, {"x": np.ones((1, 8), np.float32)})


def test_folding_does_not_make_a_tensor_it_would_throw_away(monkeypatch):
    """A ConstantOfShape of 8 MiB (above the growth limit) is left alone before evaluation."""
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill"),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array([2**21], np.int64), "shape")],
    )
    model = ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    )
    report = PassReport("prepare", {})
    prepare.infer_shapes(model, report)
    evaluated = []
    from onnx.reference import ReferenceEvaluator

    original = ReferenceEvaluator.run
    monkeypatch.setattr(
        ReferenceEvaluator,
        "run",
        lambda self, *a, **k: evaluated.append(1) or original(self, *a, **k),
    )
    assert prepare.fold_constants(model, report) == 0
    assert not evaluated
    assert next(node.op_type for node in model.graph) == "ConstantOfShape"


def test_images_past_the_pixel_limit_are_refused_by_their_header(monkeypatch, tmp_path):
    image = pytest.importorskip("PIL.Image")
    image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    spec = runtime.InputSpec("x", np.dtype(np.float32), (1, 3, 16, 16))
    source = images.ImageFolderSource(tmp_path, spec)
    assert next(iter(source))["x"].shape == (1, 3, 16, 16)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(InputError, match=r"40x30 .* above the 0 M pixels"):
        next(iter(source))
