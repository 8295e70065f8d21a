"""What a search found: the chosen trial (the best that meets every target within the budget,
else the closest, with the reason), the Pareto front of latency and size against the metric,
and every trial's recipe as ``trial-N.yaml`` (``compress --recipe trial-N.yaml`` with the same
data reproduces it); written as a terminal table, JSON and an HTML page."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from onnx_squeeze.tune.plot import scatter

if TYPE_CHECKING:
    from onnx_squeeze.tune.search import Search, Trial

JSON_FILE, HTML_FILE = "tune.json", "tune.html"
COLUMNS = ("trial", "stage", "parameters", "latency", "size", "MACs", "metric", "meets")


@dataclasses.dataclass
class TuneResult:
    chosen: Trial | None
    met: bool
    reason: str
    trials: list[Trial]
    pareto: dict[str, list[int]]
    baseline: float
    floor: float
    executed: int
    seconds: float
    work: Path
    output: str | None
    where: str
    data: dict[str, Any]


def _times(value: float | None) -> str:
    """A ratio as the table shows it; '-' where it was not measured (MACs past an op whose
    shapes are unknown)."""
    return "-" if value is None or math.isnan(value) else f"{value:.3f}x"


def _shown(trial: Trial, key: str) -> str:
    return _times(_ratio(trial, key))


def _ratio(trial: Trial, key: str) -> float:
    value = (trial.metrics or {}).get(key)
    return float(value) if value is not None else math.nan


def pareto_front(trials: Sequence[Trial], key: str) -> list[int]:
    """Numbers of the trials no other beats on both ``key`` (lower) and the metric (higher)."""
    points = [(t.number, _ratio(t, key), t.value) for t in trials if t.ok]
    points = [(n, x, y) for n, x, y in points if math.isfinite(x) and y is not None]
    return [
        n
        for n, x, y in points
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in points)
    ]


def _describe(trial: Trial) -> str:
    shown = {k: v for k, v in trial.params.items() if v not in (0, 0.0, "none", False, None)}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "(original, prepared)"


def trial_line(trial: Trial, search: Search) -> str:
    """One line per trial as the search goes."""
    tag = f"trial {trial.number:>3} [{trial.stage}]"
    if not trial.ok:
        return f"{tag} {_describe(trial)}: FAILED: {trial.result.get('error', 'no result')}"
    meets = "" if math.isnan(search.floor) else (" ✓" if search.meets(trial) else "")
    cached = " (cached)" if trial.cached else ""
    return (
        f"{tag} {_describe(trial)}: latency {_shown(trial, 'latency_ratio')}, size "
        f"{_shown(trial, 'size_ratio')}, {search.budget.metric} {trial.value:.4g}{meets}{cached}"
    )


def _trial_dict(trial: Trial, search: Search, recipe_file: str) -> dict[str, Any]:
    missed, below = search.distance(trial)
    return {
        "number": trial.number,
        "stage": trial.stage,
        "params": trial.params,
        "recipe": recipe_file,
        "status": trial.result.get("status", "failed"),
        "error": trial.result.get("error"),
        "metric": trial.value,
        "objective": search.objective(trial) if trial.ok else None,  # what TPE minimized
        "metrics": trial.metrics,
        "meets_targets": missed == 0,
        "within_budget": below == 0,
        "cached": trial.cached,
        "seconds": trial.result.get("seconds"),
        "model": trial.model_path if trial.ok else None,
        "key": trial.key,
    }


def _write_recipe(trial: Trial, search: Search, work: Path) -> str:
    path = work / f"trial-{trial.number}.yaml"
    data = search.base_job
    flags = f"--calib {data['calibration']}" + (
        f" --eval {data['evaluation']}" if data.get("evaluation") else ""
    )
    header = (
        f"# onnx-squeeze tune, trial {trial.number} ({trial.stage}): {_describe(trial)}\n"
        f"# reproduce: onnx-squeeze compress {search.source} -o OUT.onnx --recipe {path.name} {flags}\n"
    )
    path.write_text(header + yaml.safe_dump(trial.recipe.to_dict(), sort_keys=False))
    return os.fspath(path)


def _copy_atomic(source: str, target: str) -> None:
    staging = Path(f"{target}.part-{os.getpid()}")
    shutil.copyfile(source, staging)
    staging.replace(target)


def finish(
    search: Search,
    *,
    reference: Trial,
    output: str | os.PathLike | None,
    work: Path,
    seconds: float,
    where: str,
    echo: Callable[[str], None],
) -> TuneResult:
    """Choose, write the recipes, the model, the JSON and the HTML page; return it all."""
    from onnx_squeeze.tune.search import BISECT, FULL

    judged = [t for t in search.trials if t.stage in (FULL, BISECT) and t.ok]
    feasible = [t for t in judged if search.meets(t)]
    if feasible:
        chosen = max(feasible, key=lambda t: (t.value, -_ratio(t, "latency_ratio")))
    else:
        # the closest keeps the budget first (a model that lost the accuracy is no answer),
        # then misses the targets least; the original itself competes: on PP-OCRv4's recognizer
        # the only trials within the budget were pruned ones 1.75x and 5.9x slower than it
        closest = [t for t in (*judged, reference) if t.ok]  # a tie goes to the trial
        chosen = min(closest, key=lambda t: search.distance(t)[::-1], default=None)
    met = bool(feasible)
    targets = ", ".join(map(str, search.targets))
    recipes = {t.number: _write_recipe(t, search, work) for t in search.trials}
    if met:
        reason = f"trial {chosen.number} meets {targets} within {search.budget}"  # type: ignore[union-attr]
    elif chosen is None:
        reason = f"no trial could be judged ({len(search.trials) - 1} failed)"
    elif chosen is reference:
        reason = (
            f"no trial met {targets} within {search.budget} (floor {search.floor:.4g}), and "
            "none that keeps the budget came closer to the targets than the original itself "
            f"(trial 0, latency {_shown(chosen, 'latency_ratio')} as prepared): keep it"
        )
    else:
        reason = (
            f"no trial met {targets} within {search.budget} (floor {search.floor:.4g}); the "
            f"closest is trial {chosen.number} ({_describe(chosen)}): latency "
            f"{_shown(chosen, 'latency_ratio')}, size {_shown(chosen, 'size_ratio')}, "
            f"{search.budget.metric} {chosen.value:.4g}; its model is {chosen.model_path}"
        )
    if not met and (search.out_of_time or any(t.result.get("stopped") for t in search.trials)):
        reason += (
            f"; the time budget ran out ({search.executed} trials run): --resume with a longer "
            "--time-budget goes on from the trials stored"
        )
    written = None
    if met and output is not None:
        _copy_atomic(chosen.model_path, os.fspath(output))  # type: ignore[union-attr]
        written = os.fspath(output)
    pool = [reference, *judged]
    pareto = {
        "latency": pareto_front(pool, "latency_ratio"),
        "size": pareto_front(pool, "size_ratio"),
    }
    data = {
        "schema": "onnx-squeeze/tune",
        "schema_version": 1,
        "model": search.source,
        "targets": [str(t) for t in search.targets],
        "budget": str(search.budget),
        "metric": search.budget.metric,
        "baseline": reference.value,
        "floor": search.floor,
        "met": met,
        "reason": reason,
        "chosen": chosen.number if chosen else None,
        "output": written,
        "pareto": pareto,
        "trials_run": search.executed,
        "trials": [_trial_dict(t, search, recipes[t.number]) for t in search.trials],
        "seconds": seconds,
        "measured_on": where,
    }
    (work / JSON_FILE).write_text(json.dumps(data, indent=1, default=str))
    latency = next((t.value for t in search.targets if t.name == "latency"), None)
    speedup = next((t.value for t in search.targets if t.name == "speedup"), None)
    points = [(t.number, _ratio(t, "latency_ratio"), float(t.value)) for t in pool]  # type: ignore[arg-type]
    chart = scatter(
        points,
        pareto["latency"],
        chosen=chosen.number if chosen else None,
        original=reference.number,
        floor=search.floor,
        target=latency or (1 / speedup if speedup else None),
        metric=search.budget.metric,
    )
    (work / HTML_FILE).write_text(
        "<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        "<title>onnx-squeeze tune</title><style>body{font-family:sans-serif;max-width:720px;"
        "margin:auto;padding:8px}svg{width:100%;height:auto}</style>"
        f"<h1>tune: {html.escape(os.path.basename(str(data['model'])))}</h1>"
        f"<p>{html.escape(reason)}</p><p>Latency measured on {html.escape(where)}: a latency "
        "target holds on that hardware only. Trials are compared with the original as prepared "
        "(simplified, BatchNorm folded; trial 0 compares it with the file).</p>"
        + chart
        + _html_table(data, pareto)
    )
    echo(("chosen: " if met else "NOT MET: ") + reason)
    return TuneResult(
        chosen=chosen,
        met=met,
        reason=reason,
        trials=list(search.trials),
        pareto=pareto,
        baseline=float(reference.value),  # type: ignore[arg-type]
        floor=search.floor,
        executed=search.executed,
        seconds=seconds,
        work=work,
        output=written,
        where=where,
        data=data,
    )


def _html_table(data: dict[str, Any], pareto: dict[str, list[int]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in _rows(data, pareto)
    )
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"


def table_rows(result: TuneResult) -> list[list[str]]:
    """The judged trials (not those ranked on the subset only): number, stage, parameters,
    latency, size, MACs, metric, verdict."""
    return _rows(result.data, result.pareto)


def _rows(data: dict[str, Any], pareto: dict[str, list[int]]) -> list[list[str]]:
    front = set(pareto["latency"]) | set(pareto["size"])
    rows = []
    for entry in data["trials"]:
        if entry["stage"] == "subset" or entry["status"] != "ok":
            continue
        m = entry["metrics"] or {}
        mark = "chosen" if entry["number"] == data["chosen"] else ""
        mark = mark or ("front" if entry["number"] in front else "")
        ok = entry["meets_targets"] and entry["within_budget"]
        rows.append(
            [
                str(entry["number"]),
                entry["stage"],
                " ".join(f"{k}={v}" for k, v in entry["params"].items()) or "original",
                *(_times(m.get(key)) for key in ("latency_ratio", "size_ratio", "macs_ratio")),
                f"{entry['metric']:.4g}",
                ("yes" if ok else "no") + (f" ({mark})" if mark else ""),
            ]
        )
    return rows
