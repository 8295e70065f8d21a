"""How many channels each group keeps, and which: a per-group ratio, a global ratio ranked across
groups, or a cost target (MACs or measured time) met by bisection on one ratio (``uniform``) or
by sensitivity. Kept counts are rounded to a multiple for fast kernels.

By sensitivity (the default), each group's measured error curve (:mod:`.sensitivity`) prices
every rounding step of every group at the output error it adds per cost it removes; the cheapest
steps across all groups are taken until the target is met. Groups whose channels matter more
than they cost (residual streams read by many layers) are thus pruned less than one uniform
ratio would.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze import analysis, layer_times
from onnx_squeeze.passes.prune_channels.groups import ChannelAnalysis, ChannelGroup
from onnx_squeeze.passes.prune_channels.settings import PruneChannelsSettings
from onnx_squeeze.records import PassReport

# Groups with at least this many channels keep a multiple of 8 by default (fast SIMD kernels).
_ROUND_FROM = 32
_DEFAULT_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Costs:
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
    ) -> Costs:
        """MACs of the layers with weights, which scale with their weights' kept channels,
        at the run's input ``shapes``."""
        summary = analysis.analyze(model, shapes=shapes)
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        macs = {id(n): float(c.macs) for n, c in zip(nodes, summary.nodes, strict=True)}
        return cls("MACs", macs, cls._weight_atoms(channels), max(float(summary.macs), 1.0))

    @classmethod
    def latency(
        cls, model: ir.Model, channels: ChannelAnalysis, times: layer_times.LayerTimes
    ) -> Costs:
        """Measured node times: a layer with weights scales like its MACs, any other node with
        the kept share of its output's channels; time no node owns stays."""
        weights = cls._weight_atoms(channels)
        nodes, atoms = {}, {}
        for node, time in times.nodes.items():
            nodes[id(node)] = time
            layout = channels.layouts.get(node.outputs[0]) if node.outputs else None
            atoms[id(node)] = weights.get(id(node)) or ([layout.atoms] if layout else [])
        return cls("latency", nodes, atoms, max(times.total, 1e-9))


class Planner:
    """Kept channels of the prunable ``groups``: the highest-scored ones, in counts rounded to
    the settings' multiple, chosen by ratio or for a share of ``costs`` (``macs`` named beside
    it in notes when the costs are something else)."""

    def __init__(
        self,
        channels: ChannelAnalysis,
        groups: list[ChannelGroup],
        scores: dict[int, np.ndarray],
        settings: PruneChannelsSettings,
        costs: Costs,
        macs: Costs,
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

    def removed(self, plan: Mapping[int, np.ndarray], costs: Costs | None = None) -> float:
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
