"""Channel pruning at a MACs target, side by side with onnxsim 0.8's structured pruning.

For each model: prunable/frozen dependency groups, layers whose output channels shrank (both
tools), MACs and params ratios, CPU latency ratios against the prepared original (interleaved in
one run, threads 1 and 2), and fidelity (worst cosine, top-1 agreement) on 8 random feeds.
onnxsim gets the same prepared model (BatchNormalization already folded, as it requires) and its
``sparsity`` is searched by bisection for the same MACs target; where it cannot reach the target
its largest reduction is shown.

Usage: ``python benchmarks/bench_prune_channels.py [--models resnet50 ...] [--runs 20]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx_ir as ir
from onnxsim.pruning import analyze_pruning_sensitivity, apply_structured_pruning

from benchmarks import common
from onnx_squeeze import runtime
from onnx_squeeze.calibration import RandomSource
from onnx_squeeze.passes.prune_channels import PruneChannels
from onnx_squeeze.passes.prune_channels.trace import build_groups
from onnx_squeeze.records import PassContext
from onnx_squeeze.shapes import resolve_input_shapes

MODELS = ("resnet50", "mobilenetv2", "yolo", "transformer")
TARGETS = (0.3, 0.5)
THREADS = (1, 2)
_SHAPES = {"transformer": {"input_ids": (1, 128)}}
_SEARCH_STEPS = 8
_ONNXSIM_PROBE_SPARSITY = 0.5
_CALIBRATION_SAMPLES = 4
ALLOCATIONS = ("sensitivity", "uniform")


def _weight_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1:
            weight = node.inputs[1]
            if weight is not None and weight.const_value is not None:
                shapes[node.name] = tuple(weight.const_value.shape)
    return shapes


def shrunk_layers(reference: ir.Model, model: ir.Model) -> int:
    """Layers (by name) whose weight lost entries: a proxy for channel groups pruned."""
    before, after = _weight_shapes(reference), _weight_shapes(model)
    return sum(1 for name, shape in after.items() if name in before and shape != before[name])


def calibration_context(prepared: ir.Model, shapes) -> PassContext:
    """Random calibration data drawn with another seed than the fidelity feeds; one context per
    model so that the sensitivity measured for one target serves the others."""
    specs = runtime.input_specs(prepared)
    source = RandomSource(specs, count=_CALIBRATION_SAMPLES, seed=1, overrides=shapes, batch_size=1)
    return PassContext(calibration=source, shapes=resolve_input_shapes(prepared, shapes))


def ours(prepared: ir.Model, target: float, allocation: str, context: PassContext) -> ir.Model:
    model = prepared.clone()
    PruneChannels(macs_target=target, allocation=allocation)(model, context)
    return model


def our_groups(prepared: ir.Model) -> str:
    """Prunable/frozen channel dependency groups, as ``onnx-squeeze inspect --groups`` lists."""
    groups = build_groups(prepared, split_heads=True)
    frozen = sum(1 for g in groups if g.frozen)
    return f"{len(groups) - frozen}/{frozen}"


def onnxsim_groups(prepared: ir.Model) -> str:
    """onnxsim's own dry run of its structured pruning: matched chains it would shrink are
    prunable; chains it would leave alone plus Conv/Gemm/MatMul layers no matcher takes
    (``not_eligible``, counted per layer) are frozen."""
    report = analyze_pruning_sensitivity(
        ir.to_proto(prepared), apply_structured_pruning, sparsity=_ONNXSIM_PROBE_SPARSITY
    )
    prunable = sum(1 for layer in report.layers if layer.would_drop > 0)
    return f"{prunable}/{len(report.layers) - prunable + len(report.not_eligible)}"


def onnxsim_at(prepared: ir.Model, sparsity: float) -> ir.Model:
    pruned = apply_structured_pruning(ir.to_proto(prepared), sparsity=sparsity)
    pruned.graph.ClearField("value_info")  # it keeps the unpruned intermediate shapes
    return ir.from_proto(pruned)


def onnxsim_for(prepared: ir.Model, target: float, shapes, base_macs: int) -> ir.Model:
    """onnxsim at the smallest sparsity whose result removes ``target`` of the MACs."""
    low, high = 0.0, 0.95
    best = onnxsim_at(prepared, high)
    if 1 - common.cost(best, shapes)["macs"] / base_macs < target:
        return best
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        candidate = onnxsim_at(prepared, middle)
        if 1 - common.cost(candidate, shapes)["macs"] / base_macs >= target:
            high, best = middle, candidate
        else:
            low = middle
    return best


def measure(
    name: str, targets: Sequence[float], allocations: Sequence[str], runs: int
) -> list[dict[str, Any]]:
    _, prepared = common.prepared_zoo_model(name)
    shapes = _SHAPES.get(name)
    data = common.feeds(prepared, 8, shapes=shapes)
    base = common.cost(prepared, shapes)
    groups = {"onnx-squeeze": our_groups(prepared), "onnxsim": onnxsim_groups(prepared)}
    candidates: list[tuple[str, float, ir.Model]] = []
    context = calibration_context(prepared, shapes)
    for target in targets:
        for allocation in allocations:
            model = ours(prepared, target, allocation, context)
            candidates.append((f"onnx-squeeze ({allocation})", target, model))
        candidates.append(
            ("onnxsim 0.8", target, onnxsim_for(prepared, target, shapes, base["macs"]))
        )
    latency = {
        t: common.latency_ms([prepared] + [c[2] for c in candidates], data[0], t, runs)
        for t in THREADS
    }
    rows = []
    for index, (tool, target, model) in enumerate(candidates, start=1):
        cost = common.cost(model, shapes)
        fidelity = common.fidelity(prepared, model, data)
        rows.append(
            {
                "model": name,
                "target": target,
                "tool": tool,
                "groups": groups[tool.split()[0]],
                "layers_shrunk": shrunk_layers(prepared, model),
                "macs_ratio": cost["macs"] / base["macs"],
                "params_ratio": cost["params"] / base["params"],
                **{f"speedup_t{t}": latency[t][0] / latency[t][index] for t in THREADS},
                "cosine": fidelity["cosine"],
                "top1_agreement": fidelity["top1_agreement"],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    rows, failures = [], []
    for name in args.models:
        try:
            rows.extend(measure(name, args.targets, args.allocations, args.runs))
        except Exception as error:  # one model failing must not lose the others' rows
            failures.append(f"{name}: {type(error).__name__}: {error}")
    headers = [
        "model", "MACs removed (target)", "tool", "groups prunable/frozen", "layers shrunk",
        "MACs ratio", "params ratio", "speedup t1", "speedup t2", "cosine", "top-1 agree",
    ]  # fmt: skip
    table = [
        [
            r["model"], f"{r['target']:.0%}", r["tool"], r["groups"], r["layers_shrunk"],
            r["macs_ratio"], r["params_ratio"], r["speedup_t1"], r["speedup_t2"], r["cosine"],
            r["top1_agreement"],
        ]
        for r in rows
    ]  # fmt: skip
    body = common.markdown_table(headers, table) + (
        "\n\nSpeedup = latency of the prepared original / latency of the pruned model, CPU, "
        "batch 1 (transformer: sequence 128). onnxsim's sparsity is searched for the same MACs "
        "target; 'layers shrunk' counts Conv/Gemm/MatMul whose weight lost channels. onnxsim's "
        "groups come from its own dry run (`analyze_pruning_sensitivity` of "
        "`apply_structured_pruning` at sparsity 0.5): prunable = matched producer/consumer "
        "chains it would shrink; frozen = chains it would leave alone plus weight layers none "
        "of its matchers takes (counted per layer, ours per group). Our "
        "'sensitivity' allocation measures each group on 4 random calibration samples (another "
        "seed than the 8 fidelity feeds); 'uniform' is one ratio for every group. No "
        "fine-tuning: fidelity is what pruning alone keeps on the zoo's synthetic weights.\n"
    )
    body += "".join(f"\nFailed: {failure}\n" for failure in failures)
    data = {"meta": common.meta(args.runs, THREADS), "rows": rows, "failures": failures}
    print(body)
    print(common.write_results("prune_channels", "Channel pruning vs onnxsim 0.8", body, data))


if __name__ == "__main__":
    main()
