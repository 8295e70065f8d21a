"""The HTML report's pictures and banner, drawn from report dicts built here: each chart shows
what the dict holds (values, scale, worst channels named), the banner's colour follows the run's
state, the page loads nothing, and the files respect the umask."""

from __future__ import annotations

import html
import os
import re

import pytest

from onnx_squeeze import report
from onnx_squeeze.report import charts
from onnx_squeeze.report.layers import layer_changes, pruned_layers, quantized_layers


def _record(node, action, detail="", **counts):
    base = dict.fromkeys(("params_before", "params_after", "macs_before", "macs_after"))
    return {"node": node, "op_type": "Conv", "action": action, "detail": detail, **base, **counts}


def _pass(name, *records):
    return {"name": name, "settings": {}, "records": list(records), "notes": [], "seconds": 0.5}


PASSES = [
    _pass("prepare", _record("conv1", "folded", params_before=120, params_after=100)),
    _pass(
        "prune_channels",
        _record(
            "conv1", "pruned", params_before=100, params_after=25, macs_before=8000, macs_after=2000
        ),
        _record("fc", "skipped", "reaches graph output"),
    ),
    _pass(
        "quantize_int8",
        _record("conv1", "quantized", "weight int8 axis 0 (SQNR 38.5 dB), bias INT32"),
        _record("conv2", "quantized", "weight int8", sqnr_db=-3.5),
        _record("fc", "skipped", "kept in float by accuracy control for x>=1"),
    ),
]


def _latency(a_ms, b_ms, **extra):
    return [
        {"median_ms": a_ms, "p90_ms": a_ms * 1.2, "min_ms": a_ms * 0.9, "runs": 5, **extra},
        {"median_ms": b_ms, "p90_ms": b_ms * 1.2, "min_ms": b_ms * 0.9, "runs": 5},
    ]


def _comparison(**fidelity):
    return {
        "inputs_label": "random (8 samples, seed 1)",
        "names": ["original", "compressed"],
        "models": [
            {"size_bytes": 4000, "params": 1000, "macs": 10_000},
            {"size_bytes": 1000, "params": 500, "macs": 12_000},
        ],
        "latency": {"cpu/t1": _latency(2.0, 1.0, times_ms=[1.7, 2.0, 2.1, 2.3, 2.6])},
        "fidelity": [
            {
                "name": "logits",
                "cosine": 0.99,
                "sqnr_db": 25.0,
                "channel_axis": 1,
                "channels": 4,
                "worst_channel_sqnr_db": 4.5,
                "worst_sqnr_channel": 3,
                "mean_channel_sqnr_db": 18.0,
                **fidelity,
            }
        ],
        "metrics": {"worst_channel_sqnr_db": 4.5},
    }


def _report(**fields):
    base = {"created": "now", "command": "compress", "input": "a.onnx", "output": "b.onnx"}
    return {**base, "passes": PASSES, "warnings": [], "gates": [], **fields}


def _svg(page: str, label: str) -> str:
    match = re.search(rf"<svg class='chart'[^>]*aria-label='{re.escape(label)}'.*?</svg>", page)
    assert match, f"no chart {label!r}"
    return match.group(0)


def _bars(svg: str) -> list[tuple[float, float, str]]:
    """(x, width, colour) of every bar."""
    found = re.findall(
        r"<rect x='([\d.]+)' y='[\d.]+' width='([\d.]+)' height='[\d.]+' fill='(#\w+)'", svg
    )
    return [(float(x), float(w), color) for x, w, color in found]


def test_nice_ticks_cover_the_range_with_round_steps():
    assert charts.nice_ticks(0, 1.221) == [0, 0.5, 1.0, 1.5]
    assert charts.nice_ticks(-12.2, 10) == [-20, -10, 0, 10]
    assert charts.nice_ticks(0, 147_456) == [0, 50_000, 100_000, 150_000]
    assert charts.nice_ticks(3, 3) == [3]


def test_bars_are_drawn_to_scale_with_a_reference_line_and_notes_for_missing_values():
    rows = [charts.Row("a", [2.0]), charts.Row("b", [-1.0]), charts.Row("c", [None], note="n/a")]
    svg = charts.bar_chart(
        rows,
        [charts.Series("s", "#123456")],
        fmt=str,
        reference=1.0,
        reference_label="ref",
        title="t",
    )
    (xa, wa, _), (xb, wb, _) = _bars(svg)
    assert xb + wb == pytest.approx(xa)  # both start at the zero line, on either side of it
    assert wa == pytest.approx(2 * wb, abs=0.2)  # lengths in proportion to the values
    assert "class='reference'" in svg and ">ref<" in svg and ">n/a<" in svg
    ticks = re.findall(r"class='tick'>([^<]+)<", svg)
    assert ticks == ["-1.0", "0.0", "1.0", "2.0"]


def test_long_labels_keep_their_end():
    svg = charts.bar_chart(
        [charts.Row("backbone.stage4.block3.conv2", [1.0])],
        [charts.Series("s", "#000000")],
        fmt=str,
        title="t",
    )
    assert "…ge4.block3.conv2" in svg and "<title>backbone.stage4.block3.conv2</title>" in svg


@pytest.mark.parametrize(
    ("gates", "warnings", "state", "word"),
    [
        (
            [{"expr": "x>=1", "passed": False, "message": "x = 0, which is not >= 1"}],
            ["w"],
            "fail",
            "FAIL",
        ),
        ([{"expr": "x>=1", "passed": True, "message": "ok"}], ["slower"], "warn", "WARNINGS"),
        ([{"expr": "x>=1", "passed": True, "message": "ok"}], [], "pass", "PASS"),
    ],
)
def test_the_banner_shows_the_state_first_and_unfolded(gates, warnings, state, word):
    page = report.to_html(_report(gates=gates, warnings=warnings, comparison=_comparison()))
    banner = re.search(r"<div class='banner (\w+)'[^>]*><strong>(\w+)</strong>(.*?)</div>", page)
    assert banner and banner.group(1, 2) == (state, word)
    assert page.index("id='verdict'") < page.index("<h2>") < page.index("<details>")
    for failed in (g for g in gates if not g["passed"]):
        assert html.escape(failed["message"]) in banner.group(3)
    for warning in warnings:
        assert f"<li>{warning}</li>" in banner.group(3)


def test_a_gate_that_failed_before_writing_says_no_model_was_written():
    gates = [{"expr": "x>=1", "passed": False, "message": "m"}]
    page = report.to_html(_report(output=None, gates=gates))
    assert "no model written" in page


def test_per_layer_figures_come_from_the_first_before_and_last_after():
    (conv1,) = layer_changes({"passes": PASSES})
    assert (conv1.node, conv1.params, conv1.macs) == ("conv1", [120, 25], [8000, 2000])
    assert conv1.actions == [
        "prepare: folded",
        "prune_channels: pruned",
        "quantize_int8: quantized",
    ]
    (pruned,) = pruned_layers({"passes": PASSES})["prune_channels"]
    assert pruned.removed == pytest.approx(0.75)  # prepare's folding is not pruning
    sqnr = {q.node: q.sqnr_db for q in quantized_layers({"passes": PASSES})["quantize_int8"]}
    assert sqnr == {"conv1": 38.5, "conv2": -3.5, "fc": None}


def test_the_page_draws_layers_pruning_quantization_fidelity_latency_and_ratios():
    page = report.to_html(_report(comparison=_comparison()))
    params = _bars(_svg(page, "Parameters per layer"))
    (_, before, _), (_, after, _) = params  # conv1: 120 parameters, then 25
    assert before == pytest.approx(120 / 25 * after, rel=0.02)
    removed = _svg(page, "prune_channels: parameters removed per layer")
    assert ">75%<" in removed and ">100%<" in removed  # the scale runs to 100 %
    quantized = _svg(page, "quantize_int8: weight SQNR per layer")
    assert ">38.5 dB<" in quantized and ">-3.5 dB<" in quantized and ">float<" in quantized
    fidelity = _svg(page, "output SQNR per channel")
    assert ">worst ch 3<" in fidelity and _bars(fidelity)[0][2] == charts.BAD
    ratios = _svg(page, "size and speed ratios")
    assert ">1× unchanged<" in ratios
    colors = [color for _, _, color in _bars(ratios)]
    assert colors == [charts.RESULT, charts.RESULT, charts.BAD, charts.RESULT]  # MACs grew
    latency = _svg(page, "latency cpu/t1")
    assert latency.count("<circle") == 5  # one dot per timed run where the runs are known
    assert ">2.00 ms<" in latency and ">1.00 ms<" in latency


def test_every_channel_known_names_the_worst_ones_in_order():
    comparison = _comparison(channel_sqnr_db=[30.0, 12.0, None, 4.5])
    svg = _svg(report.to_html(_report(comparison=comparison)), "output SQNR per channel")
    labels = re.findall(r"class='label'>([^<]+)<", svg)
    assert labels[:3] == ["ch 3", "ch 1", "ch 0"]
    assert ">gate &gt;= 10 dB<" not in svg  # no gate given, no line


def test_measured_layers_replace_the_records_and_add_time():
    comparison = _comparison()
    comparison["layers"] = [
        {
            "node": "stem",
            "op_type": "Conv",
            "params": [10, 10],
            "macs": [100, 100],
            "time_ms": [0.5, 0.2],
        }
    ]
    page = report.to_html(_report(comparison=comparison))
    svg = _svg(page, "Measured time per layer (onnxruntime profiler)")
    assert ">0.2 ms<" in svg and "stem" in svg
    assert ">conv1<" not in _svg(page, "Parameters per layer")


def test_the_page_is_self_contained_and_fits_a_phone():
    page = report.to_html(_report(comparison=_comparison()))
    assert "name='viewport'" in page and "Content-Security-Policy" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    assert page.count("<table>") == page.count("<div class='scroll'><table>")
    assert "svg.chart{width:100%;height:auto" in page


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_reports_are_written_with_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        for name in ("r.json", "r.html"):
            report.write(_report(), tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == mode
    finally:
        os.umask(previous)
