"""Models exported by torch (TorchScript exporter): the idioms our code-built zoo does not have.

Shape→Gather→Unsqueeze→Concat→Reshape chains, Constant nodes, LSTM/GRU, int64 token inputs,
LayerNormalization and Erf-GELU, all with a dynamic batch axis. The architectures are those of
``benchmarks/robustness.py``, which runs every CLI job on them; these cases lock in its findings.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from benchmarks import robustness  # noqa: E402 - needs torch, checked just above
from onnx_squeeze import calibration, model_io  # noqa: E402
from onnx_squeeze.pipeline import compress  # noqa: E402
from onnx_squeeze.recipe import Recipe  # noqa: E402
from tests import helpers  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> path of the TorchScript (opset 17) export, made once for the module."""
    folder = tmp_path_factory.mktemp("exported")
    return lambda name: robustness.export(name, "ts17", folder)


def batch_feed(model: ir.Model, name: str, batch: int = 2) -> dict[str, np.ndarray]:
    return robustness.batch_feed(ir.to_proto(model), robustness.MODELS[name], batch)


def assert_batch_dynamic(model: ir.Model) -> None:
    for value in model.graph.inputs:
        assert isinstance(value.shape[0], ir.SymbolicDim), f"{value.name}: {value.shape}"


@pytest.mark.parametrize("name", ["crnn", "bert"])
def test_prepare_alone_is_lossless_at_batch_2(exported, name):
    """No pass: simplification, BN folding and constant folding change no output, any batch."""
    path = exported(name)
    result = compress(str(path), Recipe())
    helpers.check(result.model)
    assert_batch_dynamic(result.model)
    feed = batch_feed(result.model, name)
    expected = helpers.run(onnx.load(str(path)), feed)
    for want, got in zip(expected, helpers.run(result.model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_int8_on_exported_vit_keeps_dynamic_batch(exported):
    """Static INT8 on a TorchScript ViT (class-token Concat, LayerNormalization, Erf GELU)."""
    path = exported("vit")
    source = calibration.open_source("random", model_io.load(path), count=4)
    result = compress(str(path), Recipe.from_dict([{"quantize_int8": {}}]), calibration=source)
    helpers.check(result.model)
    assert_batch_dynamic(result.model)
    assert any(node.op_type == "QuantizeLinear" for node in result.model.graph)
    feed = batch_feed(result.model, "vit")
    (expected,) = helpers.run(onnx.load(str(path)), feed)
    (got,) = helpers.run(result.model, feed)
    assert robustness.cosine(expected[1] - expected[0], got[1] - got[0]) > 0.95
