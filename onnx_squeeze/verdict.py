"""What a run must say before anything else: warnings that cannot be missed, and the default gate.

Warnings are one line each, shown first in the terminal, listed in the JSON report and as a
banner on the HTML page; ``--strict`` turns any of them into exit code 3. They are raised for:

- random calibration or evaluation data (the figures are smoke-test quality), and whatever a
  pass flagged with a ``WARNING:`` note;
- evaluation on the data the passes calibrated on (the figures are optimistic);
- an output channel whose SQNR falls below ``warn_sqnr_db`` (default 20 dB; where that channel
  holds scores measured on fewer than ``ENOUGH_READS`` values, the warning says so: a rare
  class's few detections decide it), or, for class
  probabilities (a softmax over classes, read by its argmax), a top class that agrees at fewer
  than ``WARN_ARGMAX`` of the positions;
- outputs that became non-finite where the original's are finite;
- a top-class agreement (rows, pixels, CTC strings) that rests on fewer than ``ENOUGH_READS``
  reads, where one disagreement moves it by more than the default gate's 2 % margin: PP-OCRv4
  INT8 read 6 of 6 held-out lines the same and 81 % of 32 fresh ones, so such a verdict cannot
  tell a kept task from a broken one (the gates are then also checked on the data the passes
  saw, where figures are optimistic: a gate that fails even there, by more than one read,
  fails the run);
- a result slower than the original at a measured setting: its median time above
  ``SLOWER_MARGIN`` times the original's and even its fastest run slower than the original's
  median, so that timing noise on an unchanged model does not raise it;
- a result bigger than the original (by more than 1 %: a few bytes of metadata are not news);
- a pass that changed nothing.

With no ``--check``, ``DEFAULT_GATE`` judges the result as the output's reader reads it: the
class chosen where an output has classes along a channel axis (``argmax_agreement``: top-1 of a
classifier, each pixel of a segmentation map, the decoded strings of a CTC sequence), and the worst
channel's SQNR on every output read by its values (boxes, scores, masks, logits, state; a
softmax over classes is read only by its argmax), and the decisions that a threshold makes on
score channels whose decisions are events (``score_agreement``: a detector's class scores at
its anchors; see :mod:`onnx_squeeze.fidelity`): nudenet's INT8 read 14 dB, above the SQNR bar
that healthy results need (ddddocr_det's working INT8 reads 13.5 dB), but kept 84 % of its
score decisions and 86 % of its detections, where FP16 kept 99 % of both. A condition whose
metric does not apply to the model is left out. The figures on the real-model corpus (25
held-out samples per model) are in ``benchmarks/results/real_models.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from onnx_squeeze.fidelity import ENOUGH_READS, SCORE_ACTIVE

WARN_SQNR_DB = 20.0
WARN_ARGMAX = 0.99  # class probabilities: the top class should agree at least this often
DEFAULT_GATE = (
    "argmax_agreement>=0.98, worst_value_channel_sqnr_db>=12, score_agreement>=0.875, "
    "neighbour_agreement>=0.98"
)
SLOWER_MARGIN = 1.05  # latency ratio above which the result counts as slower
BIGGER_MARGIN = 1.01  # size ratio above which it counts as bigger (not a few bytes of metadata)

__all__ = [
    "BIGGER_MARGIN",
    "DEFAULT_GATE",
    "ENOUGH_READS",
    "SLOWER_MARGIN",
    "WARN_ARGMAX",
    "WARN_SQNR_DB",
    "blocking",
    "one_read_more",
    "run_warnings",
    "speed_hint",
    "weakly_read",
]


def run_warnings(
    comparison: Mapping[str, Any] | None,
    passes: Sequence[Mapping[str, Any]] = (),
    *,
    calibration: Any = None,
    evaluation: Any = None,
    overlap: str | None = None,
    warn_sqnr_db: float = WARN_SQNR_DB,
) -> list[str]:
    """Every warning of a run, most fundamental first: the data (random calibration or
    evaluation data, evaluation on data the passes saw: ``overlap``), what the passes flagged
    (notes starting with ``WARNING:``), then the result (weak output channels, non-finite
    outputs, slower, bigger, passes that changed nothing). ``comparison`` and ``passes`` are
    report dicts; ``calibration`` and ``evaluation`` are the data sources."""
    found = []
    worked = [p for p in passes if p["name"] != "prepare"]
    if worked and getattr(calibration, "is_random", False):
        found.append(
            f"calibrated on RANDOM data ({calibration.label}): pass real data with --calib for a "
            "model you can use"
        )
    if comparison and getattr(evaluation, "is_random", False):
        found.append(
            f"fidelity measured on RANDOM inputs ({evaluation.label}): the figures say nothing "
            "about real data; pass --eval (or --inputs) with real samples"
        )
    if overlap and comparison:
        found.append(overlap)
    said_random = bool(worked) and getattr(calibration, "is_random", False)
    for item in worked:
        for note in item["notes"]:
            if note.startswith("WARNING:") and not (said_random and "random" in note.lower()):
                found.append(f"{item['name']}: {note.removeprefix('WARNING:').strip()}")
        if not any(record["action"] != "skipped" for record in item["records"]):
            found.append(f"pass {item['name']} changed nothing (see its skipped nodes and notes)")
    if not comparison:
        return found
    for output in comparison.get("fidelity") or []:
        found.extend(_channel_warnings(output, warn_sqnr_db))
    for setting, (a, b) in (comparison.get("latency") or {}).items():
        ratio = b["median_ms"] / a["median_ms"] if a["median_ms"] > 0 else 0.0
        if ratio > SLOWER_MARGIN and b.get("min_ms", b["median_ms"]) > a["median_ms"]:
            found.append(
                f"the result is SLOWER than the original: {ratio:.2f}x its time ({setting})"
            )
    metrics = comparison.get("metrics") or {}
    size = metrics.get("size_ratio")
    if size is not None and size > BIGGER_MARGIN:
        found.append(f"the result is BIGGER than the original: {size:.3f}x its size")
    return found


def _channel_warnings(output: Mapping[str, Any], warn_sqnr_db: float) -> list[str]:
    name = output["name"]
    new_nonfinite = output.get("nonfinite_b", 0) - output.get("nonfinite_a", 0)
    if new_nonfinite > 0:
        return [f"output {name!r} has {new_nonfinite} more NaN/inf values than the original's"]
    return [
        *_weak_agreement(output),
        *_few_score_reads(output),
        *_weak_channels(output, warn_sqnr_db),
    ]


def weakly_read(comparison: Mapping[str, Any] | None) -> bool:
    """Whether an output's top-class agreement rests on fewer than ``ENOUGH_READS`` reads."""
    return any(_few_reads(output) for output in (comparison or {}).get("fidelity") or [])


def one_read_more(fidelity: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``argmax_agreement`` as it would be with one more read agreeing on every output (for a
    gate that should not fail on a single disagreement among few reads); empty when no output
    has an agreement."""
    shares = [
        min(1.0, float(output["argmax_agreement"]) + 1.0 / int(output["reads"]))
        for output in fidelity
        if _number(output.get("argmax_agreement")) is not None and int(output.get("reads") or 0)
    ]
    return {"argmax_agreement": min(shares)} if shares else {}


def _few_reads(output: Mapping[str, Any]) -> bool:
    reads = int(output.get("reads") or 0)
    return _number(output.get("argmax_agreement")) is not None and 0 < reads < ENOUGH_READS


def _weak_agreement(output: Mapping[str, Any]) -> list[str]:
    """An agreement measured on too few reads to mean anything (see the module doc)."""
    if not _few_reads(output):
        return []
    reads = int(output["reads"])
    what = "decoded CTC strings" if output.get("ctc_blank") is not None else "positions"
    return [
        f"output {output['name']!r}: its top class was compared on only {reads} {what}, where "
        f"one disagreement moves argmax_agreement by {1 / reads:.0%}: too few to tell a kept "
        f"task from a broken one; evaluate on at least {ENOUGH_READS} (--eval)"
    ]


def _few_score_reads(output: Mapping[str, Any]) -> list[str]:
    """Score decisions, or nearest neighbours, compared on too few reads to mean anything."""
    counted = (
        (
            "score_agreement",
            "score_reads",
            f"its score decisions were compared on only {{}} scores at or above "
            f"{output.get('score_threshold')}",
        ),
        (
            "neighbour_agreement",
            "neighbour_reads",
            "its nearest neighbours were compared among only {} samples",
        ),
    )
    said = []
    for metric, key, what in counted:
        reads = int(output.get(key) or 0)
        if _number(output.get(metric)) is not None and 0 < reads < ENOUGH_READS:
            said.append(
                f"output {output['name']!r}: {what.format(reads)}, where one read moves {metric} "
                f"by {1 / reads:.0%}: too few to tell a kept task from a broken one; evaluate on "
                f"more (--eval)"
            )
    return said


def _weak_channels(output: Mapping[str, Any], warn_sqnr_db: float) -> list[str]:
    """Class probabilities whose top class agrees too rarely, or a channel of an output read by
    value below ``warn_sqnr_db``."""
    name = output["name"]
    if output.get("class_probabilities"):
        agreement = _number(output.get("argmax_agreement"))
        if agreement is None or agreement >= WARN_ARGMAX:
            return []
        blank = output.get("ctc_blank")
        read = (
            f"{agreement:.1%} of the decoded CTC strings read the same (blank class {blank})"
            if blank is not None
            else f"the top class agrees at {agreement:.1%} of positions"
        )
        return [
            f"output {name!r}: {read}, below {WARN_ARGMAX:.0%} (class probabilities, axis "
            f"{output.get('channel_axis')})"
        ]
    worst = _number(output.get("worst_channel_sqnr_db"))
    if worst is None or worst >= warn_sqnr_db or output.get("read_by_value") is False:
        return []  # a map of scores only is read by its decisions (score_agreement)
    channel = output.get("worst_sqnr_channel")
    where = (
        f"channel {channel} (axis {output.get('channel_axis')})"
        if output.get("channel_axis") is not None
        else "the whole output"
    )
    whole, cosine = _number(output.get("sqnr_db")), _number(output.get("cosine"))
    context = (
        f" (whole output {whole:.1f} dB, cosine {cosine:.6f})"
        if whole is not None and cosine is not None
        else ""
    )
    reads = output.get("worst_channel_reads")
    few = (
        f"; measured on only {reads} scores of at least {SCORE_ACTIVE:.0%}: too few to tell a "
        f"kept task from a broken one, evaluate on more (--eval)"
        if reads is not None and reads < ENOUGH_READS
        else ""
    )
    return [
        f"output {name!r} {where}: SQNR {worst:.1f} dB, below {warn_sqnr_db:g} dB{context}{few}"
    ]


def _number(value: Any) -> float | None:
    """A float from a report value (non-finite numbers are written as strings or None)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def blocking(
    gates: Sequence[Mapping[str, Any]], warnings: Sequence[str], strict: bool
) -> str | None:
    """Why the run fails (exit 3, output not written), or None: a user gate that failed; with
    ``strict``, also the default gate and every warning."""
    failed = [
        f"{g['expr']}: {g['message']}"
        for g in gates
        if not g["passed"] and (strict or not g["default"])
    ]
    reasons = ["accuracy gate failed: " + "; ".join(failed)] if failed else []
    if strict and warnings:
        reasons.append(f"--strict: {len(warnings)} warning(s): " + "; ".join(warnings))
    return " | ".join(reasons) or None


def speed_hint(passes: Sequence[Any], comparison: Mapping[str, Any] | None) -> list[str]:
    """A pointer to the INT8 speed check when static INT8 left the model slower than the
    original (narrow layers at small batches, CPUs without VNNI); ``passes`` are pass reports."""
    ratio = comparison["metrics"].get("latency_ratio") if comparison else None
    int8 = [step for step in passes if step.name == "quantize_int8"]
    if ratio is None or ratio <= 1.0 or not int8:
        return []
    if any(step.settings.get("speed_check") is not False for step in int8):
        return []  # INT8 timed itself and fell back where it was slower: another pass slowed it
    return [
        f"the compressed model takes {ratio:.2f}x the original's time here: without "
        "--int8-no-speed-check (speed_check=false), INT8 times itself and keeps in float the "
        "layers it slows down on this machine"
    ]
