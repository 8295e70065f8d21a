"""The shared streaming Gram collector: what a layer's weight multiplies, summed over batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_squeeze.calibration.grams import collect_grams
from onnx_squeeze.calibration.service import Calibration
from onnx_squeeze.layers import Layer
from tests.helpers import run

RNG = np.random.default_rng(0)
CONV_GEOMETRIES = [
    {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
]


def _conv_model(geometry: dict) -> tuple[ir.Model, np.ndarray]:
    weight = RNG.standard_normal((5, 3, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 2], **geometry)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["x"], name="relu"), node],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 9, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto)), weight


def _feeds(count: int, batch: int = 2) -> list[dict[str, np.ndarray]]:
    return [
        {"input": RNG.standard_normal((batch, 3, 9, 8)).astype(np.float32)} for _ in range(count)
    ]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_patch_gram_reproduces_the_output_energy(geometry: dict):
    """``Wᵀ (Σ x xᵀ) W`` summed over outputs is the Conv's output energy only when the patches
    follow the Conv's geometry and the weight's (channel, tap) order."""
    model, weight = _conv_model(geometry)
    feeds = _feeds(3)
    spec = Layer.of(model.graph.node(1)).gram_spec()
    moments = collect_grams(model, [spec], feeds, max_rows=None)[spec]
    outputs = [run(model, feed)[0] for feed in feeds]
    matrix = weight.reshape(5, -1).T.astype(np.float64)
    energy = float(np.sum(matrix * (moments.gram @ matrix)))
    expected = sum(float(np.square(y.astype(np.float64)).sum()) for y in outputs)
    assert energy == pytest.approx(expected, rel=1e-5)
    assert moments.rows == sum(y.shape[0] * y.shape[2] * y.shape[3] for y in outputs)


def test_size_is_independent_of_batch_count_and_budget_only_splits_passes():
    model, _ = _conv_model(CONV_GEOMETRIES[0])
    spec = Layer.of(model.graph.node(1)).gram_spec()
    specs = [spec, dataclasses.replace(spec, features=3, kernel=(1, 1))]  # a 1×1 kernel's
    few, many = _feeds(2), _feeds(8)
    small = collect_grams(model, specs, few)
    large = collect_grams(model, specs, many)
    split = collect_grams(model, specs, many, budget=1)  # one spec per calibration pass
    for spec in specs:
        assert small[spec].gram.shape == large[spec].gram.shape == (spec.features,) * 2
        assert large[spec].rows == 4 * small[spec].rows
        np.testing.assert_allclose(split[spec].gram, large[spec].gram, rtol=1e-12)


def test_cache_reuses_results_until_the_model_changes():
    model, _ = _conv_model(CONV_GEOMETRIES[1])
    spec = Layer.of(model.graph.node(1)).gram_spec()
    data = Calibration(_feeds(2))
    first = collect_grams(model, [spec], data)[spec]
    assert collect_grams(model, [spec], data)[spec] is first
    model.graph.node(0).name = "renamed"  # a pass rewired the graph: measure again
    assert collect_grams(model, [spec], data)[spec] is not first


def test_rows_are_subsampled_evenly_per_batch():
    model, _ = _conv_model(CONV_GEOMETRIES[0])
    spec = Layer.of(model.graph.node(1)).gram_spec()
    moments = collect_grams(model, [spec], _feeds(2, batch=4), max_rows=10)[spec]
    assert moments.rows <= 20


def test_summed_grams_add_several_inputs_into_one_matrix():
    # Two readers of one weight (the Relu's input and output, both 3 channels): one matrix, the
    # sum of the two collected apart, in one calibration pass; the same specs share it.
    model, _ = _conv_model(CONV_GEOMETRIES[0])
    spec = Layer.of(model.graph.node(1)).gram_spec()
    other = dataclasses.replace(spec, tensor="input")
    feeds = _feeds(3)
    apart = collect_grams(model, [spec, other], feeds, max_rows=None)
    summed = collect_grams(model, {"w": [spec, other], "v": [spec, other]}, feeds, max_rows=None)
    assert summed["w"] is summed["v"]
    np.testing.assert_allclose(summed["w"].gram, apart[spec].gram + apart[other].gram)
    assert summed["w"].rows == apart[spec].rows + apart[other].rows
