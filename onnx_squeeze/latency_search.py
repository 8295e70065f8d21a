"""How many of a model's smallest layers to leave unconverted so that it runs fastest, measured.

INT8 kernels pay off on wide layers. Narrow ones (few channels, depthwise, a batch of one) can
run slower than float on CPUs without VNNI, and every switch between float and INT8 adds a
QuantizeLinear/DequantizeLinear and often a layout change. Where the crossover lies depends on
the CPU, the batch and the onnxruntime version, so it is measured rather than predicted: the
caller orders its layers by size and builds the model with the ``k`` smallest left out; the
search times whole models (interleaved, on one thread) at the quartiles of ``k`` and then at the
midpoints beside the fastest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import clocks, comparison, runtime

TOLERANCE = 0.03  # a split this much slower than the fastest counts as a tie
ROUND_BUDGET_S = 1.5  # timing per stage, all candidates together
# the same in CPU time, whose medians are steadier (the pruned digits CNN against the original,
# 6 calls each at a load of 8: ratio sd 0.005 at 0.25 s in CPU time, 0.06 at 1.5 s of wall time)
CPU_ROUND_BUDGET_S = 0.3
MIN_RUNS, MAX_RUNS = 5, 50


@dataclasses.dataclass(frozen=True)
class SplitTiming:
    """Median latency of the model with the ``left_out`` smallest layers unconverted."""

    left_out: int
    median_ms: float


def median_times(
    models: Sequence[ir.Model | ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    provider: str = "cpu",
) -> list[float]:
    """Median milliseconds per run of each model on ``feed`` (the inputs each one has), timed
    interleaved on one thread within about ``ROUND_BUDGET_S``; on the CPU in the thread's CPU
    time (:mod:`onnx_squeeze.clocks`, within ``CPU_ROUND_BUDGET_S``), as the search that asks
    for a latency target measures it. A model may be given as a session made with
    ``threads=1``, so one timed often is loaded once."""
    sessions = [
        m if isinstance(m, ort.InferenceSession) else runtime.create_session(m, provider, threads=1)
        for m in models
    ]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [{k: v for k, v in feed.items() if k in wanted} for wanted in names]
    round_s = 0.0  # one timed sample of each: a single run, or a burst of at least BURST_S
    for session, data in zip(sessions, feeds, strict=True):
        start = time.perf_counter()
        session.run(None, data)
        round_s += max(time.perf_counter() - start, clocks.BURST_S)
    cpu = clocks.cpu_clock([provider], [1])
    budget = CPU_ROUND_BUDGET_S if cpu else ROUND_BUDGET_S
    runs = int(np.clip(budget / round_s, MIN_RUNS, MAX_RUNS))
    if cpu:
        return clocks.cpu_ms(sessions, feed, runs)
    return [m.median_ms for m in comparison.latency(sessions, feeds, warmup=2, runs=runs)]


def _timings(
    build: Callable[[int], ir.Model], splits: list[int], feed: Mapping[str, np.ndarray]
) -> list[SplitTiming]:
    times = median_times([build(k) for k in splits], feed)
    return [SplitTiming(k, ms) for k, ms in zip(splits, times, strict=True)]


def _choice(timings: list[SplitTiming]) -> SplitTiming:
    """The fastest split, or the one leaving fewest layers out among those within tolerance."""
    fastest = min(t.median_ms for t in timings)
    return min(
        (t for t in timings if t.median_ms <= fastest * (1 + TOLERANCE)), key=lambda t: t.left_out
    )


def fastest_split(
    build: Callable[[int], ir.Model], count: int, feed: Mapping[str, np.ndarray]
) -> tuple[int, list[list[SplitTiming]]]:
    """The number of smallest layers (0..``count``) to leave out for the fastest model, and the
    timings of both stages (the second decides: the best of the first, timed again beside its
    neighbours and the midpoints)."""
    coarse = sorted({round(count * i / 4) for i in range(5)})
    first = _timings(build, coarse, feed)
    best = _choice(first).left_out
    index = coarse.index(best)
    beside = [coarse[j] for j in (index - 1, index + 1) if 0 <= j < len(coarse)]
    fine = sorted({best, *beside, *((best + k) // 2 for k in beside)})
    second = _timings(build, fine, feed)
    return _choice(second).left_out, [first, second]
