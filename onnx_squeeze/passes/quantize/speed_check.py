"""The speed check: time the model on this machine and keep the smallest quantized layers in
float for as many as makes the whole model fastest (INT8 loses on narrow layers at small batches
on CPUs without VNNI); by default only where the quantized model, timed once, runs slower than
the float one (:func:`unless_slower`); and the latency ratio that bounds accuracy control
(:class:`Slowdown`).

Where INT8 runs slower is a matter of onnxruntime's kernels on this CPU, not of placement alone:
ppocr_cls (MobileNetV3, 48x192 lines, 0.7 ms in float) ran 1.85x the float model's latency in
INT8 with AVX-512 VNNI. Its 5x5 depthwise QLinearConvs take 30-80 us each against 5-10 us for
the float NCHWc kernels, and every switch between the integer layers and the float HardSwish
and squeeze-excite ops adds a QuantizeLinear/DequantizeLinear and an NHWC Transpose; with
every depthwise Conv and the stem in float it still ran 1.13-1.2x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import latency_search, layer_times, runtime
from onnx_squeeze.calibration.feeds import Feed
from onnx_squeeze.calibration.service import resized
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.verdict import SLOWER_MARGIN


def fastest(
    model: ir.Model,
    anchors: Sequence[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    *,
    batch: int,
) -> tuple[list[ir.Node], float | None]:
    """The ``anchors`` to quantize: all but the smallest layers (by weight size) kept in float,
    as many as makes the model fastest at ``batch`` (``quantized_copy`` quantizes the given
    anchors of a copy); and the model's latency with them over the float model's, where one
    stage of the search timed both (None otherwise)."""
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
    kept = [node for node in anchors if node not in by_size[:left_out]]
    for stage in reversed(timings):
        median = {t.left_out: t.median_ms for t in stage}
        if left_out in median and len(by_size) in median:
            return kept, median[left_out] / median[len(by_size)]
    return kept, None


def unless_slower(
    model: ir.Model,
    anchors: Sequence[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    *,
    batch: int,
    slowdown: Callable[[ir.Model], float],
) -> list[ir.Node]:
    """The ``anchors`` to quantize: all of them where the model with them quantized runs at most
    ``SLOWER_MARGIN`` times the float ``model``'s latency (``slowdown``, one timing); otherwise
    those :func:`fastest` keeps, with a warning where INT8 pays for none of them."""
    if not anchors:
        return []
    ratio = slowdown(quantized_copy(anchors))
    timed = f"{ratio:.3g}x the float model's latency; CPU time, 1 thread, batch {batch}"
    if ratio <= SLOWER_MARGIN:
        report.notes.append(f"speed check: the quantized model runs faster here ({timed})")
        return list(anchors)
    kept, mixed = fastest(model, anchors, quantized_copy, context, report, batch=batch)
    slower = f"INT8 runs slower than float on this CPU for this model ({timed})"
    floated = f"{len(anchors) - len(kept)} of {len(anchors)} layers left float, the smallest"
    if kept and mixed is not None and mixed >= 1.0:  # a tie with float, within the tolerance
        report.notes.append(
            f"WARNING: {slower}: {floated}; the rest run no faster than float ({mixed:.3g}x): "
            "INT8 buys size here, not speed"
        )
    elif kept:
        report.notes.append(f"{slower}: {floated}, where the model runs fastest")
    else:
        report.notes.append(
            f"WARNING: {slower}: all {len(anchors)} layers left float (speed_check=false "
            "quantizes them anyway)"
        )
    return kept


# Runs of each model that :meth:`Slowdown.layer_savings` profiles (after one warm-up).
PROFILE_RUNS = 20


class Slowdown:
    """A model's latency over the original's, timed interleaved on one thread at ``batch`` (as
    the speed check and the latency search time them); the original's session and the feed
    are made at the first timing, so that a control that never times pays nothing."""

    def __init__(self, model: ir.Model, context: PassContext, *, batch: int) -> None:
        self._model, self._context, self._batch = model, context, batch
        self._original: tuple[ort.InferenceSession, Feed] | None = None

    def __call__(self, candidate: ir.Model) -> float:
        session, feed = self._session()
        provider = self._context.providers[0]
        original, timed = latency_search.median_times([session, candidate], feed, provider)
        return timed / original

    def _session(self) -> tuple[ort.InferenceSession, Feed]:
        if self._original is None:
            feed = resized(self._context.data.feed_at(0), self._model, self._batch)
            # Timing needs a plain session on one thread, as a deployment runs the model (not
            # the calibration runner's copy that exposes tensors).
            session = runtime.create_session(self._model, self._context.providers[0], threads=1)
            self._original = session, feed
        return self._original

    def layer_savings(self, quantized: ir.Model, names: Sequence[str]) -> dict[str, float] | None:
        """Per layer named, the microseconds per run that INT8 saves: its kernel time in the
        original less in ``quantized`` (onnxruntime's profiles of both, one thread, at the
        timing's batch; :mod:`onnx_squeeze.layer_times`), none below 0; None where a profile
        times not every layer named (a kernel named after no node of the model)."""
        _, feed = self._session()
        provider = self._context.providers[0]
        times = [
            {
                node.name: t
                for node, t in layer_times.measure(
                    m, feed, provider=provider, threads=1, runs=PROFILE_RUNS
                ).nodes.items()
            }
            for m in (self._model, quantized)
        ]
        if not all(name in found for found in times for name in names):
            return None
        return {name: max(times[0][name] - times[1][name], 0.0) for name in names}


def _weight_size(node: ir.Node) -> float:
    """Elements of an anchor's weight: the work its INT8 kernel spreads its overhead over."""
    shape = node.inputs[1].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return math.inf
    return math.prod(shape)
