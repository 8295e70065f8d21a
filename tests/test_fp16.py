"""FP16 for a target provider (CUDA by default), inside If/Loop bodies, and on graphs that are
already quantized: structure, validity, numerics against the FP32 model in onnxruntime CPU."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import shortcuts, zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.pipeline import finalize
from tests.helpers import check, random_feeds, run

F16 = ir.DataType.FLOAT16
F32 = ir.DataType.FLOAT


def parse(text: str) -> ir.Model:
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        node.name = f"{node.op_type}_{index}"
    return model


def every_node(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def float_weights(model: ir.Model) -> dict[str, ir.DataType]:
    """Element type of every float constant with 4 values or more, in every graph."""
    found = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            found[value.name] = value.dtype
    for node in every_node(model):
        if node.op_type == "Constant":
            found[node.outputs[0].name] = node.outputs[0].dtype
    return {
        name: dtype
        for name, dtype in found.items()
        if dtype in (F16, F32) and _size(model, name) >= 4
    }


def _size(model: ir.Model, name: str) -> int:
    for graph in model.graphs():
        if name in graph.initializers:
            return graph.initializers[name].const_value.size
    node = next(n for n in every_node(model) if n.outputs[0].name == name)
    return node.outputs[0].const_value.size


def assert_close(original: ir.Model, converted: ir.Model, feeds, bound: float) -> None:
    """Outputs within ``bound`` of each output's largest magnitude, float32 at the interface."""
    for feed in feeds:
        for a, b in zip(run(original, feed), run(converted, feed), strict=True):
            assert b.dtype == np.float32 and np.isfinite(b).all()
            assert np.abs(b - a).max() <= bound * max(1.0, float(np.abs(a).max()))


# ---------------------------------------------------------------------------------------------
# The target provider


def test_default_is_an_fp16_model_for_cuda_even_without_a_gpu():
    model = zoo.small("resnet18")
    original = model.clone()
    report = make_pass("fp16")(model)
    finalize(model)
    check(model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs and all(n.outputs[0].dtype == F16 for n in convs)
    assert set(float_weights(model).values()) == {F16}
    assert any("CPU EP" in note and "no faster" in note for note in report.notes)
    assert [v.dtype for v in model.graph.inputs] == [v.dtype for v in original.graph.inputs]
    assert all(v.dtype == F32 for v in model.graph.outputs)
    size = len(ir.to_proto(model).SerializeToString())
    assert size < 0.55 * len(ir.to_proto(original).SerializeToString())
    # Loads and runs on the CPU EP; FP16 rounding through a few layers stays within 2 %.
    assert_close(original, model, random_feeds(original), 2e-2)


def test_cuda_block_list_keeps_min_and_max_fp32():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4] x) => (float[2, 4] y)
        <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}, float low = {-1}>
        {
            h = MatMul (x, w)
            m = Max (h, low)
            y = MatMul (m, w)
        }"""
    )
    report = make_pass("fp16", {"provider": "cuda"})(model)
    check(model)
    kept = {r.op_type: r.detail for r in report.skipped}
    assert kept == {"Max": "Max is in the FP32 block list"}
    assert [n.outputs[0].dtype for n in model.graph if n.op_type == "MatMul"] == [F16, F16]


def shortcut_steps(*flags: str) -> list[tuple[str, dict]]:
    parser = argparse.ArgumentParser()
    shortcuts.add_arguments(parser)
    args = parser.parse_args(list(flags))
    return [(s.name, s.settings) for s in shortcuts.steps_from_args(args, calibrated=False)]


def test_fp16_for_picks_the_provider():
    assert shortcut_steps("--fp16") == [("fp16", {"dtype": "float16"})]
    assert shortcut_steps("--fp16", "--fp16-for", "cpu") == [
        ("fp16", {"dtype": "float16", "provider": "cpu"})
    ]
    assert shortcut_steps("--bf16", "--fp16-for", "cuda") == [
        ("fp16", {"dtype": "bfloat16", "provider": "cuda"})
    ]
    with pytest.raises(SettingsError, match="--fp16-for applies to --fp16"):
        shortcut_steps("--fp16-for", "cpu")


def test_a_cast_to_an_integer_keeps_its_type():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4] x) => (float[2, 4] y, int32[2, 4] i)
        <float[4, 4] w = {2,0,0,0, 0,2,0,0, 0,0,2,0, 0,0,0,2}>
        {
            y = MatMul (x, w)
            i = Cast <to = 6> (y)
        }"""
    )
    original = model.clone()
    make_pass("fp16", {"provider": "none"})(model)
    check(model)
    cast = next(n for n in model.graph if n.op_type == "Cast" and n.outputs[0].name == "i")
    assert cast.attributes["to"].value == int(ir.DataType.INT32)
    feed = {"x": np.array([[1, 2, 3, 4], [-1, 0, 5, 7]], np.float32)}
    for a, b in zip(run(original, feed), run(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# If/Loop bodies

IF_MODEL = """<ir_version: 8, opset_import: ["": 17]>
g (float[2, 4] x, bool c) => (float[2, 4] y, float[2, 4] z)
<float[4, 4] shared = {0.5,0,0,0.1, 0,0.5,0,0, 0,0,0.5,0, 0.2,0,0,0.5},
 float[4] k = {0.1, 0.2, 0.3, 0.4}>
{
    h = MatMul (x, shared)
    z = Min (h, k)
    y = If (c) <
        then_branch = t () => (float[2, 4] a) <float[4, 4] wt = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> {
            m = MatMul (h, wt)
            a = Add (m, k)
        },
        else_branch = e () => (float[2, 4] b) {
            we = Constant <value = float[4, 4] {0,1,0,0, 1,0,0,0, 0,0,0,1, 0,0,1,0}> ()
            nc = Not (c)
            b = If (nc) <
                then_branch = t2 () => (float[2, 4] p) {
                    n = MatMul (h, we)
                    p = Sigmoid (n)
                },
                else_branch = e2 () => (float[2, 4] q) { q = Identity (h) }
            >
        }
    >
}"""


def test_if_bodies_convert_with_float32_borders():
    model = parse(IF_MODEL)
    original = model.clone()
    report = make_pass("fp16")(model)  # CUDA's block list: Min stays FP32
    finalize(model)
    check(model)
    # Every weight is FP16 (subgraph initializer, Constant node, outer-scope initializers read
    # inside); k is read by FP32 Min and FP16 Add, so an FP32 copy stays for Min.
    weights = float_weights(model)
    assert weights.pop("k") == F32
    assert set(weights.values()) == {F16}
    matmuls = [n for n in every_node(model) if n.op_type == "MatMul"]
    assert len(matmuls) == 3 and all(n.outputs[0].dtype == F16 for n in matmuls)
    # Control flow keeps its types: If outputs and every body output are FP32.
    for node in every_node(model):
        if node.op_type == "If":
            assert all(v.dtype == F32 for v in node.outputs)
    assert all(v.dtype == F32 for g in model.graphs() for v in g.outputs)
    assert any("5 nodes inside If/Loop/Scan bodies converted" in n for n in report.notes)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    feeds = [{"x": x, "c": np.array(flag)} for flag in (True, False)]
    assert_close(original, model, feeds, 5e-3)


def test_loop_body_converts_and_carries_float32_state():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4] x) => (float[2, 4] y)
        <float[4, 4] w = {0.5,0.1,0,0, 0,0.5,0.1,0, 0,0,0.5,0.1, 0.1,0,0,0.5},
         int64 trips = {3}, bool go = {1}>
        {
            y = Loop (trips, go, x) <
                body = b (int64 i, bool c_in, float[2, 4] s) => (bool c_out, float[2, 4] s_out) {
                    c_out = Identity (c_in)
                    m = MatMul (s, w)
                    s_out = Tanh (m)
                }
            >
        }"""
    )
    original = model.clone()
    make_pass("fp16", {"provider": "none"})(model)
    finalize(model)
    check(model)
    loop = next(n for n in model.graph if n.op_type == "Loop")
    body = loop.attributes["body"].value
    assert loop.outputs[0].dtype == F32 and body.inputs[2].dtype == F32
    assert body.outputs[1].dtype == F32
    assert model.graph.initializers["w"].dtype == F16
    assert [n.outputs[0].dtype for n in body if n.op_type in ("MatMul", "Tanh")] == [F16, F16]
    feeds = [{"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)}]
    assert_close(original, model, feeds, 5e-3)


def untyped_body(model: ir.Model) -> ir.Node:
    """Take the element type of a body's Sigmoid output, as exporters and folding leave it."""
    sigmoid = next(n for n in every_node(model) if n.op_type == "Sigmoid")
    sigmoid.outputs[0].type = None
    return sigmoid


def test_untyped_body_values_get_their_type_inferred():
    model = parse(IF_MODEL)
    sigmoid = untyped_body(model)
    report = make_pass("fp16")(model)
    finalize(model)
    check(model)
    assert "element types of 1 untyped values inferred" in report.notes
    assert sigmoid.outputs[0].dtype == F16


def test_untyped_body_values_that_inference_misses_are_a_warning(monkeypatch):
    from onnx_squeeze.passes.fp16 import element_types

    monkeypatch.setattr(element_types, "infer_missing", lambda model: 0)
    model = parse(IF_MODEL)
    original = model.clone()
    sigmoid = untyped_body(model)
    report = make_pass("fp16")(model)
    finalize(model)
    check(model)
    assert any(n.startswith("WARNING:") and "unknown element type" in n for n in report.notes)
    assert sigmoid.name in {r.node for r in report.skipped}
    feeds = [{"x": np.ones((2, 4), np.float32), "c": np.array(False)}]  # runs the Sigmoid
    assert_close(original, model, feeds, 5e-3)


# ---------------------------------------------------------------------------------------------
# Already quantized graphs


def test_dynamically_quantized_conv_keeps_its_quantized_arithmetic(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, quantized_path = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    onnx.save(ir.to_proto(zoo.small("resnet18")), float_path)
    quantize_dynamic(float_path, quantized_path, weight_type=QuantType.QUInt8)
    quantized = onnx.shape_inference.infer_shapes(onnx.load(quantized_path))
    model = ir.from_proto(quantized)
    assert any(n.op_type == "ConvInteger" for n in model.graph)
    original = model.clone()
    report = make_pass("fp16")(model)
    finalize(model)
    check(model)
    kept = {r.node: r.detail for r in report.skipped}
    for node in model.graph:  # scales, quantized biases and accumulators stay FP32
        if node.op_type in ("Floor", "DynamicQuantizeLinear"):
            assert "quantized arithmetic" in kept[node.name]
        if node.op_type == "Cast" and node.name in kept:
            assert node.attributes["to"].value in (int(F32), int(ir.DataType.INT32))
    # The float ops between the quantized layers run in FP16: their rounding moves some inputs
    # of DynamicQuantizeLinear across a step of its 8-bit grid (1/255 of the range), through 12
    # quantized layers: within 5 % of the largest logit (2.7 % measured).
    assert_close(original, model, random_feeds(original, 1), 5e-2)


def test_qdq_graph_is_left_alone(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    float_model = zoo.small("resnet18")
    feeds = random_feeds(float_model, 2)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(ir.to_proto(float_model), float_path)
    quantize_static(float_path, qdq_path, Reader(), quant_format=QuantFormat.QDQ)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(qdq_path)))
    original = model.clone()
    report = make_pass("fp16")(model)
    finalize(model)
    check(model)
    # Every float op sits between DequantizeLinear and QuantizeLinear: Casts there would
    # break onnxruntime's QDQ fusion, so nothing converts and the outputs are the original's.
    assert not report.changed
    assert all("quantized arithmetic" in r.detail for r in report.skipped)
    for a, b in zip(run(original, feeds[0]), run(model, feeds[0]), strict=True):
        np.testing.assert_array_equal(a, b)
