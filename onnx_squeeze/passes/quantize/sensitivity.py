"""Mixed precision: rank the quantized layers by how much each alone costs the outputs, and
keep the most sensitive in float until a fidelity target holds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnx_squeeze import comparison, fidelity
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.gates import parse_gate
from onnx_squeeze.records import PassContext, PassReport


def keep_sensitive_float(
    model: ir.Model,
    anchors: list[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    *,
    target: str,
    batches: int,
) -> list[ir.Node]:
    """Rank anchors by sensitivity (output SQNR with only that anchor quantized) and keep
    the worst in float until ``target`` holds; the anchors to quantize."""
    feeds = context.data.first_batches(batches)
    reference = _outputs(model, feeds, context)
    sensitivity = {}
    for node in anchors:
        candidate = _outputs(quantized_copy([node]), feeds, context)
        sensitivity[node.name] = _worst_sqnr(reference, candidate)
    ranked = sorted(anchors, key=lambda n: sensitivity[n.name])
    listed = ", ".join(f"{n.name} {sensitivity[n.name]:.1f} dB" for n in ranked[:8])
    report.notes.append(f"sensitivity (output SQNR with one layer quantized), worst: {listed}")
    if not target:
        return anchors
    gate = parse_gate(target)
    kept_float: list[ir.Node] = []
    while True:
        chosen = [n for n in anchors if n not in kept_float]
        value = _metric(model, quantized_copy(chosen), feeds, gate.metric)
        if gate.passes(value) or len(kept_float) == len(ranked):
            break
        kept_float.append(ranked[len(kept_float)])
    for node in kept_float:
        report.skip(
            node,
            f"kept in float for {gate} (sensitivity {sensitivity[node.name]:.1f} dB)",
        )
    verdict = "met" if gate.passes(value) else "NOT met even with every layer in float"
    report.notes.append(
        f"target {gate}: {verdict} with {len(kept_float)} of {len(anchors)} layers in float "
        f"({gate.metric} = {value:.4g} on {len(feeds)} calibration batches)"
    )
    return [n for n in anchors if n not in kept_float]


def _outputs(model: ir.Model, feeds: Sequence[Feed], context: PassContext) -> list[Feed]:
    """The model's outputs on every feed, by name."""
    runner = TensorRunner(model, [v.name for v in model.graph.outputs], context.providers[0])
    return [runner(feed) for feed in feeds]


def _worst_sqnr(reference: list[Feed], result: list[Feed]) -> float:
    """The worst float output's SQNR (whole tensor) over all feeds."""
    measured = fidelity.measure(reference, result)
    return min((m.sqnr_db for m in measured.values()), default=math.inf)


def _metric(reference: ir.Model, model: ir.Model, feeds: Sequence[dict], metric: str) -> float:
    """One fidelity metric (as the gates name them) of ``model`` against ``reference``."""
    results = comparison.fidelity(reference, model, list(feeds))
    values = {
        "cosine": min(r.cosine for r in results),
        "max_abs_error": max(r.max_abs for r in results),
        "mean_abs_error": max(r.mean_abs for r in results),
    }
    top1 = [r.top1_agreement for r in results if r.top1_agreement is not None]
    if top1:
        values["top1_agreement"] = min(top1)
    if metric not in values:
        raise SettingsError(
            f"quantize_int8 target: {metric} cannot be measured during quantization; "
            f"use one of {', '.join(values)}"
        )
    return float(values[metric])
