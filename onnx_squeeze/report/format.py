"""Numbers and rows that the terminal tables and the HTML page both show."""

from __future__ import annotations

from typing import Any

from onnx_squeeze.units import human_bytes, human_count

# ---------------------------------------------------------------- formatting helpers


def ratio(after: float | None, before: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}×"


def number(value: Any, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def size_rows(comparison: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, original, result, ratio) rows for size, parameters, MACs and latency."""
    models = comparison.get("models") or [{}, {}]
    a, b = models[0], models[1]
    rows = [
        (
            "file size",
            human_bytes(a.get("size_bytes")),
            human_bytes(b.get("size_bytes")),
            ratio(b.get("size_bytes"), a.get("size_bytes")),
        ),
        (
            "parameters",
            human_count(a.get("params")),
            human_count(b.get("params")),
            ratio(b.get("params"), a.get("params")),
        ),
        (
            "MACs",
            human_count(a.get("macs")),
            human_count(b.get("macs")),
            ratio(b.get("macs"), a.get("macs")),
        ),
    ]
    for key, (la, lb) in (comparison.get("latency") or {}).items():
        rows.append(
            (
                f"latency {key} (median ms)",
                f"{la['median_ms']:.3f}",
                f"{lb['median_ms']:.3f}",
                ratio(lb["median_ms"], la["median_ms"]),
            )
        )
    return rows


FIDELITY_COLUMNS = (
    "output",
    "cosine",
    "SQNR dB",
    "worst ch SQNR dB",
    "worst ch",
    "worst ch cosine",
    "score cosine",
    "score decisions",
    "argmax agree",
    "non-finite a/b",
)


def fidelity_rows(comparison: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per output: whole-output figures beside the worst channel's (named as
    ``index/channels@axis``), the score channels' cosine and decisions (agreement at the worst
    threshold, and the scores read there) and the argmax agreement (of the decoded strings for
    a CTC output)."""
    rows = []
    for item in comparison.get("fidelity") or []:
        axis, worst_at = item.get("channel_axis"), item.get("worst_sqnr_channel")
        where = f"{worst_at}/{item.get('channels')}@{axis}" if axis is not None else "whole"
        argmax = item.get("argmax_agreement")
        neighbours = item.get("neighbour_agreement")
        scores = f" ({item['score_channels']} ch)" if item.get("score_channels") else ""
        rows.append(
            (
                item["name"],
                number(item["cosine"], 6),
                number(item.get("sqnr_db"), 3),
                number(item.get("worst_channel_sqnr_db"), 3),
                where,
                number(item.get("worst_channel_cosine"), 4),
                number(item.get("score_cosine"), 4) + scores,
                _decisions(item),
                f"{argmax:.4f}" + _ctc(item)
                if argmax is not None
                else "-"
                if neighbours is None
                else f"{number(neighbours, 4)} (nearest neighbours)",
                f"{item.get('nonfinite_a', 0)}/{item.get('nonfinite_b', 0)}",
            )
        )
    return rows


def _decisions(item: dict[str, Any]) -> str:
    """Score decisions: the agreement, at which threshold, on how many scores."""
    if item.get("score_agreement") is None:
        dense = item.get("dense_score_channel")
        return "-" if dense is None else f"- (ch {dense} dense)"
    return (
        f"{number(item['score_agreement'], 4)} at {item['score_threshold']:g} "
        f"({item['score_reads']})"
    )


def _ctc(item: dict[str, Any]) -> str:
    """How a CTC output's agreement was read: decoded strings, beside the shares of their
    tokens and of the steps that agree."""
    if item.get("ctc_blank") is None:
        return ""
    return (
        f" CTC strings (blank {item['ctc_blank']}; tokens {item['token_agreement']:.4f}, "
        f"steps {item['position_agreement']:.4f})"
    )


def shapes_line(comparison: dict[str, Any]) -> str:
    shapes = comparison.get("input_shapes") or {}
    return ", ".join(
        f"{name} {'×'.join(map(str, dims)) if dims else 'scalar'}" for name, dims in shapes.items()
    )


def gate_label(gate: dict[str, Any]) -> str:
    label = f"{gate['expr']} (default gate)" if gate.get("default") else gate["expr"]
    return f"{label} on the data the passes saw" if gate.get("seen") else label


# ---------------------------------------------------------------- terminal


def summed(records: list[dict[str, Any]], key: str) -> str:
    """Total before → after over the records that changed ``key`` (parameters or MACs)."""
    pairs = [
        (r[f"{key}_before"], r[f"{key}_after"])
        for r in records
        if r.get(f"{key}_before") is not None and r.get(f"{key}_after") is not None
    ]
    if not pairs:
        return ""
    return before_after(sum(b for b, _ in pairs), sum(a for _, a in pairs))


def before_after(before: int | None, after: int | None) -> str:
    if before is None and after is None:
        return ""
    return f"{human_count(before)} → {human_count(after)}"
