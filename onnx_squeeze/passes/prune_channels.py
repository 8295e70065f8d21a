"""Structured channel pruning over dependency groups (:mod:`onnx_squeeze.channel_groups`).

Each prunable group is scored by an importance criterion (a registry: name -> function of the
group, the model and activation statistics), the channels to keep are chosen by a per-group
ratio, a global ratio ranked across groups, or a MACs target, rounded to a multiple for fast
kernels, and then removed from every member at once (``remove``) or masked to zero with shapes
unchanged (``zero``, for sensitivity studies).

Scores are normalised per member (divided by the member's mean) before they are averaged over a
group's members, so that layers of different scale count alike and scores of different groups
are comparable when ranked globally.

A MACs target is spread over the groups by measured sensitivity (the default): each group alone
loses 25/50/75% of its lowest-scored channels on a few calibration batches (one onnxruntime
session, producers' outputs masked), which prices every rounding step of every group at the
output error it adds per MAC it removes; the cheapest steps across all groups are taken until
the target is met, in rounds that are measured again on top of the channels already removed.
Groups whose channels matter more than they cost (residual streams read by many layers) are
thus pruned less than one uniform ratio would. Its cost is (groups x 3 x batches x rounds)
inferences; ``allocation: uniform`` is the cheap one-ratio alternative.

A latency target prices channels by time instead: each node's time from onnxruntime's profiler
(:mod:`onnx_squeeze.layer_times`) scales with its kept channels as MACs would. That estimate
misjudges narrow layers, so the plan is checked: the pruned model is timed beside the original
and the plan made again for a corrected target until it saves what was asked.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import analysis, latency_search, layer_times, runtime
from onnx_squeeze.calibration import RandomSource, StatisticsCollector, TensorStatistics
from onnx_squeeze.calibration.grams import GramSpec, Moments, collect_grams, layer_input_spec
from onnx_squeeze.channel_groups import (
    ChannelAnalysis,
    ChannelGroup,
    Layout,
    Member,
    Slot,
    analyze_channels,
)
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames, constant_array, set_input_constant
from onnx_squeeze.least_squares import reconstruction_importance
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.prepare import BN_SCALE_KEY, bn_scale
from onnx_squeeze.records import PassContext, PassReport

KEPT_CHANNELS_KEY = "onnx_squeeze.kept_channels"
MODES = ("remove", "zero")
ALLOCATIONS = ("sensitivity", "uniform")
# Groups with at least this many channels keep a multiple of 8 by default (fast SIMD kernels).
_ROUND_FROM = 32
_DEFAULT_MULTIPLE = 8
_EPSILON = 1e-12
# Ridge (relative to the mean input variance) of the refits that rank channels for the
# reconstruction criterion where a layer sees no more calibration rows than inputs, less in
# proportion where it sees more: on held-out data, 1e-3 generalised better than a bare fit.
_SELECTION_RIDGE = 1e-3

Statistics = Mapping[str, TensorStatistics]
# What a criterion reads beside the weights: activation statistics by tensor name, or the input
# Gram matrix of each consumer layer by node name.
Measurements = Mapping[str, "TensorStatistics | Moments"]
Criterion = Callable[[ChannelGroup, ir.Model, "Measurements | None"], np.ndarray]
NEEDS = ("statistics", "grams")


# ---------------------------------------------------------------------------------------------
# Importance criteria


@dataclasses.dataclass(frozen=True)
class _CriterionEntry:
    function: Criterion
    needs: str | None


CRITERIA: dict[str, _CriterionEntry] = {}


def criterion(name: str, *, needs: str | None = None) -> Callable[[Criterion], Criterion]:
    """Register an importance criterion: ``function(group, model, measured) -> scores``, one
    score per channel of the group (higher is more important). ``needs`` says what ``measured``
    holds, from calibration data: ``statistics`` (tensor name -> activation statistics of the
    consumers' inputs), ``grams`` (consumer node name -> :class:`Moments` of what its weight
    multiplies) or None (``measured`` is None)."""
    if needs not in (None, *NEEDS):
        raise ValueError(f"needs must be one of {NEEDS} or None, got {needs!r}")

    def register_criterion(function: Criterion) -> Criterion:
        CRITERIA[name] = _CriterionEntry(function, needs)
        return function

    return register_criterion


def _normalised(scores: np.ndarray) -> np.ndarray:
    return scores / max(float(np.mean(scores)), _EPSILON)


def _mean_of(parts: list[np.ndarray], channels: int) -> np.ndarray:
    """Member scores normalised and averaged; all ones when the group has none."""
    if not parts:
        return np.ones(channels)
    return np.mean([_normalised(p) for p in parts], axis=0)


def _channel_rows(array: np.ndarray, slot: Slot, offset: int, channels: int) -> np.ndarray:
    """Entries of ``channels`` channels from ``offset`` along the slot's axis, one row each."""
    moved = np.moveaxis(array, slot.axis, 0)
    rows = moved[offset * slot.repeat : (offset + channels) * slot.repeat]
    return rows.reshape(channels, -1).astype(np.float64)


def _weight_norms(group: ChannelGroup, order: int) -> list[np.ndarray]:
    parts = []
    for member in group.members:
        if not member.slot.weight:
            continue
        array = constant_array(member.slot.node.inputs[member.slot.input])
        if array is None:
            continue
        for offset in member.offsets:
            rows = _channel_rows(array, member.slot, offset, group.channels)
            parts.append(np.linalg.norm(rows, ord=order, axis=1))
    return parts


@criterion("l1")
def l1_norm(group: ChannelGroup, model: ir.Model, stats: Statistics | None) -> np.ndarray:
    """Sum of absolute weights of every producer, consumer and depthwise slice of a channel."""
    return _mean_of(_weight_norms(group, 1), group.channels)


@criterion("l2")
def l2_norm(group: ChannelGroup, model: ir.Model, stats: Statistics | None) -> np.ndarray:
    """Euclidean norm of the same slices as ``l1``."""
    return _mean_of(_weight_norms(group, 2), group.channels)


@criterion("bn_scale")
def bn_scale_criterion(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """Network slimming: ``|gamma| / sqrt(var + eps)`` of the group's BatchNormalizations, or
    the scale kept on producers where prepare folded them; groups without BN use ``l2``."""
    parts = []
    for atom in group.atoms:
        scale = bn_scale(atom.producer) if atom.producer is not None else None
        if scale is not None:
            parts.append(np.abs(scale[atom.start : atom.start + atom.length]).astype(np.float64))
    for member in group.members:
        node = member.slot.node
        if node.op_type != "BatchNormalization" or member.slot.input != 1:
            continue
        gamma, var = (constant_array(node.inputs[i]) for i in (1, 4))
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        scale = np.abs(gamma) / np.sqrt(var.astype(np.float64) + epsilon)
        parts.extend(scale[o : o + group.channels] for o in member.offsets)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


def _consumer_statistics(group: ChannelGroup, stats: Statistics, pick) -> list[np.ndarray]:
    parts = []
    for member in group.members:
        if member.slot.role != "consumer" or member.slot.repeat != 1:
            continue
        found = stats.get(member.slot.node.inputs[0].name or "")
        if found is not None and found.channels is not None:
            values = pick(found.channels)
            parts.extend(values[o : o + group.channels] for o in member.offsets)
    return parts


@criterion("activation", needs="statistics")
def mean_activation(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """Mean absolute activation entering the group's consumers (calibration data)."""
    parts = _consumer_statistics(group, stats or {}, lambda c: c.abs_mean)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


@criterion("apoz", needs="statistics")
def apoz(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """One minus the average percentage of zeros (after ReLU) entering the consumers."""
    parts = _consumer_statistics(group, stats or {}, lambda c: 1.0 - c.zero_fraction + 1e-3)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


def _consumer_matrix(slot: Slot) -> tuple[np.ndarray, int] | None:
    """A consumer's weight as (input features, outputs), features channel-major, and how many
    features each input channel spans (Conv kernel taps, or ``repeat`` after a Flatten)."""
    node = slot.node
    weight = constant_array(node.inputs[slot.input])
    if weight is None or slot.input != 1:
        return None
    if node.op_type == "Conv" and slot.axis == 1 and slot.repeat == 1:
        return weight.reshape(weight.shape[0], -1).T, math.prod(weight.shape[2:])
    if node.op_type in ("Gemm", "MatMul") and weight.ndim == 2:
        matrix = weight if slot.axis == 0 else weight.T
        return matrix, slot.repeat
    return None


def _compensating_consumers(group: ChannelGroup) -> list[tuple[Member, GramSpec]]:
    """Members whose weight multiplies the group's channels, with the input Gram they need:
    one-group Convs, Gemms and MatMuls reading the channels on their reduction axis."""
    found = []
    for member in group.members:
        slot = member.slot
        if slot.role != "consumer" or not slot.weight or not slot.node.name:
            continue
        weight = constant_array(slot.node.inputs[slot.input])
        spec = layer_input_spec(slot.node, weight.shape) if weight is not None else None
        if spec is not None and _consumer_matrix(slot) is not None:
            found.append((member, spec))
    return found


def gram_specs(groups: list[ChannelGroup]) -> dict[str, GramSpec]:
    """Consumer node name -> the input Gram the ``reconstruction`` criterion reads."""
    return {
        member.slot.node.name: spec
        for group in groups
        for member, spec in _compensating_consumers(group)
    }


@criterion("reconstruction", needs="grams")
def reconstruction(group: ChannelGroup, model: ir.Model, grams: Measurements | None):
    """ThiNet with compensation: channels in the order greedy elimination on each consumer's
    input Gram removes them (the one whose loss the consumer can best make up by refitting the
    rest first, :func:`~onnx_squeeze.least_squares.reconstruction_importance`); pair with the
    ``reconstruct`` pass, which does that refit. Groups without such a consumer use ``l2``."""
    parts = []
    for member, _ in _compensating_consumers(group):
        moments = (grams or {}).get(member.slot.node.name)
        if moments is None:
            continue
        matrix, taps = _consumer_matrix(member.slot)
        ridge = _SELECTION_RIDGE * min(1.0, len(matrix) / max(moments.rows, 1))
        scores = reconstruction_importance(moments.gram, matrix, taps=taps, ridge=ridge)
        parts.extend(scores[o : o + group.channels] for o in member.offsets)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, grams)


def statistics_tensors(groups: list[ChannelGroup], channels: ChannelAnalysis) -> dict[str, int]:
    """Tensor name -> channel axis of the consumer inputs the activation criteria read."""
    wanted: dict[str, int] = {}
    for group in groups:
        for member in group.members:
            value = member.slot.node.inputs[0]
            layout = channels.layouts.get(value) if value is not None else None
            if member.slot.role == "consumer" and layout and layout.repeat == 1 and value.name:
                wanted[value.name] = layout.axis
    return wanted


# ---------------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class PruneChannelsSettings:
    """``ratio``: share of channels removed from each prunable group (ranked across all groups
    when ``global_ranking``); ``macs_target``: share of the model's MACs to remove instead;
    ``round_to``: kept counts are multiples of this (0: 8 for groups of 32+ channels, else 1);
    ``protect``: node names whose groups are left alone. ``allocation`` spreads a MACs target:
    ``sensitivity`` (each group measured alone on ``sensitivity_batches`` calibration batches,
    random data when none is given; cheapest output error per MAC first, measured again on top
    of the channels already removed in each of ``sensitivity_rounds`` parts) or ``uniform`` (one
    ratio for every group). ``split_heads`` follows channels through the Reshapes that split
    them into attention heads, so the head size shrinks (same in every head; queries and keys
    together). ``latency_target``: share of the model's time (``latency_batch`` samples, 1
    thread) to remove instead of MACs: channels priced by each node's profiled time, the plan
    checked by timing the pruned model and made again until it saves the target."""

    mode: str = "remove"
    criterion: str = "l1"
    ratio: float = 0.0
    global_ranking: bool = False
    macs_target: float = 0.0
    latency_target: float = 0.0
    latency_batch: int = 1
    min_channels: int = 1
    round_to: int = 0
    protect: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = 8
    allocation: str = "sensitivity"
    sensitivity_batches: int = 4
    sensitivity_rounds: int = 2
    split_heads: bool = True


@register
class PruneChannels(Pass):
    """Remove (or zero) whole channels, group by group."""

    name = "prune_channels"
    Settings = PruneChannelsSettings

    def validate(self) -> None:
        s = self.settings
        if s.mode not in MODES:
            raise SettingsError(f"prune_channels: mode must be one of {MODES}, got {s.mode!r}")
        if s.criterion not in CRITERIA:
            known = ", ".join(sorted(CRITERIA))
            raise SettingsError(f"prune_channels: unknown criterion {s.criterion!r}; use {known}")
        for field in ("ratio", "macs_target", "latency_target"):
            if not 0.0 <= float(getattr(s, field)) < 1.0:
                raise SettingsError(
                    f"prune_channels: {field} must be in [0, 1), got {getattr(s, field)}"
                )
        if s.allocation not in ALLOCATIONS:
            raise SettingsError(
                f"prune_channels: allocation must be one of {ALLOCATIONS}, got {s.allocation!r}"
            )
        if sum(1 for target in (s.ratio, s.macs_target, s.latency_target) if target) > 1:
            raise SettingsError(
                "prune_channels: set one of ratio, macs_target and latency_target, not several"
            )
        counts = (
            s.latency_batch,
            s.min_channels,
            s.calibration_batches,
            s.sensitivity_batches,
            s.sensitivity_rounds,
        )
        if min(counts) < 1 or s.round_to < 0:
            raise SettingsError(
                "prune_channels: latency_batch, min_channels, calibration_batches, "
                "sensitivity_batches and sensitivity_rounds must be >= 1, round_to >= 0"
            )
        if isinstance(s.protect, str):
            s.protect = [s.protect]

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        settings = self.settings
        channels = analyze_channels(model, split_heads=settings.split_heads)
        self._protect(model, channels.groups)
        prunable = [g for g in channels.groups if not g.frozen]
        for group in channels.groups:
            if group.frozen:
                report.skip(group.producers[0], f"group {group.id} frozen: {group.frozen}")
        report.notes.append(
            f"{len(prunable)} prunable channel groups, {len(channels.groups) - len(prunable)} frozen"
        )
        target = settings.macs_target or settings.latency_target
        if not prunable or not (settings.ratio or target):
            return
        scores = self._scores(model, context, channels, prunable)
        macs = _Costs.macs(model, channels, context.input_shapes(model))
        timing = _Timing(model, context, settings) if settings.latency_target else None
        costs = _Costs.latency(model, channels, timing.original) if timing else macs
        planner = _Planner(channels, prunable, scores, settings, costs, macs)
        if not target:
            plan = planner.plan(settings.ratio)
        elif settings.allocation == "uniform":
            plan = planner.for_target(target, report)
            replan = functools.partial(planner.for_target, report=PassReport(self.name))
        else:
            plan, replan = self._allocate(model, context, channels, planner, report)
        if timing is not None and plan:
            plan = timing.corrected(plan, replan, report)
        if not plan:
            report.notes.append("no group lost a channel at these settings")
            return
        _Rewriter(model, channels, plan, settings.mode, macs.nodes, report).run()

    def _allocate(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        planner: _Planner,
        report: PassReport,
    ) -> tuple[dict[int, np.ndarray], Callable[[float], dict[int, np.ndarray]]]:
        """The MACs or latency target reached in ``sensitivity_rounds`` equal parts, the
        sensitivities measured again on top of the channels already removed before each part
        (NetAdapt-like: later parts see how earlier ones changed the network). Also returns a
        function that plans the last part again for another target, on the same curves."""
        s = self.settings
        keep: dict[int, int] = {}
        measure = _CachedSensitivity(
            functools.partial(_Sensitivity, model, channels, planner, context.providers[0]),
            lambda: self._sensitivity_feeds(model, context, report),
            context.cache,
            (
                "prune_channels.sensitivity",
                tuple((g.name, g.channels) for g in planner.groups),
                (s.criterion, s.min_channels, s.round_to, s.sensitivity_batches),
                id(context.calibration),
            ),
        )
        goal = s.macs_target or s.latency_target
        start: dict[int, int] = {}
        for part in range(1, s.sensitivity_rounds + 1):
            start, curves = keep, measure.curves(keep)
            keep = planner.keep_for(goal * part / s.sensitivity_rounds, curves, keep)
        plan = planner.plan_counts(keep)
        removed = planner.removed(plan)
        if removed < goal:
            report.notes.append(
                f"{planner.costs.unit} target {goal:.0%} not reachable: removed {removed:.1%}"
            )
        elif plan:
            shares = [1 - len(kept) / planner.group(g).channels for g, kept in plan.items()]
            report.notes.append(
                f"{planner.costs.unit} target {goal:.0%} by sensitivity: {len(plan)} groups "
                f"pruned, {min(shares):.0%}-{max(shares):.0%} of their channels, removes "
                f"{removed:.1%}{planner.macs_note(plan)}"
            )
        return plan, lambda target: planner.plan_counts(planner.keep_for(target, curves, start))

    def _sensitivity_feeds(
        self, model: ir.Model, context: PassContext, report: PassReport
    ) -> list[dict[str, np.ndarray]]:
        """The first calibration batches, or random data shaped by the inputs when none."""
        count = self.settings.sensitivity_batches
        if context.data.supplied:
            return list(itertools.islice(iter(context.calibration), count))
        report.notes.append("sensitivity measured on random inputs (no calibration data)")
        shapes = context.input_shapes(model)
        return list(RandomSource(runtime.input_specs(model), count=count, seed=1, overrides=shapes))

    def _protect(self, model: ir.Model, groups: list[ChannelGroup]) -> None:
        protect = set(self.settings.protect)
        missing = protect - {node.name for node in model.graph}
        if missing:
            raise SettingsError(
                f"prune_channels: protect names {sorted(missing)}, not nodes of the main graph"
            )
        for group in groups:
            hit = sorted(group.node_names() & protect)
            if hit and not group.frozen:
                group.frozen = f"protected ({', '.join(hit)})"

    def _scores(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
    ) -> dict[int, np.ndarray]:
        entry = CRITERIA[self.settings.criterion]
        measured = None
        if entry.needs is not None:
            if not context.data.supplied:
                raise SettingsError(
                    f"prune_channels: criterion {self.settings.criterion!r} needs calibration "
                    "data; pass --calib DATA or use criterion l1, l2 or bn_scale"
                )
            measure = self._statistics if entry.needs == "statistics" else self._grams
            measured = measure(model, context, channels, groups)
        return {g.id: np.asarray(entry.function(g, model, measured), np.float64) for g in groups}

    def _statistics(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
    ) -> Statistics:
        axes = statistics_tensors(groups, channels)
        if not axes:
            return {}
        key = (
            "prune_channels.channels",
            tuple(sorted(axes.items())),
            self.settings.calibration_batches,
        )
        if key not in context.cache:
            collector = StatisticsCollector(
                model,
                list(axes),
                channel_axis=axes,
                keep=("channels",),
                provider=context.providers[0],
            )
            context.cache[key] = collector.collect(
                context.calibration, limit=self.settings.calibration_batches, progress=False
            )
        return context.cache[key]

    def _grams(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
    ) -> Mapping[str, Moments]:
        specs = gram_specs(groups)
        moments = collect_grams(
            model,
            specs.values(),
            context.calibration,
            provider=context.providers[0],
            batches=self.settings.calibration_batches,
            cache=context.cache,
            label="prune_channels consumer input Grams",
        )
        return {name: moments[spec] for name, spec in specs.items()}


# ---------------------------------------------------------------------------------------------
# Planning: how many channels each group keeps, and which


@dataclasses.dataclass(frozen=True)
class _Costs:
    """What channels are priced by: a cost per node (``id(node)``), the lists of atoms whose
    kept shares scale it (multiplied), and the model's total (which may include costs no
    channel scales). ``unit`` names it in notes."""

    unit: str
    nodes: dict[int, float]
    atoms: dict[int, list[tuple[int, ...]]]
    total: float

    @staticmethod
    def _weight_atoms(channels: ChannelAnalysis) -> dict[int, list[tuple[int, ...]]]:
        atoms: dict[int, list[tuple[int, ...]]] = {}
        for slot in channels.slots:
            if slot.weight:
                atoms.setdefault(id(slot.node), []).append(slot.atoms)
        return atoms

    @classmethod
    def macs(
        cls, model: ir.Model, channels: ChannelAnalysis, shapes: Mapping[str, Sequence[int]]
    ) -> _Costs:
        """MACs of the layers with weights, which scale with their weights' kept channels,
        at the run's input ``shapes``."""
        summary = analysis.analyze(model, shapes=shapes)
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        macs = {id(n): float(c.macs) for n, c in zip(nodes, summary.nodes, strict=True)}
        return cls("MACs", macs, cls._weight_atoms(channels), max(float(summary.macs), 1.0))

    @classmethod
    def latency(
        cls, model: ir.Model, channels: ChannelAnalysis, times: layer_times.LayerTimes
    ) -> _Costs:
        """Measured node times: a layer with weights scales like its MACs, any other node with
        the kept share of its output's channels; time no node owns stays."""
        weights = cls._weight_atoms(channels)
        nodes, atoms = {}, {}
        for node, time in times.nodes.items():
            nodes[id(node)] = time
            layout = channels.layouts.get(node.outputs[0]) if node.outputs else None
            atoms[id(node)] = weights.get(id(node)) or ([layout.atoms] if layout else [])
        return cls("latency", nodes, atoms, max(times.total, 1e-9))


# How often a latency plan is made again for a corrected target, and how far the pruned model's
# measured saving may fall short of the target or exceed it.
_LATENCY_CORRECTIONS = 6
_LATENCY_TOLERANCE = 0.01
_LATENCY_OVERSHOOT = 0.03


class _Timing:
    """Times of the model and of pruned copies, on one feed: the first calibration batch
    (random data when none) resized to ``latency_batch`` samples."""

    def __init__(self, model: ir.Model, context: PassContext, settings: PruneChannelsSettings):
        batch, specs = settings.latency_batch, runtime.input_specs(model)
        if context.data.supplied:
            first = next(iter(context.calibration))
            self.feed = {s.name: _resized(first[s.name], batch) for s in specs if s.name in first}
        else:
            shapes = {n: (batch, *d[1:]) for n, d in context.input_shapes(model).items()}
            self.feed = next(iter(RandomSource(specs, count=batch, seed=1, overrides=shapes)))
        self.model, self.settings, self.provider = model, settings, context.providers[0]
        self.original = layer_times.measure(model, self.feed, provider=self.provider)
        self.session = runtime.create_session(model, self.provider, threads=1)

    def removed(self, plan: Mapping[int, np.ndarray]) -> float | None:
        """Share of the time that a copy pruned by ``plan`` saves: both timed whole, interleaved
        on one thread, as a deployment runs them (None when the copy's channel groups do not
        match the model's)."""
        pruned = self.model.clone()
        channels = analyze_channels(pruned, split_heads=self.settings.split_heads)
        groups = {g.id: g.channels for g in channels.groups}
        if any(groups.get(g) is None or groups[g] < len(kept) for g, kept in plan.items()):
            return None
        _Rewriter(pruned, channels, dict(plan), "remove", {}, PassReport("probe")).run()
        before, after = latency_search.median_times(
            [self.session, pruned], self.feed, self.provider
        )
        return 1 - after / before

    def corrected(
        self,
        plan: dict[int, np.ndarray],
        replan: Callable[[float], dict[int, np.ndarray]],
        report: PassReport,
    ) -> dict[int, np.ndarray]:
        """The plan whose pruned model, timed, saves the target or just over it. Time does not
        fall linearly with channels (narrow layers keep their per-call overhead, SIMD blocks
        round channels up), so the linear estimate misjudges what pruning saves: the target the
        plan is made for is corrected in proportion to the measured shortfall or excess (at
        most by half at a time), then by bisection between the nearest plans under and over.
        Without a plan in tolerance, the one closest to the target is kept."""
        goal = self.settings.latency_target
        achieved = self.removed(plan)
        if achieved is None:
            return plan
        tried = [(goal, achieved, plan)]  # (target planned for, time saved, plan)
        for _ in range(_LATENCY_CORRECTIONS):
            if any(_in_tolerance(t[1], goal) for t in tried):
                break
            under = [t for t in tried if t[1] < goal]
            over = [t for t in tried if t[1] > goal]
            if under and over:
                low, high = max(under, key=lambda t: t[0]), min(over, key=lambda t: t[0])
                asked = (low[0] + high[0]) / 2
            else:
                last = tried[-1]
                factor = min(1.5, max(2 / 3, goal / max(last[1], 1e-6)))
                asked = min(0.95, last[0] * factor)
            again = replan(asked)
            known = [t[1] for t in tried if _same_plan(again, t[2])]
            measured = known[0] if known else self.removed(again)
            if measured is None:
                break
            tried.append((asked, measured, again))  # a known plan: its target moves on
        fitting = [t for t in tried if _in_tolerance(t[1], goal)]
        asked, achieved, plan = (
            min(fitting, key=lambda t: t[1])
            if fitting
            else min(tried, key=lambda t: abs(t[1] - goal))
        )
        planned = f", planned for {asked:.0%}" if abs(asked - goal) > 1e-9 else ""
        report.notes.append(
            f"latency target {goal:.0%}: the pruned model takes {achieved:.1%} less time "
            f"(timed at batch {self.settings.latency_batch}, 1 thread{planned})"
        )
        return plan


def _in_tolerance(achieved: float, goal: float) -> bool:
    return goal - _LATENCY_TOLERANCE <= achieved <= goal + _LATENCY_OVERSHOOT


def _same_plan(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with ``rows`` entries along its first axis (repeated when it has fewer)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] == rows:
        return array
    return np.resize(array, (rows, *array.shape[1:]))


class _Planner:
    def __init__(
        self,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
        scores: dict[int, np.ndarray],
        settings: PruneChannelsSettings,
        costs: _Costs,
        macs: _Costs,
    ) -> None:
        self.channels = channels
        self.groups = groups
        self.scores = scores
        self.settings = settings
        self.costs = costs
        self.macs = macs

    def multiple(self, group: ChannelGroup) -> int:
        if self.settings.round_to:
            return self.settings.round_to
        return _DEFAULT_MULTIPLE if group.channels >= _ROUND_FROM else 1

    def keep_count(self, group: ChannelGroup, wanted: int) -> int:
        """``wanted`` rounded to the group's multiple, at least ``min_channels``, at most all."""
        step = self.multiple(group)
        rounded = math.floor(wanted / step + 0.5) * step if step > 1 else wanted
        floor = min(max(self.settings.min_channels, step), group.channels)
        return min(group.channels, max(rounded, floor))

    def plan(self, ratio: float) -> dict[int, np.ndarray]:
        """Group id -> kept channel indices (sorted) for groups that lose channels."""
        if self.settings.global_ranking:
            wanted = self._global_keep(ratio)
        else:
            wanted = {g.id: g.channels - math.floor(ratio * g.channels + 1e-9) for g in self.groups}
        return self.plan_counts({g.id: self.keep_count(g, wanted[g.id]) for g in self.groups})

    def best_channels(self, group: ChannelGroup, keep: int) -> np.ndarray:
        """The ``keep`` highest-scored channels of a group, sorted."""
        order = np.argsort(-self.scores[group.id], kind="stable")
        return np.sort(order[:keep])

    def plan_counts(self, keep: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Group id -> kept channel indices for the groups whose count is below their size."""
        return {
            g.id: self.best_channels(g, keep[g.id])
            for g in self.groups
            if keep.get(g.id, g.channels) < g.channels
        }

    def removable_counts(self, group: ChannelGroup) -> list[int]:
        """Kept counts a group may take, from all its channels down to the floor, one rounding
        step apart."""
        counts = [group.channels]
        for wanted in range(group.channels - 1, 0, -1):
            keep = self.keep_count(group, wanted)
            if keep < counts[-1]:
                counts.append(keep)
        return counts

    def _global_keep(self, ratio: float) -> dict[int, int]:
        everything = np.concatenate([self.scores[g.id] for g in self.groups])
        removed = math.floor(ratio * everything.size)
        if removed == 0:
            return {g.id: g.channels for g in self.groups}
        threshold = np.partition(everything, removed - 1)[removed - 1]
        return {g.id: int(np.count_nonzero(self.scores[g.id] > threshold)) for g in self.groups}

    def factor(self, atoms: tuple[int, ...], plan: Mapping[int, np.ndarray]) -> float:
        """Kept share of the channels along an axis holding ``atoms``."""
        total = kept = 0
        for atom in atoms:
            length = self.channels.atom_length(atom)
            total += length
            group = self.channels.group_of.get(atom)
            kept += len(plan[group]) if group in plan else length
        return kept / total if total else 1.0

    def removed(self, plan: Mapping[int, np.ndarray], costs: _Costs | None = None) -> float:
        """Share of the total cost (the planner's, or ``costs``) that ``plan`` removes."""
        costs = costs or self.costs
        removed = 0.0
        for key, cost in costs.nodes.items():
            kept = math.prod(self.factor(atoms, plan) for atoms in costs.atoms.get(key, ()))
            removed += cost * (1 - kept)
        return removed / costs.total

    def macs_note(self, plan: Mapping[int, np.ndarray]) -> str:
        """``, N% of MACs`` when the plan is priced by something else."""
        return "" if self.costs is self.macs else f", {self.removed(plan, self.macs):.1%} of MACs"

    def for_target(self, target: float, report: PassReport) -> dict[int, np.ndarray]:
        """The smallest ratio (by bisection) whose plan removes at least ``target`` of the
        cost."""
        unit = self.costs.unit
        low, high = 0.0, 0.99
        best = self.plan(high)
        reached = self.removed(best)
        if reached < target:
            report.notes.append(f"{unit} target {target:.0%} not reachable: removed {reached:.1%}")
            return best
        for _ in range(30):
            middle = (low + high) / 2
            plan = self.plan(middle)
            if self.removed(plan) >= target:
                high, best = middle, plan
            else:
                low = middle
        report.notes.append(
            f"{unit} target {target:.0%}: ratio {high:.3f} removes {self.removed(best):.1%}"
            + self.macs_note(best)
        )
        return best

    def keep_for(
        self, target: float, errors: Mapping[int, ErrorCurve], start: Mapping[int, int]
    ) -> dict[int, int]:
        """Kept counts, from ``start``, that remove ``target`` of the cost where output error
        per cost is cheapest (all steps taken when the target is out of reach).

        Every rounding step of every group (from its lowest-scored channels up) is priced at its
        added output error (``errors[group](share removed)``, measured on calibration data)
        divided by the MACs it removes; steps are taken cheapest first across all groups
        (prices made non-decreasing within a group, so each group loses a prefix of its order)
        until the target is met: a Lagrangian allocation under additive errors. Steps beyond
        the largest share measured are taken only when the measured ones do not suffice.
        """
        steps = [s for g in self.groups for s in self._priced_steps(g, errors[g.id], start)]
        steps.sort(key=lambda step: (step.extrapolated, step.price))  # stable: groups in order
        low, high = 0, len(steps)
        while low < high:
            middle = (low + high) // 2
            if self.removed(self.plan_counts(_counts_after(steps, middle, start))) >= target:
                high = middle
            else:
                low = middle + 1
        return _counts_after(steps, high, start)

    def group(self, group_id: int) -> ChannelGroup:
        return next(g for g in self.groups if g.id == group_id)

    def channel_cost(self, group: ChannelGroup, start: Mapping[int, int]) -> float:
        """Share of the model's cost one more channel of ``group`` costs once the groups have
        ``start`` channels (half of the group's remaining channels removed)."""
        before = start.get(group.id, group.channels)
        keep = self.keep_count(group, before // 2)
        if keep >= before:
            return 0.0
        base = self.removed(self.plan_counts(start))
        removed = self.removed(self.plan_counts({**start, group.id: keep})) - base
        return removed / (before - keep)

    def _priced_steps(
        self, group: ChannelGroup, error: ErrorCurve, start: Mapping[int, int]
    ) -> list[_Step]:
        """Each rounding step of a group below its ``start`` count, priced at its added error
        per cost removed."""
        cost = self.channel_cost(group, start)
        if cost <= 0:
            return []
        before = start.get(group.id, group.channels)
        counts = [count for count in self.removable_counts(group) if count <= before]
        steps, price = [], 0.0
        for before, after in itertools.pairwise(counts):
            share = 1 - after / group.channels
            added = error(share) - error(1 - before / group.channels)
            price = max(price, added / (cost * (before - after)))
            steps.append(_Step(share > error.measured_up_to + 1e-9, price, group.id, after))
        return steps


@dataclasses.dataclass(frozen=True)
class _Step:
    """Removing channels from one group down to ``keep``; steps past the measured shares
    (``extrapolated``) come after all measured ones, whatever their price."""

    extrapolated: bool
    price: float
    group: int
    keep: int


# ---------------------------------------------------------------------------------------------
# Sensitivity: output error when one group alone loses channels


class _CachedSensitivity:
    """Error curves kept in a cache (the pass context's) under ``key`` plus the starting
    counts, so that other targets on the same model reuse them; the onnxruntime session and the
    feeds are made only when a curve must be measured."""

    def __init__(
        self,
        make: Callable[[], _Sensitivity],
        feeds: Callable[[], list[dict]],
        cache: dict,
        key: tuple,
    ) -> None:
        self.make, self.make_feeds, self.cache, self.key = make, feeds, cache, key
        self.sensitivity: _Sensitivity | None = None
        self.feeds: list[dict] = []

    def curves(self, start: Mapping[int, int]) -> dict[int, ErrorCurve]:
        key = (*self.key, tuple(sorted(start.items())))
        if key not in self.cache:
            if self.sensitivity is None:
                self.sensitivity, self.feeds = self.make(), self.make_feeds()
            self.cache[key] = self.sensitivity.curves(self.feeds, start)
        return self.cache[key]


# Shares of a group's channels removed when its sensitivity is measured.
SENSITIVITY_SHARES = (0.25, 0.5, 0.75)


class _Sensitivity:
    """Measures, on a few calibration batches, how much the model's outputs change when one
    group alone loses its lowest-scored channels. Each producer's output is multiplied by a 0/1
    mask fed as a graph input, so one onnxruntime session (weights still constant) serves every
    measurement; masking the output equals zeroing the producer's weights and biases, and
    approximates removal where an unfused BatchNormalization adds a per-channel offset after."""

    def __init__(
        self, model: ir.Model, channels: ChannelAnalysis, planner: _Planner, provider: str
    ) -> None:
        self.channels = channels
        self.planner = planner
        producers = {id(p): p for g in planner.groups for p in g.producers}
        self.layouts = [
            (node, channels.layouts[node.outputs[0]])
            for node in model.graph
            if id(node) in producers and node.outputs[0] in channels.layouts
        ]
        self.session = runtime.create_session(self._masked(model), provider)

    def _masked(self, model: ir.Model) -> ir.Model:
        """A clone whose producers' outputs are multiplied by inputs ``onnx_squeeze.mask.<i>``."""
        clone = model.clone()
        twin = dict(zip(map(id, model.graph), clone.graph, strict=True))
        for index, (node, layout) in enumerate(self.layouts):
            output = twin[id(node)].outputs[0]
            uses = list(output.uses())
            dtype = _weight_dtype(node)
            mask = ir.Value(
                name=f"onnx_squeeze.mask.{index}",
                type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                shape=ir.Shape(self._mask(layout, {}).shape),
            )
            clone.graph.inputs.append(mask)
            product = ir.node("Mul", [output, mask], name=f"onnx_squeeze.mask_mul.{index}")
            clone.graph.insert_after(twin[id(node)], product)
            for user, position in uses:
                user.replace_input_with(position, product.outputs[0])
        return clone

    def _mask(self, layout: Layout, plan: Mapping[int, np.ndarray]) -> np.ndarray:
        kept, length = kept_indices(self.channels, plan, layout.atoms, layout.repeat)
        mask = np.zeros(length, dtype=np.float32)
        mask[kept] = 1
        return mask.reshape(length, *[1] * (-layout.axis - 1))

    def _masks(self, plan: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            f"onnx_squeeze.mask.{index}": self._mask(layout, plan).astype(_weight_dtype(node))
            for index, (node, layout) in enumerate(self.layouts)
        }

    def _outputs(self, feeds: list[dict], plan: Mapping[int, np.ndarray]) -> list[list]:
        masks = self._masks(plan)
        return [self.session.run(None, {**feed, **masks}) for feed in feeds]

    def curves(self, feeds: list[dict], start: Mapping[int, int]) -> dict[int, ErrorCurve]:
        """Group id -> output error (squared, relative to the output energy, summed over the
        outputs) against the share of its channels removed, each group measured alone on top
        of the kept counts ``start``: the error it adds to theirs against the original outputs
        (the first point is where ``start`` leaves it)."""
        base = self.planner.plan_counts(start)
        reference = self._outputs(feeds, {})
        floor = _relative_error(reference, self._outputs(feeds, base)) if base else 0.0
        curves = {}
        for group in self.planner.groups:
            before = start.get(group.id, group.channels)
            shares, errors = [1 - before / group.channels], [0.0]
            for share in SENSITIVITY_SHARES:
                keep = self.planner.keep_count(group, round((1 - share) * before))
                if keep >= before or 1 - keep / group.channels <= shares[-1]:
                    continue
                plan = {**base, group.id: self.planner.best_channels(group, keep)}
                shares.append(1 - keep / group.channels)
                error = _relative_error(reference, self._outputs(feeds, plan)) - floor
                errors.append(max(errors[-1], error))
            curves[group.id] = ErrorCurve(np.array(shares), np.array(errors))
        return curves


def _weight_dtype(node: ir.Node) -> np.dtype:
    """The float type of a producer's constant weight (its output has the same)."""
    arrays = (constant_array(value) for value in node.inputs if value is not None)
    return next(a.dtype for a in arrays if a is not None and a.ndim >= 2)


def _relative_error(reference: list[list], outputs: list[list]) -> float:
    total = 0.0
    for expected, actual in zip(reference, outputs, strict=True):
        for e, a in zip(expected, actual, strict=True):
            e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
            total += float(np.sum((a - e) ** 2)) / max(float(np.sum(e**2)), _EPSILON)
    return total / len(reference)


@dataclasses.dataclass(frozen=True)
class ErrorCurve:
    """Output error against the share of a group's channels removed: piecewise-linear through
    the measured points, extended past the last one by its slope."""

    shares: np.ndarray
    errors: np.ndarray

    @property
    def measured_up_to(self) -> float:
        return float(self.shares[-1])

    def __call__(self, share: float) -> float:
        if self.shares.size < 2 or share <= self.shares[-1]:
            return float(np.interp(share, self.shares, self.errors))
        slope = (self.errors[-1] - self.errors[-2]) / (self.shares[-1] - self.shares[-2])
        return float(self.errors[-1] + slope * (share - self.shares[-1]))


def _counts_after(steps: list[_Step], taken: int, start: Mapping[int, int]) -> dict[int, int]:
    """Kept count of each group once the first ``taken`` steps are done from ``start``."""
    keep = dict(start)
    for step in steps[:taken]:
        keep[step.group] = min(keep.get(step.group, step.keep), step.keep)
    return keep


# ---------------------------------------------------------------------------------------------
# Rewriting


def kept_indices(
    channels: ChannelAnalysis,
    plan: Mapping[int, np.ndarray],
    atoms: tuple[int, ...],
    repeat: int = 1,
) -> tuple[np.ndarray, int]:
    """Kept indices along an axis holding ``atoms`` (each channel ``repeat`` entries) under
    ``plan`` (group id -> kept channels), and the axis length."""
    pieces, position = [], 0
    for atom in atoms:
        length = channels.atom_length(atom)
        group = channels.group_of.get(atom)
        local = plan[group] if group in plan else np.arange(length)
        pieces.append(position + local)
        position += length
    indices = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if repeat > 1:
        indices = (indices[:, None] * repeat + np.arange(repeat)[None, :]).reshape(-1)
    return indices.astype(np.int64), position * repeat


class _Rewriter:
    """Applies a plan: slices (or zeroes) every slot, updates structures, shapes and metadata."""

    def __init__(
        self,
        model: ir.Model,
        channels: ChannelAnalysis,
        plan: dict[int, np.ndarray],
        mode: str,
        node_macs: dict[int, float],
        report: PassReport,
    ) -> None:
        self.model = model
        self.channels = channels
        self.plan = plan
        self.remove = mode == "remove"
        self.node_macs = node_macs
        self.report = report
        self.names = UniqueNames(model)

    def kept(self, atoms: tuple[int, ...], repeat: int = 1) -> tuple[np.ndarray, int]:
        return kept_indices(self.channels, self.plan, atoms, repeat)

    def run(self) -> None:
        by_input: dict[tuple[int, int], list[Slot]] = {}
        for slot in self.channels.slots:
            by_input.setdefault((id(slot.node), slot.input), []).append(slot)
        touched: dict[int, tuple[ir.Node, int, int]] = {}
        for slots in by_input.values():
            node, index = slots[0].node, slots[0].input
            sizes = self.rewrite_input(node, index, slots)
            if sizes is not None:
                old = touched.get(id(node), (node, 0, 0))
                touched[id(node)] = (node, old[1] + sizes[0], old[2] + sizes[1])
        if self.remove:
            self.update_structures()
            self.update_values()
            self.update_bn_scales()
        self.record(touched)

    def rewrite_input(self, node: ir.Node, index: int, slots: list[Slot]) -> tuple[int, int] | None:
        """Slice (or zero) one constant input; its element counts before and after, or None
        when it keeps every channel."""
        value = node.inputs[index]
        array = constant_array(value)
        changes = [(s, *self.kept(s.atoms, s.repeat)) for s in slots]
        changes = [(s, kept, n) for s, kept, n in changes if len(kept) < n]
        if not self.remove:
            changes = [change for change in changes if change[0].zero]
        if array is None or value is None or not changes:
            return None
        result = array
        if self.remove:
            for slot, kept, _ in changes:
                result = np.take(result, kept, axis=slot.axis)
        else:
            result = array.copy()
            for slot, kept, length in changes:
                if slot.zero:
                    mask = np.ones(length, dtype=bool)
                    mask[kept] = False
                    np.moveaxis(result, slot.axis, 0)[mask] = 0
        dtype = value.dtype or ir.DataType.from_numpy(array.dtype)
        base = node.name or value.name or "pruned"
        set_input_constant(
            node, index, result, dtype, f"{base}.pruned_{index}", self.model.graph, self.names
        )
        return array.size, result.size

    def count(self, layout) -> int:
        return len(self.kept(layout.atoms)[0])

    def update_structures(self) -> None:
        graph = self.model.graph
        for structure in self.channels.structures:
            node = structure.node
            base = node.name or node.outputs[0].name  # names the rewritten constants
            if structure.kind == "depthwise":
                node.attributes["group"] = ir.AttrInt64("group", self.count(structure.layouts[0]))
            elif structure.kind == "split":
                sizes = np.array([self.count(x) for x in structure.layouts], dtype=np.int64)
                if "split" in node.attributes:
                    node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
                else:
                    node.attributes.pop("num_outputs", None)
                    set_input_constant(
                        node, 1, sizes, ir.DataType.INT64, f"{base}.split", graph, self.names
                    )
            elif structure.kind == "reshape":  # the head size, or a flattened width, shrinks
                layout = structure.layouts[0]
                target = constant_array(node.inputs[1]).astype(np.int64).copy()
                target[structure.entry] = len(self.kept(layout.atoms, layout.repeat)[0])
                set_input_constant(
                    node, 1, target, ir.DataType.INT64, f"{base}.shape", graph, self.names
                )
            else:  # slice
                source, piece = structure.layouts
                before = np.count_nonzero(self.kept(source.atoms)[0] < structure.start)
                for index, bound in ((1, before), (2, before + self.count(piece))):
                    bounds = constant_array(node.inputs[index]).astype(np.int64).copy()
                    bounds[structure.entry] = bound
                    set_input_constant(
                        node,
                        index,
                        bounds,
                        ir.DataType.INT64,
                        f"{base}.bounds_{index}",
                        graph,
                        self.names,
                    )

    def update_values(self) -> None:
        """New channel counts on the traced values' shapes, and the kept indices as metadata."""
        for value, layout in self.channels.layouts.items():
            kept, length = self.kept(layout.atoms, layout.repeat)
            if len(kept) == length:
                continue
            axis = layout.positive_axis()
            if value.shape is not None:
                dims = list(value.shape)
                dims[layout.axis] = len(kept)
                value.shape = ir.Shape(dims)
                axis = len(dims) + layout.axis
            value.metadata_props[KEPT_CHANNELS_KEY] = json.dumps(
                {"axis": axis if axis is not None else layout.axis, "kept": kept.tolist()}
            )

    def update_bn_scales(self) -> None:
        for slot in self.channels.slots:
            node = slot.node
            scale = bn_scale(node)
            if slot.role != "producer" or not slot.weight or scale is None:
                continue
            kept, length = self.kept(slot.atoms)
            if scale.size == length and len(kept) < length:
                node.metadata_props[BN_SCALE_KEY] = json.dumps([float(v) for v in scale[kept]])

    def record(self, touched: dict[int, tuple[ir.Node, int, int]]) -> None:
        factors: dict[int, float] = {}
        for slot in self.channels.slots:
            if slot.weight:
                kept, length = self.kept(slot.atoms)
                factors[id(slot.node)] = (
                    factors.get(id(slot.node), 1.0) * len(kept) / max(length, 1)
                )
        for key, (node, before, after) in touched.items():
            macs = self.node_macs.get(key, 0)
            if self.remove:
                after_macs = round(macs * factors.get(key, 1.0))
                self.report.record(
                    node,
                    "pruned",
                    "channels removed",
                    params_before=before,
                    params_after=after,
                    macs_before=macs,
                    macs_after=after_macs,
                )
            else:
                self.report.record(node, "masked", "pruned channels zeroed, shapes kept")


def kept_channels(value: ir.Value) -> dict[str, Any] | None:
    """The ``{"axis", "kept"}`` record a pruning pass left on ``value``, or None."""
    text = value.metadata_props.get(KEPT_CHANNELS_KEY)
    return None if text is None else json.loads(text)
