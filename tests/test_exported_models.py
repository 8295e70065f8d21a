"""Models exported by torch (TorchScript exporter): the idioms our code-built zoo does not have.

Shape→Gather→Unsqueeze→Concat→Reshape chains, Constant nodes, LSTM/GRU, int64 token inputs,
LayerNormalization and Erf-GELU, all with a dynamic batch axis. The architectures are those of
``benchmarks/robustness.py``, which runs every CLI job on them; these cases lock in its findings
(the ones that need no torch run without it).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import calibration, model_io, zoo
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe
from tests import helpers


@pytest.fixture(scope="module")
def robustness():
    """The sweep's module (torch models and their export), skipped without torch."""
    pytest.importorskip("torch")
    from benchmarks import robustness

    return robustness


@pytest.fixture(scope="module")
def exported(robustness, tmp_path_factory):
    """name -> path of the TorchScript (opset 17) export, made once for the module."""
    folder = tmp_path_factory.mktemp("exported")
    return lambda name: robustness.export(name, "ts17", folder)


def batch_feed(robustness, model: ir.Model, name: str) -> dict[str, np.ndarray]:
    return robustness.batch_feed(ir.to_proto(model), robustness.MODELS[name], batch=2)


def assert_batch_dynamic(model: ir.Model) -> None:
    for value in model.graph.inputs:
        assert isinstance(value.shape[0], ir.SymbolicDim), f"{value.name}: {value.shape}"


@pytest.mark.parametrize("name", ["crnn", "bert"])
def test_prepare_alone_is_lossless_at_batch_2(robustness, exported, name):
    """No pass: simplification, BN folding and constant folding change no output, any batch."""
    path = exported(name)
    result = compress(str(path), Recipe(), compare=False)
    helpers.check(result.model)
    assert_batch_dynamic(result.model)
    feed = batch_feed(robustness, result.model, name)
    expected = helpers.run(onnx.load(str(path)), feed)
    for want, got in zip(expected, helpers.run(result.model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_int8_on_exported_vit_keeps_dynamic_batch(robustness, exported):
    """Static INT8 on a TorchScript ViT (class-token Concat, LayerNormalization, Erf GELU), every
    layer (no speed check: at 0.2 ms a run, which layers pay off differs from CPU to CPU, and
    here none did)."""
    path = exported("vit")
    source = calibration.open_source("random", model_io.load(path), count=4)
    recipe = Recipe.from_dict([{"quantize_int8": {"speed_check": False}}])
    result = compress(str(path), recipe, calibration=source, compare=False)
    helpers.check(result.model)
    assert_batch_dynamic(result.model)
    assert any(node.op_type == "QuantizeLinear" for node in result.model.graph)
    feed = batch_feed(robustness, result.model, "vit")
    (expected,) = helpers.run(onnx.load(str(path)), feed)
    (got,) = helpers.run(result.model, feed)
    assert robustness.cosine(expected[1] - expected[0], got[1] - got[0]) > 0.95


def test_recover_after_2_4_sparsity_keeps_the_pattern():
    model = zoo.small("resnet18")
    source = calibration.open_source("random", model, count=2)
    steps = [{"prune_weights": {"mode": "nm", "n": 2, "m": 4}}, {"reconstruct": {}}]
    recipe = Recipe.from_dict({"prepare": {"simplify": False}, "passes": steps})
    result = compress(model, recipe, calibration=source, compare=False)
    pruned = {r.node for r in result.passes[0].records if r.action == "pruned"}
    assert pruned
    for node in result.model.graph:
        if node.name in pruned:
            weight = constant_array(node.inputs[1])
            assert (weight == 0).mean() >= 0.5, node.name
    assert any("sparse layer(s)" in note for note in result.passes[1].notes)
    feed = next(iter(source))  # the recovered model runs and stays finite
    assert all(np.isfinite(out).all() for out in helpers.run(result.model, feed))


def matmul_chain_without_bias() -> onnx.ModelProto:
    """x @ W1 → Relu → @ W2: how the TorchScript exporter writes Linear layers in attention."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape).astype(np.float32) / 8 for shape in ((64, 64), (64, 32))]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
            onnx.helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16, 32])],
        [onnx.numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights, 1)],
    )
    opset = [onnx.helper.make_opsetid("", 17)]
    return onnx.helper.make_model(graph, opset_imports=opset, ir_version=8)


def test_recover_after_low_rank_of_bias_less_matmul():
    proto = matmul_chain_without_bias()
    source = calibration.open_source("random", model_io.load(proto), count=2)
    steps = [{"low_rank": {"rank": 8}}, {"reconstruct": {}}]
    recipe = Recipe.from_dict({"prepare": {"simplify": False}, "passes": steps})
    result = compress(proto, recipe, calibration=source, compare=False)
    helpers.check(result.model)
    assert {r.action for r in result.passes[1].records} == {"refit"}
    # the refit removes at least a third of the error (per output channel, against its spread)
    errors = re.search(r"([0-9.]+) -> ([0-9.]+)\n?$", result.passes[1].notes[-1])
    assert errors and float(errors.group(2)) < 0.67 * float(errors.group(1))


def test_recover_after_weight_pruning_of_bias_less_matmul():
    """A sparse layer gets per-channel corrections only; without a bias (Llama's Linear layers)
    the scale matches the teacher's mean square, and nothing crashes for want of a bias."""
    proto = matmul_chain_without_bias()
    source = calibration.open_source("random", model_io.load(proto), count=2)
    pruning = {"ratio": 0.5, "keep_first": False, "keep_last": False}
    steps = [{"prune_weights": pruning}, {"reconstruct": {}}]
    recipe = Recipe.from_dict({"prepare": {"simplify": False}, "passes": steps})
    result = compress(proto, recipe, calibration=source, compare=False)
    helpers.check(result.model)
    refits = [r.detail for r in result.passes[1].records if r.action == "refit"]
    assert refits and all("mean square (no bias)" in detail for detail in refits)
    weights = [constant_array(n.inputs[1]) for n in result.model.graph if n.op_type == "MatMul"]
    assert all((w == 0).mean() >= 0.5 for w in weights)  # the pattern survives the refit
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "MatMul"]


@pytest.mark.parametrize(
    ("name", "exporter"), [("efficientnet", "dyn18"), ("resnext-dense", "ts17")]
)
def test_exported_channel_groups_are_prunable_and_removal_is_lossless(
    robustness, tmp_path, name, exporter
):
    """Squeeze-and-excitation as ReduceMean, flatten as Reshape(allowzero=1) (dynamo), grouped
    convolutions and x.view(x.size(0), -1) (TorchScript): only the classifier's output group
    stays frozen, and removing zeroed channels changes no output."""
    if exporter == "dyn18":
        pytest.importorskip("onnxscript")
    from onnx_squeeze.passes.prune_channels.trace import build_groups
    from onnx_squeeze.prepare import prepare
    from tests.test_prune_channels import _assert_removal_is_lossless

    model, _ = prepare(ir.load(str(robustness.export(name, exporter, tmp_path))))
    groups = build_groups(model, split_heads=True)
    assert [g.frozen for g in groups if g.frozen] == ["reaches graph output 'output'"]
    _assert_removal_is_lossless(model, ratio=0.4)
