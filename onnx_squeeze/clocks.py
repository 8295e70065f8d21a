"""Which clock a timing reads, and timing on it: at one thread on the CPU, the CPU time of the
thread that runs the model; otherwise wall time.

With one intra-op thread onnxruntime computes in the calling thread, so that thread's CPU clock
counts the model's work and not the time other jobs hold the cores. On a machine shared with
other jobs the wall clock is noise a search cannot rank on: the digits CNN, 2 cores at a load
of 12-18, the same model measured 0.30x and 0.45x of the original in two trials, and wall-clock
medians of the same four models moved by 2x from run to run, their CPU-time ratios by under 5 %.
The search's trials, latency-steered pruning's checks and its per-layer profile
(:mod:`onnx_squeeze.layer_times`) all read this policy, so that what pruning planned for is what
the search measures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import runtime

BURST_S = 0.005  # CPU seconds per round at least: a faster model runs back to back within it


def cpu_clock(providers: Sequence[str], threads: Sequence[int | None]) -> bool:
    """Whether a timing reads the thread's CPU time: one thread on the CPU (with a thread pool,
    the calling thread's clock would miss the pool's work)."""
    return list(providers)[:1] == ["cpu"] and list(threads) == [1]


def cpu_ms(
    models: Sequence[str | os.PathLike | ir.Model | ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    runs: int = 10,
    seconds: float = 0.0,
) -> list[float]:
    """Each model's CPU milliseconds per run of ``feed`` (the inputs each one has) at one
    thread: the median of ``runs`` interleaved rounds (:func:`timed_runs`) after three warm-up
    runs, or of as many more as fit in ``seconds`` (at most ten times ``runs``). A model may be
    given as a session made with ``threads=1``."""
    sessions = [
        m if isinstance(m, ort.InferenceSession) else runtime.create_session(m, "cpu", threads=1)
        for m in models
    ]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for session, inputs in zip(sessions, feeds, strict=True):
        for _ in range(3):
            session.run(None, inputs)
    timed = timed_runs(sessions, feeds, runs, cpu=True, seconds=seconds)
    return [float(np.median(t)) for t in timed]


def timed_runs(
    sessions: Sequence[ort.InferenceSession],
    feeds: Sequence[Mapping[str, np.ndarray]],
    runs: int,
    *,
    cpu: bool,
    interleaved: bool = True,
    rounds: Callable[[Iterable[int], int | None], Iterable[int]] | None = None,
    seconds: float = 0.0,
) -> list[list[float]]:
    """Milliseconds per run of each warmed-up session on its feed, ``runs`` samples each (or as
    many more as fit in ``seconds``, at most ten times ``runs``: a fast model's few samples
    are few milliseconds of a noisy clock), on the thread's CPU clock (``cpu``) or the wall
    clock. Rounds are interleaved, the order
    rotated each round, unless ``interleaved=False`` (each model's runs in a row). A model
    faster than ``BURST_S`` is run back to back within each sample until that much time has
    passed and the mean counts: a single run after the other models' would time it with cold
    caches and the timer's own overhead, not as a serving loop runs it. ``rounds`` wraps the
    loops (a progress bar)."""
    clock = time.thread_time_ns if cpu else time.perf_counter_ns
    step = rounds or (lambda values, total: values)
    once = [_run_ms(s, f, 1, clock) for s, f in zip(sessions, feeds, strict=True)]
    bursts = [max(1, math.ceil(BURST_S * 1000 / max(ms, 1e-6))) for ms in once]
    round_ms = sum(ms * burst for ms, burst in zip(once, bursts, strict=True))
    runs = max(runs, min(10 * runs, math.floor(seconds * 1000 / max(round_ms, 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    count = len(sessions)
    if interleaved:
        for round_index in step(range(max(1, runs)), runs):
            for offset in range(count):
                index = (round_index + offset) % count
                times[index].append(_run_ms(sessions[index], feeds[index], bursts[index], clock))
    else:
        for index in range(count):
            for _ in step(range(max(1, runs)), runs):
                times[index].append(_run_ms(sessions[index], feeds[index], bursts[index], clock))
    return times


def _run_ms(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    count: int,
    clock: Callable[[], int],
) -> float:
    start = clock()
    for _ in range(count):
        session.run(None, feed)
    return (clock() - start) / 1e6 / count


def interrupted_us(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
    """One run of ``feed``: the microseconds its thread did not run (wall time less the
    thread's CPU time), which other jobs took; a profiled run with little of it timed the
    model's kernels as the CPU clock would."""
    wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
    session.run(None, dict(feed))
    return ((time.perf_counter_ns() - wall) - (time.thread_time_ns() - cpu)) / 1e3
