"""Weight pruning: exact sparsity per mode, N:M along the reduction axis, selection, shared weights.

Every pruned model is run in onnxruntime (optimizations off) and checked with the full checker.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.records import PassReport
from tests import helpers

# Prune everything a test model has, tiny tensors and first/last layers included.
EVERYTHING = {"min_params": 0, "keep_first": False, "keep_last": False}


@functools.cache
def _prepared(name: str) -> ir.Model:
    return compress(zoo.small(name), compare=False).model


def prepared(name: str) -> ir.Model:
    """A prepared small zoo model; a clone, so tests cannot affect each other."""
    return _prepared(name).clone()


def prune(model: ir.Model, **settings) -> PassReport:
    return make_pass("prune_weights", settings)(model)


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Node name -> its constant weight (input 1 of Conv/Gemm/MatMul, else input 0)."""
    found = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            for index in (1, 0):
                array = constant_array(node.inputs[index])
                if array is not None:
                    found[node.name] = array
                    break
    return found


def sparsity(array: np.ndarray) -> float:
    return 1 - np.count_nonzero(array) / array.size


def pruned_names(report: PassReport) -> set[str]:
    return {r.node for r in report.changed}


def build(text: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> ir.Model:
    """A model from onnx text, with random normal initializers of the given shapes."""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        array = rng.standard_normal(shape).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.from_proto(proto)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# Every way a weight meets the reduction axis, with that axis (written out here, independently of
# the pass): Gemm B with transB=1 (axis 1) and 0 (axis 0), MatMul B (axis 0), MatMul constant A
# (axis 1), Gemm constant A with transA=1 (axis 0), Conv (axis 1) and grouped Conv (axis 1).
NM_MODEL = (
    HEADER
    + """
agraph (float[N, 8] x, float[N, 8, 5, 5] image) => (float[N, 8] y, float[N, 8, 5, 5] features) {
    a = Gemm <transB = 1> (x, gemm_bt, bias16)
    b = Gemm (a, gemm_b)
    c = MatMul (b, matmul_b)
    ct = Transpose <perm = [1, 0]> (c)
    d = MatMul (matmul_a, ct)
    e = Gemm <transA = 1> (gemm_at, d)
    y = Transpose <perm = [1, 0]> (e)
    f = Conv <pads = [1, 1, 1, 1]> (image, conv_w)
    features = Conv <pads = [1, 1, 1, 1], group = 2> (f, grouped_w)
}
"""
)
NM_SHAPES = {
    "gemm_bt": (16, 8),
    "bias16": (16,),
    "gemm_b": (16, 8),
    "matmul_b": (8, 8),
    "matmul_a": (12, 8),
    "gemm_at": (12, 8),
    "conv_w": (16, 8, 3, 3),
    "grouped_w": (8, 8, 3, 3),
}
NM_AXES = {
    "gemm_bt": 1,
    "gemm_b": 0,
    "matmul_b": 0,
    "matmul_a": 1,
    "gemm_at": 0,
    "conv_w": 1,
    "grouped_w": 1,
}


def nonzeros_per_group(array: np.ndarray, axis: int, m: int) -> np.ndarray:
    return np.count_nonzero(np.moveaxis(array, axis, -1).reshape(-1, m), axis=1)


def test_ratio_zero_is_identity() -> None:
    base = prepared("resnet18")
    model = base.clone()
    report = prune(model, ratio=0.0, **EVERYTHING)
    for name, array in weights(model).items():
        np.testing.assert_array_equal(array, weights(base)[name])
    assert all("no weight changed" in r.detail for r in report.changed)
    helpers.assert_same_outputs(base, model, helpers.random_feeds(base), rtol=0, atol=0)


def test_ratio_mode_prunes_exactly_the_smallest_share_of_every_layer() -> None:
    base = prepared("resnet18")
    model = base.clone()
    report = prune(model, mode="ratio", ratio=0.5, **EVERYTHING)
    before, after = weights(base), weights(model)
    assert pruned_names(report) == set(before)
    for name, array in after.items():
        zeroed = array == 0
        assert zeroed.sum() == round(0.5 * array.size), name
        magnitude = np.abs(before[name])
        assert magnitude[zeroed].max() <= magnitude[~zeroed].min(), name
        np.testing.assert_array_equal(array[~zeroed], before[name][~zeroed])


def test_global_mode_hits_the_ratio_with_one_threshold_over_rms_normalised_weights() -> None:
    base = prepared("resnet18")
    model = base.clone()
    prune(model, mode="global", ratio=0.7, **EVERYTHING)
    before, after = weights(base), weights(model)
    total = sum(a.size for a in after.values())
    zeros = sum(a.size - np.count_nonzero(a) for a in after.values())
    assert zeros == pytest.approx(0.7 * total, abs=1)
    largest_pruned, smallest_kept = 0.0, np.inf
    for name, array in after.items():
        normalised = np.abs(before[name]) / np.sqrt(np.mean(before[name].astype(np.float64) ** 2))
        largest_pruned = max(largest_pruned, normalised[array == 0].max())
        smallest_kept = min(smallest_kept, normalised[array != 0].min())
    assert largest_pruned <= smallest_kept
    per_layer = [sparsity(a) for a in after.values()]
    assert max(per_layer) - min(per_layer) > 0.02  # the layers are not pruned uniformly


def test_threshold_mode_prunes_below_a_share_of_each_layers_max() -> None:
    base = prepared("transformer")
    model = base.clone()
    report = prune(model, mode="threshold", threshold=0.2, **EVERYTHING)
    assert len(report.changed) == len(weights(base))
    for name, array in weights(model).items():
        magnitude = np.abs(weights(base)[name])
        below = magnitude < 0.2 * magnitude.max()
        assert below.any(), name
        np.testing.assert_array_equal(array == 0, below)
    helpers.check(model)


def test_nm_keeps_two_of_every_four_along_the_reduction_axis() -> None:
    base = build(NM_MODEL, NM_SHAPES)
    model = base.clone()
    report = prune(model, mode="nm", n=2, m=4, **EVERYTHING)
    assert len(report.changed) == len(NM_AXES) and not report.skipped
    assert all("2:4" in r.detail and "holds" in r.detail for r in report.changed)
    for name, axis in NM_AXES.items():
        array = model.graph.initializers[name].const_value.numpy()
        assert (nonzeros_per_group(array, axis, 4) == 2).all(), name
        original = NM_SHAPES[name]
        assert sparsity(array) == 0.5 and array.shape == original
    np.testing.assert_array_equal(
        model.graph.initializers["bias16"].const_value.numpy(),
        base.graph.initializers["bias16"].const_value.numpy(),
    )
    helpers.check(model)
    rng = np.random.default_rng(0)
    feed = {
        "x": rng.standard_normal((3, 8), np.float32),
        "image": rng.standard_normal((3, 8, 5, 5), np.float32),
    }
    assert [o.shape for o in helpers.run(model, feed)] == [(3, 8), (3, 8, 5, 5)]


def test_nm_skips_a_reduction_dim_not_divisible_by_m() -> None:
    model = build(
        HEADER + "agraph (float[N, 6, 4, 4] x) => (float[N, 8, 4, 4] y) { y = Conv (x, w) }",
        {"w": (8, 6, 1, 1)},
    )
    report = prune(model, mode="nm", **EVERYTHING)
    (record,) = report.records
    assert record.skipped and "not divisible by m=4" in record.detail
    assert sparsity(model.graph.initializers["w"].const_value.numpy()) == 0


def test_nm_on_the_zoo_transformer_holds_on_every_pruned_weight() -> None:
    model = prepared("transformer")
    report = prune(model, mode="nm", n=1, m=4)
    assert report.changed
    for record in report.changed:
        assert "1:4 along axis" in record.detail and "holds" in record.detail
        assert sparsity(weights(model)[record.node]) == 0.75


def test_first_and_last_layers_are_kept_by_default() -> None:
    base = prepared("resnet18")
    model = base.clone()
    report = prune(model, ratio=0.5)
    kept = {r.node: r.detail for r in report.skipped}
    assert "first layer" in kept["conv1"] and "last layer" in kept["fc"]
    assert sparsity(weights(model)["conv1"]) == 0 and sparsity(weights(model)["fc"]) == 0
    transformer = prepared("transformer")
    report = prune(transformer)
    first = {r.node for r in report.skipped if "first layer" in r.detail}
    last = {r.node for r in report.skipped if "last layer" in r.detail}
    layer0 = "encoder.layer.0.attention.self."
    assert first == {layer0 + "query", layer0 + "key", layer0 + "value"}
    assert last == {"classifier"}
    assert "conv1" in pruned_names(prune(base.clone(), keep_first=False, keep_last=False))


def test_include_exclude_and_op_types_select_layers() -> None:
    base = prepared("resnet18")
    everything = set(weights(base))
    included = pruned_names(prune(base.clone(), include=["layer1.*"], **EVERYTHING))
    assert included == {n for n in everything if n.startswith("layer1.")} and included
    excluded = pruned_names(prune(base.clone(), exclude=["*downsample*", "*conv1*"], **EVERYTHING))
    assert excluded == {n for n in everything if "downsample" not in n and "conv1" not in n}
    gemm_only = pruned_names(prune(base.clone(), op_types="Gemm", **EVERYTHING))
    assert gemm_only == {"fc"}


SHARED = (
    HEADER
    + """
agraph (float[N, 16] x) => (float[N, 16] y) {
    h = MatMul (x, w)
    y = MatMul (h, w)
}
"""
)


def test_a_shared_weight_is_pruned_once_for_all_its_users() -> None:
    base = build(SHARED, {"w": (16, 16)})
    model = base.clone()
    report = prune(model, ratio=0.5, **EVERYTHING)
    assert [r.action for r in report.records] == ["pruned", "pruned"]
    assert "shared with" in report.records[0].detail
    first, second = model.graph
    assert first.inputs[1] is second.inputs[1] and len(model.graph.initializers) == 1
    w = first.inputs[1].const_value.numpy()
    assert sparsity(w) == 0.5
    feed = helpers.random_feeds(base, count=1)[0]
    np.testing.assert_allclose(helpers.run(model, feed)[0], feed["x"] @ w @ w, rtol=1e-4, atol=1e-4)


def test_a_weight_shared_with_a_kept_node_is_left_alone() -> None:
    model = build(SHARED, {"w": (16, 16)})
    first, second = model.graph
    first.name, second.name = "first", "second"
    report = prune(model, ratio=0.5, exclude=["second"], **EVERYTHING)
    reasons = {r.node: r.detail for r in report.records}
    assert "excluded" in reasons["second"] and "shared with MatMul 'second'" in reasons["first"]
    assert sparsity(model.graph.initializers["w"].const_value.numpy()) == 0


def test_already_quantized_weights_are_skipped() -> None:
    model = ir.from_proto(
        onnx.parser.parse_model(
            HEADER
            + """
agraph (float[N, 4] x) => (float[N, 4] y)
<int8[4, 4] wq = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, float scale = {0.1}> {
    w = DequantizeLinear (wq, scale)
    y = MatMul (x, w)
}
"""
        )
    )
    (record,) = prune(model, **EVERYTHING).records
    assert record.skipped and "already quantized" in record.detail


def test_weights_inside_subgraphs_are_pruned_once() -> None:
    """An If whose branches both read the outer weight ``w`` and one holds its own ``v``: both
    are pruned, ``w`` once for both branches, and the model computes what the pruned weights
    give, in either branch."""
    model = build(
        HEADER
        + """
agraph (bool c, float[N, 16] x) => (float[N, 16] y) {
    y = If (c) <
        then_branch = g1 () => (float[N, 16] t) { h = MatMul (x, w)  t = MatMul (h, v) },
        else_branch = g2 () => (float[N, 16] e) { e = MatMul (x, w) }
    >
}
""",
        {"w": (16, 16), "v": (16, 16)},
    )
    then_branch = model.graph.node(0).attributes["then_branch"].value
    inner = model.graph.initializers.pop("v")  # moved into the branch that reads it
    then_branch.register_initializer(inner)
    original = model.clone()
    report = prune(model, ratio=0.5, **EVERYTHING)
    assert len(report.changed) == 3 and not report.skipped
    helpers.check(model)
    pruned = {
        "w": model.graph.initializers["w"].const_value.numpy(),
        "v": then_branch.initializers["v"].const_value.numpy(),
    }
    assert all(sparsity(array) == 0.5 for array in pruned.values())
    reference = original.clone()
    reference.graph.initializers["w"].const_value = ir.tensor(pruned["w"])
    branch = reference.graph.node(0).attributes["then_branch"].value
    branch.initializers["v"].const_value = ir.tensor(pruned["v"])
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    for condition in (True, False):
        feed = {"c": np.array(condition), "x": x}
        np.testing.assert_allclose(helpers.run(model, feed)[0], helpers.run(reference, feed)[0])
        assert not np.allclose(helpers.run(model, feed)[0], helpers.run(original, feed)[0])


def test_pruning_already_pruned_weights_changes_nothing() -> None:
    model = prepared("resnet18")
    prune(model, ratio=0.5, **EVERYTHING)
    tensors = {name: v.const_value for name, v in model.graph.initializers.items()}
    again = prune(model, ratio=0.5, **EVERYTHING)
    assert again.changed and all("no weight changed" in r.detail for r in again.changed)
    for name, value in model.graph.initializers.items():
        assert value.const_value is tensors[name]  # not even replaced


def test_small_ratio_on_a_zoo_model_stays_close_and_valid() -> None:
    base = prepared("resnet18")
    model = base.clone()
    prune(model, mode="global", ratio=0.05)
    helpers.check(model)
    assert str(model.graph.inputs[0].shape[0]) == str(base.graph.inputs[0].shape[0]) == "N"
    rng = np.random.default_rng(0)
    for batch in (1, 3):  # the batch stays dynamic
        feed = {"input": rng.standard_normal((batch, 3, 32, 32), np.float32)}
        (reference,), (result,) = helpers.run(base, feed), helpers.run(model, feed)
        error = np.linalg.norm(result - reference) / np.linalg.norm(reference)
        # Measured 0.03-0.04 relative L2 error on this model (10 % of the weights: ~0.1).
        assert 0 < error < 0.08
        assert (result.argmax(axis=1) == reference.argmax(axis=1)).all()


def test_the_teacher_keeps_its_weights() -> None:
    teacher = prepared("resnet18")
    before = {k: v.copy() for k, v in weights(teacher).items()}
    student = teacher.clone()  # shares tensors with the teacher, as in the pipeline
    prune(student, ratio=0.9, **EVERYTHING)
    for name, array in weights(teacher).items():
        np.testing.assert_array_equal(array, before[name])


def test_in_the_pipeline_with_notes_on_sparsity_and_gzip_size() -> None:
    result = compress(
        zoo.small("mlp"), Recipe.from_cli(["prune_weights:mode=nm,min_params=0"]), compare=False
    )
    (report,) = result.passes
    assert report.changed and any("gzip" in note for note in report.notes)
    assert any("sparsity 0.000 -> 0.500" in note for note in report.notes)
    helpers.check(result.model)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "random"}, "mode"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": "half"}, "number"),
        ({"threshold": 2.0}, "threshold"),
        ({"n": 4, "m": 4}, "0 < n < m"),
        ({"op_types": ["Einsum"]}, "op_types"),
        ({"min_params": -1}, "min_params"),
    ],
)
def test_bad_settings_say_how_to_fix(settings: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        make_pass("prune_weights", settings)
