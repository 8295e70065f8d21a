"""Shared test helpers: run models in onnxruntime with optimizations off, check validity."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_squeeze import runtime


def run(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs with onnxruntime's graph optimizations disabled, so they cannot hide a broken graph."""
    return runtime.create_session(model, optimization="none").run(None, feed)


def random_feeds(
    model: ir.Model, count: int = 2, seed: int = 0, batch: int = 2
) -> list[dict[str, np.ndarray]]:
    """Random feeds from the input spec, symbolic batch dims set to ``batch``."""
    specs = runtime.input_specs(model)
    rng = np.random.default_rng(seed)
    overrides = {
        s.name: tuple(
            batch if i == 0 and not isinstance(d, int) else size
            for i, (d, size) in enumerate(zip(s.shape, s.concrete_shape(), strict=True))
        )
        for s in specs
    }
    return [runtime.random_feed(specs, rng, overrides) for _ in range(count)]


def check(model: ir.Model) -> None:
    """The full onnx checker, as the pipeline's finalize runs it."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def assert_same_outputs(
    a: ir.Model,
    b: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Outputs of ``b`` equal those of ``a`` within float tolerance, scaled to each output's range."""
    for feed in feeds:
        for out_a, out_b in zip(run(a, feed), run(b, feed), strict=True):
            scale = max(1.0, float(np.abs(out_a).max()))
            np.testing.assert_allclose(out_b, out_a, rtol=rtol, atol=atol * scale)
