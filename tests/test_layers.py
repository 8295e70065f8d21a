"""The layer view: which input is the weight, its output and reduction axes, bias, sharing,
quantization, and the Gram spec of what the weight multiplies (checked against onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze.calibration.grams import input_vectors
from onnx_squeeze.layers import Layer, NotLayer
from tests.helpers import run

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\n'
RNG = np.random.default_rng(0)


def _model(text: str, **weights: np.ndarray) -> ir.Model:
    model = ir.from_proto(onnx.parser.parse_model(HEADER + text))
    for name, array in weights.items():
        value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
        value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
        model.graph.register_initializer(value)
        for node in model.graph:
            for index, used in enumerate(node.inputs):
                if used is not None and used.name == name and used is not value:
                    node.replace_input_with(index, value)
    return model


def _layer(model: ir.Model, index: int = 0) -> Layer:
    layer = Layer.of(model.graph.node(index))
    assert isinstance(layer, Layer), layer
    return layer


def _output_energy_matches(model: ir.Model, layer: Layer, feed: dict[str, np.ndarray]) -> None:
    """The spec's input vectors times the (reduction, output) matrix give the node's output."""
    spec = layer.gram_spec()
    assert spec is not None and spec.tensor == layer.input.name
    rows = input_vectors(feed[spec.tensor], spec)
    assert rows.shape[1] == spec.features
    expected = run(model, feed)[0].astype(np.float64)
    got = rows.astype(np.float64) @ layer.matrix().astype(np.float64)
    assert got.size == expected.size
    assert np.square(got).sum() == pytest.approx(np.square(expected).sum(), rel=1e-5)


@pytest.mark.parametrize(
    ("trans", "shape", "output_axis", "reduction"),
    [({}, (6, 4), 1, (0,)), ({"transB": 1}, (4, 6), 0, (1,))],
)
def test_gemm_weight_on_the_right(trans, shape, output_axis, reduction):
    attrs = "".join(f", {k} = {v}" for k, v in trans.items())
    model = _model(
        f"g (float[3, 6] x) => (float[3, 4] y) {{ y = Gemm <alpha = 1.0{attrs}> (x, w, b) }}",
        w=RNG.standard_normal(shape),
        b=RNG.standard_normal(4),
    )
    layer = _layer(model)
    assert (layer.weight_index, layer.left, layer.shape) == (1, False, shape)
    assert (layer.output_axis, layer.reduction_axes) == (output_axis, reduction)
    assert layer.bias is model.graph.initializers["b"]
    assert not layer.shared and not layer.quantized
    model.graph.node(0).replace_input_with(2, None)  # the bias is not part of the matrix
    _output_energy_matches(model, layer, {"x": RNG.standard_normal((3, 6)).astype(np.float32)})


def test_gemm_with_trans_a_reads_its_input_by_columns():
    model = _model(
        "g (float[6, 3] x) => (float[3, 4] y) { y = Gemm <transA = 1> (x, w) }",
        w=RNG.standard_normal((6, 4)),
    )
    layer = _layer(model)
    assert layer.gram_spec().layout == "first"
    _output_energy_matches(model, layer, {"x": RNG.standard_normal((6, 3)).astype(np.float32)})


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_with_a_constant_a_has_its_weight_on_the_left(trans_a):
    shape = (6, 5) if trans_a else (5, 6)
    model = _model(
        f"g (float[6, 3] x) => (float[5, 3] y) {{ y = Gemm <transA = {trans_a}> (w, x) }}",
        w=RNG.standard_normal(shape),
    )
    layer = _layer(model)
    assert layer.left and layer.weight_index == 0 and layer.input.name == "x"
    assert layer.output_axis == (1 if trans_a else 0)
    assert layer.reduction_axes == ((0,) if trans_a else (1,))
    _output_energy_matches(model, layer, {"x": RNG.standard_normal((6, 3)).astype(np.float32)})


def test_matmul_weight_on_the_right_and_on_the_left():
    right = _model(
        "g (float[2, 3, 6] x) => (float[2, 3, 4] y) { y = MatMul (x, w) }",
        w=RNG.standard_normal((6, 4)),
    )
    layer = _layer(right)
    assert (layer.weight_index, layer.output_axis, layer.reduction_axes) == (1, 1, (0,))
    assert layer.bias is None
    _output_energy_matches(right, layer, {"x": RNG.standard_normal((2, 3, 6)).astype(np.float32)})

    left = _model(
        "g (float[2, 6, 3] x) => (float[2, 5, 3] y) { y = MatMul (w, x) }",
        w=RNG.standard_normal((5, 6)),
    )
    layer = _layer(left)
    assert (layer.weight_index, layer.left, layer.output_axis) == (0, True, 0)
    assert layer.reduction_axes == (1,) and layer.gram_spec().layout == "columns"
    _output_energy_matches(left, layer, {"x": RNG.standard_normal((2, 6, 3)).astype(np.float32)})


def test_batched_and_vector_matmul_weights():
    batched = _layer(
        _model(
            "g (float[2, 3, 6] x) => (float[2, 3, 4] y) { y = MatMul (x, w) }",
            w=RNG.standard_normal((2, 6, 4)),
        )
    )
    assert (batched.output_axis, batched.reduction_axes) == (2, (1,))
    assert batched.gram_spec() is None  # one Gram per batch entry, not one per layer
    vector = _layer(
        _model("g (float[3, 6] x) => (float[3] y) { y = MatMul (x, w) }", w=RNG.standard_normal(6))
    )
    assert (vector.output_axis, vector.reduction_axes) == (None, (0,))


def test_conv_axes_bias_and_patch_gram():
    model = _model(
        "g (float[2, 3, 7, 7] x) => (float[2, 5, 4, 4] y) "
        "{ y = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w, b) }",
        w=RNG.standard_normal((5, 3, 3, 3)),
        b=RNG.standard_normal(5),
    )
    layer = _layer(model)
    assert (layer.output_axis, layer.reduction_axes, layer.kernel) == (0, (1, 2, 3), (3, 3))
    assert layer.bias is model.graph.initializers["b"] and layer.groups == 1
    spec = layer.gram_spec()
    assert (spec.layout, spec.features, spec.strides, spec.pads) == (
        "patches", 27, (2, 2), (1, 1, 1, 1)
    )  # fmt: skip
    feed = {"x": RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)}
    model.graph.node(0).replace_input_with(2, None)
    rows = input_vectors(feed["x"], spec)
    got = rows @ layer.array.reshape(5, -1).T
    expected = run(model, feed)[0]
    assert np.square(got).sum() == pytest.approx(float(np.square(expected).sum()), rel=1e-5)


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_and_depthwise_conv_have_no_single_gram(group):
    model = _model(
        f"g (float[1, 4, 5, 5] x) => (float[1, 4, 3, 3] y) {{ y = Conv <group = {group}> (x, w) }}",
        w=RNG.standard_normal((4, 4 // group, 3, 3)),
    )
    layer = _layer(model)
    assert layer.groups == group and layer.output_axis == 0
    assert layer.gram_spec() is None


@pytest.mark.parametrize(("group", "output_axis"), [(1, 1), (2, None)])
def test_conv_transpose_produces_on_weight_axis_1(group, output_axis):
    model = _model(
        f"g (float[1, 4, 3, 3] x) => (float[1, 6, 5, 5] y) "
        f"{{ y = ConvTranspose <group = {group}> (x, w) }}",
        w=RNG.standard_normal((4, 6 // group, 3, 3)),
    )
    layer = _layer(model)
    assert layer.output_axis == output_axis and layer.reduction_axes == (0, 2, 3)
    assert layer.gram_spec() is None


def test_a_shared_weight_names_its_other_users():
    model = _model(
        "g (float[2, 4] x) => (float[2, 4] y) { h = MatMul (x, w)\n y = MatMul (h, w) }",
        w=RNG.standard_normal((4, 4)),
    )
    first, second = model.graph
    layer = _layer(model)
    assert layer.shared and layer.other_users == (second,)
    assert _layer(model, 1).other_users == (first,)


def test_a_weight_from_dequantize_linear_is_quantized():
    model = ir.from_proto(
        onnx.parser.parse_model(
            HEADER
            + """
g (float[2, 4] x) => (float[2, 3] y)
<int8[4, 3] wq = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float scale = {0.1}> {
    w = DequantizeLinear (wq, scale)
    y = MatMul (x, w)
}
"""
        )
    )
    layer = _layer(model, 1)
    assert layer.quantized and layer.array is None and layer.shape == (4, 3)
    assert (layer.weight_index, layer.output_axis) == (1, 1)


def test_quantized_ops_are_not_layers():
    model = ir.from_proto(
        onnx.parser.parse_model(
            HEADER
            + """
g (uint8[2, 4] x, uint8[4, 3] w) => (int32[2, 3] y) { y = MatMulInteger (x, w) }
"""
        )
    )
    found = Layer.of(model.graph.node(0))
    assert isinstance(found, NotLayer) and found.quantized and "already quantized" in found.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{ y = MatMul (x, w) }", "both operands are activations"),
        ("{ y = Gemm (x, w) }", "weight is not a constant"),
        ("{ y = Add (x, w) }", "Add is not a Conv, ConvTranspose, Gemm or MatMul"),
    ],
)
def test_not_layers_say_why(text, reason):
    model = _model(f"g (float[4, 4] x, float[4, 4] w) => (float[4, 4] y) {text}")
    found = Layer.of(model.graph.node(0))
    assert isinstance(found, NotLayer) and found.reason == reason and not found.quantized


def test_an_initializer_that_is_a_graph_input_is_not_a_constant_weight():
    model = _model(
        "g (float[1, 3, 5, 5] x) => (float[1, 2, 3, 3] y) { y = Conv (x, w) }",
        w=RNG.standard_normal((2, 3, 3, 3)),
    )
    model.graph.inputs.append(model.graph.initializers["w"])  # overridable at run time
    found = Layer.of(model.graph.node(0))
    assert isinstance(found, NotLayer) and found.reason == "weight is not a constant"
