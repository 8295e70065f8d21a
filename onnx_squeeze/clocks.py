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
from collections.abc import Mapping, Sequence

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
) -> list[float]:
    """Each model's CPU milliseconds per run of ``feed`` (the inputs each one has) at one
    thread: the median of ``runs`` rounds, the models interleaved and the order rotated each
    round, a fast model's round being a burst of back-to-back runs (the mean counts). A model
    may be given as a session made with ``threads=1``."""
    sessions = [
        m if isinstance(m, ort.InferenceSession) else runtime.create_session(m, "cpu", threads=1)
        for m in models
    ]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    bursts = []
    for session, inputs in zip(sessions, feeds, strict=True):
        for _ in range(3):
            session.run(None, inputs)
        once = _cpu_run(session, inputs, 1)
        bursts.append(max(1, math.ceil(BURST_S * 1000 / max(once, 1e-6))))
    times: list[list[float]] = [[] for _ in sessions]
    for round_index in range(max(1, runs)):
        for offset in range(len(sessions)):
            index = (round_index + offset) % len(sessions)
            times[index].append(_cpu_run(sessions[index], feeds[index], bursts[index]))
    return [float(np.median(t)) for t in times]


def _cpu_run(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], count: int) -> float:
    start = time.thread_time_ns()
    for _ in range(count):
        session.run(None, feed)
    return (time.thread_time_ns() - start) / 1e6 / count


def interrupted_us(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
    """One run of ``feed``: the microseconds its thread did not run (wall time less the
    thread's CPU time), which other jobs took; a profiled run with little of it timed the
    model's kernels as the CPU clock would."""
    wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
    session.run(None, dict(feed))
    return ((time.perf_counter_ns() - wall) - (time.thread_time_ns() - cpu)) / 1e3
