"""A latency target checked by timing: channels are priced by each node's profiled time
(:mod:`.layer_times`), which scales with its kept channels as MACs would. That estimate misjudges
narrow layers, so the plan is checked: the pruned model is timed beside the original and the
plan made again for a corrected target until it saves what was asked. At one thread on the CPU
both the profile and the check read the thread's CPU time (:mod:`onnx_squeeze.clocks`), the
clock ``tune`` judges the target in: six checks of the same pruned digits CNN at a load of 8
read 0.37-0.57 of the original's time on the wall clock, 0.43-0.44 in CPU time, and a plan
corrected on the wall clock's noise missed the target the search then measured."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze import latency_search, layer_times, runtime
from onnx_squeeze.calibration.service import resized
from onnx_squeeze.passes.prune_channels.rewrite import Rewriter
from onnx_squeeze.passes.prune_channels.settings import PruneChannelsSettings
from onnx_squeeze.passes.prune_channels.trace import analyze_channels
from onnx_squeeze.records import PassContext, PassReport

# How often a latency plan is made again for a corrected target, and how far the pruned model's
# measured saving may fall short of the target or exceed it.
_LATENCY_CORRECTIONS = 6
_LATENCY_TOLERANCE = 0.01
_LATENCY_OVERSHOOT = 0.03


class Timing:
    """Times of the model and of pruned copies, on one feed: the first calibration batch (the
    run's random draws when no data is given) resized to ``latency_batch`` samples."""

    def __init__(self, model: ir.Model, context: PassContext, settings: PruneChannelsSettings):
        names = {spec.name for spec in runtime.input_specs(model)}
        first = {k: v for k, v in context.data.feed_at(0).items() if k in names}
        self.feed = resized(first, model, settings.latency_batch)
        self.model, self.settings, self.provider = model, settings, context.providers[0]
        self.original = layer_times.measure(model, self.feed, provider=self.provider)
        # Timing needs a plain session on one thread, as a deployment runs the model.
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
        Rewriter(pruned, channels, dict(plan), "remove", {}, PassReport("probe")).run()
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
