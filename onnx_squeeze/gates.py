"""Accuracy gates for ``--check``: ``metric OP number`` conditions on a comparison's metrics.

``parse_gates("top1_agreement>=0.99, cosine>=0.999")`` accepts several gates separated by commas
(or given as repeated strings); operators are ``>= <= > < ==``; a threshold may end in ``%``
(``top1_agreement>=99%``). The metrics are those of :meth:`comparison.Comparison.metrics`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnx_squeeze.errors import GateFailedError, SettingsError

__all__ = [
    "AGREEMENT_METRICS",
    "METRICS",
    "Gate",
    "GateResult",
    "agreement_bound",
    "check_gates",
    "counted_on",
    "decided",
    "evaluate_gates",
    "judged",
    "parse_gate",
    "parse_gates",
    "reads_to_decide",
    "validated",
]

# Metric name -> (what it is, why it can be missing from a comparison).
METRICS: dict[str, tuple[str, str]] = {
    "cosine": (
        "cosine similarity of B's outputs to A's, worst output",
        "no numeric output was compared",
    ),
    "max_abs_error": ("largest |A - B| over all outputs", "no numeric output was compared"),
    "mean_abs_error": ("mean |A - B|, worst output", "no numeric output was compared"),
    "sqnr_db": (
        "signal-to-noise ratio of B's outputs to A's in dB, whole output, worst output",
        "no numeric output was compared",
    ),
    "worst_channel_sqnr_db": (
        "SQNR in dB of the worst output channel (for probabilities, over the values where either "
        "model scores at least 5 %), worst output",
        "no numeric output was compared",
    ),
    "worst_value_channel_sqnr_db": (
        "worst_channel_sqnr_db over the outputs read by value: every output but class "
        "probabilities (a softmax over classes, which argmax_agreement judges) and maps of "
        "scores only (which score_agreement judges)",
        "every output is a softmax over classes or a map of scores",
    ),
    "worst_channel_cosine": (
        "cosine of the worst output channel, worst output",
        "no numeric output was compared",
    ),
    "score_cosine": (
        "cosine over the score channels (Sigmoid/Softmax probabilities), worst output",
        "no output carries Sigmoid/Softmax probabilities",
    ),
    "score_agreement": (
        "score channels along a channel axis (a detector's classes, multi-label heads) read "
        "against thresholds 0.1…0.9: the scores at or above one in both models over those at "
        "or above it in either, at the worst threshold with at least 50 such scores (else the "
        "one with the most), worst output",
        "no output has score channels along a channel axis outside a softmax over classes, "
        "no score reached 0.1 in either model, or a score channel reaches 0.5 at more than 5 % "
        "of its positions (decisions conditional on another channel, as YOLOX's classes on "
        "its objectness)",
    ),
    "argmax_agreement": (
        "share of positions whose argmax along the channel axis agrees (classes per row, time "
        "step or pixel; for a CTC sequence, of its decoded strings: the share that read "
        "exactly the same), worst output",
        "no output has a channel axis to take an argmax along, or its channels mix scores with "
        "other values",
    ),
    "token_agreement": (
        "share of a CTC sequence's decoded tokens that agree (1 - edit distance / length: a "
        "character error rate), worst output",
        "no output is read as CTC (a sequence whose most frequent class fills half the steps)",
    ),
    "neighbour_agreement": (
        "pooled embeddings (one vector per sample, out of a pooling or a normalization): share "
        "of the distinct samples whose nearest other sample by cosine is the same in both "
        "models (what a similarity search reads), worst output",
        "no output is a pooled embedding, or fewer than 3 distinct samples were compared",
    ),
    "top1_agreement": (
        "share of rows whose argmax agrees, worst classifier output",
        "the model has no classifier-shaped output (2-D [N, C] with C > 1)",
    ),
    "nonfinite": ("count of NaN/inf values in B's outputs", "no numeric output was compared"),
    "latency_ratio": (
        "median latency of B / A",
        "latency was not measured (runs=0 or no execution provider available)",
    ),
    "speedup": (
        "median latency of A / B",
        "latency was not measured (runs=0 or no execution provider available)",
    ),
    "size_ratio": ("size of B / A", "model A has no weights"),
    "params_ratio": ("parameters of B / A", "model A has no parameters"),
    "macs_ratio": (
        "MACs of B / A",
        "model A has no MACs that could be counted, or either model has layers whose shapes, "
        "and so MACs, are unknown",
    ),
}

ALIASES = {
    "top1": "top1_agreement",
    "top1_agree": "top1_agreement",
    "max_abs": "max_abs_error",
    "mean_abs": "mean_abs_error",
    "latency": "latency_ratio",
    "sqnr": "sqnr_db",
    "worst_sqnr": "worst_channel_sqnr_db",
}

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}

_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|>|<)\s*([^\s<>=]+?)\s*$")
_EXAMPLE = "write it as METRIC OP NUMBER, e.g. 'top1_agreement>=0.99' or 'max_abs_error<0.01'"


@dataclasses.dataclass(frozen=True)
class Gate:
    """One condition: ``metric op threshold``."""

    metric: str
    op: str
    threshold: float
    expr: str

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the condition (NaN never does)."""
        if math.isnan(value):
            return False
        return _OPERATORS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclasses.dataclass
class GateResult:
    """The outcome of one gate on a comparison's metrics."""

    expr: str
    value: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        value = self.value
        if value is not None and not math.isfinite(value):
            return {**dataclasses.asdict(self), "value": str(value)}
        return dataclasses.asdict(self)


# The metrics that count agreeing reads (positions, CTC lines, score decisions, neighbours).
AGREEMENT_METRICS = ("argmax_agreement", "top1_agreement", "score_agreement", "neighbour_agreement")
# A search that keeps the best of many candidates, each measured on a few noisy reads, picks
# one that reads better there than it will on other data: it counts on an agreement only as
# far as the Wilson score interval's lower bound, this many standard errors below the share
# counted. ppocr_rec's INT8 had held argmax_agreement>=0.98 at 0.99 of 99 check lines and read
# 0.967 of 153 others; held to the bound, its control returns layers until all 99 agree.
AGREEMENT_Z = 1.0


def agreement_bound(share: float, reads: float, z: float = AGREEMENT_Z) -> float:
    """The lower bound of the Wilson score interval of an agreement ``share`` counted on
    ``reads``: what the agreement can be trusted to reach on other data of its kind."""
    if reads <= 0 or not math.isfinite(reads):
        return share
    z2 = z * z / reads
    centre = share + z2 / 2
    spread = z * math.sqrt(share * (1 - share) / reads + z2 / (4 * reads))
    return (centre - spread) / (1 + z2)


def counted_on(share: float, reads: float) -> float:
    """What a search may count on from an agreement ``share`` counted on ``reads`` (infinite:
    not counted): its lower bound, or the share itself where every read agreed (too few reads
    for any bound to reach a gate: nothing more to gain)."""
    return share if share >= 1 or not math.isfinite(reads) else agreement_bound(share, reads)


# A gate that allows fewer disagreements than this among the reads counted is decided by the
# count itself: one read is then a large step, and the bound would ask every read to agree.
# magika's, silero-vad's and ddddocr_beta's INT8 read 98 of 99 the same (a 0.98 gate allows
# 1.98) and were left float; nudenet's read 0.90 of 141 score decisions (0.875 allows 17.6),
# 0.87 at the bound, and kept 86 % of its detections elsewhere.
DECIDED_BELOW = 5.0
# ... but only on this many independent reads at least: fewer are too few to count, and the
# bound decides (every read agreeing still passes). pp_layout's channel pruning read 0.886 of
# the score decisions of 2 held-back pages (a handful of independent reads, allowing less than
# one disagreement) and 0.31 of 58 other pages' at threshold 0.1.
COUNTED_FROM = 50.0


def decided(gate: Gate, share: float, reads: float) -> bool:
    """Whether ``gate`` holds on an agreement ``share`` counted on ``reads`` (independent
    ones), as accuracy control decides to keep or drop a result: at its lower bound
    (:func:`counted_on`), unless at least ``COUNTED_FROM`` reads were counted and the gate allows fewer than
    ``DECIDED_BELOW`` disagreements among them, where the count itself is judged."""
    if not gate.passes(share):
        return False
    if not math.isfinite(reads):
        return True
    allowed = reads * (1 - gate.threshold)
    return (reads >= COUNTED_FROM and allowed < DECIDED_BELOW) or gate.passes(
        counted_on(share, reads)
    )


def reads_to_decide(gate: Gate) -> float:
    """The fewest reads on which ``gate``, an agreement at least a share, is decided by them
    all agreeing (:func:`decided` without its pass for every read agreeing): a search that
    picks its most aggressive candidate among several passes a few reads that all agree by
    luck. magika's factorization read 8 of 8 held-back files the same and 0.961 of 154 others;
    a 0.98 gate needs 50. Zero for other gates; infinite where no count decides."""
    if gate.op not in (">=", ">") or gate.threshold <= 0:
        return 0.0
    for reads in range(1, 100_000):
        allowed = reads * (1 - gate.threshold)
        if (reads >= COUNTED_FROM and allowed < DECIDED_BELOW) or gate.passes(
            agreement_bound(1.0, reads)
        ):
            return float(reads)
    return math.inf


def _metric_list() -> str:
    return ", ".join(METRICS)


def parse_gate(expr: str) -> Gate:
    """Parse one gate such as ``cosine>=0.999``; a :class:`SettingsError` says what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        raise SettingsError(f"empty accuracy gate: {_EXAMPLE}")
    if "," in expr:
        raise SettingsError(
            f"{expr!r} holds several gates; parse it with parse_gates, or give one gate: {_EXAMPLE}"
        )
    match = _PATTERN.match(expr)
    if not match:
        raise SettingsError(f"cannot read the accuracy gate {expr!r}: {_EXAMPLE}")
    name, op, number = match.groups()
    metric = ALIASES.get(name.lower(), name.lower())
    if metric not in METRICS:
        raise SettingsError(
            f"unknown metric {name!r} in the accuracy gate {expr!r}; known metrics: {_metric_list()}"
        )
    scale = 1.0
    if number.endswith("%"):
        number, scale = number[:-1], 0.01
    try:
        threshold = float(number) * scale
    except ValueError:
        raise SettingsError(
            f"the threshold {number!r} in the accuracy gate {expr!r} is not a number: {_EXAMPLE}"
        ) from None
    if math.isnan(threshold):
        raise SettingsError(f"the threshold in the accuracy gate {expr!r} is NaN: {_EXAMPLE}")
    return Gate(metric, op, threshold, expr.strip())


def parse_gates(exprs: str | Sequence[str]) -> list[Gate]:
    """Parse gates given as one comma-separated string or as several strings (each may hold
    commas too); empty parts are ignored."""
    items = [exprs] if isinstance(exprs, str) else list(exprs)
    gates = []
    for item in items:
        for part in item.split(","):
            if part.strip():
                gates.append(parse_gate(part))
    return gates


def _format(value: float) -> str:
    return f"{value:.6g}"


def evaluate_gates(exprs: str | Sequence[str], metrics: Mapping[str, float]) -> list[GateResult]:
    """Evaluate gates on ``metrics``; a metric that is missing (e.g. ``top1_agreement`` for a
    detector) or NaN fails with a message saying why."""
    results = []
    for gate in parse_gates(exprs):
        value = metrics.get(gate.metric)
        if value is None:
            reason = METRICS[gate.metric][1]
            results.append(
                GateResult(gate.expr, None, False, f"{gate.metric} was not measured: {reason}")
            )
            continue
        value = float(value)
        condition = f"{gate.op} {gate.threshold:g}"
        if math.isnan(value):
            message = f"{gate.metric} is NaN (outputs with NaN/inf where the reference has numbers), not {condition}"
            results.append(GateResult(gate.expr, value, False, message))
        elif gate.passes(value):
            results.append(
                GateResult(gate.expr, value, True, f"{gate.metric} = {_format(value)} {condition}")
            )
        else:
            results.append(
                GateResult(
                    gate.expr,
                    value,
                    False,
                    f"{gate.metric} = {_format(value)}, which is not {condition}",
                )
            )
    return results


def check_gates(exprs: str | Sequence[str], metrics: Mapping[str, float]) -> list[GateResult]:
    """Evaluate gates and raise :class:`GateFailedError` (CLI exit code 3) if any fails."""
    results = evaluate_gates(exprs, metrics)
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateFailedError(
            "accuracy gate failed: " + "; ".join(f"{r.expr}: {r.message}" for r in failed)
        )
    return results


def validated(expressions: Sequence[str]) -> list[str]:
    """The gate expressions, each checked (a bad one is a :class:`SettingsError` before any
    work is done)."""
    for expression in expressions:
        parse_gates(expression)
    return list(expressions)


def applicable(exprs: str | Sequence[str], metrics: Mapping[str, float]) -> list[str]:
    """The gates of ``exprs`` whose metric ``metrics`` holds (a gate on a metric the model does
    not have, ``argmax_agreement`` on a detector's boxes, would fail for want of it)."""
    return [g.expr for g in parse_gates(exprs) if g.metric in metrics]


def judged(
    expressions: Sequence[str], metrics: Mapping[str, float], default: str
) -> list[dict[str, Any]]:
    """The user's gates on ``metrics``, or the ``default`` gates (marked ``default``) when the
    user gave none, as report dicts. A default gate whose metric does not apply to the model
    (``argmax_agreement`` on a detector's boxes) is left out, unless none applies."""
    if expressions:
        return [{**r.to_dict(), "default": False} for r in evaluate_gates(expressions, metrics)]
    results = evaluate_gates(applicable(default, metrics) or [default], metrics)
    return [{**result.to_dict(), "default": True} for result in results]
