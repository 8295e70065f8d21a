"""Run the benchmarks and assemble ``benchmarks/results/latest.md``.

    python benchmarks/run.py                 # reference models, then every bench_*.py
    python benchmarks/run.py --only foundation --runs 10
    python benchmarks/run.py --collect       # only re-assemble latest.md from results/*.md

The foundation section measures every full-size zoo model as built, after onnx-squeeze's
prepare (an empty recipe) and after onnxsim alone, side by side in one process. Each
``bench_<topic>.py`` writes ``results/<topic>.md``; ``latest.md`` is their concatenation, and
README quotes its headline rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import onnx_ir as ir
import onnxsim

from onnx_squeeze import model_io, zoo
from onnx_squeeze.pipeline import compress
from onnx_squeeze.units import human_bytes, human_count

HERE = Path(__file__).parent
# The order sections appear in latest.md; topics not listed follow alphabetically.
SECTION_ORDER = [
    "foundation",
    "prune_channels",
    "prune_weights",
    "low_rank",
    "quantize_int8",
    "quantize_float",
    "quantize_weights",
    "distill",
]
# Inputs for the zoo's symbolic dims where batch 1 alone is not representative.
SHAPES = {"transformer": {"input_ids": (1, 128)}}


def _onnxsim_peer(model: ir.Model) -> ir.Model:
    """The peer: onnxsim's simplifier alone, in process, default settings."""
    simplified, ok = onnxsim.simplify(ir.to_proto(model))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return ir.from_proto(simplified)


def bench_model(name: str, threads: list[int], runs: int, folder: Path) -> dict:
    """Original vs onnx-squeeze prepare (empty recipe) vs onnxsim on one zoo model."""
    original = zoo.build(name)
    path = folder / f"{name}.onnx"
    model_io.save(original, path)
    start = time.perf_counter()
    ours = compress(path, compare=False).model
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    peer = _onnxsim_peer(original)
    peer_s = time.perf_counter() - start
    feed = common.feeds(original, 1, shapes=SHAPES.get(name))[0]
    row = {
        "model": name,
        "inputs": {k: list(v.shape) for k, v in feed.items()},
        **common.cost(original, shapes=SHAPES.get(name)),
        "nodes": {
            "original": len(original.graph),
            "onnx_squeeze": len(ours.graph),
            "onnxsim": len(peer.graph),
        },
        "seconds": {"onnx_squeeze_prepare": ours_s, "onnxsim": peer_s},
        "latency_ms": {},
    }
    for count in threads:
        base, squeezed, simplified = common.latency_ms([original, ours, peer], feed, count, runs)
        row["latency_ms"][f"t{count}"] = {
            "original": base,
            "onnx_squeeze": squeezed,
            "onnxsim": simplified,
        }
    row["cosine_onnx_squeeze"] = common.fidelity(original, ours, [feed])["cosine"]
    return row


def foundation_markdown(rows: list[dict], threads: list[int]) -> str:
    headers = ["model", "input", "params", "MACs", "size", "nodes orig → ours / onnxsim"]
    for count in threads:
        headers += [f"orig ms t{count}", f"ours ×t{count}", f"onnxsim ×t{count}"]
    headers.append("cosine ours")
    table = []
    for row in rows:
        nodes = row["nodes"]
        cells = [
            row["model"],
            "; ".join("×".join(map(str, s)) for s in row["inputs"].values()),
            human_count(row["params"]),
            human_count(row["macs"]),
            human_bytes(row["bytes"]),
            f"{nodes['original']} → {nodes['onnx_squeeze']} / {nodes['onnxsim']}",
        ]
        for count in threads:
            lat = row["latency_ms"][f"t{count}"]
            cells += [
                f"{lat['original']:.2f}",
                f"{lat['onnx_squeeze'] / lat['original']:.3f}",
                f"{lat['onnxsim'] / lat['original']:.3f}",
            ]
        cells.append(f"{row['cosine_onnx_squeeze']:.7f}")
        table.append(cells)
    return (
        "Prepare = what `onnx-squeeze compress` does with an empty recipe (shape inference, "
        "onnxsim in a subprocess, BatchNorm folding, constant folding). Peer = onnxsim alone. "
        "× = latency relative to the original model in the same run (lower is faster). "
        "onnxsim's lower node count on the transformer is its fusion of attention into "
        "onnxruntime-only `com.microsoft.Attention`, which prepare turns off so that passes see "
        "the Q/K/V projections.\n\n" + common.markdown_table(headers, table)
    )


def run_foundation(models: list[str], threads: list[int], runs: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, threads, runs, Path(scratch)))
    data = {"meta": common.meta(runs, threads), "rows": rows}
    common.write_results(
        "foundation",
        "Reference models: prepare vs onnxsim",
        foundation_markdown(rows, threads),
        data,
    )


def collect() -> Path:
    """Concatenate results/<topic>.md into results/latest.md in SECTION_ORDER."""
    found = {p.stem: p for p in common.RESULTS.glob("*.md") if p.stem != "latest"}
    order = [t for t in SECTION_ORDER if t in found] + sorted(set(found) - set(SECTION_ORDER))
    sections = [
        found[t].read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1) for t in order
    ]
    latest = common.RESULTS / "latest.md"
    latest.write_text("# Benchmark results\n\n" + "\n".join(sections))
    return latest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.NAMES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", help="run one topic: foundation or a bench_<topic>.py")
    parser.add_argument("--collect", action="store_true", help="only re-assemble latest.md")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if not args.collect:
        if args.only in (None, "foundation"):
            run_foundation(args.models.split(","), threads, args.runs)
        scripts = sorted(HERE.glob("bench_*.py"))
        if args.only not in (None, "foundation"):
            scripts = [HERE / f"bench_{args.only}.py"]
        for script in scripts:
            print(f"running {script.name} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(script)], check=True)
    print(collect().read_text())


if __name__ == "__main__":
    main()
