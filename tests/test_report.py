"""Terminal report: the passes summary totals and the per-node view ranks the largest changes."""

from __future__ import annotations

from rich.console import Console

from onnx_squeeze import report


def _record(node: str, macs_before: int, macs_after: int, action: str = "pruned") -> dict:
    return {
        "node": node,
        "op_type": "Conv",
        "action": action,
        "detail": "why" if action == "skipped" else "channels removed",
        "params_before": 10 if action != "skipped" else None,
        "params_after": 5 if action != "skipped" else None,
        "macs_before": macs_before if action != "skipped" else None,
        "macs_after": macs_after if action != "skipped" else None,
    }


def _printed(run_report: dict, **kwargs) -> str:
    console = Console(record=True, width=200)
    report.print_report(run_report, console, **kwargs)
    return console.export_text()


def test_summary_totals_and_largest_changes_first():
    records = [_record(f"conv{i}", 1000 * (i + 1), 500 * (i + 1)) for i in range(20)]
    records.append(_record("fc", 0, 0, action="skipped"))
    text = _printed(
        {"passes": [{"name": "prune_channels", "seconds": 1.0, "records": records, "notes": []}]}
    )
    assert "210.00k → 105.00k" in text.replace(",", "")  # MACs summed over the 20 records
    assert text.index("conv19") < text.index("conv18")  # largest change first
    assert "conv0 " not in text  # beyond the terminal rows, left to the JSON report
    assert "skipped by prune_channels: fc (Conv): why" in text
    assert "8 more changed and 0 more skipped" in text


def test_all_nodes_lists_every_record_in_order():
    records = [_record(f"conv{i}", 1000 * (i + 1), 500 * (i + 1)) for i in range(20)]
    text = _printed(
        {"passes": [{"name": "p", "seconds": 0.1, "records": records, "notes": []}]}, all_nodes=True
    )
    assert text.index("conv0 ") < text.index("conv19") and "more changed" not in text


def test_html_page_summarises_passes_and_folds_node_records():
    records = [_record(f"conv{i}", 1000, 500) for i in range(3)] + [_record("fc", 0, 0, "skipped")]
    page = report.to_html(
        {
            "created": "now",
            "passes": [{"name": "prune_channels", "seconds": 1.0, "records": records, "notes": []}],
        }
    )
    summary_row = (
        "<td>prune_channels</td><td>3</td><td>1</td><td>30 → 15</td><td>3.00k → 1.50k</td>"
    )
    assert summary_row in page.replace("\n", "")
    assert page.count("<details>") == page.count("</details>") == 1
