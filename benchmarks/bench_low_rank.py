"""Low-rank factorization on ResNet-50 and the transformer encoder (full-size zoo models).

For each model: energy 0.90 / 0.95 and a 50% MACs target, each scheme, plain and data-aware SVD;
plus ResNet-50 with only its 3×3 convs factorized. Reports MACs and parameter ratios, CPU
latency ratios against the prepared original (interleaved, threads 1 and 2), how much of the
MACs reduction shows in latency (``lat/MACs``: latency reduction over MACs reduction, the aim is
0.8 or more), and fidelity (worst cosine, top-1 agreement) on 8 random feeds. Data-aware rows use
calibration data drawn from the same distribution with another seed.

    python benchmarks/bench_low_rank.py [--runs 20] [--models resnet50 transformer] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from onnx_squeeze import calibration, runtime
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.pipeline import finalize
from onnx_squeeze.records import PassContext

MODELS: dict[str, dict[str, Any]] = {
    "resnet50": {
        "shapes": None,
        "schemes": ["auto", "channel", "spatial", "tucker2"],
        "quick": ["channel", "tucker2"],
    },
    "transformer": {"shapes": {"input_ids": (1, 128)}, "schemes": ["svd"], "quick": ["svd"]},
}
SELECTIONS: dict[str, dict[str, Any]] = {
    "energy 0.90": {"energy": 0.90},
    "energy 0.95": {"energy": 0.95},
    "MACs -50%": {"macs_target": 0.5},
}
ONLY_3X3 = {"energy 0.90, 3x3 only": {"energy": 0.90, "include": ["*conv2"]}}
THREADS = (1, 2)


def variants(
    name: str, quick: bool, only: list[str] | None = None
) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """(selection label, scheme, data-aware, settings) of every row for one model."""
    spec = MODELS[name]
    selections = dict(SELECTIONS)
    if name == "resnet50":
        selections.update(ONLY_3X3)
    selections = {k: v for k, v in selections.items() if not only or k in only}
    schemes = spec["quick"] if quick else spec["schemes"]
    shapes = [f"{k}:{'x'.join(map(str, v))}" for k, v in (spec["shapes"] or {}).items()]
    rows = []
    for label, selection in selections.items():
        for scheme in schemes:
            for data_aware in (False, True):
                if quick and data_aware and scheme != schemes[0]:
                    continue
                settings = {**selection, "scheme": scheme, "data_aware": data_aware}
                rows.append((label, scheme, data_aware, {**settings, "shapes": shapes}))
    return rows


def bench_model(
    name: str, runs: int, quick: bool, only: list[str] | None = None
) -> list[dict[str, Any]]:
    shapes = MODELS[name]["shapes"]
    _, prepared = common.prepared_zoo_model(name)
    data = common.feeds(prepared, 8, shapes=shapes)
    specs = runtime.input_specs(prepared)
    overrides = shapes or {s.name: (1, *s.concrete_shape()[1:]) for s in specs}
    source = calibration.RandomSource(specs, count=8, seed=1, overrides=overrides)
    context = PassContext(calibration=source)  # one service: its store shares Grams across rows
    base = common.cost(prepared, shapes)
    rows, models = [], []
    for label, scheme, data_aware, settings in variants(name, quick, only):
        model = prepared.clone()
        start = time.perf_counter()
        report = make_pass("low_rank", settings)(model, context)
        finalize(model)
        seconds = time.perf_counter() - start
        cost = common.cost(model, shapes)
        changed = report.changed
        rows.append(
            {
                "model": name,
                "selection": label,
                "scheme": scheme,
                "data_aware": data_aware,
                "layers": len(changed),
                "macs_ratio": cost["macs"] / base["macs"],
                "params_ratio": cost["params"] / base["params"],
                "layer_macs_ratio": sum(r.macs_after for r in changed)
                / max(1, sum(r.macs_before for r in changed)),
                "pass_seconds": seconds,
                **common.fidelity(prepared, model, data),
            }
        )
        models.append(model)
        print(f"{name} {label} {scheme} data_aware={data_aware}: {rows[-1]}", flush=True)
    for threads in THREADS:
        timings = common.latency_ms([prepared, *models], data[0], threads, runs)
        for row, ms in zip(rows, timings[1:], strict=True):
            row[f"latency_t{threads}_ratio"] = ms / timings[0]
            row[f"efficiency_t{threads}"] = (1 - ms / timings[0]) / max(1e-9, 1 - row["macs_ratio"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="fewer schemes and data-aware rows")
    parser.add_argument(
        "--selections", nargs="+", choices=[*SELECTIONS, *ONLY_3X3], help="rows to run (all)"
    )
    args = parser.parse_args()
    rows = [
        row
        for name in args.models
        for row in bench_model(name, args.runs, args.quick, args.selections)
    ]
    headers = [
        "model", "selection", "scheme", "data-aware", "layers", "MACs", "params",
        "lat t1", "lat t2", "lat/MACs t1", "lat/MACs t2", "cosine", "top-1", "pass s",
    ]  # fmt: skip
    table = [
        [
            r["model"], r["selection"], r["scheme"], "yes" if r["data_aware"] else "no",
            r["layers"], r["macs_ratio"], r["params_ratio"], r["latency_t1_ratio"],
            r["latency_t2_ratio"], r["efficiency_t1"], r["efficiency_t2"], r["cosine"],
            r["top1_agreement"], r["pass_seconds"],
        ]
        for r in rows
    ]  # fmt: skip
    body = (
        "Ratios are against the prepared original (BatchNorm folded). `lat/MACs`: latency "
        "reduction divided by MACs reduction (1.0: latency falls as much as MACs; aim >= 0.8). "
        "Fidelity: worst cosine and top-1 agreement over the outputs on 8 random feeds; the zoo "
        "weights are random, so their spectra are flat and fidelity at a given energy is a lower "
        "bound of what trained weights give.\n\n" + common.markdown_table(headers, table)
    )
    meta = common.meta(args.runs, THREADS)
    path = common.write_results(
        "low_rank", "Low-rank factorization", body, {"meta": meta, "rows": rows}
    )
    print(body)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
