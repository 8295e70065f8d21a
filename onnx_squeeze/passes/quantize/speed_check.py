"""The speed check: time the model on this machine and keep the smallest quantized layers in
float for as many as makes the whole model fastest (INT8 loses on narrow layers at small batches
on CPUs without VNNI); and the latency ratio that bounds accuracy control (:class:`Slowdown`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import latency_search, runtime
from onnx_squeeze.calibration.feeds import Feed
from onnx_squeeze.calibration.service import resized
from onnx_squeeze.records import PassContext, PassReport


def fastest(
    model: ir.Model,
    anchors: Sequence[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    *,
    batch: int,
) -> list[ir.Node]:
    """The ``anchors`` to quantize: all but the smallest layers (by weight size) kept in float,
    as many as makes the model fastest at ``batch`` (``quantized_copy`` quantizes the given
    anchors of a copy)."""
    by_size = sorted(anchors, key=_weight_size)
    feed = resized(context.data.feed_at(0), model, batch)

    def build(left_out: int) -> ir.Model:
        if left_out == len(by_size):
            return model
        return quantized_copy(by_size[left_out:])

    left_out, timings = latency_search.fastest_split(build, len(by_size), feed)
    for node in by_size[:left_out]:
        report.skip(node, f"kept in float: the model runs faster so (speed check, batch {batch})")
    stages = "; then ".join(
        ", ".join(f"{t.left_out}: {t.median_ms:.3g}" for t in stage) for stage in timings
    )
    report.notes.append(
        f"speed check (batch {batch}, 1 thread), ms with the k smallest layers in float, "
        f"k: ms: {stages}; kept the {left_out} smallest of {len(by_size)} in float"
    )
    return [node for node in anchors if node not in by_size[:left_out]]


class Slowdown:
    """A model's latency over the original's, timed interleaved on one thread at ``batch`` (as
    the speed check and the latency search time them); the original's session and the feed
    are made at the first timing, so that a control that never times pays nothing."""

    def __init__(self, model: ir.Model, context: PassContext, *, batch: int) -> None:
        self._model, self._context, self._batch = model, context, batch
        self._original: tuple[ort.InferenceSession, Feed] | None = None

    def __call__(self, candidate: ir.Model) -> float:
        provider = self._context.providers[0]
        if self._original is None:
            feed = resized(self._context.data.feed_at(0), self._model, self._batch)
            # Timing needs a plain session on one thread, as a deployment runs the model (not
            # the calibration runner's copy that exposes tensors).
            session = runtime.create_session(self._model, provider, threads=1)
            self._original = session, feed
        session, feed = self._original
        original, timed = latency_search.median_times([session, candidate], feed, provider)
        return timed / original


def _weight_size(node: ir.Node) -> float:
    """Elements of an anchor's weight: the work its INT8 kernel spreads its overhead over."""
    shape = node.inputs[1].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return math.inf
    return math.prod(shape)
