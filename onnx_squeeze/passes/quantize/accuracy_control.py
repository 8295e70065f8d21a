"""Accuracy control: return the quantized layers that harm the outputs most to float until a
fidelity gate holds on calibration data (NNCF's accuracy control, with a cheaper ranking).

The quantized model is measured against the float one on a few calibration batches, by the
gate's metric (per output channel by default: ``verdict.DEFAULT_GATE``). While the gate fails,
the layer whose return to float helps most is found by bisection over the remaining quantized
layers (graph order): return each half to float, keep the half that measured better, until one
layer is left. That costs two runs per halving, ``2·log2(N)`` per layer found, instead of the
``N + 1`` runs of ranking every layer alone, and it ranks by the metric the gate reads, so a
layer that crushes one score channel is found even when the whole output hardly moves. The
layer is returned to float and the model re-measured on the next calibration batches (a layer
picked as the best of many noisy measurements looks better on the batches it was picked on than
it is; ResNet-18 with 1000 classes gained 6 dB there and nothing on held-out data). Where the
gate still fails with it, the error is spread over several layers (ppocr_rec: the early
high-resolution Convs of its backbone, each worth a few percent of the lines; one at a time, the
search ran out of runs with one layer found): the groups the bisection passed through, each
half of the one before, are checked in turn for the smallest whose return to float holds the
gate (a bisection over their sizes), and that group goes back to float at once (ppocr_rec: 6
layers, 0.2 % of the MACs, 0.87 -> 0.96 of the lines read the same). If the layer (or group)
made the metric no better (by less than ``MIN_GAIN`` of what separates it from the gate, or a
rank no higher than its noise: what the fully quantized model's rank differs by between the
two sets of batches, the share of it that is the check's own, as noise falls with the root of
the batches: nudenet's 4 search images against 22 differed 7.7 dB, 3.0 dB of it the check's),
the groups the bisection passed through and the halves it passed over are measured, smallest
first, and the best that gains beyond the noise goes back to float even where the gate does not
hold with it yet (ddddocr_beta: Conv_39 alone lowered the lines read the same, its later half
kept 0.985 of 134 fresh ones, against 0.91 with every layer INT8); where none gains, the step
is taken back and the search ends: the error is spread over more layers than the bounds allow,
and more searches would cost runs and then speed for crumbs.

Work and speed are bounded: at most ``runs`` measured runs of the model (a search that would
not fit is not begun); the layers in float may hold ``float_macs`` of the quantized layers'
multiply-accumulates untimed, and a step beyond that share is timed against the original
(CPU, one thread) and kept while the result still pays, at most ``latency_ratio`` of the
original's latency. A step that would not pay gives way to the best ranked of the halves the
bisection passed over that gains beyond the noise and pays, even where the gate does not hold
with it yet. A MAC share alone either stops short of such a group or lets a model that gains
little from INT8 float layers it cannot spare.

Where steps are timed, the bisection halves the candidates by cost, not by count: by the time
INT8 saves per layer, from onnxruntime's profiles of the original and of the model with every
candidate quantized (:meth:`speed_check.Slowdown.layer_savings`). Halves of like count bundle
cheap layers with a costly one, and the half that gains most is then the one that gives up
most speed for it: ddddocr_beta's Gemm_97 (8210 classes at every time step) saves 2.2 of the
4.3 ms that INT8 saves, and in float it gains 0.2 dB. By count it shared the later half with
10 Convs, which held the gate at 0.88-0.904x the original's latency against the 0.9x bound, so
that the timing decided between that half (0.967 of 153 fresh strings read the same) and
nothing in float (0.941) from run to run; by cost it is a half of its own, and all 20 Convs
return to float at 0.75x (0.980; the profile put their savings 80-300 us under the Gemm's in
every run, more than the 16 us of the last Conv that the halves could trade).

A gate on the agreement of the top class (``argmax_agreement``, ``top1_agreement``) counts
positions, a whole number of them: the search ranks by the SQNR of the outputs that the gate
reads instead (a step is kept when it raises that SQNR beyond its noise without lowering the
agreement), and the check measures enough positions to see the gate's margin
(``AGREEMENT_POSITIONS``).

The copies measured have their weight bias corrected as the result will, but not the mean
output error that the result's last layers then have removed (that costs a calibration run
per copy): the control judges the result slightly pessimistically.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import onnx_ir as ir

from onnx_squeeze import fidelity
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.gates import (
    AGREEMENT_METRICS,
    Gate,
    agreement_bound,
    counted_on,
    decided,
    parse_gates,
)
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.passes.base import bounded, choice
from onnx_squeeze.passes.quantize import speed_check
from onnx_squeeze.passes.quantize.shared_weights import SharedWeight
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.verdict import DEFAULT_GATE

# The gate metrics a fidelity measurement gives (the rest need latency, sizes or MACs).
MEASURABLE = (
    "cosine",
    "sqnr_db",
    "worst_channel_sqnr_db",
    "worst_value_channel_sqnr_db",
    "worst_channel_cosine",
    "max_abs_error",
    "mean_abs_error",
    "score_cosine",
    "score_agreement",
    "argmax_agreement",
    "top1_agreement",
    "neighbour_agreement",
)


# The share of the gap to the gate that a layer returned to float must close to stay float
# (e.g. 10 % of 10 dB: 1 dB); a smaller gain is within the noise of a few calibration batches.
MIN_GAIN = 0.1


# The values per output channel the check measures at least (from up to CHECK_BATCHES): a
# classifier's logit has one per sample, and the worst of 1000 channels over 4 samples is
# noise (the zoo's ResNet-50 kept a layer float for -7.8 -> -4.1 dB on 4 check batches, 4.8 ->
# 4.6 dB on 64 held-out samples).
CHANNEL_VALUES = 32


# Gates on the share of positions whose top class agrees (argmax, top-1) count agreements: a
# whole number of positions. The check measures at least this many positions (from up to
# CHECK_BATCHES), so that one position is an eighth of what a 0.98 gate allows: on 4 batches of
# ppocr_rec (160 time steps) INT8 agreed at 0.981 and at 0.946 on the held-out fifth. A CTC
# output's agreement counts lines (its decoded strings), so its check takes every batch up to
# CHECK_BATCHES where the data has them (ppocr_rec's 26 calibration lines: 22 checked). The
# search ranks by the SQNR of the outputs the gate reads instead: the agreement of one half
# of the layers against the other is a handful of positions either way, while the SQNR moves
# with every change of the probabilities that decide them.
# Score decisions (a detector's classes against thresholds) rank by the worst channel's SQNR
# (for score channels, over the values where either model scores at least 5 %): the boxes
# beside them would decide the whole output's, and only a box channel worse than every score
# channel decides it.
AGREEMENT_POSITIONS = 400
# The most batches the check reads. Where a batch gives one read (a CTC line, a classifier's
# row at batch 1), 32 batches let a lucky draw decide: with 128 captured lines, ppocr_rec's INT8
# read the check's 32 all the same and 87 % of 153 others, where its 99 calibration lines
# showed 0.91 and two layers in float (0.0 % of the MACs) brought it to 0.99 (0.97 on the 153);
# ddddocr_beta's went from 0.94 to 0.97 the same way.
CHECK_BATCHES = 128
# Where the check counts fewer reads than AGREEMENT_POSITIONS, a smaller group that holds the
# agreement gate goes back to float instead of a larger one only while it keeps this share of
# the larger's gain in the read outputs' SQNR (dB): on 99 strings, one read is half of what a
# 0.98 gate allows, and which of two groups reads one more string the same is the luck of the
# check. ddddocr_beta: all 20 Convs in float read 98 of the 99 check strings the same at
# +20.0 dB, their later 11 all 99 at +7.4 dB; 0.980 and 0.961 of 153 others.
HOLDING_SHARE = 0.5
# A timed ratio this close to the latency bound (relatively) is timed twice more and the median
# decides: one timing of ddddocr_beta's later half in float read 0.882x and 0.904x the
# original's latency in two runs, against a 0.9x bound.
NEAR_BOUND = 0.03


@dataclasses.dataclass
class ControlSettings:
    """Accuracy control's settings: the base of the settings of every pass that quantizes."""

    # accuracy control: return the layers that harm the outputs most to float until the gate
    # ``target`` holds on calibration data (passes/quantize/accuracy_control.py)
    accuracy_control: bool = True
    # the gates accuracy control meets in turn, e.g. "top1_agreement>=0.99" (comma-separated
    # for several); empty: the default gate's conditions (verdict.DEFAULT_GATE)
    target: str = ""
    control_batches: int = bounded(4, low=1)  # calibration batches its search measures on
    control_runs: int = bounded(24, low=1)  # model runs it may measure, at most
    # the share of the quantized layers' MACs it may return to float untimed
    control_float_macs: float = bounded(0.1, low=0, high=1)
    # beyond that share, layers return to float while the result, timed (CPU, 1 thread, batch
    # speed_batch), runs in at most this share of the original's latency; 0: the MAC share
    # is the bound
    control_latency_ratio: float = bounded(0.9, low=0)
    # where accuracy control cannot hold the gate within those bounds: "float" leaves every
    # layer float (the model unchanged, with a warning that says why), "quantize" writes what
    # it reached (the comparison then reports the gate it fails)
    if_missed: str = choice("float", ("float", "quantize"))
    # the batch the model is timed at, for inputs with a free batch size
    speed_batch: int = bounded(1, low=1)


def check_settings(settings: ControlSettings) -> None:
    """A :class:`SettingsError` when quantization cannot measure a gate it is to meet."""
    for gate in parse_gates(settings.target or DEFAULT_GATE):
        check_gate(gate)


def controlled(
    model: ir.Model,
    anchors: list[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    settings: ControlSettings,
    *,
    slowdown: speed_check.Slowdown | None = None,
) -> list[ir.Node] | None:
    """The anchors to quantize under ``settings`` (every one where accuracy control is off,
    or where the data is random and no ``target`` was asked for: the default gate held on
    noise says nothing about the task, and the layers it returned to float varied with the
    noise and the timings, the demo's ResNet-18 from 0.25x to 0.51x of the original's
    latency); None where a gate was missed on real data and ``if_missed`` leaves the model
    float, which the report then says (a ``target`` asked for on random data, as tune's
    searches of synthetic models do, is worked towards, and a miss there is reported and the
    model quantized). ``quantized_copy`` quantizes the given anchors of a copy of ``model``;
    ``slowdown`` times a copy against ``model`` (made here where not given)."""
    s = settings
    if not s.accuracy_control or not anchors:
        return anchors
    if context.data.is_random and not s.target:
        report.notes.append(
            f"WARNING: accuracy control skipped on RANDOM data ({context.data.label}), which "
            "says nothing about the task: every layer quantized unchecked; pass real "
            "calibration data (--calib) for a model the gate can vouch for, or a target to "
            f"hold on this data (--pass {report.name}:target=...)"
        )
        return anchors
    slowdown = slowdown or speed_check.Slowdown(model, context, batch=s.speed_batch)
    try:
        control = keep_harmful_float(
            model,
            anchors,
            quantized_copy,
            context,
            report,
            gates=parse_gates(s.target or DEFAULT_GATE),
            batches=s.control_batches,
            bounds=Bounds(s.control_runs, s.control_float_macs, s.control_latency_ratio, slowdown),
        )
    except InputError as error:  # a pass that needs no data was given none it can use
        report.notes.append(
            f"WARNING: accuracy control skipped, every layer quantized unchecked: {error}"
        )
        return anchors
    if control.missed and context.data.is_random:
        report.notes.append(
            f"WARNING: accuracy control could not hold {'; '.join(control.missed)} on RANDOM "
            "data, which says nothing about the task: quantized as far as it went, not left "
            "float; pass real calibration data (--calib) for a model the gate can vouch for"
        )
    elif control.missed and s.if_missed == "float":
        report.notes.append(
            f"WARNING: every layer left float ({len(anchors)} would have been quantized): "
            f"accuracy control could not hold {'; '.join(control.missed)} within its bounds "
            "(its note says where it stopped), and a model that misses the gate would not "
            "keep the task; aim at the gate the task needs (--check) or quantize anyway "
            f"(--pass {report.name}:if_missed=quantize)"
        )
        return None
    return control.anchors


def controlled_weights(
    model: ir.Model,
    weights: list[SharedWeight],
    context: PassContext,
    report: PassReport,
    settings: ControlSettings,
    select: Callable[[ir.Model, PassReport], list[SharedWeight]],
    quantize: Callable[[ir.Model, list[SharedWeight], PassReport], None],
) -> list[SharedWeight] | None:
    """The ``weights`` of ``model`` (as ``select`` finds them) to quantize, less those accuracy
    control returns to float (:func:`controlled`, over the nodes that read them; a weight stays
    float with every reader, so that none is stored twice; ``quantize`` quantizes the given
    weights of a copy); None where a gate was missed and the model stays float."""

    def read_only_by(found: list[SharedWeight], names: set[str]) -> list[SharedWeight]:
        return [w for w in found if all(c.node.name in names for c in w.consumers)]

    def quantized_copy(chosen: Sequence[ir.Node]) -> ir.Model:
        copy, unreported = model.clone(), PassReport(report.name)
        found = read_only_by(select(copy, unreported), {node.name for node in chosen})
        quantize(copy, found, unreported)
        return copy

    anchors = list(dict.fromkeys(c.node for w in weights for c in w.consumers))
    kept = controlled(model, anchors, quantized_copy, context, report, settings)
    if kept is None:
        return None
    names = {node.name for node in kept}
    for weight in weights:
        if readers := [c.node for c in weight.consumers if c.node.name not in names]:
            for consumer in weight.consumers:
                if consumer.node.name in names:
                    report.skip(
                        consumer.node,
                        f"kept in float: it shares its weight with {readers[0].name}, which "
                        "accuracy control returned to float",
                    )
    return read_only_by(weights, names)


class Reading(NamedTuple):
    """One measurement: the gate's metric, and what the search ranks by (higher is better:
    the metric itself, oriented, or for agreement gates the SQNR of the outputs they read);
    for an agreement, the reads it counted (the fewest of the outputs that have it)."""

    value: float
    rank: float
    reads: float = math.inf


@dataclasses.dataclass(frozen=True)
class Bounds:
    """How far the control may go: measured runs of the model (the work); the share of the
    quantized layers' multiply-accumulates that may return to float untimed (the speed it gives
    up, estimated); and beyond that share, the latency over the original's that the result may
    reach, timed by ``slowdown`` (a model's latency over the original's; without it, or with
    ``latency_ratio`` 0, the MAC share is the bound)."""

    runs: int
    float_macs: float
    latency_ratio: float = 0.0
    slowdown: Callable[[ir.Model], float] | None = None

    @property
    def timed(self) -> bool:
        """Whether steps beyond the MAC share are timed rather than refused."""
        return self.latency_ratio > 0 and self.slowdown is not None

    @property
    def layer_savings(self) -> Callable[[ir.Model, Sequence[str]], dict[str, float] | None] | None:
        """Where steps are timed, what profiles the time INT8 saves per layer (the slowdown's
        ``layer_savings``, :class:`speed_check.Slowdown`); None otherwise."""
        return getattr(self.slowdown, "layer_savings", None) if self.timed else None


def check_gate(gate: Gate) -> None:
    """A :class:`SettingsError` when quantization cannot measure ``gate``'s metric."""
    if gate.metric not in MEASURABLE:
        raise SettingsError(
            f"quantize_int8 target: {gate.metric} cannot be measured during quantization; "
            f"use one of {', '.join(MEASURABLE)}"
        )


class _Measure:
    """The gate's metric of the model quantized at all anchors but those named, on fixed
    calibration feeds: the search's (``batches``), or the check's (the next batches, so that
    the layer the search picked as best among many noisy measurements is judged on data it was
    not picked on; as many as give every output channel ``CHANNEL_VALUES`` values, or
    ``AGREEMENT_POSITIONS`` positions for an agreement gate among ``gates``, at most
    ``CHECK_BATCHES``); counts its runs."""

    def __init__(
        self,
        model: ir.Model,
        anchors: Sequence[ir.Node],
        quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
        context: PassContext,
        gates: Sequence[Gate],
        batches: int,
    ) -> None:
        self.anchors = list(anchors)
        self.quantized_copy = quantized_copy
        self.context = context
        self.gate = gates[0]
        self.kinds = fidelity.OutputKinds.of(model)
        agreement = any(gate.metric in AGREEMENT_METRICS for gate in gates)
        # reads are counted over every batch the check may take: a detector's high thresholds
        # see a few scores per image, and counted on the search's batches they were not read
        # (nudenet: 0.906 of the score decisions at 0.3 on 32 batches, 0.84 at 0.8 on 102)
        first = _outputs(
            model, context.data.first_batches(CHECK_BATCHES if agreement else batches), context
        )
        per_batch = _reads(first, self.kinds) if agreement else _channel_values(first, self.kinds)
        needed = AGREEMENT_POSITIONS if agreement else CHANNEL_VALUES
        checks = min(max(batches, math.ceil(needed / per_batch)), CHECK_BATCHES)
        feeds = context.data.first_batches(batches + checks)
        self.feeds = _split(feeds, batches)
        # the reads an agreement gate counts on the check (none counted otherwise)
        self.check_reads = per_batch * len(self.feeds["check"]) if agreement else math.inf
        # the original's outputs where the pipeline gives it (the passes before this one err
        # too, and the gate judges the result against the original), else the model's own
        original = context.teacher if context.teacher is not None else model
        if original is model and len(first) >= len(feeds):  # measured already
            self.reference = _split(first[: len(feeds)], batches)
        else:
            self.reference = {key: _outputs(original, f, context) for key, f in self.feeds.items()}
        self.against_original = original is not model
        self.model = model
        self.runs = 0

    def held_to_own_error(self) -> None:
        """Measure against the model before quantization, not the original."""
        self.reference = {
            key: _outputs(self.model, f, self.context) for key, f in self.feeds.items()
        }
        self.against_original = False

    def copy(self, floated: Sequence[str]) -> ir.Model:
        """The model quantized with the ``floated`` anchors in float."""
        left = set(floated)
        return self.quantized_copy([node for node in self.anchors if node.name not in left])

    def __call__(self, floated: Sequence[str], on: str = "search") -> Reading:
        """The metric with the ``floated`` anchors in float (NaN where no output has it)."""
        self.runs += 1
        return self.reading(_outputs(self.copy(floated), self.feeds[on], self.context), on)

    def reading(self, result: Sequence[Feed], on: str) -> Reading:
        """The metric of a model's outputs ``result`` on the feeds named ``on``."""
        measured = fidelity.measure(self.reference[on], result, kinds=self.kinds)
        value = metric_of(measured, self.gate.metric)
        value = math.nan if value is None else value
        if self.ranked_by_sqnr:
            scores = self.gate.metric == "score_agreement"
            having = [m for m in measured.values() if getattr(m, self.gate.metric) is not None]
            read = [m.worst_channel_sqnr_db if scores else m.sqnr_db for m in having]
            reads = fidelity.counted_reads(having, self.gate.metric)
            return Reading(value, _oriented(min(read, default=math.nan), 1.0), reads)
        sign = {">=": 1.0, ">": 1.0, "<=": -1.0, "<": -1.0}.get(self.gate.op)
        return Reading(value, _oriented(value, sign) if sign else -self.gap(value))

    def holds(self, reading: Reading) -> bool:
        """Whether the gate holds on ``reading``; an agreement counted on ``reading.reads``
        only where it holds at its lower bound, or where every read agrees
        (:func:`counted_on`)."""
        if not self.gate.passes(reading.value):
            return False
        return self.gate.passes(counted_on(reading.value, reading.reads))

    def decided(self, reading: Reading) -> bool:
        """Whether the gate holds on ``reading`` as a decision to keep the result
        (:func:`gates.decided`): the search aims at the lower bound, but where the gate allows
        few disagreements among the reads, one read decides and the count itself is judged."""
        return decided(self.gate, reading.value, reading.reads)

    def said(self, reading: Reading, named: bool = True) -> str:
        """``reading`` in words: the gate's metric, and for an agreement the reads it counted
        and its lower bound."""
        said = f"{self.gate.metric} = {reading.value:.4g}" if named else f"{reading.value:.4g}"
        if math.isfinite(reading.reads):
            bound = agreement_bound(reading.value, reading.reads)
            said += f" of {reading.reads:.0f} reads, {bound:.4g} at its lower bound"
        return said

    @property
    def check_share(self) -> float:
        """The share of what one model's rank differs by between the search's batches and the
        check's that is the check's own noise, taking noise to fall as one over the root of
        the batches: a gain is measured on the check's batches alone (nudenet: 4 search
        batches against 22 differed 7.7 dB, of which 3.0 dB are the check's)."""
        search, check = len(self.feeds["search"]), len(self.feeds["check"])
        return math.sqrt(search / (search + check)) if check > search else 1.0

    @property
    def ranked_by_sqnr(self) -> bool:
        """Whether the search ranks by the read outputs' SQNR (agreement gates)."""
        return self.gate.metric in AGREEMENT_METRICS

    @property
    def counts_few(self) -> bool:
        """Whether the gate counts agreements on fewer reads than ``AGREEMENT_POSITIONS`` (the
        data had no more): too few to tell two models that both pass it apart."""
        return self.ranked_by_sqnr and self.check_reads < AGREEMENT_POSITIONS

    def measurable(self) -> bool:
        """Whether some output of the model has the gate's metric (float outputs, a classifier
        for top-1, probabilities for score_cosine ...)."""
        reference = self.reference["check"]
        measured = fidelity.measure(reference, reference, kinds=self.kinds)
        return metric_of(measured, self.gate.metric) is not None

    def gap(self, value: float) -> float:
        """How far ``value`` is from passing the gate (0 when it passes; NaN is infinitely
        far)."""
        if math.isnan(value):
            return math.inf
        if self.gate.op in (">=", ">"):
            return max(self.gate.threshold - value, 0.0)
        if self.gate.op in ("<=", "<"):
            return max(value - self.gate.threshold, 0.0)
        return abs(value - self.gate.threshold)

    def worth(self, new: Reading, current: Reading, spread: float) -> bool:
        """Whether ``new`` (a layer back in float) raises the rank by more than ``spread`` (the
        check's share of what the rank of one model differs by between the search's batches
        and the check's) and, ranked by the metric itself, closes at least ``MIN_GAIN`` of the
        gap that ``current`` leaves (a gain past the gate counts in the rank, not the gap): a
        layer in float costs speed, a crumb of fidelity or a gain within the noise is not worth
        it. Ranked by SQNR, the agreement may not fall either."""
        if self.ranked_by_sqnr:
            kept = self.gap(new.value) <= self.gap(current.value)
            return kept and new.rank - current.rank > spread
        gain = self.gap(current.value) - self.gap(new.value)
        return gain >= MIN_GAIN * self.gap(current.value) and new.rank - current.rank > spread


class Control(NamedTuple):
    """What accuracy control decided: the anchors to quantize, and the gates it could not hold
    within its bounds (each with what it measured last; empty where every gate held)."""

    anchors: list[ir.Node]
    missed: list[str]


def keep_harmful_float(
    model: ir.Model,
    anchors: list[ir.Node],
    quantized_copy: Callable[[Sequence[ir.Node]], ir.Model],
    context: PassContext,
    report: PassReport,
    *,
    gates: Sequence[Gate],
    batches: int,
    bounds: Bounds,
) -> Control:
    """The anchors to quantize: all but those returned to float until every one of ``gates``
    that the model's outputs can measure holds on the first ``batches`` calibration batches
    (the gates in turn, sharing ``bounds``; ``quantized_copy`` quantizes the given anchors of
    a copy); and the gates that did not hold."""
    measure = _Measure(model, anchors, quantized_copy, context, gates, batches)
    data = f"{len(measure.feeds['check'])} calibration batches"
    if context.data.is_random:
        data += f" of RANDOM data ({context.data.label})"
    if measure.against_original:
        _against_what_came_before(measure, gates, report)
    floated: list[str] = []
    measured = False
    missed: dict[Gate, tuple[int, Reading]] = {}  # each gate not held: layers float, reading
    for gate in gates:
        measure.gate = gate
        if measure.measurable():
            measured = True
            floated, reading = _float_until_held(measure, anchors, floated, report, bounds, data)
            if not measure.decided(reading):
                missed[gate] = len(floated), reading
    if not measured:
        metrics = ", ".join(gate.metric for gate in gates)
        report.notes.append(
            f"accuracy control: no output of this model has {metrics}; every layer stays quantized"
        )
    said = []
    for gate, (then, reading) in missed.items():  # a later gate's layers in float may hold it
        measure.gate = gate
        if len(floated) > then:
            reading = measure(floated, on="check")
        if not measure.decided(reading):
            said.append(f"{gate} ({measure.said(reading)})")
    return Control([node for node in anchors if node.name not in floated], said)


def _against_what_came_before(measure: _Measure, gates: Sequence[Gate], report: PassReport) -> None:
    """Hold the layers to the error they add where the model before quantization already
    misses a gate against the original (a pruning the user asked for): no layer in float
    could then hold it."""
    outputs = _outputs(measure.model, measure.feeds["check"], measure.context)  # once
    for gate in gates:
        measure.gate = gate
        if not measure.measurable():
            continue
        reading = measure.reading(outputs, "check")
        if not measure.holds(reading):
            report.notes.append(
                f"accuracy control: the model before quantization already misses {gate} "
                f"against the original ({measure.said(reading)}): the quantized layers are "
                "held to the error they add"
            )
            measure.held_to_own_error()
            return


def _float_until_held(
    measure: _Measure,
    anchors: list[ir.Node],
    floated: list[str],
    report: PassReport,
    bounds: Bounds,
    data: str,
) -> tuple[list[str], Reading]:
    """``floated`` and the anchors returned to float, most harmful first, until
    ``measure.gate`` holds, within ``bounds``; and the gate's last reading."""
    gate = measure.gate
    before = current = measure(floated, on="check")
    if measure.holds(before):
        report.notes.append(
            f"accuracy control: {gate} holds with "
            + (f"{len(floated)} layers in float" if floated else "every layer quantized")
            + f" ({measure.said(before)} on {data})"
        )
        return floated, before
    macs = {node.name: _macs(node) for node in anchors}
    budget = bounds.float_macs * sum(macs.values())
    costs = _costs(measure, anchors, bounds)
    by_cost = False  # whether a bisection halved by cost
    floated = list(floated)
    first = len(floated)
    spread = math.nan
    why = latency = ""
    while not measure.holds(current):
        spent = sum(macs[name] for name in floated)
        candidates = [
            node
            for node in anchors
            if node.name not in floated and (bounds.timed or spent + macs[node.name] <= budget)
        ]
        if not candidates:
            why = f"; no layer left to try within {bounds.float_macs:.0%} of the MACs in float"
            break
        split = costs
        needed = _search_runs(candidates, split) + 1 + math.isnan(spread)
        if costs is not None and measure.runs + needed > bounds.runs:
            split = None  # halves of like cost would take more runs: halves of like count
            needed = _search_runs(candidates, split) + 1 + math.isnan(spread)
        if measure.runs + needed > bounds.runs:
            why = f"; stopped at its bound of {bounds.runs} runs"
            break
        if math.isnan(spread):  # the rank's noise: the same model on the search's batches
            spread = abs(measure(floated).rank - before.rank) * measure.check_share
            spread = spread if math.isfinite(spread) else 0.0
        groups = _descent(candidates, floated, measure, split)
        by_cost = by_cost or split is not None
        found = groups[-1][0]
        chosen, new = groups[-1], measure([*floated, found.name], on="check")

        def worth(reading: Reading, current: Reading = current, spread: float = spread) -> bool:
            return measure.worth(reading, current, spread)

        def holds(reading: Reading) -> bool:
            return measure.holds(reading) and worth(reading)

        def keeps(reading: Reading, largest: Reading, current: Reading = current) -> bool:
            gain = reading.rank - current.rank
            return not measure.counts_few or gain >= HOLDING_SHARE * (largest.rank - current.rank)

        def fits(group: list[ir.Node], spent: float = spent) -> bool:  # untimed: the MAC share
            return bool(group) and (
                bounds.timed or spent + sum(macs[n.name] for n in group) <= budget
            )

        if not holds(new):
            # the error is spread: the fewest layers that hold it
            fitting = [g for g in groups[:-1] if fits(g)]
            held_by = _smallest_holding(fitting, floated, measure, holds, keeps, bounds.runs)
            if held_by is not None:
                chosen, new = held_by
        if not worth(new):  # the layer found gains nothing: some group the search passed may
            chosen, new = _best_gaining(
                [g for g in [*groups[:-1], *_passed_over(candidates, groups)] if fits(g)],
                (chosen, new),
                floated,
                measure,
                worth,
                bounds.runs,
            )
        if not worth(new):
            noise = (
                f"the read outputs' SQNR's noise {spread:.3g} dB"
                if measure.ranked_by_sqnr
                else f"the metric's noise {spread:.3g}"
            )
            why = (
                f"; stepped back from {found.name} ({gate.metric} {new.value:.4g} with it in "
                f"float too, {noise}): no one layer holds the error, nor any group of them "
                "within the bounds"
            )
            break
        if spent + sum(macs[n.name] for n in chosen) > budget:  # beyond the MAC share: timed
            paying = _paying(chosen, new, candidates, groups, floated, measure, worth, bounds)
            if isinstance(paying, float):
                why = (
                    f"; stepped back from {len(chosen)} layers from {chosen[0].name} on "
                    f"({gate.metric} {new.value:.4g} with them in float too): the result "
                    f"would run at {paying:.3g}x the original's latency, beyond its bound of "
                    f"{bounds.latency_ratio:g}x, and no half the search passed over gains "
                    "within it"
                )
                break
            chosen, new, ratio = paying
            latency = f", {ratio:.3g}x the original's latency"
        group = f" (one of {len(chosen)} layers returned together)" if len(chosen) > 1 else ""
        for node in chosen:
            floated.append(node.name)
            report.skip(
                node,
                f"kept in float by accuracy control for {gate}{group}: {gate.metric} "
                f"{current.value:.4g} -> {new.value:.4g} on {data}{latency}",
            )
        current = new
    held, kept = measure.holds(current), measure.decided(current)
    status = (
        "holds"
        if held
        else "holds as counted, not at its lower bound (one read decides at this count),"
        if kept
        else "NOT met"
    )
    share = sum(macs[name] for name in floated) / max(sum(macs.values()), 1)
    # A gate the result misses on calibration data is news even where the smaller held-out
    # set happens to pass it (ppocr_rec: 0.9 of 10 lines read the same here, 6 of 6 held out).
    report.notes.append(
        f"{'' if kept else 'WARNING: '}accuracy control: {gate} "
        f"{status} with {len(floated)} of {len(anchors)} layers in float "
        f"({share:.1%} of their MACs; {len(floated) - first} for this gate): {gate.metric} "
        f"{before.value:.4g} -> {measure.said(current, named=False)} on {data}{latency}; "
        f"{measure.runs} measured runs"
        f"{' (halves of like profiled INT8 savings)' if by_cost else ''}{why}"
    )
    return floated, current


def _costs(measure: _Measure, anchors: list[ir.Node], bounds: Bounds) -> dict[str, float] | None:
    """The time INT8 saves per anchor, profiled in the original and with every anchor
    quantized, where steps are timed and both profiles time every anchor; None otherwise (the
    bisection then halves by count)."""
    if bounds.layer_savings is None or len(anchors) < 2:
        return None
    savings = bounds.layer_savings(measure.copy([]), [node.name for node in anchors])
    return savings if savings and sum(savings.values()) > 0 else None


def _search_runs(candidates: list[ir.Node], costs: Mapping[str, float] | None) -> int:
    """The runs :func:`_descent` takes over ``candidates`` at most (two per halving, along
    its deepest path)."""

    def depth(group: list[ir.Node]) -> int:
        if len(group) < 2:
            return 0
        half = _half(group, costs)
        return 1 + max(depth(group[:half]), depth(group[half:]))

    return 2 * depth(candidates)


def _half(group: list[ir.Node], costs: Mapping[str, float] | None) -> int:
    """Where the bisection splits ``group`` (2 layers or more): the first half's length that
    brings its ``costs`` closest to half of the group's (the shorter on a tie), or half the
    count without costs."""
    if costs is None:
        return len(group) // 2
    total, spent = sum(costs[node.name] for node in group), 0.0
    best, best_miss = 1, math.inf
    for length in range(1, len(group)):
        spent += costs[group[length - 1].name]
        miss = abs(spent - total / 2)
        if miss < best_miss - 1e-9 * total:
            best, best_miss = length, miss
    return best


def _descent(
    candidates: list[ir.Node],
    floated: list[str],
    measure: _Measure,
    costs: Mapping[str, float] | None = None,
) -> list[list[ir.Node]]:
    """The groups a bisection over ``candidates`` (graph order) passes through, each a half
    of the one before (of like ``costs``, or count) and the one whose return to float (beside
    ``floated``) measured better on the search batches, down to the single most harmful layer
    (last)."""
    groups, group = [], candidates
    while len(group) > 1:
        half = _half(group, costs)
        first, second = group[:half], group[half:]
        a = measure([*floated, *(n.name for n in first)])
        b = measure([*floated, *(n.name for n in second)])
        group = second if b.rank > a.rank else first
        groups.append(group)
    return groups or [group]


def _paying(
    chosen: list[ir.Node],
    new: Reading,
    candidates: list[ir.Node],
    groups: list[list[ir.Node]],
    floated: list[str],
    measure: _Measure,
    worth: Callable[[Reading], bool],
    bounds: Bounds,
) -> tuple[list[ir.Node], Reading, float] | float:
    """``chosen`` (measured ``new``) with its latency ratio where the result still pays with it
    in float; otherwise, of the halves that the bisection of ``candidates`` into ``groups``
    passed over (each checked, smallest first, while runs are left), the best ranked that is
    ``worth`` it and pays, even where the gate does not hold with it yet (the next step goes on
    from there); otherwise ``chosen``'s ratio. The half not taken is the other place the error
    may sit (ddddocr_beta: the later half ranked best and would cost 0.90x the original's
    latency; the early Convs gain less, at 0.7x)."""
    ratio = _latency(measure.copy([*floated, *(n.name for n in chosen)]), bounds)
    if ratio <= bounds.latency_ratio:
        return chosen, new, ratio
    worthy = []
    for sibling in sorted((s for s in _passed_over(candidates, groups) if s), key=len):
        if measure.runs >= bounds.runs:
            break
        reading = measure([*floated, *(n.name for n in sibling)], on="check")
        if worth(reading):
            worthy.append((sibling, reading))
    for sibling, reading in sorted(worthy, key=lambda pair: -pair[1].rank):
        other = _latency(measure.copy([*floated, *(n.name for n in sibling)]), bounds)
        if other <= bounds.latency_ratio:
            return sibling, reading, other
    return ratio


def _latency(model: ir.Model, bounds: Bounds) -> float:
    """``model``'s latency over the original's; timed twice more, and the median taken, where
    one timing is within ``NEAR_BOUND`` of the bound."""
    assert bounds.slowdown is not None
    ratio = bounds.slowdown(model)
    if abs(ratio - bounds.latency_ratio) <= NEAR_BOUND * bounds.latency_ratio:
        ratio = statistics.median([ratio, bounds.slowdown(model), bounds.slowdown(model)])
    return ratio


def _passed_over(candidates: list[ir.Node], groups: list[list[ir.Node]]) -> list[list[ir.Node]]:
    """The halves the bisection of ``candidates`` into ``groups`` did not take, largest first."""
    return [
        [n for n in parent if n not in group]
        for parent, group in zip([candidates, *groups[:-1]], groups, strict=True)
    ]


def _best_gaining(
    groups: list[list[ir.Node]],
    fallback: tuple[list[ir.Node], Reading],
    floated: list[str],
    measure: _Measure,
    worth: Callable[[Reading], bool],
    runs: int,
) -> tuple[list[ir.Node], Reading]:
    """Of ``groups`` (smallest first, while runs are left), the best ranked whose return to
    float is ``worth`` it on the check batches, even where the gate does not hold with it yet;
    ``fallback`` where none is. The single layer a bisection ends on can gain nothing where
    the error is spread (ddddocr_beta: Conv_39 alone lowered the lines read the same from 0.95
    to 0.86, its 10 early Convs raise them) and the search would end with every layer INT8."""
    best = fallback
    for group in sorted(groups, key=len):
        if measure.runs >= runs:
            break
        reading = measure([*floated, *(n.name for n in group)], on="check")
        if worth(reading) and (not worth(best[1]) or reading.rank > best[1].rank):
            best = group, reading
    return best


def _smallest_holding(
    groups: list[list[ir.Node]],
    floated: list[str],
    measure: _Measure,
    holds: Callable[[Reading], bool],
    keeps: Callable[[Reading, Reading], bool],
    runs: int,
) -> tuple[list[ir.Node], Reading] | None:
    """The smallest of the nested ``groups`` (largest first) whose return to float ``holds``
    on the check batches (the gate, by more than its noise) and ``keeps`` what the largest's
    measured (its reading, then the largest's), by bisection over their sizes until the
    measure has made ``runs`` runs; None when the largest does not hold (or no run is
    left)."""
    found = largest = None
    low, high = 0, len(groups) - 1  # the candidates: groups[low..high], larger ones held
    while low <= high and measure.runs < runs:
        middle = low if found is None else (low + high + 1) // 2
        reading = measure([*floated, *(n.name for n in groups[middle])], on="check")
        largest = largest or reading
        if holds(reading) and keeps(reading, largest):
            found, low = (groups[middle], reading), middle + 1
        elif found is None:
            return None
        else:
            high = middle - 1
    return found


def _oriented(value: float, sign: float) -> float:
    """``value`` as a rank, higher better (NaN lowest)."""
    return -math.inf if math.isnan(value) else sign * value


def metric_of(measured: Mapping[str, fidelity.OutputFidelity], metric: str) -> float | None:
    """One gate metric over a measurement's outputs, as comparisons give it; None where no
    output has it."""
    return fidelity.gate_metrics(measured.values()).get(metric)


def _channel_values(outputs: Sequence[Feed], kinds: fidelity.OutputKinds) -> float:
    """The fewest values per output channel that a batch of ``outputs`` gives (as the
    fidelity measure finds channels)."""
    measured = fidelity.measure(outputs, outputs, kinds=kinds).values()
    values = min((m.elements / m.channels for m in measured), default=1.0)
    return max(values / len(outputs), 1.0)


def _reads(outputs: Sequence[Feed], kinds: fidelity.OutputKinds) -> float:
    """The fewest reads an agreement counts per batch of ``outputs``, over the outputs that
    have one: positions, or for a CTC sequence the lines (ppocr_rec: 40 steps, one line), or
    the scores at or above a threshold."""
    measured = fidelity.measure(outputs, outputs, kinds=kinds)
    reads = [m.reads for m in measured.values() if m.argmax_agreement is not None]
    reads += [m.score_reads for m in measured.values() if m.score_agreement is not None]
    reads += [m.neighbour_reads for m in measured.values() if m.neighbour_agreement is not None]
    return max(min(reads, default=1) / len(outputs), 1.0)


def _split(items: Sequence[Feed], batches: int) -> dict[str, Sequence[Feed]]:
    """The search's first ``batches`` of ``items`` and the check's rest (the search's where
    none are left)."""
    return {"search": items[:batches], "check": items[batches:] or items[:batches]}


def _outputs(model: ir.Model, feeds: Sequence[Feed], context: PassContext) -> list[Feed]:
    """The model's outputs on every feed, by name."""
    runner = TensorRunner(model, [v.name for v in model.graph.outputs], context.providers[0])
    return [runner(feed) for feed in feeds]


def _macs(node: ir.Node) -> float:
    """An anchor's multiply-accumulates per sample (free dimensions count as 1): what
    returning it to float gives up, relative to the others."""
    weight = constant_array(node.inputs[1])
    if node.op_type == "Gemm" and weight is not None:
        return float(weight.size)
    if node.op_type == "ConvTranspose" and weight is not None:
        return weight.size * _fixed(node.inputs[0].shape, 2)
    if node.op_type == "Conv" and weight is not None:
        return weight.size / weight.shape[0] * _fixed(node.outputs[0].shape, 1)
    shape = node.inputs[0].shape  # MatMul: the reduced axis is input 0's last
    depth = shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else 1
    return float(depth * _fixed(node.outputs[0].shape, 1))


def _fixed(shape: ir.Shape | None, start: int) -> int:
    """The product of the fixed dimensions of ``shape`` from axis ``start`` on."""
    return math.prod(d for d in (shape or [])[start:] if isinstance(d, int))
