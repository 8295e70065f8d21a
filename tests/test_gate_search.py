"""The default's search over pruned fractions: bisection below 30 % of the MACs, bounded in time
by what the first candidate cost. Candidates are judged numerically in onnxruntime against the
original (the gate check)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from onnx_squeeze import runtime
from onnx_squeeze.calibration import RandomSource
from onnx_squeeze.passes.prune_channels import gate_search
from onnx_squeeze.records import PassContext, PassReport
from tests.test_gate_check import GATE, WEIGHT, _classifier
from tests.test_prune_channels_default import _context, _two_branches


def _scale_weights(copy: ir.Model, fraction: float, report: PassReport) -> None:
    """A stand-in for pruning that any strict gate notices: one weight scaled by 1 - fraction."""
    value = copy.graph.initializers["wd"]
    value.const_value = ir.tensor(value.const_value.numpy() * (1 - fraction), name="wd")
    report.record(value.uses()[0].node, "pruned", "weights scaled")


def _search(model: ir.Model) -> gate_search.GateSearch:
    return gate_search.GateSearch(
        model, _context(model), _scale_weights, target="worst_channel_sqnr_db>=80", recover=False
    )


def test_bisection_tries_every_step_within_the_time_bound():
    model = _two_branches(1.0)
    search = _search(model)
    best, tried = search.search(3)
    assert best is None and [c.fraction for c in tried] == [0.3, 0.15, 0.075]
    assert all("worst_channel_sqnr_db" in c.said for c in tried)
    assert not search.notes
    assert all(c.model is None for c in tried)  # none kept: no pruned copy held


def test_the_search_stops_before_a_candidate_that_would_pass_the_time_bound(monkeypatch):
    """With a bound the first candidate already used up, no second one is tried, and the notes
    say so and how to skip the search."""
    monkeypatch.setattr(gate_search, "SEARCH_SECONDS", 0.0)
    model = _two_branches(1.0)
    search = _search(model)
    best, tried = search.search(3)
    assert best is None and [c.fraction for c in tried] == [0.3]
    assert not tried[0].passed
    (note,) = search.notes
    assert "stopped after 1 of 3 candidates" in note and "--prune-channels FRACTION" in note


def test_a_first_candidate_that_meets_the_gate_ends_the_search_without_a_note(monkeypatch):
    monkeypatch.setattr(gate_search, "SEARCH_SECONDS", 0.0)
    model = _two_branches(1.0)
    search = gate_search.GateSearch(
        model, _context(model), _scale_weights, target="worst_channel_sqnr_db>=1", recover=False
    )
    best, tried = search.search(3)
    assert best is tried[0] and best.passed and len(tried) == 1
    assert best.model.graph.initializers["wd"].const_value.numpy() == pytest.approx(
        model.graph.initializers["wd"].const_value.numpy() * 0.7
    )
    assert not search.notes


@pytest.mark.parametrize(("batches", "held"), [(100, 50), (300, 60)])
def test_recovery_gives_up_batches_to_the_reads_the_gate_needs(batches, held):
    """A classifier at batch 1 reads one row a batch: a 0.98 gate needs 50, so of 100 batches
    every 2nd is held back from recovery; of 300, every 5th as usual."""
    model = _classifier(WEIGHT)
    source = RandomSource(runtime.input_specs(model), count=batches, batch_size=1, seed=1)
    context = PassContext(calibration=source, teacher=model.clone())
    search = gate_search.GateSearch(model, context, _scale_weights, target=GATE, recover=False)
    assert list(search.check.feeds) == ["held"]  # the probe that sized it is let go
    assert len(search.check.feeds["held"]) == held
    assert search.data.startswith(f"{held} calibration batches held back from recovery")
    assert len(search.fitting.data) == batches - held


def test_without_an_agreement_every_5th_batch_is_held_back():
    model = _classifier(WEIGHT)
    source = RandomSource(runtime.input_specs(model), count=13, batch_size=1, seed=1)
    context = PassContext(calibration=source, teacher=model.clone())
    search = gate_search.GateSearch(
        model, context, _scale_weights, target="worst_channel_sqnr_db>=20", recover=False
    )
    assert (len(search.check.feeds["held"]), len(search.fitting.data)) == (2, 11)
