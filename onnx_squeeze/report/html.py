"""The report as one self-contained HTML page: a verdict banner, pictures, then the tables.

The banner comes first and is never folded: a failed gate is red, a warning amber, a clean pass
green, so the state of a run is seen before anything else. Charts are inline SVG (``charts``) and
the page loads nothing (its Content-Security-Policy forbids it), so it opens offline and on a
phone: charts scale with the page, wide tables scroll inside their own box.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from onnx_squeeze.report import charts
from onnx_squeeze.report.charts import Row, Series, Spread
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
from onnx_squeeze.report.layers import layer_changes, pruned_layers, quantized_layers
from onnx_squeeze.units import human_count

MAX_ROWS = 40  # per-layer charts show the largest layers; the JSON holds all of them
WORST_CHANNELS = 12

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #dde}
.sub{color:#667;margin-top:0;overflow-wrap:anywhere}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.5rem 0}
table{border-collapse:collapse;width:100%}
th,td{padding:.3rem .6rem;border-bottom:1px solid #eef;text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th:first-child,td:first-child{text-align:left} th{background:#f5f6fa;font-weight:600}
td.wrap{white-space:normal;min-width:16rem;text-align:left}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:.8rem;margin:1rem 0}
.card{background:#f5f6fa;border-radius:8px;padding:.7rem 1rem}
.card b{display:block;font-size:1.5rem} .card span{color:#667}
.banner{border-radius:8px;padding:.7rem 1rem;margin:1rem 0;border:2px solid}
.banner strong{font-size:1.25rem;margin-right:.6rem}
.banner ul{margin:.4rem 0 0 1.1rem;padding:0} .banner li{margin:.15rem 0;overflow-wrap:anywhere}
.banner.fail{background:#fdecea;border-color:#b3261e;color:#5f1410}
.banner.warn{background:#fff4e5;border-color:#e08a00;color:#4d3000}
.banner.pass{background:#e8f5ec;border-color:#167a3a;color:#0d3d1d}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,420px),1fr));gap:1rem}
figure{margin:0;background:#fafbfd;border:1px solid #e6e9f2;border-radius:8px;padding:.6rem .7rem}
figcaption{font-weight:600;margin-bottom:.3rem} figcaption .note{font-weight:400}
svg.chart{width:100%;height:auto;display:block}
svg .label{font-size:12px;text-anchor:end;fill:#1d2330} svg .value{font-size:11px;fill:#445}
svg .tick{font-size:10.5px;text-anchor:middle;fill:#667} svg .reftext{font-size:10px;fill:#b3261e}
svg .grid{stroke:#e4e7f0} svg .axis{stroke:#889}
svg .reference{stroke:#b3261e;stroke-dasharray:4 3;stroke-width:1.5}
.legend{display:block;font-weight:400;font-size:.85rem;color:#556}
.key{margin-right:1rem} .key i{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;vertical-align:-1px}
.pass{color:#167a3a;font-weight:600} .fail{color:#b3261e;font-weight:600} .note{color:#667}
details{margin:.4rem 0}
@media (max-width:520px){body{padding:0 .5rem;margin-top:.8rem} figure{padding:.5rem .4rem} .banner{padding:.6rem .7rem}}
"""

# The page fetches nothing: styles are inline, pictures are inline SVG.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_GATE = re.compile(r"^\s*(\w+)\s*(>=|>|<=|<)\s*(-?\d+(?:\.\d+)?)\s*$")

esc = html.escape


def _db(value: float) -> str:
    return f"{value:.1f} dB"


def _db_tick(value: float) -> str:
    return f"{value:g} dB"


def _count(value: float) -> str:
    """A count as people read it, without trailing zeros on the axis: 50k, 1.5M."""
    return re.sub(r"\.?0+(?=[kMG]$)", "", human_count(value))


def _card(label: str, value: str) -> str:
    return f'<div class="card"><b>{esc(value)}</b><span>{esc(label)}</span></div>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], wrap_last: bool = False) -> str:
    """A table in its own horizontally scrolling box (a phone scrolls the table, not the page)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    last = len(headers) - 1 if wrap_last else -1
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='wrap'>{cell}</td>" if i == last else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _figure(title: str, svg: str, caption: str = "") -> str:
    return f"<figure><figcaption>{esc(title)}{caption}</figcaption>{svg}</figure>"


def _banner(report: dict[str, Any]) -> str:
    """Red when a gate failed, amber with warnings, green for a clean pass; everything the user
    must not miss is listed here, above the fold."""
    gates = report.get("gates") or []
    failed = [g for g in gates if not g["passed"]]
    warnings = report.get("warnings") or []
    if failed:
        state, word = "fail", "FAIL"
    elif warnings:
        state, word = "warn", "WARNINGS"
    else:
        state, word = "pass", "PASS" if gates else "OK"
    facts = []
    if gates:
        facts.append(f"{len(gates) - len(failed)} of {len(gates)} gates passed")
    facts.append(f"{len(warnings)} warning{'s' * (len(warnings) != 1)}")
    if report.get("command") == "compress" and not report.get("output"):
        facts.append("no model written")
    items = [f"<li><b>gate failed:</b> {esc(g['message'])}</li>" for g in failed]
    listing = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    lists = ""
    if items:
        lists += f"<ul>{''.join(items)}</ul>"
    if listing:
        lists += f"<ul class='warnings'>{listing}</ul>"
    return (
        f"<div class='banner {state}' role='status' id='verdict'><strong>{word}</strong>"
        f"{esc(' · '.join(facts))}{lists}</div>"
    )


def _ratio(text: str) -> float | None:
    try:
        return float(text.rstrip("×"))
    except ValueError:
        return None


def _size_section(comparison: dict[str, Any]) -> list[str]:
    rows = size_rows(comparison)
    names = comparison.get("names") or ["original", "result"]
    cards = [_card(f"{metric} ratio", ratio) for metric, _, _, ratio in rows[:3]]
    cards += [
        _card(metric.replace(" (median ms)", "") + " ratio", ratio)
        for metric, _, _, ratio in rows[3:4]
    ]
    worst = comparison.get("metrics", {}).get("worst_channel_sqnr_db")
    if worst is not None:
        cards.append(_card("worst output channel SQNR", f"{worst:.1f} dB"))
    chart = charts.bar_chart(
        [
            Row(
                metric.replace(" (median ms)", ""),
                [_ratio(ratio)],
                f"{metric}: {a} → {b}",
                charts.BAD if (_ratio(ratio) or 0) > 1 else None,
                note="n/a",
            )
            for metric, a, b, ratio in rows
        ],
        [Series(f"{names[1]} / {names[0]}", charts.RESULT)],
        fmt=lambda v: f"{v:g}×",
        reference=1.0,
        reference_label="1× unchanged",
        title="size and speed ratios",
    )
    parts = [
        "<div class='cards'>" + "".join(cards) + "</div>",
        "<h2>Size and speed</h2><div class='charts'>",
        _figure(
            f"Ratios, {names[1]} / {names[0]}",
            chart,
            charts.legend(
                [
                    Series(f"{names[1]} / {names[0]}: shorter is smaller or faster", charts.RESULT),
                    Series("bigger or slower", charts.BAD),
                ]
            ),
        ),
    ]
    for key, pair in (comparison.get("latency") or {}).items():
        spreads = [
            Spread(
                name,
                color,
                timing["median_ms"],
                timing["p90_ms"],
                timing.get("min_ms"),
                timing.get("mean_ms"),
                timing.get("times_ms") or (),
            )
            for name, color, timing in zip(
                names, (charts.ORIGINAL, charts.RESULT), pair, strict=True
            )
        ]
        runs = pair[0].get("runs")
        parts.append(
            _figure(
                f"Latency {key}" + (f", {runs} runs" if runs else ""),
                charts.spread_chart(spreads, title=f"latency {key}"),
                "<span class='legend'>line: fastest run to 90th percentile · bar: median · "
                "ring: mean</span>",
            )
        )
    parts.append("</div>")
    parts.append(
        _table(
            ["", *names, "ratio"],
            [(esc(m), esc(a), esc(b), esc(r)) for m, a, b, r in rows],
        )
    )
    return parts


def _gate_threshold(report: dict[str, Any], metrics: tuple[str, ...]) -> tuple[float, str] | None:
    for gate in report.get("gates") or []:
        match = _GATE.match(gate["expr"])
        if match and match.group(1) in metrics:
            return float(match.group(3)), f"gate {match.group(2)} {match.group(3)} dB"
    return None


def _fidelity_rows(comparison: dict[str, Any]) -> list[Row]:
    """Per output: its worst channels named (every channel's SQNR when the comparison kept
    them, else the worst one), the channel mean and the whole output."""
    rows = []
    outputs = comparison.get("fidelity") or []
    for item in outputs:
        name = item["name"]
        label = f"{name} " if len(outputs) > 1 else ""
        per_channel = item.get("channel_sqnr_db")
        if per_channel:
            ranked = sorted((v, i) for i, v in enumerate(per_channel) if v is not None)[
                :WORST_CHANNELS
            ]
            rows += [
                Row(
                    f"{label}ch {i}",
                    [v],
                    f"{name} channel {i}: {v:.2f} dB",
                    charts.BAD if k == 0 else None,
                )
                for k, (v, i) in enumerate(ranked)
            ]
        elif item.get("worst_channel_sqnr_db") is not None and item.get("channel_axis") is not None:
            at = item.get("worst_sqnr_channel")
            rows.append(
                Row(
                    f"{label}worst ch {at}",
                    [item["worst_channel_sqnr_db"]],
                    f"{name}: worst channel {at} of {item.get('channels')} on axis {item['channel_axis']}",
                    charts.BAD,
                )
            )
        if item.get("mean_channel_sqnr_db") is not None and item.get("channel_axis") is not None:
            rows.append(Row(f"{label}channel mean", [item["mean_channel_sqnr_db"]]))
        if item.get("sqnr_db") is not None:
            rows.append(Row(f"{label}whole output", [item["sqnr_db"]], f"{name}: whole output"))
    return [r for r in rows if all(isinstance(v, float | int) for v in r.values)]


def _fidelity_section(report: dict[str, Any], comparison: dict[str, Any]) -> list[str]:
    parts = [
        f"<h2>Fidelity <span class='note'>(inputs: {esc(comparison.get('inputs_label', '?'))};"
        f" shapes: {esc(shapes_line(comparison) or '?')})</span></h2>"
    ]
    rows = _fidelity_rows(comparison)
    if rows:
        threshold = _gate_threshold(
            report, ("worst_channel_sqnr_db", "worst_value_channel_sqnr_db")
        )
        chart = charts.bar_chart(
            rows,
            [Series("SQNR", charts.RESULT)],
            fmt=_db,
            tick_fmt=_db_tick,
            reference=threshold[0] if threshold else None,
            reference_label=threshold[1] if threshold else "",
            title="output SQNR per channel",
        )
        parts.append(
            "<div class='charts'>"
            + _figure(
                "Output SQNR (dB, higher is closer to the original)",
                chart,
                charts.legend(
                    [
                        Series("worst channel", charts.BAD),
                        Series("mean, whole output", charts.RESULT),
                    ]
                ),
            )
            + "</div>"
        )
    parts.append(
        _table(
            list(FIDELITY_COLUMNS),
            [tuple(esc(c) for c in row) for row in fidelity_rows(comparison)],
        )
    )
    return parts


def _largest(rows: list[Row]) -> tuple[list[Row], str]:
    if len(rows) <= MAX_ROWS:
        return rows, ""
    kept = sorted(rows, key=lambda r: -max(v or 0 for v in r.values))[:MAX_ROWS]
    order = {id(r): i for i, r in enumerate(rows)}
    kept.sort(key=lambda r: order[id(r)])
    return (
        kept,
        f" <span class='note'>(the {MAX_ROWS} largest of {len(rows)}; all in the JSON)</span>",
    )


def _layer_section(report: dict[str, Any]) -> list[str]:
    figures = _size_figures(report) + _pruning_figures(report) + _quantization_figures(report)
    if not figures:
        return []
    return ["<h2>Per layer</h2><div class='charts'>", *figures, "</div>"]


def _size_figures(report: dict[str, Any]) -> list[str]:
    """Parameters, MACs and measured time per layer, before and after."""
    names = (report.get("comparison") or {}).get("names") or ["original", "result"]
    series = [Series(names[0], charts.ORIGINAL), Series(names[1], charts.RESULT)]
    layers = layer_changes(report)
    figures = []
    for key, title, fmt in (
        ("params", "Parameters per layer", _count),
        ("macs", "MACs per layer", _count),
        ("time_ms", "Measured time per layer (onnxruntime profiler)", lambda v: f"{v:.3g} ms"),
    ):
        rows = [
            Row(
                layer.node,
                getattr(layer, key),
                f"{layer.node} ({layer.op_type}): "
                + " → ".join(fmt(v) if v is not None else "-" for v in getattr(layer, key))
                + (f"; {', '.join(layer.actions)}" if layer.actions else ""),
            )
            for layer in layers
            if any(v is not None for v in getattr(layer, key))
        ]
        if rows:
            rows, more = _largest(rows)
            chart = charts.bar_chart(rows, series, fmt=fmt, title=title)
            figures.append(_figure(title, chart, more + charts.legend(series)))
    return figures


def _pruning_figures(report: dict[str, Any]) -> list[str]:
    figures = []
    for name, pruned in pruned_layers(report).items():
        rows = [
            Row(
                p.node,
                [100 * p.removed],
                f"{p.node} ({p.op_type}) {p.action}: parameters "
                f"{human_count(p.params[0])} → {human_count(p.params[1])}",
            )
            for p in pruned
        ]
        rows, more = _largest(rows)
        chart = charts.bar_chart(
            rows,
            [Series("removed", charts.RESULT)],
            fmt=lambda v: f"{v:.3g}%",
            high=100.0,
            title=f"{name}: parameters removed per layer",
        )
        figures.append(_figure(f"{name}: parameters removed per layer", chart, more))
    return figures


def _quantization_figures(report: dict[str, Any]) -> list[str]:
    """Each quantized layer's weight SQNR; the lowest named, the layers kept in float counted."""
    figures = []
    for name, quantized in quantized_layers(report).items():
        rows = [
            Row(q.node, [q.sqnr_db], f"{q.node} ({q.op_type}): {q.detail}", note="float")
            for q in quantized
        ]
        if len(rows) > MAX_ROWS:  # the lowest matter
            rows = sorted(rows, key=lambda r: r.values[0] if r.values[0] is not None else -1e9)
            more = f" <span class='note'>(the {MAX_ROWS} lowest of {len(rows)})</span>"
            rows = rows[:MAX_ROWS]
        else:
            more = ""
        measured = [q for q in quantized if q.sqnr_db is not None]
        low = min(measured, key=lambda q: q.sqnr_db or 0.0)
        chart = charts.bar_chart(
            rows,
            [Series("weight SQNR", charts.RESULT)],
            fmt=_db,
            tick_fmt=_db_tick,
            title=f"{name}: weight SQNR per layer",
        )
        caption = f"{more}<span class='legend'>lowest: {esc(low.node)} {low.sqnr_db:.1f} dB"
        float_count = len(quantized) - len(measured)
        if float_count:
            caption += f" · {float_count} layer{'s' * (float_count != 1)} kept in float"
        figures.append(
            _figure(f"{name}: weight quantization SQNR per layer (dB)", chart, caption + "</span>")
        )
    return figures


def _passes_section(passes: list[dict[str, Any]]) -> list[str]:
    parts = ["<h2>Passes</h2>"]
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
            parts.append(
                _table(["node", "op", "action", "params", "MACs", "detail"], rows, wrap_last=True)
            )
        for note in item["notes"]:
            parts.append(f"<p class='note'>{esc(note)}</p>")
        parts.append("</details>")
    return parts


def to_html(report: dict[str, Any]) -> str:
    """A self-contained page: the verdict, headline ratios and pictures, then the tables."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        f"<title>onnx-squeeze report</title><style>{_CSS}</style></head><body>",
        "<h1>onnx-squeeze report</h1>",
        f"<p class='sub'>{esc(str(report.get('input') or ''))} → "
        f"{esc(str(report.get('output') or '(not written)'))} · {esc(report['created'])}</p>",
        _banner(report),
    ]
    comparison = report.get("comparison")
    if comparison:
        parts += _size_section(comparison)
        parts += _fidelity_section(report, comparison)
    parts += _layer_section(report)
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
        parts += _passes_section(passes)
    for note in report.get("notes") or []:
        parts.append(f"<p class='note'>note: {esc(note)}</p>")
    tool = report.get("tool", {})
    parts.append(
        f"<p class='note'>{esc(', '.join(f'{k} {v}' for k, v in tool.items()))}</p></body></html>"
    )
    return "\n".join(parts)
