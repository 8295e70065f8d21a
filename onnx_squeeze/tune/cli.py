"""The ``tune`` command's options and what it prints; the search is :func:`tune.search.tune`."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from onnx_squeeze.errors import GateFailedError, SettingsError
from onnx_squeeze.tune import results
from onnx_squeeze.tune.space import FAMILIES

HELP = "search recipes for a latency/size target within an accuracy budget"
console = Console()


def duration(text: str) -> float:
    """``30m``, ``2h``, ``90s`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30m, 2h or 90s, got {text!r}"
        )
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tune`` besides the shared run options (shapes, providers, threads,
    batch, runs: ``cli._add_run_options``)."""
    parser.add_argument("model", help="input .onnx file (or zoo:NAME)")
    parser.add_argument("-o", "--output", required=True, help="where the chosen model goes")
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="NAME=VALUE",
        help="latency=F or size=F or macs=F (fraction of the original's), speedup=X; "
        "repeatable or comma-separated, all must hold",
    )
    parser.add_argument(
        "--metric",
        default="agreement",
        help="agreement (the share of the decisions the default gate reads that stay the "
        "original's: classes, CTC strings, detections' scores, embeddings' neighbours; 0 where "
        "outputs read by value fall below the gate's 12 dB), top1 "
        "(labels in --eval), top1_agreement, cosine, worst_channel_sqnr_db, or "
        "module:function(model_path, eval_data) -> float (default agreement)",
    )
    parser.add_argument("--max-drop", help="largest drop of the metric: 0.01 (absolute) or 1%%")
    parser.add_argument(
        "--min-metric",
        type=float,
        metavar="VALUE",
        help="a floor for the metric instead of --max-drop (e.g. 30 for worst_channel_sqnr_db)",
    )
    parser.add_argument(
        "--calib", metavar="SRC", help="calibration data (required; 'random' only when asked)"
    )
    parser.add_argument(
        "--eval",
        metavar="SRC",
        help="held-out data trials are judged on (without it every 5th batch of --calib)",
    )
    parser.add_argument("--trials", type=int, default=20, help="candidates to draw (default 20)")
    parser.add_argument(
        "--patience",
        type=int,
        default=6,
        metavar="N",
        help="stop drawing after N draws in a row that come no closer (default 6; 0: draw --trials)",
    )
    parser.add_argument(
        "--time-budget",
        type=duration,
        metavar="30m",
        help="end the search by then: a trial still making a model is stopped (and runs again "
        "on --resume); trials stop early enough for the best drawn on a subset to be judged "
        "on all --eval",
    )
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once (local; default 1)")
    parser.add_argument(
        "--trial-timeout", type=duration, metavar="10m", help="stop a trial after this"
    )
    parser.add_argument("--resume", action="store_true", help="continue the search in --work-dir")
    parser.add_argument(
        "--work-dir", metavar="DIR", help="trials, recipes, reports (default OUT.tune)"
    )
    parser.add_argument(
        "--family", choices=FAMILIES, help="the search space preset (default: detected)"
    )
    parser.add_argument(
        "--finetune", action="store_true", help="add fine-tuning to the space (PyTorch)"
    )
    parser.add_argument(
        "--subset",
        type=float,
        default=0.25,
        help="share of --eval that candidates are ranked on before the best third is judged on all of it (default 0.25; 0: all)",
    )
    parser.add_argument(
        "--bisect-steps", type=int, default=3, help="pruning-fraction bisection steps (default 3)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--preset", default="imagenet", help="image preprocessing for image folders"
    )
    parser.add_argument(
        "--calib-count", type=int, default=32, help="samples of --calib random (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--first",
        action="store_true",
        help="stop at the first candidate that meets every target within the budget on all "
        "--eval (the search's time, not the most metric kept)",
    )


def add_parser(subparsers: Any, **kwargs: Any) -> argparse.ArgumentParser:
    """``tune`` on the CLI's subparsers (``kwargs``, e.g. ``parents``, go to add_parser)."""
    from onnx_squeeze.cli import _add_run_options

    parser = subparsers.add_parser("tune", help=HELP, **kwargs)
    add_arguments(parser)
    _add_run_options(parser, runs=10)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the search; exit 3 (GateFailedError) with the closest trial when none meets all."""
    from onnx_squeeze import runtime
    from onnx_squeeze.calibration.constants import parse_settings
    from onnx_squeeze.report import write_text_atomic
    from onnx_squeeze.tune.search import tune
    from onnx_squeeze.tune.targets import parse_budget, parse_targets

    if args.ray_address and args.executor != "ray":
        raise SettingsError("--ray-address goes with --executor ray")
    found = tune(
        args.model,
        args.output,
        targets=parse_targets(args.target),
        budget=parse_budget(args.metric, args.max_drop, args.min_metric),
        calibration=args.calib,
        evaluation=args.eval,
        trials=args.trials,
        time_budget=args.time_budget,
        executor=args.executor,
        ray_address=args.ray_address,
        jobs=args.jobs,
        trial_timeout=args.trial_timeout,
        work_dir=args.work_dir,
        resume=args.resume,
        family=args.family,
        finetune=args.finetune,
        subset=args.subset,
        bisect_steps=args.bisect_steps,
        providers=tuple(args.providers),
        threads=tuple(args.threads),
        runs=args.runs,
        batch=args.batch,
        shapes=runtime.parse_shape_overrides(args.shape) or None,
        default_dim=args.default_dim,
        constants=parse_settings(args.set),
        preset=args.preset,
        calibration_samples=args.calib_count,
        samples=args.samples,
        seed=args.seed,
        first=args.first,
        patience=args.patience,
        echo=lambda line: console.print(line, markup=False, highlight=False),
    )
    table = Table(title=f"tune: {found.data['model']} (latency measured on {found.where})")
    for column in (*results.COLUMNS[:-2], args.metric, results.COLUMNS[-1]):
        table.add_column(column)
    for row in results.table_rows(found):
        table.add_row(*row)
    console.print(table)
    unstarted = sum(1 for t in found.trials if t.result.get("started") is False)
    console.print(
        f"{len(found.trials)} trials ({found.executed} run, the rest cached"
        f"{f', {unstarted} not started: no time left' if unstarted else ''}) in "
        f"{found.seconds:.0f} s; results: {found.work / results.JSON_FILE}, plot: "
        f"{found.work / results.HTML_FILE}; recipes: {found.work}/trial-N.yaml",
        markup=False,
        highlight=False,
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(found.data, indent=1, default=str))
    if not found.met:
        raise GateFailedError(found.reason)
    console.print(f"wrote {found.output}", markup=False, highlight=False)
    return 0
