"""The default fraction: with no ratio, MACs or latency target given, ``prune_channels`` removes
up to ``DEFAULT_MACS`` of the MACs, as much as still meets the fidelity gate.

A fraction is judged on a pruned copy, recovered by ``reconstruct`` first when the pass is told
that recovery follows (``recover``): pruning alone breaks far more than pruning and recovery,
so judging it unrecovered would step back much too far. The copy is compared with the original
on the calibration batches recovery did not fit on (every 5th, split as the run splits its
evaluation data; every 4th, 3rd or 2nd where the gate's agreements need more reads to be decided,
as :mod:`onnx_squeeze.gate_check` counts them: minilm's pruning kept the nearest neighbours of
20 held-back sentences and 0.978 of 154 others') by the gate the run aims at (``target``, else
``verdict.DEFAULT_GATE``).
``DEFAULT_MACS`` is tried first; when it misses the gate, the fraction is bisected below it
for ``steps`` candidates in all, and the largest that meets the gate is kept. When none does,
the model is left as it came and a warning says why. A candidate costs about what the first
did (pruning, recovery, the check), so the bisection stops before a candidate that would take
the search past ``SEARCH_SECONDS`` (PP-OCR's text detector at 736×736: about 160 s a candidate
on 2 busy cores), and :attr:`GateSearch.notes` says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable

import onnx_ir as ir

from onnx_squeeze.calibration.service import Calibration
from onnx_squeeze.calibration.sources import HOLDOUT_EVERY, split_for_evaluation
from onnx_squeeze.gate_check import GateCheck
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.records import PassContext, PassReport

DEFAULT_MACS = 0.3  # the share of the MACs the default removes at most
SEARCH_SECONDS = 120.0  # no further candidate once the search would likely take longer
PROBE_BATCHES = 4  # the batches whose reads tell how many the gate's check needs


@dataclasses.dataclass
class Candidate:
    """A pruned (and recovered) copy at one fraction of the MACs, with what its pruning and
    recovery reported and what the gate measured. The search drops the model of a candidate
    that is not kept (None): each is a whole pruned copy."""

    fraction: float
    model: ir.Model | None
    report: PassReport
    passed: bool
    said: str


class GateSearch:
    """Prunes copies of ``model`` at candidate fractions (``prune(copy, fraction, report)``),
    recovers them when ``recover``, and judges them by the gate."""

    def __init__(
        self,
        model: ir.Model,
        context: PassContext,
        prune: Callable[[ir.Model, float, PassReport], None],
        *,
        target: str,
        recover: bool,
    ) -> None:
        self.model, self.prune, self.recover = model, prune, recover
        self.teacher = context.teacher or model.clone()
        # every 5th batch is held back, or more where the gate's agreements need more reads
        probe = itertools.islice(context.data.batches(), PROBE_BATCHES)
        self.check = GateCheck(self.teacher, {"probe": probe}, target, context.providers[0])
        self.gate = self.check.gate
        needed, every = self.check.batches_to_decide("probe"), HOLDOUT_EVERY
        self.check.forget("probe")
        try:
            total = len(context.data)
        except TypeError:
            total = None
        if needed and total is not None:
            every = min(HOLDOUT_EVERY, total // needed)
        source = context.data.source
        fit, held = split_for_evaluation(source, max(every, 2), purpose="the pruning gate")
        self.check.add("held", held or fit)
        self.data = f"{len(self.check.feeds['held'])} calibration batches"
        if held is None:
            self.data += " (too few to hold any back from recovery)"
        else:
            self.data += " held back from recovery"
        if context.data.is_random:
            self.data += f" of RANDOM data ({context.data.label})"
        self.fitting = dataclasses.replace(context, calibration=Calibration(fit))
        self.fitting.data.axes = context.data.axes
        self.fitting.teacher = self.teacher
        self.notes: list[str] = []  # what the search left out, for the pass report

    def candidate(self, fraction: float) -> Candidate:
        copy = self.model.clone()
        report = PassReport("prune_channels")
        self.prune(copy, fraction, report)
        if self.recover and report.changed:
            recovery = make_pass("reconstruct")(copy, self.fitting)
            report.records.extend(recovery.records)
            report.notes.extend(_prefixed("recovery", note) for note in recovery.notes)
        passed, said = self.check(copy, "held") if report.changed else (False, "")
        return Candidate(fraction, copy, report, passed, said)

    def search(self, steps: int) -> tuple[Candidate | None, list[Candidate]]:
        """The candidate at the largest fraction tried that meets the gate (None when none
        does), and every candidate tried, in order: ``DEFAULT_MACS``, then bisection below it
        (a fraction that prunes nothing counts as missing)."""
        start = time.perf_counter()
        tried = [self.candidate(DEFAULT_MACS)]
        each = time.perf_counter() - start
        low, high = 0.0, DEFAULT_MACS
        best = tried[0] if tried[0].passed else None
        if best is None:
            tried[0].model = None
        while best is not tried[0] and len(tried) < steps:
            if time.perf_counter() - start + each > SEARCH_SECONDS:
                self.notes.append(
                    f"the search stopped after {len(tried)} of {steps} candidates: the first "
                    f"took {each:.0f} s and another would pass the {SEARCH_SECONDS:.0f} s "
                    "bound; give a MACs target (--prune-channels FRACTION) to skip the search"
                )
                break
            middle = (low + high) / 2
            tried.append(self.candidate(middle))
            if tried[-1].passed:
                if best is not None:
                    best.model = None
                low, best = middle, tried[-1]
            else:
                high, tried[-1].model = middle, None
        return best, tried


def _prefixed(who: str, note: str) -> str:
    """``note`` attributed to ``who``, a warning still a warning."""
    if note.startswith("WARNING:"):
        return f"WARNING: {who}: {note.removeprefix('WARNING:').strip()}"
    return f"{who}: {note}"
