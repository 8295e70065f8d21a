"""The split search, on synthetic timings: which split it picks, how it breaks ties, what it
times. Real timings are exercised by the quantize_int8 speed-check tests."""

from __future__ import annotations

import pytest

from onnx_squeeze import latency_search
from onnx_squeeze.latency_search import SplitTiming


def fake_timings(monkeypatch, cost):
    timed: list[list[int]] = []

    def timings(build, splits, feed):
        timed.append(list(splits))
        return [SplitTiming(k, cost(k)) for k in splits]

    monkeypatch.setattr(latency_search, "_timings", timings)
    return timed


@pytest.mark.parametrize("best", [0, 3, 5, 8, 12, 16])
def test_finds_the_fastest_split_of_a_valley(monkeypatch, best):
    timed = fake_timings(monkeypatch, lambda k: 1.0 + abs(k - best))
    left_out, stages = latency_search.fastest_split(None, 16, {})
    assert timed[0] == [0, 4, 8, 12, 16]
    assert abs(left_out - best) <= 2
    assert stages[-1] == [SplitTiming(k, 1.0 + abs(k - best)) for k in timed[1]]


def test_ties_go_to_the_split_that_converts_most(monkeypatch):
    # flat within 3 % from k = 6 on: the smallest such k wins, leaving fewest layers float
    fake_timings(monkeypatch, lambda k: 2.0 if k < 6 else 1.0 + 0.001 * (16 - k))
    left_out, _ = latency_search.fastest_split(None, 16, {})
    assert left_out == 6


def test_a_model_with_one_layer_times_both_forms(monkeypatch):
    timed = fake_timings(monkeypatch, lambda k: [2.0, 1.0][k])
    left_out, _ = latency_search.fastest_split(None, 1, {})
    assert timed[0] == [0, 1]
    assert left_out == 1
