"""The calibration statistics quantizers read: activation histograms and ranges read until
they settle (INT8), largest magnitudes (FP16 range checks, FP8 scales); each kept in the
calibration service's store for the model and data they were measured on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from onnx_squeeze.calibration import StatisticsCollector, TensorStatistics
from onnx_squeeze.passes.quantize.bias_correction import OUTPUT_MEANS, FirstMeans
from onnx_squeeze.passes.quantize.params import IntType
from onnx_squeeze.passes.quantize.settling import RangeSettling
from onnx_squeeze.records import PassContext, PassReport


def settled_statistics(
    model: ir.Model,
    names: Sequence[str],
    context: PassContext,
    report: PassReport,
    *,
    range_of: Callable[[TensorStatistics], tuple[float, float]],
    activation: IntType,
    channel_axes: Mapping[str, int],
    output_axes: Mapping[str, int],
    histogram_bins: int,
    histogram_values: int,
    calibration_batches: int,
    settle_db: float,
) -> dict[str, TensorStatistics]:
    """Min/max and histograms of ``names``, and per-channel statistics along ``channel_axes``
    (bias correction's input means) in the same calibration run, read until the ranges (by
    ``range_of``) settle; stored per model, data and reading settings. The same run keeps, for
    output bias correction, the channel means of ``output_axes``'s tensors over its first
    batches."""
    cached: dict[str, TensorStatistics] = context.data.store(
        model,
        "quantize_int8.statistics",
        histogram_bins,
        histogram_values,
        calibration_batches,
        settle_db,
    )
    missing = [
        name
        for name in names
        if name not in cached or (name in channel_axes and cached[name].means is None)
    ]
    if missing:
        axes = {n: channel_axes[n] for n in missing if n in channel_axes}
        outputs = FirstMeans({n: a for n, a in output_axes.items() if n not in axes})
        collector = StatisticsCollector(
            model,
            [*missing, *outputs.axes],
            histogram_bins=histogram_bins,
            channel_axis={**axes, **outputs.axes},
            keep=("minmax", "histogram", "means"),
            sample_values=histogram_values,
        )
        limit = calibration_batches or None
        settling = RangeSettling(range_of, activation, settle_db, tensors=set(missing))
        collected = collector.collect(
            context.data,
            limit=limit,
            stop=lambda read, kept: outputs(read, kept) or settling(read, kept),
        )
        if outputs.axes:
            outputs.take_last(collected, limit)
            context.data.store(model, OUTPUT_MEANS)["first"] = outputs
        cached.update({name: collected[name] for name in missing})
        if settling.stopped_at is not None:
            _, average, worst, name = settling.checks[-1]
            report.notes.append(
                f"calibration read {settling.stopped_at} batches and stopped: the ranges "
                f"had settled (those from the first half would have added {average:+.3f} "
                f"dB of noise on average, at most {worst:+.3f} dB at {name}); "
                "settle_db=0 reads every batch"
            )
    return {name: cached[name] for name in names}


def largest_magnitudes(
    model: ir.Model, names: list[str], context: PassContext, limit: int
) -> dict[str, float]:
    """Largest absolute value of each named tensor over the first ``limit`` calibration
    batches (stored)."""
    cache: dict[str, float] = context.data.store(model, "largest_magnitude", limit)
    missing = [name for name in names if name not in cache]
    if missing:
        collector = StatisticsCollector(model, missing, keep=("minmax",), channel_axis=None)
        statistics = collector.collect(context.data, limit=limit, progress=False)
        for name, stats in statistics.items():
            assert stats.minmax is not None
            cache[name] = max(abs(stats.minmax.min), abs(stats.minmax.max))
    return {name: cache[name] for name in names}
