"""Run reports: one JSON-able dict (versioned schema) rendered as terminal tables or an HTML page.

The dict is the single source: the terminal, the JSON file and the HTML page all show it.
Its schema is ``onnx_squeeze/report_schema.json``; bump ``SCHEMA_VERSION`` on breaking changes.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import onnx_squeeze
from onnx_squeeze.records import PassReport

SCHEMA = "onnx-squeeze/report"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")

# Per-node rows shown in the terminal before "... N more"; the JSON always has all of them.
_TERMINAL_NODE_ROWS = 12
_TERMINAL_SKIPS = 8


def build_report(
    *,
    command: str,
    input_path: str | None,
    output_path: str | None,
    reports: Sequence[PassReport] = (),
    notes: Sequence[str] = (),
    comparison: dict[str, Any] | None = None,
    gates: Sequence[dict[str, Any]] = (),
    warnings: Sequence[str] = (),
    calibration: str | None = None,
    evaluation: str | None = None,
    recipe: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Assemble the report dict of a run. ``passed``: every gate passed (the default gate, applied
    when no ``--check`` was given, counts here; it fails the exit code only under --strict)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool": {
            "onnx_squeeze": onnx_squeeze.__version__,
            "onnx": onnx.__version__,
            "onnx_ir": ir.__version__,
            "onnxruntime": ort.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "input": input_path,
        "output": output_path,
        "warnings": list(warnings),
        "calibration": calibration,
        "evaluation": evaluation,
        "recipe": recipe,
        "passes": [r.to_dict() for r in reports],
        "notes": list(notes),
        "comparison": comparison,
        "gates": list(gates),
        "passed": all(g["passed"] for g in gates),
        "seconds": seconds,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become None (strict parsers reject them)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_finite_or_none(report), indent=2, default=_jsonable)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    target = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as JSON, or as HTML when the path ends in .html/.htm."""
    text = to_html(report) if str(path).lower().endswith((".html", ".htm")) else to_json(report)
    write_text_atomic(path, text)


# ---------------------------------------------------------------- formatting helpers


def human_count(value: float | None) -> str:
    """12_345_678 -> '12.35M'."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:g}"


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _ratio(after: float | None, before: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}×"


def _number(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def _size_rows(comparison: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, original, result, ratio) rows for size, parameters, MACs and latency."""
    models = comparison.get("models") or [{}, {}]
    a, b = models[0], models[1]
    rows = [
        (
            "file size",
            human_bytes(a.get("size_bytes")),
            human_bytes(b.get("size_bytes")),
            _ratio(b.get("size_bytes"), a.get("size_bytes")),
        ),
        (
            "parameters",
            human_count(a.get("params")),
            human_count(b.get("params")),
            _ratio(b.get("params"), a.get("params")),
        ),
        (
            "MACs",
            human_count(a.get("macs")),
            human_count(b.get("macs")),
            _ratio(b.get("macs"), a.get("macs")),
        ),
    ]
    for key, (la, lb) in (comparison.get("latency") or {}).items():
        rows.append(
            (
                f"latency {key} (median ms)",
                f"{la['median_ms']:.3f}",
                f"{lb['median_ms']:.3f}",
                _ratio(lb["median_ms"], la["median_ms"]),
            )
        )
    return rows


_FIDELITY_COLUMNS = (
    "output",
    "cosine",
    "SQNR dB",
    "worst ch SQNR dB",
    "worst ch",
    "worst ch cosine",
    "score cosine",
    "argmax agree",
    "non-finite a/b",
)


def _fidelity_rows(comparison: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per output: whole-output figures beside the worst channel's (named as
    ``index/channels@axis``), the score channels' cosine and the argmax agreement."""
    rows = []
    for item in comparison.get("fidelity") or []:
        axis, worst_at = item.get("channel_axis"), item.get("worst_sqnr_channel")
        where = f"{worst_at}/{item.get('channels')}@{axis}" if axis is not None else "whole"
        argmax = item.get("argmax_agreement")
        scores = f" ({item['score_channels']} ch)" if item.get("score_channels") else ""
        rows.append(
            (
                item["name"],
                _number(item["cosine"], 6),
                _number(item.get("sqnr_db"), 3),
                _number(item.get("worst_channel_sqnr_db"), 3),
                where,
                _number(item.get("worst_channel_cosine"), 4),
                _number(item.get("score_cosine"), 4) + scores,
                "-" if argmax is None else f"{argmax:.4f}",
                f"{item.get('nonfinite_a', 0)}/{item.get('nonfinite_b', 0)}",
            )
        )
    return rows


def _shapes_line(comparison: dict[str, Any]) -> str:
    shapes = comparison.get("input_shapes") or {}
    return ", ".join(f"{name} {'×'.join(map(str, dims))}" for name, dims in shapes.items())


def _gate_label(gate: dict[str, Any]) -> str:
    return f"{gate['expr']} (default gate)" if gate.get("default") else gate["expr"]


# ---------------------------------------------------------------- terminal


def print_report(
    report: dict[str, Any], console: Console | None = None, *, all_nodes: bool = False
) -> None:
    """Plain tables for the terminal; the warnings come first, where they cannot be missed."""
    console = console or Console()
    for warning in report.get("warnings") or []:
        console.print(f"[bold yellow]WARNING[/]: {escape(warning)}", highlight=False)
    if report.get("input"):
        console.print(
            f"[bold]{report['input']}[/] → [bold]{report.get('output') or '(not written)'}[/]"
        )
    if report.get("calibration"):
        console.print(f"calibration: {escape(report['calibration'])}")
    if report.get("evaluation"):
        console.print(f"judged on: {escape(report['evaluation'])}")
    passes = report.get("passes") or []
    if passes:
        table = Table(title="passes", title_justify="left")
        for column in ("pass", "changed", "skipped", "params", "MACs", "seconds"):
            table.add_column(column, justify="left" if column == "pass" else "right")
        for item in passes:
            records = item["records"]
            skipped = sum(r["action"] == "skipped" for r in records)
            table.add_row(
                item["name"],
                str(len(records) - skipped),
                str(skipped),
                _summed(records, "params"),
                _summed(records, "macs"),
                f"{item['seconds']:.2f}",
            )
        console.print(table)
        _print_records(console, passes, all_nodes)
    notes = list(report.get("notes") or []) + [n for p in passes for n in p["notes"]]
    for note in notes:
        console.print(f"note: {escape(note)}")
    comparison = report.get("comparison")
    if comparison:
        print_comparison(comparison, console)
    for gate in report.get("gates") or []:
        verdict = "[green]PASS[/]" if gate["passed"] else "[red]FAIL[/]"
        console.print(
            f"gate {escape(_gate_label(gate))}: {verdict} {escape(gate.get('message', ''))}"
        )
    if report.get("warnings"):
        console.print(f"[bold yellow]{len(report['warnings'])} warning(s)[/]: see the top")


def _summed(records: list[dict[str, Any]], key: str) -> str:
    """Total before → after over the records that changed ``key`` (parameters or MACs)."""
    pairs = [
        (r[f"{key}_before"], r[f"{key}_after"])
        for r in records
        if r.get(f"{key}_before") is not None and r.get(f"{key}_after") is not None
    ]
    if not pairs:
        return ""
    return _before_after(sum(b for b, _ in pairs), sum(a for _, a in pairs))


def _change(record: dict[str, Any]) -> float:
    """How much a record changed its node, for ranking: MACs first, then parameters."""
    macs = abs((record.get("macs_before") or 0) - (record.get("macs_after") or 0))
    params = abs((record.get("params_before") or 0) - (record.get("params_after") or 0))
    return macs * 1e3 + params


def _print_records(console: Console, passes: list[dict[str, Any]], all_nodes: bool) -> None:
    """The nodes that changed most (or all with ``all_nodes``), then what was skipped and why."""
    changed = [(p["name"], r) for p in passes for r in p["records"] if r["action"] != "skipped"]
    skipped = [(p["name"], r) for p in passes for r in p["records"] if r["action"] == "skipped"]
    if not all_nodes:
        changed = sorted(changed, key=lambda item: _change(item[1]), reverse=True)
    shown = changed if all_nodes else changed[:_TERMINAL_NODE_ROWS]
    if shown:
        title = "per node" if all_nodes else "largest changes per node"
        table = Table(title=title, title_justify="left")
        for column in ("pass", "node", "op", "action", "params", "MACs", "detail"):
            table.add_column(column)
        for name, record in shown:
            table.add_row(
                name,
                record["node"],
                record["op_type"],
                record["action"],
                _before_after(record.get("params_before"), record.get("params_after")),
                _before_after(record.get("macs_before"), record.get("macs_after")),
                record["detail"],
            )
        console.print(table)
    hidden = len(changed) - len(shown)
    for name, record in skipped if all_nodes else skipped[:_TERMINAL_SKIPS]:
        console.print(
            f"skipped by {name}: {record['node']} ({record['op_type']}): {record['detail']}"
        )
    hidden_skips = 0 if all_nodes else max(0, len(skipped) - _TERMINAL_SKIPS)
    if hidden or hidden_skips:
        console.print(
            f"... {hidden} more changed and {hidden_skips} more skipped nodes "
            "(all of them are in the JSON report)"
        )


def _before_after(before: int | None, after: int | None) -> str:
    if before is None and after is None:
        return ""
    return f"{human_count(before)} → {human_count(after)}"


def print_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    """The side-by-side table (size, params, MACs, latency) and the fidelity table."""
    console = console or Console()
    names = comparison.get("names") or ["original", "result"]
    table = Table(
        title=f"compare (inputs: {comparison.get('inputs_label', '?')}; shapes: "
        f"{_shapes_line(comparison) or '?'})",
        title_justify="left",
    )
    table.add_column("")
    table.add_column(names[0], justify="right")
    table.add_column(names[1], justify="right")
    table.add_column("ratio", justify="right")
    for row in _size_rows(comparison):
        table.add_row(*row)
    console.print(table)
    fidelity = Table(title="fidelity (whole output and per output channel)", title_justify="left")
    for column in _FIDELITY_COLUMNS:
        fidelity.add_column(column, justify="left" if column == "output" else "right")
    for row in _fidelity_rows(comparison):
        fidelity.add_row(*row)
    console.print(fidelity)
    for line in comparison.get("skipped") or []:
        console.print(f"skipped: {escape(line)}")


# ---------------------------------------------------------------- HTML

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
        rows = _size_rows(comparison)
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
            f" shapes: {esc(_shapes_line(comparison) or '?')})</span></h2>"
        )
        parts.append(
            _table(
                list(_FIDELITY_COLUMNS),
                [tuple(esc(c) for c in row) for row in _fidelity_rows(comparison)],
            )
        )
    gates = report.get("gates") or []
    if gates:
        parts.append("<h2>Accuracy gates</h2>")
        verdict = {True: "<span class='pass'>PASS</span>", False: "<span class='fail'>FAIL</span>"}
        gate_rows = [
            (esc(_gate_label(g)), esc(_number(g.get("value"))), verdict[g["passed"]]) for g in gates
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
                    esc(_summed(item["records"], "params")),
                    esc(_summed(item["records"], "macs")),
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
                esc(_before_after(r.get("params_before"), r.get("params_after"))),
                esc(_before_after(r.get("macs_before"), r.get("macs_after"))),
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


def print_groups(rows: Sequence[Sequence[str]], console: Console | None = None) -> None:
    """What ``inspect --groups`` prints: one row per channel dependency group."""
    console = console or Console()
    prunable = sum(1 for row in rows if row[-1] == "prunable")
    table = Table(
        title=f"channel groups: {prunable} prunable, {len(rows) - prunable} frozen",
        title_justify="left",
    )
    for column in ("id", "first producer", "channels", "producers/params/consumers", "status"):
        table.add_column(column, justify="right" if column in ("id", "channels") else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_summary(
    summary: Any, console: Console | None = None, *, all_nodes: bool = False, top: int = 15
) -> None:
    """What ``inspect`` prints: model facts, inputs/outputs, op histogram, heaviest nodes."""
    console = console or Console()
    data = summary.to_dict()
    opsets = ", ".join(
        f"{domain or 'ai.onnx'} {version}" for domain, version in data["opsets"].items()
    )
    console.print(
        f"ir_version {data['ir_version']} · opsets: {opsets} · producer: {data['producer'] or '-'}"
    )
    facts = Table(show_header=False, box=None)
    facts.add_row("parameters", human_count(data["params"]))
    if data["macs"] is None:
        facts.add_row("MACs", "[bold red]unknown[/]: input dimensions not given (see the note)")
    else:
        facts.add_row("MACs", f"{human_count(data['macs'])} (inputs {data['input_shapes']})")
    facts.add_row("weights in memory", human_bytes(data["initializer_bytes"]))
    facts.add_row("file size", human_bytes(data["size_bytes"]))
    facts.add_row("weight sparsity", f"{data['sparsity']:.2%}")
    console.print(facts)
    io = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "type", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for item in data[kind]:
            io.add_row(
                kind[:-1],
                item["name"],
                item["dtype"],
                escape("[" + ", ".join(map(str, item["shape"])) + "]"),
            )
    console.print(io)
    histogram = Table(title="ops", title_justify="left")
    histogram.add_column("op")
    histogram.add_column("count", justify="right")
    for op, count in sorted(data["op_histogram"].items(), key=lambda kv: (-kv[1], kv[0])):
        histogram.add_row(op, str(count))
    console.print(histogram)
    nodes = [n for n in data["nodes"] if n["macs"] or n["params"]]
    nodes.sort(key=lambda n: -n["macs"])
    shown = nodes if all_nodes else nodes[:top]
    table = Table(
        title="nodes by MACs"
        + ("" if all_nodes else f" (top {len(shown)} of {len(nodes)}; --all-nodes for every one)"),
        title_justify="left",
    )
    for column in ("node", "op", "params", "MACs", "% MACs", "weight shape", "sparsity"):
        table.add_column(
            column, justify="left" if column in ("node", "op", "weight shape") else "right"
        )
    for node in shown:
        share = f"{node['macs'] / data['macs']:.1%}" if data["macs"] else "-"
        sparsity = "-" if node["sparsity"] is None else f"{node['sparsity']:.1%}"
        shape = "" if node["weight_shape"] is None else "×".join(map(str, node["weight_shape"]))
        table.add_row(
            node["name"],
            node["op_type"],
            human_count(node["params"]),
            human_count(node["macs"]),
            share,
            shape,
            sparsity,
        )
    console.print(table)
    if data["macs"] is None:
        console.print(f"note: MACs of {len(data['unknown_macs'])} nodes depend on those dimensions")
    else:
        for name in data["unknown_macs"]:
            console.print(f"note: MACs of {name} unknown (shape inference could not reach it)")
    for note in data["notes"]:
        console.print(f"note: {escape(note)}")


def print_bench(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    """What ``bench`` prints: one row per model, provider and thread count; skipped ones say why."""
    console = console or Console()
    table = Table(title="latency", title_justify="left")
    for column in ("model", "provider", "threads", "median ms", "p90 ms", "params", "MACs", "size"):
        table.add_column(column, justify="left" if column in ("model", "provider") else "right")
    for row in rows:
        if row.get("skipped"):
            console.print(f"skipped: {row['model']} on {row['provider']}: {row['skipped']}")
            continue
        table.add_row(
            str(row["model"]),
            str(row["provider"]),
            str(row["threads"]),
            f"{row['median_ms']:.3f}",
            f"{row['p90_ms']:.3f}",
            human_count(row.get("params")),
            human_count(row.get("macs")),
            human_bytes(row.get("size_bytes")),
        )
    console.print(table)
