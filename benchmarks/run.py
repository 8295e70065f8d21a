"""Benchmarks on the full-size zoo models, measured side by side in one run.

    python benchmarks/run.py [--models resnet18,resnet50] [--runs 20] [--threads 1,2]

Writes ``benchmarks/results/latest.md`` (committed) and ``latest.json``. Latencies are timed
interleaved (A, B, C, A, B, C, ...) in one process so machine noise hits every model alike;
tables quote ratios against the original, as ANCHORS.md asks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxsim

from onnx_squeeze import analysis, comparison, model_io, runtime, zoo
from onnx_squeeze.pipeline import compress
from onnx_squeeze.report import human_bytes, human_count

RESULTS = Path(__file__).parent / "results"


def _onnxsim_peer(model: ir.Model) -> ir.Model:
    """The peer: onnxsim's simplifier alone, in process, default settings."""
    simplified, ok = onnxsim.simplify(ir.to_proto(model))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return ir.from_proto(simplified)


def _latencies(models: list[ir.Model], feed: dict, threads: int, runs: int) -> list[float]:
    timings = comparison.latency(models, feed, provider="cpu", threads=threads, runs=runs, warmup=3)
    return [t.median_ms for t in timings]


def bench_model(name: str, threads: list[int], runs: int, folder: Path) -> dict:
    """Original vs onnx-squeeze prepare (empty recipe) vs onnxsim on one zoo model."""
    start = time.perf_counter()
    original = zoo.build(name)
    build_s = time.perf_counter() - start
    path = folder / f"{name}.onnx"
    model_io.save(original, path)
    start = time.perf_counter()
    ours = compress(path).model
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    peer = _onnxsim_peer(original)
    peer_s = time.perf_counter() - start
    summary = analysis.analyze(original, path=path)
    feed = runtime.random_feed(runtime.input_specs(original), np.random.default_rng(0))
    row = {
        "model": name,
        "inputs": {k: list(v) for k, v in summary.input_shapes.items()},
        "params": summary.params,
        "macs": summary.macs,
        "size_bytes": summary.size_bytes,
        "nodes": {
            "original": len(original.graph),
            "onnx_squeeze": len(ours.graph),
            "onnxsim": len(peer.graph),
        },
        "seconds": {"build": build_s, "onnx_squeeze_prepare": ours_s, "onnxsim": peer_s},
        "latency_ms": {},
    }
    for count in threads:
        base, squeezed, simplified = _latencies([original, ours, peer], feed, count, runs)
        row["latency_ms"][f"t{count}"] = {
            "original": base,
            "onnx_squeeze": squeezed,
            "onnxsim": simplified,
        }
    fid = comparison.fidelity(original, ours, [feed])
    row["cosine_onnx_squeeze"] = min(f.cosine for f in fid)
    return row


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"{meta['date']} · {meta['machine']} · onnxruntime {meta['onnxruntime']} · "
        f"CPUExecutionProvider · batch 1 · median of {meta['runs']} interleaved runs",
        "",
        "## Reference models (full size) and prepare vs onnxsim",
        "",
        "Prepare = what `onnx-squeeze compress` does with an empty recipe (shape inference, onnxsim "
        "in a subprocess, BatchNorm folding, constant folding). Peer = onnxsim alone. Ratios are "
        "latency relative to the original model, same run (lower is faster).",
        "",
        "| model | input | params | MACs | size | nodes orig → ours / onnxsim | "
        + " | ".join(f"orig ms t{t} | ours ×t{t} | onnxsim ×t{t}" for t in meta["threads"])
        + " | cosine ours |",
        "|---|---|---|---|---|---|" + "---|---|---|" * len(meta["threads"]) + "---|",
    ]
    for row in rows:
        shape = "; ".join("×".join(map(str, s)) for s in row["inputs"].values())
        nodes = row["nodes"]
        cells = [
            row["model"],
            shape,
            human_count(row["params"]),
            human_count(row["macs"]),
            human_bytes(row["size_bytes"]),
            f"{nodes['original']} → {nodes['onnx_squeeze']} / {nodes['onnxsim']}",
        ]
        for count in meta["threads"]:
            lat = row["latency_ms"][f"t{count}"]
            cells += [
                f"{lat['original']:.2f}",
                f"{lat['onnx_squeeze'] / lat['original']:.3f}",
                f"{lat['onnxsim'] / lat['original']:.3f}",
            ]
        cells.append(f"{row['cosine_onnx_squeeze']:.7f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.NAMES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "latest.md"))
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, threads, args.runs, Path(scratch)))
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "runs": args.runs,
        "threads": threads,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(rows, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
