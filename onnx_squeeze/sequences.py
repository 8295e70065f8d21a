"""How a CTC sequence output is read, so that fidelity judges the strings and not the frames.

An OCR or speech recognizer's output is N×T×C: per time step, scores over an alphabet plus a
blank. Its reader takes the top class per step, merges repeats and drops blanks (greedy CTC
decoding): ``- a a - b`` and ``a - - - b`` both read ``ab``. A compressed model often moves a
character's edge by one step (blank ↔ character) without changing the string; counting
agreeing steps calls that a disagreement (PP-OCRv4's recognizer after INT8: 96.7 % of steps
agree, every string is kept). So a sequence output whose most frequent top class fills at least
``CTC_BLANK_SHARE`` of the reference's steps is read as CTC with that class as the blank, and
judged on its decoded strings: the share of sequences that read exactly the same (what an OCR
line's reader gets right or wrong), and the share of tokens that agree (one minus the edit
distance over the longer string's length, summed over sequences: a character error rate, what
long speech transcripts are judged by). Per-token taggers (a diacritic or entity per character)
have no class filling half their steps and keep per-step agreement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "CTC_BLANK_SHARE",
    "agreements",
    "ctc_blank",
    "decode",
    "edit_distance",
    "time_axis",
]

# A CTC blank fills most steps (62-82 % on the corpus's OCR models; a diacritizer's commonest
# class, 39 %).
CTC_BLANK_SHARE = 0.5


def time_axis(shape: Sequence[int], channel: int, fixed: Sequence[bool] | None) -> int:
    """The time axis of a rank-3 output with classes along ``channel``: of the two other axes,
    the one that is not the batch. A batch of one tells itself; else a fixed-size axis beside a
    symbolic one is time (captcha CRNNs: ``20×batch×37``); else N×T×C, the last of the two."""
    first, second = (axis for axis in range(3) if axis != channel)
    if shape[first] == 1 and shape[second] > 1:
        return second
    if shape[second] == 1 and shape[first] > 1:
        return first
    if fixed is not None and len(fixed) == 3 and fixed[first] != fixed[second]:
        return first if fixed[first] else second
    return second


def ctc_blank(steps: Sequence[np.ndarray]) -> int | None:
    """The class read as the blank (the reference's most frequent top class) when it fills at
    least ``CTC_BLANK_SHARE`` of the steps; None when the output is not read as CTC."""
    classes = np.concatenate([s.ravel() for s in steps]) if steps else np.zeros(0, np.int64)
    if classes.size == 0:
        return None
    counts = np.bincount(classes)
    blank = int(counts.argmax())
    return blank if counts[blank] >= CTC_BLANK_SHARE * classes.size else None


def decode(steps: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC decoding of one sequence of top classes: repeats merged, blanks dropped."""
    if steps.size == 0:
        return []
    keep = np.ones(steps.size, dtype=bool)
    keep[1:] = steps[1:] != steps[:-1]
    return [int(c) for c in steps[keep] if c != blank]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions and substitutions count 1)."""
    if list(a) == list(b):
        return 0
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def agreements(
    reference: Sequence[np.ndarray], result: Sequence[np.ndarray], blank: int
) -> tuple[float, float]:
    """Over pairs of sequences (rows of the ``[sequences, T]`` arrays of top classes, one array
    per feed): the share whose decoded strings are identical, and 1 - Σ edit distance / Σ
    longer decoded length (1 when every string reads the same)."""
    pairs = [
        (decode(a, blank), decode(b, blank))
        for a_rows, b_rows in zip(reference, result, strict=True)
        for a, b in zip(a_rows, b_rows, strict=True)
    ]
    if not pairs:
        return 1.0, 1.0
    strings = sum(a == b for a, b in pairs) / len(pairs)
    longest = sum(max(len(a), len(b)) for a, b in pairs)
    distance = sum(edit_distance(a, b) for a, b in pairs)
    return strings, 1.0 - distance / longest if longest else 1.0
