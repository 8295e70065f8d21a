"""The report as terminal tables (rich): warnings first, then what changed and what it cost."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnx_squeeze.report.format import (
    FIDELITY_COLUMNS,
    before_after,
    fidelity_rows,
    gate_label,
    shapes_line,
    size_rows,
    summed,
)
from onnx_squeeze.units import human_bytes, human_count

# Per-node rows shown in the terminal before "... N more"; the JSON always has all of them.
_TERMINAL_NODE_ROWS = 12
_TERMINAL_SKIPS = 8


def _add(table: Table, *cells: Any) -> None:
    """A row of data: names, shapes and details shown as written, never read as markup
    (rich took a shape ``[batch, 3]`` for a tag and printed nothing)."""
    table.add_row(*(escape(str(cell)) for cell in cells))


def print_report(
    report: dict[str, Any], console: Console | None = None, *, all_nodes: bool = False
) -> None:
    """Plain tables for the terminal; the warnings come first, where they cannot be missed."""
    console = console or Console()
    for warning in report.get("warnings") or []:
        console.print(f"[bold yellow]WARNING[/]: {escape(warning)}", highlight=False)
    if report.get("input"):
        console.print(
            f"[bold]{escape(report['input'])}[/] → "
            f"[bold]{escape(report.get('output') or '(not written)')}[/]"
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
            _add(
                table,
                item["name"],
                str(len(records) - skipped),
                str(skipped),
                summed(records, "params"),
                summed(records, "macs"),
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
            f"gate {escape(gate_label(gate))}: {verdict} {escape(gate.get('message', ''))}"
        )
    if report.get("warnings"):
        console.print(f"[bold yellow]{len(report['warnings'])} warning(s)[/]: see the top")


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
            _add(
                table,
                name,
                record["node"],
                record["op_type"],
                record["action"],
                before_after(record.get("params_before"), record.get("params_after")),
                before_after(record.get("macs_before"), record.get("macs_after")),
                record["detail"],
            )
        console.print(table)
    hidden = len(changed) - len(shown)
    for name, record in skipped if all_nodes else skipped[:_TERMINAL_SKIPS]:
        console.print(
            escape(f"skipped by {name}: {record['node']} ({record['op_type']}): {record['detail']}")
        )
    hidden_skips = 0 if all_nodes else max(0, len(skipped) - _TERMINAL_SKIPS)
    if hidden or hidden_skips:
        console.print(
            f"... {hidden} more changed and {hidden_skips} more skipped nodes "
            "(all of them are in the JSON report)"
        )


def print_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    """The side-by-side table (size, params, MACs, latency) and the fidelity table."""
    console = console or Console()
    names = comparison.get("names") or ["original", "result"]
    table = Table(
        title=escape(
            f"compare (inputs: {comparison.get('inputs_label', '?')}; shapes: "
            f"{shapes_line(comparison) or '?'})"
        ),
        title_justify="left",
    )
    table.add_column("")
    table.add_column(escape(names[0]), justify="right")
    table.add_column(escape(names[1]), justify="right")
    table.add_column("ratio", justify="right")
    for row in size_rows(comparison):
        _add(table, *row)
    console.print(table)
    fidelity = Table(title="fidelity (whole output and per output channel)", title_justify="left")
    for column in FIDELITY_COLUMNS:
        fidelity.add_column(column, justify="left" if column == "output" else "right")
    for row in fidelity_rows(comparison):
        _add(fidelity, *row)
    console.print(fidelity)
    for line in comparison.get("skipped") or []:
        console.print(f"skipped: {escape(line)}")


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
        _add(table, *row)
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
        facts.add_row(
            "MACs", escape(f"{human_count(data['macs'])} (inputs {data['input_shapes']})")
        )
    facts.add_row("weights in memory", human_bytes(data["initializer_bytes"]))
    facts.add_row("file size", human_bytes(data["size_bytes"]))
    facts.add_row("weight sparsity", f"{data['sparsity']:.2%}")
    console.print(facts)
    io = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "type", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for item in data[kind]:
            _add(
                io,
                kind[:-1],
                item["name"],
                item["dtype"],
                "[" + ", ".join(map(str, item["shape"])) + "]",
            )
    console.print(io)
    histogram = Table(title="ops", title_justify="left")
    histogram.add_column("op")
    histogram.add_column("count", justify="right")
    for op, count in sorted(data["op_histogram"].items(), key=lambda kv: (-kv[1], kv[0])):
        _add(histogram, op, str(count))
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
        _add(
            table,
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
            console.print(escape(f"skipped: {row['model']} on {row['provider']}: {row['skipped']}"))
            continue
        _add(
            table,
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


def print_passes(passes: Sequence[Any], console: Console | None = None) -> None:
    """What ``passes`` prints: per pass (:class:`onnx_squeeze.pass_docs.PassDoc`), its
    settings with type, default, the values taken and what the setting does."""
    console = console or Console()
    for item in passes:
        table = Table(title=escape(f"{item.name}: {item.summary}"), title_justify="left")
        for column in ("setting", "type", "default", "values", "what it does"):
            table.add_column(column)
        for setting in item.settings:
            _add(
                table,
                setting.name,
                setting.type,
                _setting_value(setting.default),
                setting.values,
                setting.doc,
            )
        console.print(table)
    console.print(
        escape("set them with --pass NAME:key=value,key=[a,b] or in a recipe file (YAML/JSON)"),
        highlight=False,
    )


def _setting_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return '""' if value == "" else str(value)
