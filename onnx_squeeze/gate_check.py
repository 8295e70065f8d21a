"""Whether a candidate model meets the fidelity gate against a reference: the one check that the
passes' default searches (how much to prune, how low to factorize) judge their candidates by.

The reference's outputs are computed once per named set of feeds (``search``, ``check``...); a
candidate is run on a set, measured per output channel (:mod:`fidelity`) and judged by the
gate the run aims at (``target``, else ``verdict.DEFAULT_GATE``: the conditions that apply to
the model's outputs), as the final comparison will judge the result, but an agreement at its
lower bound (:func:`gates.counted_on`), since the searches keep the most aggressive of several
candidates. Where the gate allows few disagreements, accuracy control lets the count decide
(:func:`gates.decided`: 98 of 99 strings pass a 0.98 gate), as it returns layers of one
quantization to float and stops at the first that holds; a search does not: ppocr_rec's pruning
read 50 of 51 held-back lines the same, 0.92 of the 52 it was recovered on and 0.88 of 153 others.

Each set is read as far as its agreement gates need: at least ``least`` batches of it, more
while the reads counted on the reference fall short of :func:`gates.reads_to_decide` (a 0.98
gate: 50 where every read agrees). Where the set holds too few, a candidate that meets the gate
on them is not taken to meet it, and what it measured says how many reads the gate needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from onnx_squeeze import fidelity, gates
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.verdict import DEFAULT_GATE

__all__ = ["GateCheck"]


class GateCheck:
    """Judges candidates against ``reference`` on each named set of ``feeds``, reading at least
    ``least`` batches of each (all when None) and as many more as its agreements need."""

    def __init__(
        self,
        reference: ir.Model,
        feeds: Mapping[str, Iterable[Feed]],
        target: str,
        provider: str,
        least: int | None = None,
    ) -> None:
        self.target, self.provider = target, provider
        self.gate = target or DEFAULT_GATE
        self.kinds = fidelity.OutputKinds.of(reference)
        self.model, self.names = reference, [value.name for value in reference.graph.outputs]
        self.feeds: dict[str, list[Feed]] = {}
        self.reference: dict[str, list[Feed]] = {}
        self.reads: dict[str, dict[str, tuple[float, float]]] = {}  # set -> gate -> (had, needed)
        for name, pool in feeds.items():
            self.add(name, pool, least)

    def add(
        self, name: str, pool: Iterable[Feed], least: int | None = None, most: int | None = None
    ) -> None:
        """Read the set ``name`` from ``pool``: ``least`` batches (all when None), then as many
        more as its agreement gates need, by the reads the first ones gave, ``most`` in all."""
        batches = iter(pool)
        with TensorRunner(self.model, self.names, self.provider) as runner:
            feeds = list(batches if least is None else itertools.islice(batches, max(least, 1)))
            outputs = [runner(feed) for feed in feeds]
            self.feeds[name], self.reference[name] = feeds, outputs
            self.reads[name] = self._needed(outputs)
            read = len(feeds)
            wanted = self.batches_to_decide(name)
            if most is not None:
                wanted = min(wanted, most)
            for feed in itertools.islice(batches, max(wanted - read, 0)):
                feeds.append(feed)
                outputs.append(runner(feed))
        if len(feeds) > read:
            self.reads[name] = self._needed(outputs)

    def forget(self, name: str) -> None:
        """Let the set ``name`` go: a probe whose reads sized the others holds the reference's
        outputs of its batches (a few MB on a 736x736 detector) for the whole search."""
        for held in (self.feeds, self.reference, self.reads):
            held.pop(name, None)

    def batches_to_decide(self, on: str) -> int:
        """The batches like those of the set ``on`` that give every agreement gate the reads
        that decide it, by the reads per batch the set gave (0 where no agreement gate
        applies)."""
        count = len(self.feeds[on])
        wanted = [
            math.ceil(needed / (had / count)) if had > 0 else count
            for had, needed in self.reads[on].values()
            if math.isfinite(needed)
        ]
        return max(wanted, default=0)

    def _needed(self, outputs: list[Feed]) -> dict[str, tuple[float, float]]:
        """The agreement gates that apply, by expression: (reads ``outputs`` give, reads
        needed to decide)."""
        if not outputs:
            return {}
        measured = fidelity.measure(outputs, outputs, kinds=self.kinds)
        metrics = fidelity.gate_metrics(measured.values())
        results = gates.judged([self.target] if self.target else [], metrics, DEFAULT_GATE)
        needed = {}
        for gate in gates.parse_gates([result["expr"] for result in results]):
            if gate.metric in gates.AGREEMENT_METRICS and gate.metric in metrics:
                reads = fidelity.counted_reads(measured.values(), gate.metric)
                needed[gate.expr] = (reads, gates.reads_to_decide(gate))
        return needed

    def _outputs(self, model: ir.Model, on: str) -> list[Feed]:
        with TensorRunner(model, self.names, self.provider) as runner:
            return [runner(feed) for feed in self.feeds[on]]

    def __call__(self, model: ir.Model, on: str) -> tuple[bool, str]:
        """(whether ``model`` meets the gate on the feeds named ``on``, what was measured); an
        agreement counted on fewer reads than decide it does not meet it."""
        measured = fidelity.measure(self.reference[on], self._outputs(model, on), kinds=self.kinds)
        metrics = fidelity.gate_metrics(measured.values())
        results = gates.judged([self.target] if self.target else [], metrics, DEFAULT_GATE)
        said = "; ".join(result["message"] for result in results)
        passed = all(result["passed"] for result in results)
        for gate in gates.parse_gates([r["expr"] for r in results if r["passed"]]):
            if gate.metric in gates.AGREEMENT_METRICS:
                reads = fidelity.counted_reads(measured.values(), gate.metric)
                bound = gates.counted_on(metrics[gate.metric], reads)
                if not gate.passes(bound):
                    said += f" ({gate.metric} of {reads:.0f} reads: {bound:.4g} at its lower bound)"
                    passed = False
                elif reads < gates.reads_to_decide(gate):  # every read agreed
                    said += (
                        f" ({gate.metric} of {reads:.0f} reads: too few to decide {gate}, which "
                        f"needs {gates.reads_to_decide(gate):.0f})"
                    )
                    passed = False
        return passed, said
