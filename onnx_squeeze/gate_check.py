"""Whether a candidate model meets the fidelity gate against a reference: the one check that the
passes' default searches (how much to prune, how low to factorize) judge their candidates by.

The reference's outputs are computed once per named set of feeds (``search``, ``check``...); a
candidate is run on a set, measured per output channel (:mod:`fidelity`) and judged by the
gate the run aims at (``target``, else ``verdict.DEFAULT_GATE``: the conditions that apply to
the model's outputs), as the final comparison will judge the result, but an agreement as a
decision (:func:`gates.decided`: at its lower bound where the gate allows enough disagreements
among the reads, since the searches keep the best of several candidates measured on a few).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnx_squeeze import fidelity, gates
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.verdict import DEFAULT_GATE

__all__ = ["GateCheck"]


class GateCheck:
    """Judges candidates against ``reference`` on each named set of ``feeds``."""

    def __init__(
        self,
        reference: ir.Model,
        feeds: Mapping[str, Sequence[Feed]],
        target: str,
        provider: str,
    ) -> None:
        self.target, self.provider = target, provider
        self.gate = target or DEFAULT_GATE
        self.feeds = {name: list(batch) for name, batch in feeds.items()}
        self.kinds = fidelity.OutputKinds.of(reference)
        self.reference = {name: self._outputs(reference, name) for name in self.feeds}

    def _outputs(self, model: ir.Model, on: str) -> list[Feed]:
        names = [value.name for value in model.graph.outputs]
        with TensorRunner(model, names, self.provider) as runner:
            return [runner(feed) for feed in self.feeds[on]]

    def __call__(self, model: ir.Model, on: str) -> tuple[bool, str]:
        """(whether ``model`` meets the gate on the feeds named ``on``, what was measured)."""
        measured = fidelity.measure(self.reference[on], self._outputs(model, on), kinds=self.kinds)
        metrics = fidelity.gate_metrics(measured.values())
        results = gates.judged([self.target] if self.target else [], metrics, DEFAULT_GATE)
        said = "; ".join(result["message"] for result in results)
        passed = all(result["passed"] for result in results)
        for gate in gates.parse_gates([r["expr"] for r in results if r["passed"]]):
            if gate.metric in gates.AGREEMENT_METRICS:
                reads = fidelity.counted_reads(measured.values(), gate.metric)
                if not gates.decided(gate, metrics[gate.metric], reads):
                    bound = gates.counted_on(metrics[gate.metric], reads)
                    said += f" ({gate.metric} of {reads:.0f} reads: {bound:.4g} at its lower bound)"
                    passed = False
        return passed, said
