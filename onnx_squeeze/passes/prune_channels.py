"""Structured channel pruning over dependency groups (:mod:`onnx_squeeze.channel_groups`).

Each prunable group is scored by an importance criterion (a registry: name -> function of the
group, the model and activation statistics), the channels to keep are chosen by a per-group
ratio, a global ratio ranked across groups, or a MACs target, rounded to a multiple for fast
kernels, and then removed from every member at once (``remove``) or masked to zero with shapes
unchanged (``zero``, for sensitivity studies).

Scores are normalised per member (divided by the member's mean) before they are averaged over a
group's members, so that layers of different scale count alike and scores of different groups
are comparable when ranked globally.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import analysis
from onnx_squeeze.calibration import StatisticsCollector, TensorStatistics
from onnx_squeeze.channel_groups import ChannelAnalysis, ChannelGroup, Slot, analyze_channels
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames, constant_array, set_input_constant
from onnx_squeeze.passes.base import Pass, PassContext, PassReport, register
from onnx_squeeze.prepare import BN_SCALE_KEY, bn_scale

KEPT_CHANNELS_KEY = "onnx_squeeze.kept_channels"
MODES = ("remove", "zero")
# Groups with at least this many channels keep a multiple of 8 by default (fast SIMD kernels).
_ROUND_FROM = 32
_DEFAULT_MULTIPLE = 8
_EPSILON = 1e-12

Statistics = Mapping[str, TensorStatistics]
Criterion = Callable[[ChannelGroup, ir.Model, "Statistics | None"], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Importance criteria


@dataclasses.dataclass(frozen=True)
class _CriterionEntry:
    function: Criterion
    needs_statistics: bool


CRITERIA: dict[str, _CriterionEntry] = {}


def criterion(name: str, *, needs_statistics: bool = False) -> Callable[[Criterion], Criterion]:
    """Register an importance criterion: ``function(group, model, stats) -> scores``, one score
    per channel of the group (higher is more important). ``stats`` maps tensor names to
    calibration statistics when ``needs_statistics`` is set, else it is None."""

    def register_criterion(function: Criterion) -> Criterion:
        CRITERIA[name] = _CriterionEntry(function, needs_statistics)
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


@criterion("activation", needs_statistics=True)
def mean_activation(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """Mean absolute activation entering the group's consumers (calibration data)."""
    parts = _consumer_statistics(group, stats or {}, lambda c: c.abs_mean)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


@criterion("apoz", needs_statistics=True)
def apoz(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """One minus the average percentage of zeros (after ReLU) entering the consumers."""
    parts = _consumer_statistics(group, stats or {}, lambda c: 1.0 - c.zero_fraction + 1e-3)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


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
    ``protect``: node names whose groups are left alone."""

    mode: str = "remove"
    criterion: str = "l1"
    ratio: float = 0.0
    global_ranking: bool = False
    macs_target: float = 0.0
    min_channels: int = 1
    round_to: int = 0
    protect: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = 8


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
        for field in ("ratio", "macs_target"):
            if not 0.0 <= float(getattr(s, field)) < 1.0:
                raise SettingsError(
                    f"prune_channels: {field} must be in [0, 1), got {getattr(s, field)}"
                )
        if s.ratio and s.macs_target:
            raise SettingsError("prune_channels: set either ratio or macs_target, not both")
        if s.min_channels < 1 or s.round_to < 0 or s.calibration_batches < 1:
            raise SettingsError(
                "prune_channels: min_channels and calibration_batches must be >= 1, round_to >= 0"
            )
        if isinstance(s.protect, str):
            s.protect = [s.protect]

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        settings = self.settings
        channels = analyze_channels(model)
        self._protect(model, channels.groups)
        prunable = [g for g in channels.groups if not g.frozen]
        for group in channels.groups:
            if group.frozen:
                report.skip(group.producers[0], f"group {group.id} frozen: {group.frozen}")
        report.notes.append(
            f"{len(prunable)} prunable channel groups, {len(channels.groups) - len(prunable)} frozen"
        )
        if not prunable or not (settings.ratio or settings.macs_target):
            return
        scores = self._scores(model, context, channels, prunable)
        planner = _Planner(model, channels, prunable, scores, settings)
        plan = (
            planner.for_macs(settings.macs_target, report)
            if settings.macs_target
            else (planner.plan(settings.ratio))
        )
        if not plan:
            report.notes.append("no group lost a channel at these settings")
            return
        _Rewriter(model, channels, plan, settings.mode, planner.node_macs, report).run()

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
        stats = (
            self._statistics(model, context, channels, groups) if entry.needs_statistics else None
        )
        return {g.id: np.asarray(entry.function(g, model, stats), np.float64) for g in groups}

    def _statistics(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
    ) -> Statistics:
        if context.calibration is None:
            raise SettingsError(
                f"prune_channels: criterion {self.settings.criterion!r} needs calibration data; "
                "pass --calib DATA or use criterion l1, l2 or bn_scale"
            )
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


# ---------------------------------------------------------------------------------------------
# Planning: how many channels each group keeps, and which


class _Planner:
    def __init__(
        self,
        model: ir.Model,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
        scores: dict[int, np.ndarray],
        settings: PruneChannelsSettings,
    ) -> None:
        self.channels = channels
        self.groups = groups
        self.scores = scores
        self.settings = settings
        summary = analysis.analyze(model)
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        self.node_macs = {id(n): c.macs for n, c in zip(nodes, summary.nodes, strict=True)}
        self.total_macs = max(summary.macs, 1)

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
        plan = {}
        for group in self.groups:
            keep = self.keep_count(group, wanted[group.id])
            if keep < group.channels:
                order = np.argsort(-self.scores[group.id], kind="stable")
                plan[group.id] = np.sort(order[:keep])
        return plan

    def _global_keep(self, ratio: float) -> dict[int, int]:
        everything = np.concatenate([self.scores[g.id] for g in self.groups])
        removed = math.floor(ratio * everything.size)
        if removed == 0:
            return {g.id: g.channels for g in self.groups}
        threshold = np.partition(everything, removed - 1)[removed - 1]
        return {g.id: int(np.count_nonzero(self.scores[g.id] > threshold)) for g in self.groups}

    def factor(self, slot: Slot, plan: Mapping[int, np.ndarray]) -> float:
        """Kept share of a slot's channels."""
        total = kept = 0
        for atom in slot.atoms:
            length = self.channels.atom_length(atom)
            total += length
            group = self.channels.group_of.get(atom)
            kept += len(plan[group]) if group in plan else length
        return kept / total if total else 1.0

    def macs_removed(self, plan: Mapping[int, np.ndarray]) -> float:
        factors: dict[int, float] = {}
        for slot in self.channels.slots:
            if slot.weight:
                key = id(slot.node)
                factors[key] = factors.get(key, 1.0) * self.factor(slot, plan)
        removed = sum(self.node_macs.get(k, 0) * (1 - f) for k, f in factors.items())
        return removed / self.total_macs

    def for_macs(self, target: float, report: PassReport) -> dict[int, np.ndarray]:
        """The smallest ratio (by bisection) whose plan removes at least ``target`` of MACs."""
        low, high = 0.0, 0.99
        best = self.plan(high)
        reached = self.macs_removed(best)
        if reached < target:
            report.notes.append(f"MACs target {target:.0%} not reachable: removed {reached:.1%}")
            return best
        for _ in range(30):
            middle = (low + high) / 2
            plan = self.plan(middle)
            if self.macs_removed(plan) >= target:
                high, best = middle, plan
            else:
                low = middle
        report.notes.append(
            f"MACs target {target:.0%}: ratio {high:.3f} removes {self.macs_removed(best):.1%}"
        )
        return best


# ---------------------------------------------------------------------------------------------
# Rewriting


class _Rewriter:
    """Applies a plan: slices (or zeroes) every slot, updates structures, shapes and metadata."""

    def __init__(
        self,
        model: ir.Model,
        channels: ChannelAnalysis,
        plan: dict[int, np.ndarray],
        mode: str,
        node_macs: dict[int, int],
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
        """Kept indices along an axis holding ``atoms`` (each channel ``repeat`` entries) and
        the axis length."""
        pieces, position = [], 0
        for atom in atoms:
            length = self.channels.atom_length(atom)
            group = self.channels.group_of.get(atom)
            local = self.plan[group] if group in self.plan else np.arange(length)
            pieces.append(position + local)
            position += length
        indices = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        if repeat > 1:
            indices = (indices[:, None] * repeat + np.arange(repeat)[None, :]).reshape(-1)
        return indices.astype(np.int64), position * repeat

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
            if structure.kind == "depthwise":
                node.attributes["group"] = ir.AttrInt64("group", self.count(structure.layouts[0]))
            elif structure.kind == "split":
                sizes = np.array([self.count(x) for x in structure.layouts], dtype=np.int64)
                if "split" in node.attributes:
                    node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
                else:
                    node.attributes.pop("num_outputs", None)
                    set_input_constant(
                        node, 1, sizes, ir.DataType.INT64, f"{node.name}.split", graph, self.names
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
                        f"{node.name}.bounds_{index}",
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
