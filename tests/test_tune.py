"""``onnx-squeeze tune``: targets and budgets, the search's logic on a synthetic executor
(choice, bisection, successive halving, resume), and real searches on a tiny MLP in trial
processes (a recipe that reproduces its model, a crashing trial, exit 3, Ray)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from onnx_squeeze import cli, model_io, zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.tune import parse_budget, parse_targets, tune
from onnx_squeeze.tune.results import pareto_front, table_rows
from onnx_squeeze.tune.space import (
    CHEAP_CRITERION,
    Param,
    Space,
    build_space,
    family_of,
    recipe_for,
)
from onnx_squeeze.tune.subset import least_samples
from onnx_squeeze.tune.targets import Budget, agreement, measured_gate
from onnx_squeeze.tune.trial import RESULT_FILE, run_trial
from tests.helpers import run

SAMPLES = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny MLP with calibration and held-out data (random, labelled as such by its name)."""
    folder = tmp_path_factory.mktemp("tune")
    model = zoo.small("mlp")
    path = folder / "mlp.onnx"
    model_io.save(model, path)
    spec = model.graph.inputs[0]
    width = spec.shape[1]
    rng = np.random.default_rng(0)
    data = rng.standard_normal((SAMPLES * 2, width)).astype(np.float32)
    np.savez(folder / "random_calib.npz", **{spec.name: data[:SAMPLES]})
    np.savez(folder / "random_eval.npz", **{spec.name: data[SAMPLES:]})
    return {
        "model": str(path),
        "calib": str(folder / "random_calib.npz"),
        "eval": str(folder / "random_eval.npz"),
        "folder": str(folder),
    }


# ----------------------------------------------------------------- targets, budgets, spaces


def test_targets_and_budgets_parse_and_refuse():
    targets = parse_targets(["latency=0.5,size=0.3", "macs=0.4"])
    assert [str(t) for t in targets] == ["latency=0.5", "size=0.3", "macs=0.4"]
    assert targets[0].shortfall({"latency_ratio": 0.5}) == 0
    assert targets[0].shortfall({"latency_ratio": 1.0}) == pytest.approx(math.log(2))
    speedup = parse_targets(["speedup=2"])[0]
    assert speedup.shortfall({"speedup": 2.5}) == 0 and speedup.shortfall({"speedup": 1.0}) > 0
    for bad in (["latency=2"], ["speedup=0.5"], ["fast=1"], ["latency=0.5", "speedup=2"], []):
        with pytest.raises(SettingsError):
            parse_targets(bad)
    assert parse_budget("top1", "1%", None).floor(0.9) == pytest.approx(0.891)
    assert parse_budget("top1", "0.01", None).floor(0.9) == pytest.approx(0.89)
    assert parse_budget("cosine", "0.01", None).gate == "cosine>=0.99"
    assert parse_budget("top1", "0.02", None).gate == "top1_agreement>=0.98"
    with pytest.raises(SettingsError, match="min-metric"):
        parse_budget("worst_channel_sqnr_db", "3", None).floor(math.inf)
    assert parse_budget("worst_channel_sqnr_db", None, 30).floor(math.inf) == 30
    with pytest.raises(SettingsError, match="unknown --metric"):
        parse_budget("accuracy", "0.01", None)


def test_agreement_reads_the_decisions_the_default_gate_reads():
    budget = parse_budget("agreement", "0.02", None)
    assert budget.gate == (
        "argmax_agreement>=0.98, score_agreement>=0.98, neighbour_agreement>=0.98, "
        "worst_value_channel_sqnr_db>=12"
    )
    # INT8's accuracy control aims at the parts the model has: a detector has no argmax
    detector = {"score_agreement": 0.95, "worst_value_channel_sqnr_db": 30.0, "cosine": 0.99}
    assert measured_gate(budget.gate, detector) == (
        "score_agreement>=0.98, worst_value_channel_sqnr_db>=12"
    )
    assert agreement(detector) == 0.95
    # scores kept, boxes broken: nothing kept
    assert agreement({**detector, "worst_value_channel_sqnr_db": 8.0}) == 0.0
    assert agreement({"argmax_agreement": 0.99, "neighbour_agreement": 0.9}) == 0.9
    # no decisions (a detector's raw grid): kept while its values hold the gate's floor
    assert agreement({"worst_value_channel_sqnr_db": 14.0}) == 1.0
    assert agreement({"worst_value_channel_sqnr_db": 11.0}) == 0.0
    assert agreement({"cosine": 0.999}) is None  # nothing the gate reads: tune says so
    assert math.isnan(agreement({"argmax_agreement": math.nan, "score_agreement": 1.0}))
    # a floor given directly is the level every decision is held to
    assert parse_budget("agreement", None, 0.9).gate.startswith("argmax_agreement>=0.9, ")


def test_spaces_per_family_and_recipes():
    assert family_of(zoo.small("resnet18")) == "cnn"
    assert family_of(zoo.small("yolo")) == "detector"
    assert family_of(zoo.small("transformer")) == "transformer"
    # recurrent layers multiply by weight matrices: an LSTM-only model (tashkeel) is searched
    # with dynamic INT8, not as a detector
    lstm = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        rnn (float[7, 1, 5] x) => (float[7, 1, 1, 3] y) {
          y, h, c = LSTM <hidden_size = 3> (x, w, r)
        }
        """
    )
    assert family_of(ir.from_proto(lstm)) == "transformer"
    cnn = {p.name for p in build_space("cnn").params}
    assert {"prune", "criterion", "quantize", "int8_method"} <= cnn and "low_rank" not in cnn
    transformer = build_space("transformer")
    assert "low_rank" in {p.name for p in transformer.params}
    assert "int8_dynamic" in transformer.param("quantize").choices
    assert "fp16" not in transformer.param("quantize").choices
    assert "fp16" in build_space("cnn", providers=("cuda",)).param("quantize").choices
    recipe = recipe_for(
        {
            "prune": 0.3,
            "steer": "latency",
            "recover": True,
            "quantize": "int8",
            "int8_method": "mse",
        },
        gate="top1_agreement>=0.99",
    )
    assert [s.name for s in recipe.steps] == ["prune_channels", "reconstruct", "quantize_int8"]
    assert recipe.steps[0].settings["latency_target"] == 0.3
    assert recipe.steps[2].settings["target"] == "top1_agreement>=0.99"  # accuracy control
    assert recipe_for({"prune": 0.0, "recover": True, "quantize": "none"}).steps == []


def test_the_pilot_is_the_presets_recipe_at_a_pruning_fraction():
    cnn = build_space("cnn")
    int8_arm, pruned_arm = cnn.pilots
    timed = cnn.pilot_point(int8_arm, 0.4, timed=True)
    assert timed == {
        "prune": 0.4,
        "steer": "latency",
        "criterion": "reconstruction",
        "recover": True,
        "quantize": "int8",
        "int8_method": "mse",
        "speed_check": True,
    }
    assert cnn.pilot_point(int8_arm, 0.4, timed=False)["steer"] == "macs"
    # no pruning: the settings of pruning are not drawn, INT8 alone under accuracy control
    alone = recipe_for(cnn.pilot_point(int8_arm, 0.0, timed=True), gate="top1_agreement>=0.9")
    assert [(s.name, s.settings) for s in alone.steps] == [
        ("quantize_int8", {"method": "mse", "speed_check": True, "target": "top1_agreement>=0.9"})
    ]
    # the second arm prunes the same way without INT8; its lowest fraction is no recipe at all
    pruned = recipe_for(cnn.pilot_point(pruned_arm, 0.6, timed=True))
    assert [s.name for s in pruned.steps] == ["prune_channels", "reconstruct"]
    assert recipe_for(cnn.pilot_point(pruned_arm, 0.0, timed=True)).steps == []
    transformer = build_space("transformer")
    assert transformer.pilot_point(transformer.pilots[0], 0.0, timed=True)["low_rank"] == 0.0
    lines = cnn.describe()
    assert "  first: --recipe fast, aimed at the budget" in lines  # the family's preset
    arms = [line for line in lines if line.startswith("  then: prune bisected")]
    assert len(arms) == 2 and "finetune" not in arms[0]  # fine-tuning not asked for
    # asked for, fine-tuning is a third arm: the second's pruning, fine-tuned
    tuned = build_space("cnn", finetune=True).pilots
    assert len(tuned) == 3 and {**tuned[1], "finetune": tuned[2]["finetune"]} == tuned[2]
    assert tuned[2]["finetune"] > 0
    # the highest fraction is a pruning fraction too: its steering and criterion are drawn
    assert cnn.param("criterion").active({"prune": 0.7})


def test_pareto_front_keeps_only_undominated_trials():
    class T:
        def __init__(self, number, latency, value):
            self.number, self.value, self.ok = number, value, True
            self.metrics = {"latency_ratio": latency}

    trials = [T(0, 1.0, 1.0), T(1, 0.5, 0.9), T(2, 0.6, 0.85), T(3, 0.3, 0.7), T(4, 0.5, 0.95)]
    assert sorted(pareto_front(trials, "latency_ratio")) == [0, 3, 4]


# ----------------------------------------------------------------- the search, synthetic


class Synthetic:
    """Trials measured by formula: latency and MACs fall with the pruning fraction (INT8 takes
    another 40 % of the time), the metric falls with its square (half as fast fine-tuned)."""

    where = "synthetic"

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def run(self, jobs, end=None):
        results = []
        for job in jobs:
            self.jobs.append(job)
            folder = Path(job["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.onnx").write_bytes(Path(job["model"]).read_bytes())
            steps = {s["pass"]: s for s in job["recipe"]["passes"]}
            pruning = steps.get("prune_channels", {})
            prune = pruning.get("macs_target", pruning.get("latency_target", 0.0))
            int8 = "quantize_int8" in steps
            latency = (1 - prune) * (0.6 if int8 else 1.0)
            value = (
                1
                - 0.2 * prune**2 * (0.5 if "finetune" in steps else 1)
                - (0.005 if int8 else 0)
                - (0.002 if job.get("eval_limit") else 0)
            )
            metrics = {
                "latency_ratio": latency,
                "speedup": 1 / latency,
                "size_ratio": (1 - prune) * (0.25 if int8 else 1),
                "macs_ratio": 1 - prune,
                "top1_agreement": value,
            }
            results.append({"status": "ok", "metrics": metrics, "value": value, "seconds": 0})
        return results


PRUNE_ONLY = Space("cnn", (Param("prune", low=0.0, high=0.7, step=0.05),))
PRUNE_INT8 = Space(
    "cnn", (Param("prune", low=0.0, high=0.7, step=0.05), Param("quantize", ("none", "int8")))
)


def _settings(files, tmp_path, **kwargs) -> dict[str, Any]:
    """tune's arguments for a search of the MLP into ``tmp_path``, ``kwargs`` over these."""
    settings = dict(
        targets=parse_targets(["latency=0.5"]),
        budget=parse_budget("top1_agreement", "0.05", None),
        calibration=files["calib"],
        evaluation=files["eval"],
        trials=4,
        work_dir=tmp_path / "work",
        space=PRUNE_ONLY,
        subset=0,
        echo=lambda line: None,
    )
    return {**settings, **kwargs}


def _search(files, tmp_path, executor, **kwargs):
    settings = _settings(files, tmp_path, executor=executor, **kwargs)
    return tune(files["model"], tmp_path / "out.onnx", **settings)


def test_bisection_finds_the_smallest_fraction_that_meets_the_target(files, tmp_path):
    found = _search(files, tmp_path, Synthetic(), trials=1, bisect_steps=6)
    assert found.met
    # latency = 1 - prune: 0.5 is the smallest fraction at 0.5x, and keeps the most metric
    assert found.chosen.params["prune"] == pytest.approx(0.5)
    assert any(t.stage == "bisect" for t in found.trials)
    # between two points of the space's grid (0.45: 0.55x, 0.5: 0.5x), on half its step
    between = _search(
        files,
        tmp_path / "between",
        Synthetic(),
        trials=1,
        bisect_steps=6,
        targets=parse_targets(["latency=0.53"]),
    )
    assert between.met and between.chosen.params["prune"] == pytest.approx(0.475)


class MacsUnknown(Synthetic):
    """MACs not counted (shapes unknown past a contrib op): no ratio."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for result in results:
            del result["metrics"]["macs_ratio"]
        return results


def test_a_ratio_not_measured_shows_as_a_dash(files, tmp_path):
    found = _search(files, tmp_path, MacsUnknown(), trials=1, bisect_steps=0)
    rows = table_rows(found)
    assert rows and all(row[5] == "-" and row[3].endswith("x") for row in rows)
    # a target on the ratio the original's comparison lacks is refused, not missed by every trial
    with pytest.raises(SettingsError, match=r"macs=0\.5: the original's macs_ratio cannot be"):
        _search(files, tmp_path / "macs", MacsUnknown(), targets=parse_targets(["macs=0.5"]))


def test_choice_meets_target_and_budget_and_is_the_best_judged(files, tmp_path):
    found = _search(
        files,
        tmp_path,
        Synthetic(),
        space=PRUNE_INT8,
        trials=8,
        targets=parse_targets(["speedup=2.5"]),
    )
    assert found.met
    chosen = found.chosen
    assert chosen.metrics["speedup"] >= 2.5 and chosen.value >= found.floor
    feasible = [
        t
        for t in found.trials
        if t.stage in ("full", "bisect") and t.metrics["speedup"] >= 2.5 and t.value >= found.floor
    ]
    assert chosen.value == max(t.value for t in feasible)
    # the best in the space: INT8 with the least pruning that gives 2.5x (0.6 * (1 - p) <= 0.4)
    assert chosen.params["quantize"] == "int8" and chosen.params["prune"] <= 0.4


def test_impossible_target_gives_the_closest_trial_and_writes_nothing(files, tmp_path):
    found = _search(files, tmp_path, Synthetic(), targets=parse_targets(["latency=0.1"]))
    assert not found.met and found.output is None and not (tmp_path / "out.onnx").exists()
    judged = [t for t in found.trials if t.stage in ("full", "bisect")]
    kept = [t for t in judged if t.value >= found.floor]  # the closest keeps the budget
    assert found.chosen in kept
    assert found.chosen.metrics["latency_ratio"] == min(t.metrics["latency_ratio"] for t in kept)
    assert f"closest is trial {found.chosen.number}" in found.reason
    assert "time budget" not in found.reason  # there was none: more time would not help


class PruningSlows(Synthetic):
    """As on PP-OCRv4's recognizer: pruning makes the model slower (1 + the fraction here;
    1.75x its time at 0.1 there), so the trials that keep the budget are all slower than the
    original."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            steps = {s["pass"]: s for s in job["recipe"]["passes"]}
            prune = steps.get("prune_channels", {}).get("macs_target", 0.0)
            if prune:
                result["metrics"]["latency_ratio"] = 1 + prune
                result["metrics"]["speedup"] = 1 / (1 + prune)
        return results


def test_no_trial_closer_than_the_original_chooses_the_original(files, tmp_path):
    found = _search(  # INT8 (0.6x) breaks a budget of 0.004; every pruned trial is slower
        files,
        tmp_path,
        PruningSlows(),
        space=Space(
            "cnn", (Param("prune", low=0.05, high=0.7), Param("quantize", ("none", "int8")))
        ),
        trials=6,
        budget=parse_budget("top1_agreement", "0.004", None),
    )
    judged = [t for t in found.trials if t.stage in ("full", "bisect")]
    assert judged and all(t.metrics["latency_ratio"] > 1 or t.value < found.floor for t in judged)
    assert not found.met and found.output is None
    assert found.chosen is found.trials[0] and found.chosen.stage == "reference"
    assert "closer to the targets than the original itself" in found.reason


PILOTED = dataclasses.replace(PRUNE_INT8, pilots=({"quantize": "int8"},))
AT_2_5X = dict(space=PILOTED, targets=parse_targets(["speedup=2.5"]))  # the pilot's INT8 arm


def test_the_pilot_bisects_the_presets_pruning_before_tpe_draws(files, tmp_path):
    # 2.5x: INT8 alone gives 1/0.6; the smallest fraction on the grid with 0.6 (1 - p) <= 0.4
    # is 0.35
    found = _search(files, tmp_path, Synthetic(), trials=5, bisect_steps=0, **AT_2_5X)
    drawn = [(t.params["prune"], t.params["quantize"]) for t in found.trials[1:6]]
    # INT8 alone (misses), the middle of [0, 0.7] (meets), then halves: 0.15, 0.25, 0.3 miss
    assert drawn == [(p, "int8") for p in (0.0, 0.35, 0.15, 0.25, 0.3)]
    assert found.met and found.chosen.params == {"prune": 0.35, "quantize": "int8"}


def test_the_pilot_stops_when_quantization_alone_breaks_the_budget(files, tmp_path):
    found = _search(  # INT8 costs 0.005 of the metric: over a budget of 0.004 at any fraction
        files,
        tmp_path,
        Synthetic(),
        space=PILOTED,
        trials=3,
        bisect_steps=0,
        budget=parse_budget("top1_agreement", "0.004", None),
    )
    assert found.trials[1].params == {"prune": 0.0, "quantize": "int8"}
    assert found.trials[2].params != {"prune": 0.35, "quantize": "int8"}  # TPE's, not the pilot's


class PresetPrunesWell(Synthetic):
    """As ``--recipe fast`` on ppocr_cls: the preset's own pruning (as much as its gate holds,
    no fraction given) reaches 0.3x at 0.99 of the metric, further than any fraction of the
    arms within the budget."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            pruning = {s["pass"]: s for s in job["recipe"]["passes"]}.get("prune_channels", {})
            if pruning and not {"macs_target", "latency_target"} & set(pruning):
                result["metrics"].update(latency_ratio=0.3, speedup=1 / 0.3, macs_ratio=0.5)
                result["metrics"]["top1_agreement"] = result["value"] = 0.99
        return results


def test_the_presets_run_as_they_are_before_the_pilot(files, tmp_path):
    executor = PresetPrunesWell()
    space = dataclasses.replace(PILOTED, presets=("fast",))
    assert space.describe()[-2:] == [
        "  first: --recipe fast, aimed at the budget",
        "  then: prune bisected with quantize=int8",
    ]
    found = _search(  # the INT8 arm reaches 0.35x only past the budget of 0.02
        files,
        tmp_path,
        executor,
        space=space,
        targets=parse_targets(["latency=0.35"]),
        budget=parse_budget("top1_agreement", "0.02", None),
        trials=4,
        bisect_steps=3,
    )
    preset = found.trials[1]
    assert preset.params == {"preset": "fast"}
    # aimed at the budget: as much pruning, and INT8's accuracy control, as its gate holds
    steps = {s["pass"]: s for s in executor.jobs[preset.number]["recipe"]["passes"]}
    assert steps["prune_channels"] == {
        "pass": "prune_channels",
        "recover": True,
        "target": "top1_agreement>=0.98",
    }
    assert steps["quantize_int8"]["target"] == "top1_agreement>=0.98"
    pilot = found.trials[2:]
    assert len(pilot) == 3 and all(t.params.get("quantize") == "int8" for t in pilot)
    assert found.met and found.chosen is preset
    # its pruning finds its own fraction: nothing bisects one onto it
    assert not any("preset" in t.params for t in found.trials if t.stage == "bisect")
    # where the search stops at the first that meets everything, nothing runs after it
    first = _search(
        files,
        tmp_path / "first",
        PresetPrunesWell(),
        space=space,
        first=True,
        targets=parse_targets(["latency=0.35"]),
        trials=4,
    )
    assert [t.params for t in first.trials[1:]] == [{"preset": "fast"}]


ARMED = Space(
    "cnn",
    (*PRUNE_INT8.params, Param("finetune", (0, 300))),
    pilots=(
        {"quantize": "int8", "finetune": 0},
        {"quantize": "none", "finetune": 0},
        {"quantize": "none", "finetune": 300},
    ),
)


def _armed_search(files, tmp_path, monkeypatch, executor, trials):
    """A search of ARMED's three arms for 0.31x within 0.05: the search and the points it drew
    (fraction, quantization, fine-tuning steps)."""
    import onnx_squeeze.passes.finetune as finetune_pass

    monkeypatch.setattr(finetune_pass, "torch_available", lambda: True)  # the recipe's check
    found = _search(
        files,
        tmp_path,
        executor,
        space=ARMED,
        trials=trials,
        bisect_steps=0,
        targets=parse_targets(["latency=0.31"]),
    )
    params = [t.params for t in found.trials[1:]]
    return found, [(p["prune"], p["quantize"], p["finetune"]) for p in params]


def test_the_pilot_goes_on_to_the_next_arm_where_one_cannot_meet_the_target(
    files, tmp_path, monkeypatch
):
    # INT8 needs 0.5 of pruning (the metric 0.945), pruning alone 0.7 (0.902), pruning
    # fine-tuned 0.7 at 0.951
    found, drawn = _armed_search(files, tmp_path, monkeypatch, Synthetic(), trials=11)
    # each arm bisected to its end, in order; pruning alone skips its lowest fraction (the
    # original); fine-tuned, it starts above every fraction that missed the target untuned, at
    # the top (none met it untuned), then halves down: coarse to fine
    assert drawn == [
        *((p, "int8", 0) for p in (0.0, 0.35, 0.5, 0.4, 0.45)),
        *((p, "none", 0) for p in (0.35, 0.5, 0.6, 0.55)),
        *((p, "none", 300) for p in (0.7, 0.65)),
    ]
    assert found.met and found.chosen.params == {"prune": 0.7, "quantize": "none", "finetune": 300}


class CheapCriterion(Synthetic):
    """The cheap criterion loses another 0.2 p^2 of the metric over the arm's own."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            steps = {s["pass"]: s for s in job["recipe"]["passes"]}
            pruning = steps.get("prune_channels", {})
            if pruning.get("criterion") == CHEAP_CRITERION:
                result["value"] -= 0.2 * pruning["latency_target"] ** 2
                result["metrics"]["top1_agreement"] = result["value"]
        return results


def test_the_pilot_tries_the_cheap_criterion_first_and_its_own_where_that_breaks_the_budget(
    files, tmp_path
):
    pruned = tuple(round(0.05 * k, 2) for k in range(1, 15))
    space = Space(
        "cnn",
        (
            Param("prune", low=0.0, high=0.7, step=0.05),
            Param("steer", ("macs", "latency"), when=(("prune", pruned),)),
            Param("criterion", (CHEAP_CRITERION, "reconstruction"), when=(("prune", pruned),)),
            Param("quantize", ("none", "int8")),
        ),
        pilots=({"criterion": "reconstruction", "quantize": "int8"},),
    )
    found = _search(
        files,
        tmp_path,
        CheapCriterion(),
        space=space,
        trials=6,
        bisect_steps=0,
        targets=parse_targets(["speedup=2"]),
    )
    drawn = [(t.params["prune"], t.params.get("criterion")) for t in found.trials[1:]]
    # at 0.35 the cheap criterion breaks the budget of 0.05 (0.946) and the arm's own keeps it
    # (0.9705); lower, where the cheap one keeps it, it is not tried again with the arm's own
    assert drawn == [
        (0.0, None),
        (0.35, CHEAP_CRITERION),
        (0.35, "reconstruction"),
        (0.15, CHEAP_CRITERION),
        (0.25, CHEAP_CRITERION),
        (0.2, CHEAP_CRITERION),
    ]
    assert found.met and found.chosen.params["prune"] == 0.2
    assert found.chosen.params["criterion"] == CHEAP_CRITERION
    # a fine-tuned arm too: fine-tuning recovered more after weight-norm scoring on the digits CNN
    point = space.pilot_point({"criterion": "reconstruction", "finetune": 300}, 0.4, True, True)
    assert point["criterion"] == CHEAP_CRITERION


class SlowPruning(Synthetic):
    """Pruning without INT8 runs past the trial time limit."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for index, job in enumerate(jobs):
            steps = {s["pass"] for s in job["recipe"]["passes"]}
            if "prune_channels" in steps and "quantize_int8" not in steps:
                results[index] = {"status": "failed", "error": "past the limit", "timed_out": True}
        return results


def test_a_trial_past_the_time_limit_ends_its_pilot_arm(files, tmp_path, monkeypatch):
    found, drawn = _armed_search(files, tmp_path, monkeypatch, SlowPruning(), trials=7)
    # pruning alone times out at its first fraction and its arm ends there (no 0.15 next); the
    # fine-tuned arm skips fraction 0 (fine-tuning alone changes no time), and times out too
    assert drawn[5:] == [(0.35, "none", 0), (0.35, "none", 300)]
    assert [t.result.get("timed_out") for t in found.trials[6:]] == [True, True]


# A metric that does not count samples: a quarter of the 32 resolves it as well as all of them.
SMOOTH = parse_budget("cosine", "0.05", None)


def test_a_subset_holds_enough_samples_for_the_budget_to_let_two_flip(files, tmp_path):
    assert least_samples("top1", 0.01) == 200 and least_samples("top1_agreement", 0.1) == 20
    assert least_samples("cosine", 0.01) == 2 and least_samples("top1", 0.0) == 2
    executor, lines = Synthetic(), []
    # 0.2 of top-1 agreement: 10 samples, more than a quarter of 32
    _search(
        files,
        tmp_path / "wide",
        executor,
        trials=3,
        subset=0.25,
        budget=parse_budget("top1_agreement", "0.2", None),
    )
    limits = {job.get("eval_limit") for job in executor.jobs if not job.get("reference")}
    assert limits == {10, None}
    # 0.05: 40 samples, more than the 32 there are: every candidate is ranked on all of them
    executor = Synthetic()
    _search(files, tmp_path / "narrow", executor, trials=3, subset=0.25, echo=lines.append)
    assert not any(job.get("eval_limit") for job in executor.jobs)
    assert any("a subset of it would need 40 samples" in line for line in lines), lines


def test_first_stops_at_the_first_candidate_that_meets_everything_on_all_data(files, tmp_path):
    found = _search(
        files, tmp_path, Synthetic(), trials=8, subset=0.25, first=True, budget=SMOOTH, **AT_2_5X
    )
    # INT8 alone misses; at 0.35 it meets on the subset, is judged on all the data at once,
    # meets there too, and nothing else runs: no more pilot, TPE, promotion or bisection
    stages = [(t.stage, t.params.get("prune")) for t in found.trials]
    assert stages == [("reference", None), ("subset", 0.0), ("subset", 0.35), ("full", 0.35)]
    assert found.met and found.chosen is found.trials[-1]


class TimedSlowerAgain(Synthetic):
    """A model judged again is timed 1.21 times slower than when it was made (a noisy clock)."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            if job.get("model_from"):
                result["metrics"]["latency_ratio"] *= 1.21
        return results


def test_no_time_left_starts_no_trial_and_a_failed_one_is_not_timed_twice(tmp_path):
    from onnx_squeeze.tune.executors import LocalExecutor
    from onnx_squeeze.tune.search import Trial, _timed_twice

    executor = LocalExecutor(timeout=60)
    try:
        (result,) = executor.run([{"folder": str(tmp_path / "t")}], end=time.monotonic() - 1)
    finally:
        executor.close()
    assert result["stopped"] and not result["started"] and not (tmp_path / "t").exists()
    ok = {"status": "ok", "metrics": {"latency_ratio": 0.5}}
    failed = Trial(0, "subset", {}, Recipe.from_dict({"passes": []}), "k", result, False, "m")
    assert _timed_twice(ok, failed) == ok and _timed_twice(ok, None) == ok


def test_a_launchers_start_up_counts_against_the_trials_limit(tmp_path, monkeypatch):
    """A launcher that takes 3 s to start (its imports; here a ``sitecustomize`` that sleeps)
    leaves a trial with a 1 s limit no time: the trial, which would fail after 0.5 s (reading
    its model from a pipe written then), is stopped at once instead."""

    from onnx_squeeze.tune.executors import LocalExecutor

    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")
    monkeypatch.setattr(sys, "path", [str(slow), *sys.path])  # the launcher's PYTHONPATH
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)

    done = threading.Event()

    def write_late() -> None:  # once the trial reads the pipe: empty, after 0.5 s
        while not done.is_set():
            try:
                stream = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                time.sleep(0.01)
                continue
            time.sleep(0.5)
            os.close(stream)
            return

    writer = threading.Thread(target=write_late, daemon=True)
    writer.start()
    executor = LocalExecutor(timeout=1)
    try:
        (result,) = executor.run([{"folder": str(tmp_path / "t"), "model": str(fifo), "run": {}}])
    finally:
        executor.close()
        done.set()
    assert result.get("timed_out"), result


def test_a_model_judged_again_counts_both_timings(files, tmp_path):
    found = _search(
        files,
        tmp_path,
        TimedSlowerAgain(),
        trials=8,
        subset=0.25,
        first=True,
        budget=SMOOTH,
        **AT_2_5X,
    )
    made, judged = found.trials[2], found.trials[3]
    assert judged.stage == "full" and judged.params == made.params
    then = made.metrics["latency_ratio"]
    assert judged.metrics["latency_ratio"] == pytest.approx(then * 1.1)  # sqrt(1.21)
    assert judged.metrics["latency_ratios_timed"] == pytest.approx([then, then * 1.21])
    assert judged.metrics["speedup"] == pytest.approx(1 / (then * 1.1))


class SubsetReads(Synthetic):
    """The subset's 8 samples read ``factor`` times the metric's loss on all 32 (an unlucky or
    a lucky draw)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            if job.get("eval_limit"):
                result["value"] = 1 - self.factor * (1 - result["value"])
        return results


def test_first_judges_on_all_data_a_candidate_within_the_subsets_spread(files, tmp_path):
    # 400 held-out samples (random, as the fixture's): a quarter is a subset of 100, whose share
    # spreads twice as wide as all of them, so a reading up to one budget below the floor may be
    # the subset's draw
    with np.load(files["eval"]) as held:
        (name,) = held.files
        width = held[name].shape[1]
    many = tmp_path / "random_eval_400.npz"
    rng = np.random.default_rng(1)
    np.savez(many, **{name: rng.standard_normal((400, width), np.float32)})

    def first(folder: str, executor: Synthetic, **kwargs: Any):
        settings = dict(subset=0.25, first=True, evaluation=str(many), **AT_2_5X)
        return _search(files, tmp_path / folder, executor, **{**settings, **kwargs})

    found = first("wide", SubsetReads(2.0), trials=8)
    # INT8 at 0.35 reads 0.937 on the subset against a floor of 0.95, and 0.9705 on all of it
    stages = [(t.stage, t.params.get("prune")) for t in found.trials]
    assert stages == [("reference", None), ("subset", 0.0), ("subset", 0.35), ("full", 0.35)]
    assert found.trials[2].value < found.floor <= found.trials[3].value
    assert found.met and found.chosen is found.trials[-1]
    # where it fails there (a floor of 0.975), the search goes on, and halving does not judge it
    # again
    floor_975 = parse_budget("top1_agreement", "0.025", None)
    strict = first("strict", SubsetReads(1.0), trials=6, bisect_steps=0, budget=floor_975)
    full = [t.params for t in strict.trials if t.stage == "full"]
    assert full[0] == {"prune": 0.35, "quantize": "int8"} and strict.trials[3].value < strict.floor
    assert len(strict.trials) > 4  # and the search went on
    assert len(full) == len({tuple(sorted(p.items())) for p in full})
    # a lucky subset: INT8 at 0.35 meets there (0.984) and not on all of it (0.9705); the pilot
    # reads the judgment on all of it, so the INT8 arm found nothing and, once its bisection
    # ends, the next arm (pruning alone) runs before TPE draws
    two_arms = dataclasses.replace(PILOTED, pilots=({"quantize": "int8"}, {"quantize": "none"}))
    lucky = first(
        "lucky", SubsetReads(0.5), trials=7, bisect_steps=0, budget=floor_975, space=two_arms
    )
    assert lucky.trials[2].value >= lucky.floor > lucky.trials[3].value
    drawn = [(t.params["prune"], t.params["quantize"]) for t in lucky.trials[4:8]]
    assert drawn == [(0.15, "int8"), (0.25, "int8"), (0.3, "int8"), (0.35, "none")]
    # a cosine does not spread as a share of samples does: no reading below its floor is judged
    smooth = first("smooth", SubsetReads(2.0), trials=3, bisect_steps=0, budget=SMOOTH)
    assert not any(t.stage == "full" and t.params.get("prune") == 0.35 for t in smooth.trials[:4])


def test_successive_halving_judges_the_best_third_on_all_data(files, tmp_path):
    executor = Synthetic()
    found = _search(files, tmp_path, executor, trials=6, subset=0.25, bisect_steps=0, budget=SMOOTH)
    subset = [t for t in found.trials if t.stage == "subset"]
    full = [t for t in found.trials if t.stage == "full"]
    distinct = {t.key for t in subset}  # a point TPE drew twice is promoted once
    assert len(subset) == 6 and len(full) == math.ceil(len(distinct) / 3)
    assert len({t.key for t in full}) == len(full)
    limits = {job.get("eval_limit") for job in executor.jobs if not job.get("reference")}
    assert limits == {SAMPLES // 4, None}
    # the two promoted are the two best on the subset
    ranked = sorted(
        {e["key"]: e for e in found.data["trials"] if e["stage"] == "subset"}.values(),
        key=lambda entry: entry["objective"],
    )
    assert [t.params for t in full] == [entry["params"] for entry in ranked[: len(full)]]
    # promoted models are judged again, not made again
    promoted = {t.params["prune"]: t.model_path for t in subset}
    again = [job for job in executor.jobs if job.get("model_from")]
    assert [job["model_from"] for job in again] == [promoted[t.params["prune"]] for t in full]


def test_rerun_and_resume_skip_finished_trials(files, tmp_path):
    first = Synthetic()
    found = _search(files, tmp_path, first, bisect_steps=2)
    assert found.executed == len(first.jobs) > 3
    again = Synthetic()
    rerun = _search(files, tmp_path, again, bisect_steps=2, resume=True)
    assert again.jobs == [] and rerun.executed == 0
    assert [t.params for t in rerun.trials] == [t.params for t in found.trials]
    assert rerun.chosen.number == found.chosen.number
    # a trial cut off before its result was written runs again, alone
    (Path(found.trials[2].model_path).parent / RESULT_FILE).unlink()
    third = Synthetic()
    _search(files, tmp_path, third, bisect_steps=2)
    assert len(third.jobs) == 1
    with pytest.raises(SettingsError, match="--resume"):
        _search(files, tmp_path / "elsewhere", Synthetic(), resume=True)


def test_a_point_drawn_twice_in_one_batch_runs_once(files, tmp_path):
    executor = Synthetic()
    one_point = Space("cnn", (Param("prune", low=0.25, high=0.25, step=0.05),))
    found = _search(files, tmp_path, executor, space=one_point, trials=2, jobs=2, bisect_steps=0)
    assert [t.params for t in found.trials[1:]] == [{"prune": 0.25}] * 2
    assert len(executor.jobs) == 2 == found.executed  # the reference and the point, once
    assert found.trials[1].ok and found.trials[2].ok


def test_the_api_takes_targets_and_budget_as_text(files, tmp_path):
    import onnx_squeeze.tune

    found = onnx_squeeze.tune(  # the package is callable: onnx_squeeze.tune(...) is the search
        files["model"],
        tmp_path / "out.onnx",
        targets=["latency=0.5"],
        metric="top1_agreement",
        max_drop="6%",
        calibration=files["calib"],
        evaluation=files["eval"],
        executor=Synthetic(),
        work_dir=tmp_path / "work",
        space=PRUNE_ONLY,
        echo=lambda line: None,
    )
    assert found.met and found.floor == pytest.approx(0.94)
    assert found.chosen.metrics["latency_ratio"] <= 0.5
    with pytest.raises(SettingsError, match="--target"):
        _search(files, tmp_path, Synthetic(), targets=[])


def test_tune_refuses_to_invent_data(files, tmp_path):
    with pytest.raises(SettingsError, match="--calib"):
        _search(files, tmp_path, Synthetic(), calibration=None)
    with pytest.raises(SettingsError, match="overwrite the input"):
        tune(
            files["model"],
            files["model"],
            targets=["latency=0.5"],
            max_drop=0.1,
            calibration=files["calib"],
            executor=Synthetic(),
        )
    with pytest.raises(SettingsError, match="labels"):
        _search(
            files, tmp_path, Synthetic(), evaluation=None, budget=parse_budget("top1", "0.01", None)
        )


# ----------------------------------------------------------------- real trials, in processes

PRUNE_GRID = Space("cnn", (Param("prune", low=0.0, high=0.5, step=0.25),))


@pytest.fixture(scope="module")
def searched(files, tmp_path_factory):
    """A real search: the MLP pruned in trial processes, 25 % of its MACs to remove."""
    work = tmp_path_factory.mktemp("searched")
    settings = _settings(
        files,
        work,
        targets=parse_targets(["macs=0.8"]),
        budget=parse_budget("cosine", "0.2", None),
        trials=2,
        space=PRUNE_GRID,
        bisect_steps=1,
        runs=2,
    )
    found = tune(files["model"], work / "out.onnx", **settings)
    return found, settings, work


def test_real_search_meets_the_target_and_its_recipe_reproduces_the_model(files, searched):
    found, _, work = searched
    assert found.met, found.reason
    chosen = found.chosen
    assert chosen.metrics["macs_ratio"] <= 0.8 and chosen.value >= found.floor
    assert chosen.params["prune"] > 0 and found.executed == len(found.trials)
    written = model_io.load(work / "out.onnx")
    # the recipe file alone (with the same data) makes the same model
    recipe_file = found.data["trials"][chosen.number]["recipe"]
    assert "compress" in Path(recipe_file).read_text()
    again = compress(
        files["model"],
        Recipe.load(recipe_file),
        calibration=files["calib"],
        evaluation=files["eval"],
        runs=1,
    )
    # ratios against the original file, as compress reports them for the same recipe
    for key in ("macs_ratio", "params_ratio", "size_ratio"):
        assert chosen.metrics[key] == pytest.approx(again.comparison["metrics"][key], rel=0.01)
    name = written.graph.inputs[0].name
    feed = {name: np.load(files["eval"])[name][:4]}
    (expected,), (reproduced,) = run(written, feed), run(again.model, feed)
    np.testing.assert_allclose(reproduced, expected, rtol=1e-5, atol=1e-6)
    original = run(model_io.load(files["model"]), feed)[0]
    assert not np.allclose(expected, original)  # it was compressed, not copied
    data = json.loads((found.work / "tune.json").read_text())
    assert data["chosen"] == chosen.number and data["met"]
    judged = {t["number"] for t in data["trials"] if t["status"] == "ok"}
    assert data["pareto"]["latency"] and set(data["pareto"]["latency"]) <= judged
    # on the size front the most pruned trial is undominated (smallest, whatever its metric)
    smallest = min(
        (t for t in data["trials"] if t["status"] == "ok"), key=lambda t: t["metrics"]["size_ratio"]
    )
    assert smallest["number"] in data["pareto"]["size"]
    page = (found.work / "tune.html").read_text()
    assert "<svg" in page and f"trial {chosen.number}" in page and "budget" in page


def test_trials_at_one_thread_are_timed_in_cpu_time(files, searched):
    found, _, _ = searched
    # the reference (the original prepared, timed against the file) too: it competes as the
    # closest trial when none meets the targets
    for trial in found.trials:
        metrics = trial.metrics
        assert "wall_latency_ratio" in metrics  # the comparison's, kept beside
        assert metrics["latency_ratio"] * metrics["speedup"] == pytest.approx(1.0)


def test_a_model_judged_again_measures_as_when_it_was_made(files, searched, tmp_path):
    found, _, _ = searched
    chosen = found.chosen
    job = json.loads((Path(chosen.model_path).parent / "job.json").read_text())
    again = run_trial({**job, "model_from": chosen.model_path, "folder": str(tmp_path / "again")})
    assert again["status"] == "ok"
    assert (tmp_path / "again" / "model.onnx").read_bytes() == Path(chosen.model_path).read_bytes()
    made = json.loads((Path(chosen.model_path).parent / RESULT_FILE).read_text())
    for key in ("cosine", "top1_agreement", "worst_channel_sqnr_db", "macs_ratio"):
        assert again["metrics"][key] == pytest.approx(made["metrics"][key], rel=1e-6)
    assert again["value"] == pytest.approx(made["value"], rel=1e-6)
    # making it took part of its trial's time; judging it again makes nothing
    assert 0 < made["made_seconds"] < made["seconds"] and again["made_seconds"] == 0


def test_real_rerun_runs_no_trial_again(files, searched):
    found, settings, work = searched
    rerun = tune(files["model"], work / "out2.onnx", **{**settings, "resume": True})
    assert rerun.executed == 0 and all(t.cached for t in rerun.trials)
    assert rerun.chosen.key == found.chosen.key
    assert (work / "out2.onnx").read_bytes() == (work / "out.onnx").read_bytes()


def _original_weights(files, monkeypatch) -> None:
    """The original's weight count in the environment, where tests.tune_metrics's functions
    read it to tell a pruned model."""
    proto = onnx.load(files["model"])
    weights = sum(onnx.numpy_helper.to_array(t).size for t in proto.graph.initializer)
    monkeypatch.setenv("TUNE_TEST_ORIGINAL_WEIGHTS", str(weights))


def _one_candidate(prune: float, target: str, budget: Budget) -> dict[str, Any]:
    """A search of one candidate, pruned by ``prune``."""
    return dict(
        targets=parse_targets([target]),
        budget=budget,
        trials=1,
        space=Space("cnn", (Param("prune", low=prune, high=prune, step=prune),)),
        bisect_steps=0,
        runs=1,
    )


def _slow_when_pruned(files, monkeypatch) -> dict[str, Any]:
    """A search whose one candidate, pruned by half, takes a minute to judge."""
    _original_weights(files, monkeypatch)
    slow = parse_budget("tests.tune_metrics:slow_when_pruned", "0.1", None)
    return _one_candidate(0.5, "macs=1.0", slow)


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(files, tmp_path, monkeypatch):
    _original_weights(files, monkeypatch)
    found = _search(
        files,
        tmp_path,
        "local",
        targets=parse_targets(["macs=1.0"]),
        budget=parse_budget("tests.tune_metrics:abort_when_pruned", "0.1", None),
        trials=3,
        space=PRUNE_GRID,
        bisect_steps=0,
        runs=1,
        seed=1,  # draws 0.25, 0.5, then 0: two crashes before a trial that runs
    )
    failed = [t for t in found.trials if not t.ok]
    kept = [t for t in found.trials[1:] if t.ok]
    assert failed and kept, [t.params for t in found.trials]
    assert all("SIGABRT" in t.result["error"] for t in failed)
    assert all(t.params["prune"] > 0 for t in failed) and all(t.params["prune"] == 0 for t in kept)
    assert len(found.trials) == 4  # the reference and three draws: none stopped the search
    assert found.met and found.chosen.params["prune"] == 0
    entry = found.data["trials"][failed[0].number]
    assert entry["status"] == "failed" and "SIGABRT" in entry["error"]


def test_the_time_budget_stops_a_running_trial_which_runs_again_on_resume(
    files, tmp_path, monkeypatch
):
    settings = _slow_when_pruned(files, monkeypatch)
    start = time.monotonic()
    found = _search(files, tmp_path, "local", time_budget=10, **settings)
    # the reference runs to the end (nothing is chosen without it); the pruned trial, a minute
    # long, is stopped when the 10 s run out, and the original is kept
    assert time.monotonic() - start < 30
    (stopped,) = found.trials[1:]
    assert stopped.result["stopped"] and "time budget ran out" in stopped.result["error"]
    assert found.chosen.stage == "reference" and "the time budget ran out" in found.reason
    folder = Path(stopped.model_path).parent
    assert (folder / "trial.log").exists() and found.executed == 2  # it had started
    assert not (folder / RESULT_FILE).exists()  # and is not stored
    resumed = _search(files, tmp_path, "local", time_budget=5, resume=True, **settings)
    assert resumed.trials[0].cached and not resumed.trials[1].cached  # not found in the store
    assert resumed.trials[1].result.get("stopped")  # run again, stopped again


class Clocked(Synthetic):
    """Trials that take seconds of a clock of their own: the reference 7 (2 of them preparing the
    model, 5 judging it), a judgment of a made model 5, a candidate made on the subset 2; one
    that would run past the time budget's ``end`` is stopped there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def run(self, jobs, end=None):
        results = []
        for job, result in zip(jobs, super().run(jobs), strict=True):
            cost = 7.0 if job.get("reference") else 5.0 if job.get("model_from") else 2.0
            if end is not None and self.now + cost > end:
                started = self.now < end
                self.now = max(self.now, end)
                result = {"status": "failed", "timed_out": True, "stopped": True}
                result["started"] = started
            else:
                self.now += cost
                result.update(seconds=cost, made_seconds=2.0 if job.get("reference") else 0.0)
            results.append(result)
        return results


def test_the_time_budget_keeps_time_for_the_last_judgment(files, tmp_path, monkeypatch):
    from onnx_squeeze.tune import search as search_module

    clocked = Clocked()
    monkeypatch.setattr(search_module, "time", clocked)
    found = _search(
        files,
        tmp_path,
        clocked,
        trials=20,
        subset=0.25,
        budget=SMOOTH,
        time_budget=22 + search_module.WIND_DOWN_S,  # the time a real stop takes: none here
        patience=0,
        bisect_steps=0,
    )
    # the reference judged the original in 5 s, so trials stop at 17 s, and the best of them,
    # judged on all the data as long, ends the search when the 22 s run out, not 5 s past them
    ran = [t.stage for t in found.trials if not t.cached]  # not a point drawn twice
    assert ran == ["reference", *["subset"] * 5, "full"], ran
    assert found.executed == len(ran)
    assert found.seconds == pytest.approx(22) and found.chosen.stage == "full"
    # three draws end at 13 s and the best is judged by 18 s: the reserve is spent, and the
    # bisection has what is left, 3 s, for one trial and a start
    clocked = Clocked()
    monkeypatch.setattr(search_module, "time", clocked)
    found = _search(
        files,
        tmp_path / "bisected",
        clocked,
        trials=3,
        subset=0.25,
        budget=SMOOTH,
        time_budget=21 + search_module.WIND_DOWN_S,
        patience=0,
        bisect_steps=3,
    )
    bisected = [t for t in found.trials if t.stage == "bisect"]
    assert [t.ok for t in bisected] == [True, False], [t.result for t in bisected]
    assert found.seconds == pytest.approx(21) and found.executed == len(found.trials)


def test_the_default_metric_reads_a_sequence_model_and_aims_int8_at_it(tmp_path):
    """A model of [N, T, classes] scores (a CTC recognizer's shape) has no top-1 agreement:
    the default metric reads its class at each position, and INT8 aims at what it reads."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["scores"])],
        "sequence",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 12, 16])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 12, 8])],
        [weight],
    )
    path = tmp_path / "sequence.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    data = rng.standard_normal((48, 12, 16)).astype(np.float32)
    np.savez(tmp_path / "random_calib.npz", x=data[:32])
    np.savez(tmp_path / "random_eval.npz", x=data[32:])
    found = tune(
        path,
        tmp_path / "out.onnx",
        targets=["size=0.5"],
        max_drop=0.1,
        calibration=tmp_path / "random_calib.npz",
        evaluation=tmp_path / "random_eval.npz",
        trials=1,
        space=Space("transformer", (Param("quantize", ("int8",)),)),
        bisect_steps=0,
        runs=1,
        subset=0,
        echo=lambda line: None,
    )
    reference, trial = found.trials[:2]
    assert reference.value == 1.0 and reference.metrics["argmax_agreement"] == 1.0
    assert "top1_agreement" not in reference.metrics
    assert trial.ok and trial.value == trial.metrics["argmax_agreement"]
    # raw scores (no softmax) are read by value too, as the default gate reads them; no gate on
    # score decisions or neighbours, which this model's outputs do not hold
    (step,) = trial.recipe.steps
    assert step.settings["target"] == "argmax_agreement>=0.9, worst_value_channel_sqnr_db>=12"


def test_cli_exit_3_names_the_closest_trial(files, searched, capsys):
    _, settings, work = searched
    argv = [
        "tune",
        files["model"],
        "-o",
        str(work / "impossible.onnx"),
        "--target",
        "size=0.01",
        "--metric",
        "cosine",
        "--max-drop",
        "0.2",
        "--calib",
        files["calib"],
        "--eval",
        files["eval"],
        "--trials",
        "1",
        "--subset",
        "0",
        "--bisect-steps",
        "0",
        "--runs",
        "2",
        "--work-dir",
        str(settings["work_dir"]),
        "--family",
        "cnn",
    ]
    assert cli.run(argv) == 3
    err = capsys.readouterr().err
    assert "no trial met size=0.01" in err and "closest is trial" in err
    assert not (work / "impossible.onnx").exists()
    assert cli.run([*argv[:4], "--target", "latency=2", *argv[6:]]) == 1  # a usage error


def test_ray_executor_runs_trials_on_a_local_instance(files, tmp_path, monkeypatch):
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install 'onnx-squeeze[ray]')"
    )
    from onnx_squeeze.tune.executors import RayExecutor

    slow_settings = _slow_when_pruned(files, monkeypatch)  # the workers inherit its variable
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cosine = parse_budget("cosine", "0.2", None)
        found = _search(files, tmp_path, RayExecutor(), **_one_candidate(0.25, "macs=0.8", cosine))
        # on the worker started above: its start (imports, seconds on a loaded machine) would
        # count against the reference's 20 s
        slow = _search(files, tmp_path / "slow", RayExecutor(timeout=20), **slow_settings)
    finally:
        ray.shutdown()
    # a Ray task past --trial-timeout is cancelled and recorded as such
    assert slow.trials[1].result["timed_out"] and "limit of 20 s" in slow.trials[1].result["error"]
    assert found.met and "Ray" in found.where and "Ray" in found.data["measured_on"]
    assert found.executed == 2
    written = model_io.load(tmp_path / "out.onnx")
    feed = {written.graph.inputs[0].name: np.load(files["eval"])[written.graph.inputs[0].name][:2]}
    # the model came back from the worker: pruned, and as close to the original as measured
    pruned, original = run(written, feed)[0], run(model_io.load(files["model"]), feed)[0]
    assert found.chosen.metrics["macs_ratio"] <= 0.8
    cosine = float((pruned * original).sum() / np.linalg.norm(pruned) / np.linalg.norm(original))
    assert cosine == pytest.approx(found.chosen.value, abs=0.2) and cosine >= found.floor - 0.1


class NothingToPrune(Synthetic):
    """A dense model (magika): pruning removes nothing, whatever the fraction."""

    def run(self, jobs, end=None):
        results = super().run(jobs, end)
        for job, result in zip(jobs, results, strict=True):
            if any(s["pass"] == "prune_channels" for s in job["recipe"]["passes"]):
                int8 = any(s["pass"] == "quantize_int8" for s in job["recipe"]["passes"])
                latency = 0.6 if int8 else 1.0
                result["metrics"].update(latency_ratio=latency, speedup=1 / latency, macs_ratio=1.0)
        return results


def test_a_pilot_arm_whose_pruning_removes_nothing_ends_there(files, tmp_path, monkeypatch):
    _, drawn = _armed_search(files, tmp_path, monkeypatch, NothingToPrune(), trials=12)
    # each arm's first pruned fraction leaves the MACs whole: no bisection over fractions
    # that cannot prune (magika bisected 6 of its 12 trials so); TPE draws the rest
    pilot = [d for d in drawn if d[0] > 0][:3]
    assert pilot == [(0.35, "int8", 0), (0.35, "none", 0), (0.7, "none", 300)]
    assert (0.175, "int8", 0) not in drawn[:4] and (0.525, "int8", 0) not in drawn[:4]


def test_drawing_stops_after_patience_draws_that_come_no_closer(files, tmp_path):
    """An out-of-reach target: after ``patience`` draws in a row that come no closer, the
    search stops drawing (and still judges the best on all the data)."""
    lines: list[str] = []
    found = _search(
        files,
        tmp_path,
        Synthetic(),
        space=PRUNE_INT8,
        trials=40,
        patience=3,
        targets=parse_targets(["latency=0.01"]),
        echo=lines.append,
    )
    assert not found.met
    drawn = [t for t in found.trials if t.stage == "full"]
    assert len(drawn) < 40
    assert any("no closer in the last 3 draws" in line for line in lines)
    unlimited = _search(
        files,
        tmp_path / "all",
        Synthetic(),
        space=PRUNE_INT8,
        trials=12,
        patience=0,
        targets=parse_targets(["latency=0.01"]),
    )
    assert len([t for t in unlimited.trials if t.stage == "full"]) >= 12
