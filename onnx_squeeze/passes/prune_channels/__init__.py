"""Structured channel pruning over dependency groups.

Channels that must be pruned together form groups (:mod:`.trace` walks the graph with the rules
of :mod:`.op_rules` and :mod:`.layer_rules`; :mod:`.groups` holds what it finds). Each prunable
group is scored by an importance criterion (:mod:`.criteria`), the channels to keep are chosen
by a per-group ratio, a global ratio ranked across groups, or a MACs target (:mod:`.allocation`,
spread over the groups by measured :mod:`.sensitivity` by default), or a latency target priced
by profiled node times (:mod:`.layer_times`) and checked by timing (:mod:`.latency_plan`),
rounded to a multiple for fast kernels, and then removed from every member at once (``remove``)
or masked to zero with shapes unchanged (``zero``, for sensitivity studies) by :mod:`.rewrite`.

A MACs target is reached in ``sensitivity_rounds`` parts: each group alone loses 25/50/75% of its
lowest-scored channels on a few calibration batches, the cheapest steps across all groups are
taken, and the curves are measured again on top of the channels already removed.

With no ratio or target, the pass removes up to 30 % of the MACs, as much as still meets the
fidelity gate, or leaves the model unchanged with a warning (:mod:`.gate_search`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import StatisticsCollector
from onnx_squeeze.calibration.grams import Moments, collect_grams
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.passes.prune_channels.allocation import Costs, Planner
from onnx_squeeze.passes.prune_channels.criteria import (
    CRITERIA,
    Statistics,
    gram_specs,
    statistics_tensors,
)
from onnx_squeeze.passes.prune_channels.gate_search import DEFAULT_MACS, GateSearch
from onnx_squeeze.passes.prune_channels.groups import ChannelAnalysis, ChannelGroup
from onnx_squeeze.passes.prune_channels.latency_plan import Timing
from onnx_squeeze.passes.prune_channels.rewrite import Rewriter
from onnx_squeeze.passes.prune_channels.sensitivity import CachedSensitivity, Sensitivity
from onnx_squeeze.passes.prune_channels.settings import PruneChannelsSettings
from onnx_squeeze.passes.prune_channels.trace import analyze_channels
from onnx_squeeze.records import PassContext, PassReport


@register
class PruneChannels(Pass):
    """Remove (or zero) whole channels, group by group."""

    name = "prune_channels"
    Settings = PruneChannelsSettings

    def validate(self) -> None:
        s = self.settings
        if sum(1 for target in (s.ratio, s.macs_target, s.latency_target) if target) > 1:
            raise SettingsError(
                "prune_channels: set one of ratio, macs_target and latency_target, not several"
            )
        if isinstance(s.protect, str):
            s.protect = [s.protect]

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        settings = self.settings
        channels, prunable = self._groups(model)
        for group in channels.groups:
            if group.frozen:
                report.skip(group.producers[0], f"group {group.id} frozen: {group.frozen}")
        report.notes.append(
            f"{len(prunable)} prunable channel groups, {len(channels.groups) - len(prunable)} frozen"
        )
        if not prunable:
            return
        if {settings.ratio, settings.macs_target, settings.latency_target} != {None}:
            self._prune(model, context, channels, prunable, report, settings.macs_target or 0.0)
        else:
            self._up_to_gate(model, context, report)

    def _groups(self, model: ir.Model) -> tuple[ChannelAnalysis, list[ChannelGroup]]:
        """The channel groups of ``model`` (protected ones frozen), and the prunable ones."""
        channels = analyze_channels(model, split_heads=self.settings.split_heads)
        self._protect(model, channels.groups)
        return channels, [g for g in channels.groups if not g.frozen]

    def _up_to_gate(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        """The default: the largest share of the MACs up to ``DEFAULT_MACS`` whose pruned
        (and, with ``recover``, recovered) copy meets the gate; the model is replaced by that
        copy's graph, or left unchanged with a warning."""

        def prune(copy: ir.Model, fraction: float, notes: PassReport) -> None:
            self._prune(copy, context, *self._groups(copy), notes, fraction)

        s = self.settings
        search = GateSearch(model, context, prune, target=s.target, recover=s.recover)
        best, tried = search.search(s.gate_steps)
        report.notes.extend(search.notes)  # what the search left out (its time bound)
        steps = ", ".join(
            f"{c.fraction:.1%} {'meets' if c.passed else 'misses' if c.said else 'prunes nothing'}"
            for c in tried
        )
        recovered = " and recovered" if s.recover else ""
        if best is None:
            smallest = min(tried, key=lambda c: c.fraction)
            why = (
                f"misses the gate {search.gate}: {smallest.said}"
                if smallest.said
                else ("removes no channel")
            )
            report.notes.append(
                f"WARNING: prune_channels left the model unchanged: pruned{recovered} at "
                f"{smallest.fraction:.1%} of the MACs, the smallest share tried, the model {why} "
                f"(on {search.data}; tried {steps}); give a MACs target (--prune-channels "
                "FRACTION) to prune anyway"
            )
            return
        model.graph = best.model.graph  # the chosen copy, pruned and recovered, as it was judged
        report.records.extend(best.report.records)
        report.notes.extend(best.report.notes)
        report.notes.append(
            f"default: up to {DEFAULT_MACS:.0%} of the MACs within the gate {search.gate}: "
            f"{best.fraction:.1%} pruned{recovered} meets it ({best.said} on {search.data}; "
            f"tried {steps})"
        )

    def _prune(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        prunable: list[ChannelGroup],
        report: PassReport,
        macs_target: float,
    ) -> None:
        """Prune ``model`` in place by the ratio, ``macs_target`` or the latency target."""
        settings = self.settings
        target = macs_target or settings.latency_target
        scores = self._scores(model, context, channels, prunable)
        macs = Costs.macs(model, channels, context.input_shapes(model))
        timing = Timing(model, context, settings) if settings.latency_target else None
        costs = Costs.latency(model, channels, timing.original) if timing else macs
        planner = Planner(channels, prunable, scores, settings, costs, macs)
        if not target:
            plan = planner.plan(settings.ratio or 0.0)
        elif settings.allocation == "uniform":
            plan = planner.for_target(target, report)
            replan = functools.partial(planner.for_target, report=PassReport(self.name))
        else:
            plan, replan = self._allocate(model, context, channels, planner, report, target)
        if timing is not None and plan:
            plan = timing.corrected(plan, replan, report)
        if not plan:
            report.notes.append("no group lost a channel at these settings")
            return
        Rewriter(model, channels, plan, settings.mode, macs.nodes, report).run()

    def _allocate(
        self,
        model: ir.Model,
        context: PassContext,
        channels: ChannelAnalysis,
        planner: Planner,
        report: PassReport,
        goal: float,
    ) -> tuple[dict[int, np.ndarray], Callable[[float], dict[int, np.ndarray]]]:
        """The MACs or latency target reached in ``sensitivity_rounds`` equal parts, the
        sensitivities measured again on top of the channels already removed before each part
        (NetAdapt-like: later parts see how earlier ones changed the network). Also returns a
        function that plans the last part again for another target, on the same curves."""
        s = self.settings
        keep: dict[int, int] = {}
        measure = CachedSensitivity(
            functools.partial(Sensitivity, model, channels, planner, context.providers[0]),
            lambda: self._sensitivity_feeds(context, report),
            context.data.store(
                model,
                "prune_channels.sensitivity",
                tuple((g.name, g.channels) for g in planner.groups),
                (s.criterion, s.min_channels, s.round_to, s.sensitivity_batches),
            ),
        )
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
        self, context: PassContext, report: PassReport
    ) -> list[dict[str, np.ndarray]]:
        """The first calibration batches (the run's random draws when no data is given)."""
        feeds = context.data.first_batches(self.settings.sensitivity_batches)
        if not context.data.supplied:
            report.notes.append("sensitivity measured on random inputs (no calibration data)")
        return feeds

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
        batches = self.settings.calibration_batches
        store = context.data.store(model, "prune_channels.channels", batches)
        key = tuple(sorted(axes.items()))
        if key not in store:
            collector = StatisticsCollector(
                model,
                list(axes),
                channel_axis=axes,
                keep=("channels",),
                provider=context.providers[0],
            )
            store[key] = collector.collect(context.data, limit=batches, progress=False)
        return store[key]

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
            context.data,
            provider=context.providers[0],
            batches=self.settings.calibration_batches,
            label="prune_channels consumer input Grams",
        )
        return {name: moments[spec] for name, spec in specs.items()}
