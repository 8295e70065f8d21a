"""The report as one self-contained HTML page: a warning banner, cards and tables."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from onnx_squeeze.report.format import (
    FIDELITY_COLUMNS,
    before_after,
    fidelity_rows,
    gate_label,
    number,
    shapes_line,
    size_rows,
    summed,
)

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #dde}
.sub{color:#667;margin-top:0} table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{padding:.3rem .6rem;border-bottom:1px solid #eef;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left} th{background:#f5f6fa;font-weight:600}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{flex:1;min-width:180px;background:#f5f6fa;border-radius:8px;padding:.8rem 1rem}
.card b{display:block;font-size:1.6rem} .card span{color:#667}
.bar{background:#e4e7f0;border-radius:4px;height:10px;width:160px;display:inline-block;vertical-align:middle}
.bar i{display:block;height:10px;border-radius:4px;background:#4a7bd0}
.warnings{background:#fff4e5;border:2px solid #e08a00;border-radius:8px;padding:.6rem 1rem;margin:1rem 0}
.warnings ul{margin:.3rem 0 0 1rem;padding:0}
.pass{color:#167a3a;font-weight:600} .fail{color:#b3261e;font-weight:600} .note{color:#667}
"""


def _card(label: str, value: str) -> str:
    return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(ratio_text: str) -> str:
    try:
        ratio = float(ratio_text.rstrip("×"))
    except ValueError:
        return ""
    width = max(0.0, min(ratio, 1.5)) / 1.5 * 100
    return f'<span class="bar"><i style="width:{width:.0f}%"></i></span>'


def to_html(report: dict[str, Any]) -> str:
    """A self-contained page: headline ratios first, then the tables behind them."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>onnx-squeeze report</title><style>{_CSS}</style></head><body>"
    ]
    parts.append("<h1>onnx-squeeze report</h1>")
    parts.append(
        f"<p class='sub'>{esc(str(report.get('input') or ''))} → {esc(str(report.get('output') or '(not written)'))} · {esc(report['created'])}</p>"
    )
    if report.get("warnings"):
        items = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"])
        parts.append(f"<div class='warnings'><b>Warnings</b><ul>{items}</ul></div>")
    comparison = report.get("comparison")
    if comparison:
        rows = size_rows(comparison)
        cards = [_card(f"{metric} ratio", ratio) for metric, _, _, ratio in rows[:3]]
        cards += [
            _card(metric.replace(" (median ms)", "") + " ratio", ratio)
            for metric, _, _, ratio in rows[3:4]
        ]
        worst = comparison.get("metrics", {}).get("worst_channel_sqnr_db")
        if worst is not None:
            cards.append(_card("worst output channel SQNR", f"{worst:.1f} dB"))
        parts.append("<div class='cards'>" + "".join(cards) + "</div>")
        names = comparison.get("names") or ["original", "result"]
        parts.append("<h2>Size and speed</h2>")
        parts.append(
            _table(
                ["", *names, "ratio", ""],
                [(esc(m), esc(a), esc(b), esc(r), _bar(r)) for m, a, b, r in rows],
            )
        )
        parts.append(
            f"<h2>Fidelity <span class='note'>(inputs: {esc(comparison.get('inputs_label', '?'))};"
            f" shapes: {esc(shapes_line(comparison) or '?')})</span></h2>"
        )
        parts.append(
            _table(
                list(FIDELITY_COLUMNS),
                [tuple(esc(c) for c in row) for row in fidelity_rows(comparison)],
            )
        )
    gates = report.get("gates") or []
    if gates:
        parts.append("<h2>Accuracy gates</h2>")
        verdict = {True: "<span class='pass'>PASS</span>", False: "<span class='fail'>FAIL</span>"}
        gate_rows = [
            (esc(gate_label(g)), esc(number(g.get("value"))), verdict[g["passed"]]) for g in gates
        ]
        parts.append(_table(["gate", "value", "result"], gate_rows))
    passes = report.get("passes") or []
    if passes:
        parts.append("<h2>Passes</h2>")
        summary = []
        for item in passes:
            skipped = sum(r["action"] == "skipped" for r in item["records"])
            summary.append(
                (
                    esc(item["name"]),
                    str(len(item["records"]) - skipped),
                    str(skipped),
                    esc(summed(item["records"], "params")),
                    esc(summed(item["records"], "macs")),
                    f"{item['seconds']:.2f}",
                )
            )
        parts.append(_table(["pass", "changed", "skipped", "params", "MACs", "seconds"], summary))
    for item in passes:
        parts.append(
            f"<details><summary><b>{esc(item['name'])}</b> <span class='note'>"
            f"({len(item['records'])} node records, {item['seconds']:.2f} s)</span></summary>"
        )
        rows = [
            (
                esc(r["node"]),
                esc(r["op_type"]),
                esc(r["action"]),
                esc(before_after(r.get("params_before"), r.get("params_after"))),
                esc(before_after(r.get("macs_before"), r.get("macs_after"))),
                esc(r["detail"]),
            )
            for r in item["records"]
        ]
        if rows:
            parts.append(_table(["node", "op", "action", "params", "MACs", "detail"], rows))
        for note in item["notes"]:
            parts.append(f"<p class='note'>{esc(note)}</p>")
        parts.append("</details>")
    for note in report.get("notes") or []:
        parts.append(f"<p class='note'>note: {esc(note)}</p>")
    tool = report.get("tool", {})
    parts.append(
        f"<p class='note'>{esc(', '.join(f'{k} {v}' for k, v in tool.items()))}</p></body></html>"
    )
    return "\n".join(parts)
