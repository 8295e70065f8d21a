"""Shared pieces of the benchmark scripts: models, inputs, timing, fidelity, tables, results.

Every ``benchmarks/bench_*.py`` measures its rows side by side in one process (latency
interleaved, so machine noise hits every model alike), quotes ratios against the original and the
peers, and writes ``benchmarks/results/<topic>.md`` (committed) plus ``<topic>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_squeeze import analysis, comparison, runtime, zoo
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.pipeline import compress, convert_opset, finalize
from onnx_squeeze.records import PassContext

RESULTS = Path(__file__).parent / "results"


def prepared_zoo_model(name: str, **kwargs: Any) -> tuple[ir.Model, ir.Model]:
    """A full-size zoo model (``kwargs`` go to ``zoo.build``) and its prepared form.

    The prepared form (what ``compress`` does with an empty recipe) is the baseline that passes
    start from; ratios are quoted against the original.
    """
    original = zoo.build(name, **kwargs)
    return original, compress(original, compare=False).model


def feeds(
    model: ir.Model,
    count: int,
    *,
    batch: int = 1,
    seed: int = 0,
    shapes: dict[str, Sequence[int]] | None = None,
) -> list[dict]:
    """``count`` feeds of standard-normal data: the zoo's BatchNorm statistics are fitted to it.

    ``shapes`` fixes whole input shapes (e.g. ``{"input_ids": (1, 128)}`` for the transformer,
    whose sequence length is symbolic); other inputs get ``batch`` and 1 for symbolic dims.
    """
    rng = np.random.default_rng(seed)
    specs = runtime.input_specs(model)
    overrides = {s.name: (batch, *s.concrete_shape()[1:]) for s in specs}
    overrides.update(shapes or {})
    return [runtime.random_feed(specs, rng, overrides) for _ in range(count)]


def latency_ms(models: Sequence[ir.Model], feed: dict, threads: int, runs: int = 20) -> list[float]:
    """Median CPU latency of each model, timed interleaved in this process."""
    timings = comparison.latency(
        list(models), feed, provider="cpu", threads=threads, runs=runs, warmup=3
    )
    return [t.median_ms for t in timings]


def fidelity(reference: ir.Model, model: ir.Model, data: Sequence[dict]) -> dict[str, float]:
    """Worst cosine and top-1 agreement over the outputs, and the largest absolute error."""
    results = comparison.fidelity(reference, model, list(data))
    top1 = [r.top1_agreement for r in results if r.top1_agreement is not None]
    return {
        "cosine": min(r.cosine for r in results),
        "top1_agreement": min(top1) if top1 else float("nan"),
        "max_abs": max(r.max_abs for r in results),
    }


def cost(model: ir.Model, shapes: dict[str, Sequence[int]] | None = None) -> dict[str, int]:
    """Parameters, MACs (batch 1, or at ``shapes``) and serialized size of a model."""
    summary = analysis.analyze(model, shapes=shapes)
    size = summary.size_bytes or len(ir.to_proto(model).SerializeToString())
    return {"params": summary.params, "macs": summary.macs, "bytes": size}


def timed_pass(
    prepared: ir.Model, name: str, settings: dict, calibration: Any, opset: int | None = None
) -> tuple[ir.Model, float]:
    """One registered pass on a copy of ``prepared`` (converted to ``opset`` first if given),
    finalized as ``compress`` would, and the seconds the pass took."""
    model = prepared.clone() if opset is None else convert_opset(prepared.clone(), opset)
    start = time.perf_counter()
    make_pass(name, settings)(model, PassContext(calibration=calibration, teacher=prepared))
    seconds = time.perf_counter() - start
    finalize(model)
    return model, seconds


def variant_row(
    prepared: ir.Model,
    model: ir.Model,
    timings: dict[int, list[float]],
    index: int | None,
    held_out: Sequence[dict],
    shapes: dict[str, Sequence[int]] | None,
) -> dict[str, Any]:
    """Size, latency and fidelity of one variant against the prepared original; ``timings``
    are per-thread latencies from :func:`latency_ms` with the original first and the variant at
    ``index`` (None: it could not run, so latency and fidelity are None)."""
    fidelity_row = fidelity(prepared, model, held_out) if index is not None else {}
    return {
        "size_ratio": cost(prepared, shapes)["bytes"] / cost(model, shapes)["bytes"],
        "latency_ratio": {
            f"t{t}": times[index] / times[0] if index is not None else None
            for t, times in timings.items()
        },
        "fp32_ms": {f"t{t}": times[0] for t, times in timings.items()},
        "cosine": fidelity_row.get("cosine"),
        "top1_agreement": fidelity_row.get("top1_agreement"),
        "max_abs": fidelity_row.get("max_abs"),
    }


def run_isolated(code: str, timeout: float = 1800) -> dict[str, Any]:
    """Run Python ``code`` in a fresh interpreter; its wall time and the JSON it printed.

    Peak memory of one quantizer or pass is only comparable when each runs in its own process:
    ``code`` prints one JSON object on its last line of stdout, with ``self_peak_rss_mib()``.
    """
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"isolated run failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    return {
        "seconds": seconds,
        "result": json.loads(lines[-1]) if lines else {},
    }


def self_peak_rss_mib() -> float:
    """Peak resident memory of this process (for code run through :func:`run_isolated`).

    Read from /proc (VmHWM): on Linux ``ru_maxrss`` survives exec, so a child started from a
    big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def revision() -> str:
    """The commit the package ran from, and whether its files had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "onnx_squeeze"], capture_output=True, text=True
    )
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant decimals, None an en dash."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def meta(runs: int, threads: Sequence[int]) -> dict[str, Any]:
    """Where and how the figures were taken."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "runs": runs,
        "threads": list(threads),
    }


def write_results(topic: str, title: str, body: str, data: dict[str, Any]) -> Path:
    """Write ``results/<topic>.md`` (title, how measured, body) and ``results/<topic>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = data.get("meta", {})
    header = (
        f"# {title}\n\n{info.get('date', '')} · {info.get('machine', '')} · onnxruntime "
        f"{info.get('onnxruntime', '')} · CPUExecutionProvider · median of {info.get('runs', '?')} "
        "interleaved runs\n\n"
    )
    markdown = RESULTS / f"{topic}.md"
    markdown.write_text(header + body.rstrip() + "\n")
    (RESULTS / f"{topic}.json").write_text(json.dumps(data, indent=2, default=float))
    return markdown


def run_per_model(
    argv: list[str] | None,
    doc: str,
    models: Iterable[str],
    topic: str,
    title: str,
    bench_model: Callable[[str, list[int], int], list[dict]],
    markdown: Callable[[list[dict], list[int]], str],
) -> None:
    """The command line of a benchmark whose rows come from ``bench_model(name, threads, runs)``
    for each of ``--models``: writes ``results/<topic>`` with ``markdown(rows, threads)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", default=",".join(models))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows += bench_model(name, threads, args.runs)
    data = {"meta": meta(args.runs, threads), "rows": rows}
    write_results(topic, title, markdown(rows, threads), data)
    print(markdown(rows, threads))
