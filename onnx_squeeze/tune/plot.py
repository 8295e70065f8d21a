"""The search's picture: every judged trial as a point of latency (x, fraction of the
original's) against the metric (y), the Pareto front joined, the budget's floor and the
latency target drawn as lines, the chosen trial marked. One inline ``<svg>``, the report
charts' scale and ticks (:mod:`onnx_squeeze.report.charts`)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from onnx_squeeze.report.charts import BAD, ORIGINAL, RESULT, nice_ticks

WIDTH, HEIGHT = 400, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 34


def scatter(
    points: Sequence[tuple[int, float, float]],
    front: Sequence[int],
    *,
    chosen: int | None,
    original: int | None = None,
    floor: float,
    target: float | None,
    metric: str,
) -> str:
    """``points``: (trial number, latency ratio, metric value); ``original``: the trial that
    measured the original itself."""
    finite = [(n, x, y) for n, x, y in points if math.isfinite(x) and math.isfinite(y)]
    xs = [x for _, x, _ in finite] + [target or 1.0, 1.0]
    ys = [y for _, _, y in finite] + ([floor] if math.isfinite(floor) else [])
    xt = nice_ticks(min(0.0, *xs), max(xs))
    yt = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * (WIDTH - LEFT - RIGHT)

    def py(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y0) / ((y1 - y0) or 1) * (HEIGHT - TOP - BOTTOM)

    parts = [
        f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' role='img' class='chart'>"
        f"<title>{html.escape(metric)} against latency, every judged trial</title>"
    ]
    for x in xt:
        parts.append(
            f"<line x1='{px(x):.1f}' x2='{px(x):.1f}' y1='{TOP}' y2='{HEIGHT - BOTTOM}' stroke='#eee'/>"
            f"<text x='{px(x):.1f}' y='{HEIGHT - BOTTOM + 12}' font-size='9' text-anchor='middle'>{x:g}×</text>"
        )
    for y in yt:
        parts.append(
            f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{py(y):.1f}' y2='{py(y):.1f}' stroke='#eee'/>"
            f"<text x='{LEFT - 4}' y='{py(y) + 3:.1f}' font-size='9' text-anchor='end'>{y:.4g}</text>"
        )
    parts.append(
        f"<text x='{(LEFT + WIDTH - RIGHT) / 2}' y='{HEIGHT - 4}' font-size='10' text-anchor='middle'>"
        "latency (fraction of the original's)</text>"
    )
    if math.isfinite(floor):
        parts.append(
            f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{py(floor):.1f}' y2='{py(floor):.1f}' "
            f"stroke='{BAD}' stroke-dasharray='4 3'/><text x='{WIDTH - RIGHT}' y='{py(floor) - 3:.1f}' "
            f"font-size='9' text-anchor='end' fill='{BAD}'>budget: {html.escape(metric)} ≥ {floor:.4g}</text>"
        )
    if target is not None:
        parts.append(
            f"<line x1='{px(target):.1f}' x2='{px(target):.1f}' y1='{TOP}' y2='{HEIGHT - BOTTOM}' "
            f"stroke='{BAD}' stroke-dasharray='2 3'/><text x='{px(target) + 3:.1f}' "
            f"y='{HEIGHT - BOTTOM - 4}' font-size='9' fill='{BAD}'>target {target:.3g}×</text>"
        )
    by_number = {n: (x, y) for n, x, y in finite}
    path = [by_number[n] for n in front if n in by_number]
    if len(path) > 1:
        joined = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(path))
        parts.append(f"<polyline points='{joined}' fill='none' stroke='{RESULT}'/>")
    for number, x, y in finite:
        color = RESULT if number in front else ORIGINAL
        parts.append(
            f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='3' fill='{color}'>"
            f"<title>trial {number}: {x:.3g}×, {html.escape(metric)} {y:.4g}</title></circle>"
        )
    if original is not None and original in by_number:
        x, y = by_number[original]
        parts.append(
            f"<text x='{px(x) + 5:.1f}' y='{py(y) + 12:.1f}' font-size='9'>original</text>"
        )
    if chosen is not None and chosen in by_number:
        x, y = by_number[chosen]
        parts.append(
            f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='7' fill='none' stroke='{BAD}' stroke-width='2'/>"
            f"<text x='{px(x) + 9:.1f}' y='{py(y) + 3:.1f}' font-size='9'>trial {chosen}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
