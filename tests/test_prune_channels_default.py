"""Channel pruning's default: up to 30 % of the MACs, as much as still meets the fidelity gate
(judged after recovery when recovery follows), else the model unchanged with a warning; an
explicit fraction is honoured exactly. Checked numerically in onnxruntime against the original."""

from __future__ import annotations

import argparse

import numpy as np
import onnx_ir as ir
import pytest

from onnx_squeeze import analysis, fidelity, runtime, shortcuts
from onnx_squeeze.calibration import RandomSource
from onnx_squeeze.passes.prune_channels import PruneChannels
from onnx_squeeze.passes.prune_channels import gate_search as gate_search_module
from onnx_squeeze.passes.prune_channels.sensitivity import Sensitivity
from onnx_squeeze.records import PassContext
from tests.helpers import assert_same_outputs, check, random_feeds, run
from tests.test_channel_groups import graph_model
from tests.test_prune_channels import TWO_BRANCHES, _counted


def _two_branches(quiet: float) -> ir.Model:
    """Two Conv branches of equal MACs added at the output; the second read through weights
    scaled by ``quiet`` (small: its channels hardly matter); nodes named, as recovery matches
    layers by name."""
    model = graph_model(TWO_BRANCHES)
    for index, node in enumerate(model.graph):
        node.name = f"{node.op_type}_{index}"
    value = model.graph.initializers["wd"]
    value.const_value = ir.tensor(value.const_value.numpy() * quiet, name="wd")
    return model


def _context(model: ir.Model) -> PassContext:
    """Ten batches of two samples (the search holds every 5th back), the model as teacher."""
    source = RandomSource(runtime.input_specs(model), count=20, batch_size=2, seed=1)
    return PassContext(calibration=source, teacher=model.clone())


def _prune(model: ir.Model, **settings):
    pruned = model.clone()
    report = PruneChannels(**settings)(pruned, _context(model))
    return pruned, report


def _macs_ratio(pruned: ir.Model, model: ir.Model) -> float:
    return analysis.analyze(pruned).macs / analysis.analyze(model).macs


def _worst_channel_sqnr(model: ir.Model, pruned: ir.Model) -> float:
    feeds = random_feeds(model, 4, batch=2)
    reference = [{"y": run(model, feed)[0]} for feed in feeds]
    result = [{"y": run(pruned, feed)[0]} for feed in feeds]
    return fidelity.measure(reference, result)["y"].worst_channel_sqnr_db


def test_default_prunes_up_to_30_percent_where_the_gate_holds():
    """The quiet branch costs little output error: the first candidate (30 % of the MACs)
    meets the default gate and is kept, and the result meets it on other data too. (With the
    branch scaled by 0.01, 1.6 % of the 256 positions' top channels move: 0.984 does not show
    a 0.98 gate at its lower bound, and the search rightly keeps the model.)"""
    model = _two_branches(0.003)
    pruned, report = _prune(model)
    check(pruned)
    assert 0.6 <= _macs_ratio(pruned, model) <= 0.7
    note = next(n for n in report.notes if n.startswith("default: up to 30%"))
    assert "30.0% pruned meets it" in note and "tried 30.0% meets)" in note, note
    assert _worst_channel_sqnr(model, pruned) > 12


def test_default_leaves_the_model_unchanged_with_a_warning_when_no_step_meets_the_gate():
    model = _two_branches(1.0)
    pruned, report = _prune(model, target="worst_channel_sqnr_db>=80", gate_steps=2)
    assert not report.changed
    warning = next(n for n in report.notes if n.startswith("WARNING:"))
    assert "left the model unchanged" in warning and "15.0% of the MACs" in warning, warning
    assert "tried 30.0% misses, 15.0% misses" in warning and "--prune-channels FRACTION" in warning
    assert_same_outputs(model, pruned, random_feeds(model, 2, batch=2))


def test_default_bisects_to_the_largest_share_that_meets_the_gate(monkeypatch):
    """A gate that holds while at most 20 % of the MACs are gone: 30 % misses, 15 % meets,
    22.5 % misses, so 15 % is kept; the sensitivities are measured once for all three."""
    model = _two_branches(1.0)
    total = analysis.analyze(model).macs

    def within_20_percent(self, copy, on):
        removed = 1 - analysis.analyze(copy).macs / total
        return removed <= 0.2, f"removed {removed:.3f}"

    monkeypatch.setattr(gate_search_module.GateCheck, "__call__", within_20_percent)
    measured = _counted(monkeypatch, Sensitivity, "curves")
    pruned, report = _prune(model, round_to=1)
    check(pruned)
    assert len(measured) == 1  # the candidates share one measurement of the sensitivities
    assert 0.8 <= _macs_ratio(pruned, model) <= 0.85
    note = next(n for n in report.notes if n.startswith("default:"))
    assert "tried 30.0% misses, 15.0% meets, 22.5% misses" in note, note


def test_default_judges_and_keeps_the_recovered_candidate():
    """With ``recover``, each candidate is refitted by reconstruct before it is judged (on
    batches held back from the fit), and the one kept is the recovered one."""
    model = _two_branches(0.3)
    plain, _ = _prune(model, target="worst_channel_sqnr_db>=1", gate_steps=1)
    recovered, report = _prune(model, target="worst_channel_sqnr_db>=1", gate_steps=1, recover=True)
    check(recovered)
    assert any(record.action == "refit" for record in report.records)
    assert any(note.startswith("recovery: ") for note in report.notes)
    note = next(n for n in report.notes if n.startswith("default:"))
    assert "pruned and recovered meets it" in note and "held back from recovery" in note
    assert _macs_ratio(recovered, model) == pytest.approx(_macs_ratio(plain, model))
    assert _worst_channel_sqnr(model, recovered) > _worst_channel_sqnr(model, plain) + 1


def test_an_explicit_target_is_honoured_without_a_search(monkeypatch):
    model = _two_branches(1.0)
    searched = _counted(monkeypatch, gate_search_module.GateSearch, "search")
    pruned, _ = _prune(model, macs_target=0.3, target="worst_channel_sqnr_db>=80")
    assert not searched
    assert _macs_ratio(pruned, model) <= 0.7


def test_ratio_zero_given_is_the_identity_not_the_default():
    model = _two_branches(0.01)
    pruned, report = _prune(model, ratio=0.0)
    assert not report.changed and not any(n.startswith("default") for n in report.notes)
    assert_same_outputs(model, pruned, random_feeds(model, 1))


def _steps(*flags: str, calibrated: bool) -> list[tuple[str, dict]]:
    parser = argparse.ArgumentParser()
    shortcuts.add_arguments(parser)
    steps = shortcuts.steps_from_args(parser.parse_args(list(flags)), calibrated=calibrated)
    return [(step.name, step.settings) for step in steps]


def test_the_bare_flag_asks_for_the_default_and_folds_recovery_into_it():
    assert _steps("--prune-channels", calibrated=True) == [("prune_channels", {"recover": True})]
    assert _steps("--prune-channels", calibrated=False) == [("prune_channels", {"recover": False})]
    assert _steps("--prune-channels", "--no-recover", calibrated=True) == [
        ("prune_channels", {"recover": False})
    ]
    both = _steps("--prune-channels", "--prune-weights", "0.5", calibrated=True)
    assert [name for name, _ in both] == ["prune_channels", "prune_weights", "reconstruct"]
    explicit = _steps("--prune-channels", "0.3", calibrated=True)
    assert explicit == [("prune_channels", {"macs_target": 0.3}), ("reconstruct", {})]


def test_sensitivity_reads_only_the_batches_its_output_channels_need():
    """A map output gives every channel many values per batch: two batches are enough; a
    classifier's [N, C] output gives one per sample: all the batches are read (up to 32
    values per channel). They are joined into one run (the batch axis is free)."""
    rng = np.random.default_rng(0)
    model = _two_branches(1.0)
    feeds = _context(model).data.first_batches(4)  # 2 samples each
    sensitivity = object.__new__(Sensitivity)  # only its outputs, model and kinds are needed
    sensitivity.model = model
    sensitivity.kinds = fidelity.OutputKinds()  # the stand-in outputs declare nothing
    for shape, samples in (((2, 8, 8, 8), 4), ((1, 10), 8)):
        output = {"y": rng.standard_normal(shape).astype(np.float32)}
        sensitivity._outputs = lambda feeds, plan, output=output: [output] * len(feeds)
        (joined,) = sensitivity.enough(feeds)
        assert joined["x"].shape[0] == samples, shape
