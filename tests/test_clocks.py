"""The one clock policy: at one thread on the CPU a timing reads the thread's CPU time, which
other jobs on the machine do not move; the search, latency-steered pruning's checks and its
per-layer profile all read it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnx_squeeze import clocks, latency_search, model_io, runtime, zoo


def test_cpu_time_ranks_a_bigger_model_slower_and_a_copy_the_same(tmp_path):
    small, big = zoo.build("mlp", width=0.25), zoo.build("mlp", width=8.0)
    model_io.save(small, tmp_path / "small.onnx")
    model_io.save(big, tmp_path / "big.onnx")
    feeds = {"input": np.ones((1, 64), np.float32)}
    paths = [tmp_path / "small.onnx", tmp_path / "big.onnx", tmp_path / "small.onnx"]
    first, second, copy = clocks.cpu_ms(paths, feeds, runs=5)
    assert second > 3 * first and copy == pytest.approx(first, rel=0.5)


def test_a_timing_given_seconds_runs_more_rounds_up_to_ten_times():
    """A fast model's few rounds are few samples of a noisy clock: given seconds, as many more
    rounds as fit run (each round at least ``BURST_S`` a model), at most ten times ``runs``."""
    session = runtime.create_session(zoo.build("mlp", width=0.25), "cpu", threads=1)
    feed = {"input": np.ones((1, 64), np.float32)}

    def samples(seconds: float) -> list[int]:
        timed = clocks.timed_runs([session, session], [feed, feed], 3, cpu=True, seconds=seconds)
        return [len(t) for t in timed]

    assert samples(0.0) == [3, 3]
    more = samples(0.1)  # a round: 2 x 5 ms and a little more
    assert 3 < more[0] <= 10 and more[0] == more[1]
    assert samples(10.0) == [30, 30]


@pytest.mark.parametrize(
    ("providers", "threads", "cpu"),
    [(["cpu"], [1], True), (["cpu"], [4], False), (["cpu"], [1, 4], False), (["cuda"], [1], False)],
)
def test_only_one_cpu_thread_reads_the_cpu_clock(providers, threads, cpu):
    assert clocks.cpu_clock(providers, threads) is cpu


def test_latency_checks_on_the_cpu_read_the_cpu_clock(monkeypatch):
    """A thread that sleeps in the middle of every run (as one preempted by other jobs) is
    timed by its work only: median_times, which latency-steered pruning and INT8's speed check
    read, counts CPU time, so the sleep does not make the model look slower."""
    model = zoo.build("mlp", width=0.25)
    session = runtime.create_session(model, "cpu", threads=1)
    feed = {"input": np.ones((1, 64), np.float32)}
    plain = latency_search.median_times([session], feed)[0]
    run = session.run

    def interrupted(*args, **kwargs):
        time.sleep(0.002)
        return run(*args, **kwargs)

    monkeypatch.setattr(session, "run", interrupted)
    monkeypatch.setattr(clocks, "BURST_S", 0.0)  # one run per round: a short test
    slept = latency_search.median_times([session], feed)[0]
    assert slept < plain + 0.5  # 2 ms of sleep per run, not counted
    assert clocks.interrupted_us(session, feed) >= 1500
    # the one timing loop, on either clock: the wall clock counts the sleep
    (wall,), (cpu,) = (clocks.timed_runs([session], [feed], 3, cpu=c) for c in (False, True))
    assert len(wall) == len(cpu) == 3
    assert min(wall) >= 2.0 and max(cpu) < 1.5
