"""Counts and byte sizes as people read them, for reports, notes and progress lines."""

from __future__ import annotations


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
