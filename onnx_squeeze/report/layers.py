"""Per-layer figures for the report's pictures, gathered from what the report dict holds.

Parameters and MACs before/after come from the pass records (the first pass's "before", the last
pass's "after" of each node), or from ``comparison.layers`` when the comparison measured every
layer of both models (then with onnxruntime's profiled time too). A quantized layer's weight SQNR
is the record's ``sqnr_db``, or the "SQNR X dB" its detail states.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_SQNR = re.compile(r"SQNR (-?\d+(?:\.\d+)?) dB")


@dataclasses.dataclass
class LayerChange:
    """One node's figures before and after the run (None: not recorded)."""

    node: str
    op_type: str
    params: list[int | None] = dataclasses.field(default_factory=lambda: [None, None])
    macs: list[int | None] = dataclasses.field(default_factory=lambda: [None, None])
    time_ms: list[float | None] = dataclasses.field(default_factory=lambda: [None, None])
    actions: list[str] = dataclasses.field(default_factory=list)

    def fold(self, key: str, before: Any, after: Any) -> None:
        pair = getattr(self, key)
        if pair[0] is None:
            pair[0] = before
        if after is not None:
            pair[1] = after


def layer_changes(report: dict[str, Any]) -> list[LayerChange]:
    """Every layer with a before/after figure, in the order the run first met it."""
    measured = (report.get("comparison") or {}).get("layers")
    if measured:
        return [
            LayerChange(
                item["node"],
                item.get("op_type", ""),
                list(item.get("params") or [None, None]),
                list(item.get("macs") or [None, None]),
                list(item.get("time_ms") or [None, None]),
            )
            for item in measured
        ]
    layers: dict[str, LayerChange] = {}
    for item in report.get("passes") or []:
        for record in item["records"]:
            if record["action"] == "skipped":
                continue
            layer = layers.setdefault(
                record["node"], LayerChange(record["node"], record["op_type"])
            )
            layer.actions.append(f"{item['name']}: {record['action']}")
            for key in ("params", "macs"):
                layer.fold(key, record.get(f"{key}_before"), record.get(f"{key}_after"))
    for layer in layers.values():
        for key in ("params", "macs"):
            pair = getattr(layer, key)
            if pair[0] is not None and pair[1] is None:
                pair[1] = pair[0]
    return [
        layer
        for layer in layers.values()
        if any(v is not None for v in (*layer.params, *layer.macs))
    ]


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    node: str
    op_type: str
    sqnr_db: float | None  # None: kept in float
    detail: str


def quantized_layers(report: dict[str, Any]) -> dict[str, list[QuantizedLayer]]:
    """Per quantizing pass, its layers' weight SQNR, and the layers it kept in float (sqnr None)."""
    found: dict[str, list[QuantizedLayer]] = {}
    for item in report.get("passes") or []:
        rows = []
        for record in item["records"]:
            value = record.get("sqnr_db")
            if value is None and (match := _SQNR.search(record["detail"])):
                value = float(match.group(1))
            if record["action"] == "skipped" and "float" in record["detail"]:
                rows.append(
                    QuantizedLayer(record["node"], record["op_type"], None, record["detail"])
                )
            elif value is not None and record["action"] != "skipped":
                rows.append(
                    QuantizedLayer(record["node"], record["op_type"], value, record["detail"])
                )
        if any(row.sqnr_db is not None for row in rows):
            found[item["name"]] = rows
    return found


@dataclasses.dataclass(frozen=True)
class PrunedLayer:
    node: str
    op_type: str
    removed: float  # fraction of the layer's parameters removed
    params: tuple[int, int]
    action: str


def pruned_layers(report: dict[str, Any]) -> dict[str, list[PrunedLayer]]:
    """Per pass that removed parameters (pruning, factorizing), each layer's removed fraction.
    ``prepare`` folds BatchNorm into layers: bookkeeping, not pruning, so it is left out."""
    found: dict[str, list[PrunedLayer]] = {}
    for item in report.get("passes") or []:
        if item["name"] == "prepare":
            continue
        rows = [
            PrunedLayer(
                r["node"],
                r["op_type"],
                1.0 - r["params_after"] / r["params_before"],
                (r["params_before"], r["params_after"]),
                r["action"],
            )
            for r in item["records"]
            if r["action"] != "skipped"
            and r.get("params_before")
            and r.get("params_after") is not None
        ]
        if rows:
            found[item["name"]] = rows
    return found
