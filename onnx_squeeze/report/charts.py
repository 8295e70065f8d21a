"""Inline SVG charts for the HTML report: horizontal bars with a scale, and latency ranges.

No script and no network: each chart is one ``<svg>`` with a ``viewBox``, so it scales with the
page (a phone shows it at its width) and prints. Every chart has an axis with ticks and units,
and may carry a reference line (1× = unchanged, a dB threshold) so a bar is read against it.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable, Sequence

WIDTH = 400  # viewBox width; the page scales it (CSS width 100%)
_LABEL = 128  # label column
_VALUE = 52  # value column at the right
_ROW_GAP = 6
_BAR = 11
_AXIS = 28  # room for the tick labels under the bars
_LABEL_CHARS = 17

ORIGINAL = "#9aa5bd"
RESULT = "#2f6bd6"
BAD = "#c0392b"


@dataclasses.dataclass(frozen=True)
class Series:
    """One bar per row in this colour; ``name`` goes into the legend."""

    name: str
    color: str


@dataclasses.dataclass(frozen=True)
class Row:
    """A chart row: its label, one value per series (None: nothing to draw), a tooltip, an
    optional colour for every bar of the row (a worst channel drawn in red) and a note shown in
    the value column when the row has no value ("float" for a layer left unquantized)."""

    label: str
    values: Sequence[float | None]
    tooltip: str = ""
    color: str | None = None
    note: str = ""


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    span = high - low
    if span <= 0 or not math.isfinite(span):
        return [low]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _clip(label: str) -> str:
    """Long names keep their end: in an exported model's hierarchical names (model.22.cv2.0.conv)
    the end tells layers apart, the start is shared. The tooltip has the whole name."""
    return label if len(label) <= _LABEL_CHARS else "…" + label[-(_LABEL_CHARS - 1) :]


def legend(series: Sequence[Series], extra: str = "") -> str:
    """The legend as HTML (stays readable when the chart is scaled down)."""
    keys = "".join(
        f"<span class='key'><i style='background:{s.color}'></i>{html.escape(s.name)}</span>"
        for s in series
    )
    return f"<span class='legend'>{keys}{html.escape(extra)}</span>"


def bar_chart(
    rows: Sequence[Row],
    series: Sequence[Series],
    *,
    fmt: Callable[[float], str],
    tick_fmt: Callable[[float], str] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    low: float | None = None,
    high: float | None = None,
    title: str,
) -> str:
    """Horizontal grouped bars, one group per row, on a shared axis; values are written with
    ``fmt``, ticks with ``tick_fmt`` (default ``fmt``). The axis starts at 0 unless a value (or
    ``low``) is below it."""
    tick_fmt = tick_fmt or fmt
    values = [v for row in rows for v in row.values if v is not None and math.isfinite(v)]
    marks = [*values, *(x for x in (reference, low, high) if x is not None)]
    lo = min([0.0, *marks])
    hi = max(marks, default=lo)
    ticks = nice_ticks(lo, hi if hi > lo else lo + 1.0)
    lo, hi = ticks[0], ticks[-1]
    left, right = _LABEL, WIDTH - _VALUE
    span = (hi - lo) or 1.0

    def x(value: float) -> float:
        return left + (min(max(value, lo), hi) - lo) / span * (right - left)

    group = len(series) * _BAR + _ROW_GAP
    height = 8 + len(rows) * group + _AXIS + (10 if reference is not None else 0)
    parts = [
        f"<svg class='chart' viewBox='0 0 {WIDTH} {height}' role='img' "
        f"aria-label='{html.escape(title, quote=True)}' xmlns='http://www.w3.org/2000/svg'>",
        f"<title>{html.escape(title)}</title>",
    ]
    axis_y = 8 + len(rows) * group
    for tick in ticks:
        tx = x(tick)
        parts.append(
            f"<line x1='{tx:.1f}' y1='4' x2='{tx:.1f}' y2='{axis_y}' class='grid'/>"
            f"<text x='{tx:.1f}' y='{axis_y + 13}' class='tick'>{html.escape(tick_fmt(tick))}</text>"
        )
    zero = x(0.0)
    for index, row in enumerate(rows):
        top = 8 + index * group
        label = html.escape(_clip(row.label))
        tip = html.escape(row.tooltip or row.label)
        parts.append(
            f"<g><title>{tip}</title><text x='{left - 6}' y='{top + group / 2 + 1:.1f}' "
            f"class='label'>{label}</text>"
        )
        if row.note and all(v is None for v in row.values):
            parts.append(
                f"<text x='{right + 4}' y='{top + group / 2 + 1:.1f}' class='value'>"
                f"{html.escape(row.note)}</text>"
            )
        for slot, (value, kind) in enumerate(zip(row.values, series, strict=True)):
            if value is None or not math.isfinite(value):
                continue
            y = top + slot * _BAR
            start, end = sorted((zero, x(value)))
            color = row.color or kind.color
            parts.append(
                f"<rect x='{start:.1f}' y='{y + 1}' width='{max(end - start, 0.8):.1f}' "
                f"height='{_BAR - 2}' fill='{color}'/>"
            )
            if slot == len(series) - 1 or len(series) == 1:
                parts.append(
                    f"<text x='{right + 4}' y='{y + _BAR - 1.5:.1f}' class='value'>"
                    f"{html.escape(fmt(value))}</text>"
                )
        parts.append("</g>")
    parts.append(f"<line x1='{left}' y1='{axis_y}' x2='{right}' y2='{axis_y}' class='axis'/>")
    if reference is not None and lo <= reference <= hi:
        rx = x(reference)
        # the label reads away from the nearer edge of the plot, so it is never cut off
        anchor, tx = ("end", rx - 3) if rx > (left + right) / 2 else ("start", rx + 3)
        parts.append(
            f"<line x1='{rx:.1f}' y1='2' x2='{rx:.1f}' y2='{axis_y}' class='reference'/>"
            f"<text x='{tx:.1f}' y='{axis_y + 24}' class='reftext' text-anchor='{anchor}'>"
            f"{html.escape(reference_label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class Spread:
    """A latency distribution in milliseconds: what the comparison recorded (min, median,
    p90, mean) and, where present, every timed run."""

    name: str
    color: str
    median: float
    p90: float
    low: float | None = None
    mean: float | None = None
    samples: Sequence[float] = ()


def spread_chart(spreads: Sequence[Spread], *, title: str) -> str:
    """One line per model from its fastest run to its 90th percentile (its slowest when every
    run is known), a thick mark at the median, a hollow one at the mean, a dot per run."""
    ends = [
        v for s in spreads for v in (s.low, s.median, s.p90, s.mean, *s.samples) if v is not None
    ]
    ticks = nice_ticks(0.0, max(ends) if ends else 1.0)
    left, right = _LABEL, WIDTH - _VALUE
    top_value = ticks[-1] or 1.0

    def x(value: float) -> float:
        return left + value / top_value * (right - left)

    row = 26
    axis_y = 8 + row * len(spreads)
    parts = [
        f"<svg class='chart' viewBox='0 0 {WIDTH} {axis_y + _AXIS}' role='img' "
        f"aria-label='{html.escape(title, quote=True)}' xmlns='http://www.w3.org/2000/svg'>",
        f"<title>{html.escape(title)}</title>",
    ]
    for tick in ticks:
        tx = x(tick)
        parts.append(
            f"<line x1='{tx:.1f}' y1='4' x2='{tx:.1f}' y2='{axis_y}' class='grid'/>"
            f"<text x='{tx:.1f}' y='{axis_y + 13}' class='tick'>"
            f"{tick:g}{' ms' if tick == ticks[-1] else ''}</text>"
        )
    for index, spread in enumerate(spreads):
        mid = 8 + index * row + row / 2
        tip = f"{spread.name}: median {spread.median:.3f} ms, p90 {spread.p90:.3f} ms" + (
            f", fastest {spread.low:.3f} ms" if spread.low is not None else ""
        )
        high = max(spread.samples) if spread.samples else spread.p90
        low = spread.low if spread.low is not None else spread.median
        parts.append(
            f"<g><title>{html.escape(tip)}</title>"
            f"<text x='{left - 6}' y='{mid + 4:.1f}' class='label'>"
            f"{html.escape(_clip(spread.name))}</text>"
            f"<line x1='{x(low):.1f}' y1='{mid:.1f}' x2='{x(high):.1f}' y2='{mid:.1f}' "
            f"stroke='{spread.color}' stroke-width='2'/>"
            f"<rect x='{x(spread.median) - 2:.1f}' y='{mid - 8:.1f}' width='4' height='16' "
            f"fill='{spread.color}'/>"
        )
        for sample in spread.samples:
            parts.append(
                f"<circle cx='{x(sample):.1f}' cy='{mid - 6:.1f}' r='1.6' "
                f"fill='{spread.color}' opacity='.55'/>"
            )
        if spread.mean is not None:
            parts.append(
                f"<circle cx='{x(spread.mean):.1f}' cy='{mid:.1f}' r='3.5' fill='white' "
                f"stroke='{spread.color}' stroke-width='1.5'/>"
            )
        parts.append(
            f"<text x='{right + 4}' y='{mid + 4:.1f}' class='value'>{spread.median:.2f} ms</text>"
            "</g>"
        )
    parts.append(f"<line x1='{left}' y1='{axis_y}' x2='{right}' y2='{axis_y}' class='axis'/>")
    parts.append("</svg>")
    return "".join(parts)
