"""Weight pruning on full-size ResNet-50 and the transformer: sparsity, storage, latency, fidelity.

    python benchmarks/bench_prune_weights.py [--models resnet50 transformer] [--runs 20]

Variants: global magnitude pruning at 0.5 / 0.7 / 0.9 and 2:4 N:M. Latency is expected to stay
at about 1.0x of the dense model: onnxruntime's CPU kernels do not skip zeros. The gain is the
gzip-compressed file size (and, for 2:4, what sparse tensor cores could run).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import onnx_ir as ir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from onnx_squeeze import analysis
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.records import PassReport

SHAPES = {"transformer": {"input_ids": (1, 128)}}
VARIANTS = {
    "global 0.5": {"mode": "global", "ratio": 0.5},
    "global 0.7": {"mode": "global", "ratio": 0.7},
    "global 0.9": {"mode": "global", "ratio": 0.9},
    "2:4": {"mode": "nm", "n": 2, "m": 4},
}
FIDELITY_FEEDS = 8


def storage(model: ir.Model) -> dict[str, int]:
    """Serialized size and gzip (deflate, level 6) size of the whole model file."""
    data = ir.to_proto(model).SerializeToString()
    return {"bytes": len(data), "gzip_bytes": len(zlib.compress(data, 6))}


def pruned_sparsity(report: PassReport) -> float:
    """Share of zeros over the pruned weights, from the pass's per-layer records."""
    size = sum(r.params_before for r in report.changed if r.params_before is not None)
    kept = sum(r.params_after for r in report.changed if r.params_after is not None)
    return 1 - kept / size if size else 0.0


def bench_model(name: str, threads: list[int], runs: int) -> list[dict]:
    original, prepared = common.prepared_zoo_model(name)
    shapes = SHAPES.get(name)
    data = common.feeds(original, FIDELITY_FEEDS, shapes=shapes)
    dense = storage(prepared)
    models, rows = [prepared], []
    for label, settings in VARIANTS.items():
        model = prepared.clone()
        report = make_pass("prune_weights", {**settings, "measure_gzip": False})(model)
        size = storage(model)
        rows.append(
            {
                "model": name,
                "variant": label,
                "pruned_layers": len(report.changed),
                "sparsity_pruned": pruned_sparsity(report),
                "sparsity_all": analysis.analyze(model, shapes=shapes).sparsity,
                "file_ratio": size["bytes"] / dense["bytes"],
                "gzip_ratio": size["gzip_bytes"] / dense["gzip_bytes"],
                **common.fidelity(original, model, data),
                "latency_ratio": {},
            }
        )
        models.append(model)
    for count in threads:
        base, *pruned = common.latency_ms(models, data[0], count, runs)
        for row, ms in zip(rows, pruned, strict=True):
            row["latency_ratio"][f"t{count}"] = ms / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "transformer"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = [row for name in args.models for row in bench_model(name, args.threads, args.runs)]
    headers = ["model", "variant", "layers", "sparsity (pruned)", "sparsity (all MAC weights)"]
    headers += ["file", "gzip", *(f"latency t{t}" for t in args.threads), "cosine", "top-1"]
    table = [
        [
            r["model"],
            r["variant"],
            r["pruned_layers"],
            r["sparsity_pruned"],
            r["sparsity_all"],
            r["file_ratio"],
            r["gzip_ratio"],
            *(r["latency_ratio"][f"t{t}"] for t in args.threads),
            r["cosine"],
            r["top1_agreement"],
        ]
        for r in rows
    ]
    body = (
        "Magnitude pruning (`prune_weights`, first conv and classifier kept) on the full-size zoo "
        "models; the transformer at input (1, 128). Ratios are against the dense prepared model; "
        "fidelity is against the original on 8 random feeds (worst output).\n\n"
        + common.markdown_table(headers, table)
        + "\n\nLatency stays at about 1.0x: onnxruntime's CPU kernels are dense and do not skip "
        "zeros. What pruning buys here is the gzip-compressed file (zip/gzip of the model or a "
        "sparse storage format); 2:4 is the pattern sparse tensor cores (TensorRT, Ampere+) use. Fidelity is of pruning alone, "
        "without reconstruction or fine-tuning: on the zoo's synthetic weights the error grows "
        "quickly with depth (small zoo models keep cosine > 0.99 at ratio 0.1).\n"
    )
    data = {"meta": common.meta(args.runs, args.threads), "rows": rows}
    print(body)
    print(common.write_results("prune_weights", "Weight pruning", body, data))


if __name__ == "__main__":
    main()
