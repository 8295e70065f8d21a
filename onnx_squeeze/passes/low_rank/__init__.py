"""Low-rank factorization of Gemm, MatMul and Conv layers with constant weights.

Each layer is replaced by a chain of smaller layers of the same kind, so that later passes
(channel pruning, quantization) still see plain Conv/Gemm/MatMul with constant weights:

- ``svd`` (Gemm/MatMul): ``X·W → (X·A)·B``; Gemm's bias, ``beta`` and ``transA/transB`` stay on
  the right factor, ``alpha`` is folded into B; a MatMul whose constant is the first operand
  becomes ``A·(B·X)``.
- ``channel`` (Conv): the original kernel to r channels, then a 1×1 Conv.
- ``spatial`` (2-D Conv): a kh×1 Conv to r channels, then a 1×kw Conv (strides, pads, dilations
  and ``auto_pad`` split by axis, which is exact).
- ``tucker2`` (Conv): 1×1 reduce → kh×kw core → 1×1 expand (HOSVD of the channel modes).
- ``auto``: ``svd`` for Gemm/MatMul and 1×1 Convs (as ``channel``); for larger kernels the
  scheme that costs the fewest MACs at the requested energy (or, under a budget, the best trade).

Ranks come from one of: ``rank``, ``ratio`` (of full rank), ``energy`` (share of the spectrum
kept: one minus the mean over output channels of each channel's relative error) or a
whole-model ``macs_target`` / ``params_target`` (fraction to remove), for which ranks are
allocated across layers by energy lost per MAC (or parameter) saved; each is honoured as given.
With none of them (the default), the ranks are the lowest at which the factorized model still
meets the fidelity gate on calibration data, and layers whose factors do not run faster stay
whole; when nothing can be factorized so, the model is left unchanged with a warning
(:mod:`.gate_search`). A layer is factorized only when that saves MACs. With ``data_aware``,
the input second moments measured on the calibration data whiten the decomposition so that it
minimises the layer's output error rather than its weight error (see :mod:`.factorize`).

Modules: :mod:`.plans` (a layer's candidate schemes and their costs), :mod:`.ranks` (rank
selection), :mod:`.gate_search` (the default: ranks by the gate), :mod:`.rewrite` (the factor
nodes swapped in), :mod:`.factorize` (the numerics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir

from onnx_squeeze import analysis, gates, runtime
from onnx_squeeze.blas import blas_threads
from onnx_squeeze.calibration.grams import GramSpec, budget_groups, collect_grams
from onnx_squeeze.errors import SettingsError, ShapeUnknownError
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.passes.base import Pass, bounded, choice, register, subset
from onnx_squeeze.passes.low_rank import factorize, gate_search
from onnx_squeeze.passes.low_rank.plans import Candidate, Plan, find_candidate, plans_for
from onnx_squeeze.passes.low_rank.ranks import (
    Option,
    allocate,
    cheapest_with_energy,
    original_cost,
    unprofitable,
)
from onnx_squeeze.passes.low_rank.rewrite import factorize_layer
from onnx_squeeze.prepare import infer_shapes
from onnx_squeeze.progress import track
from onnx_squeeze.records import PassContext, PassReport, unselected

SCHEMES = ("auto", "svd", "channel", "spatial", "tucker2")
SUPPORTED_OPS = ("Gemm", "MatMul", "Conv")
# Data-aware Grams (float64) held at once: one 3×3 Conv over 512 channels (162 MiB) alone per
# calibration pass, since the factors of every layer decomposed before are held beside them and
# accumulating a Gram makes a temporary as large. ResNet-50 at 30 % MACs peaked at 1139 MiB
# with 192 MiB (a small Gram beside each large one), 1043 MiB with 170.
GRAM_BUDGET = 170 * 2**20


@dataclasses.dataclass
class LowRankSettings:
    # factorization: "auto" (per layer, the cheapest at the energy asked), "svd" (Gemm/MatMul
    # and 1x1 Conv), "channel" or "spatial" SVD of a Conv, or "tucker2"
    scheme: str = choice("auto", SCHEMES)
    # at most one of the next five; none: the lowest ranks that keep the gate ``target``
    rank: int | None = bounded(None, low=1)
    ratio: float | None = bounded(None, above=0, high=1)  # share of full rank kept
    energy: float | None = bounded(None, above=0, high=1)  # share of squared singular values kept
    macs_target: float | None = bounded(None, above=0, below=1)  # share of model MACs removed
    params_target: float | None = bounded(None, above=0, below=1)  # share of parameters removed
    data_aware: bool = False  # whiten by each layer's input Gram (calibration data): output error
    # data-aware: fraction of the mean input energy added to the diagonal
    damping: float = bounded(0.01, low=0)
    round_to: int = bounded(8, low=1)  # 1: no rounding
    min_macs: int = bounded(0, low=0)  # layers with fewer MACs per sample stay whole
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: Sequence[str] = subset(SUPPORTED_OPS, SUPPORTED_OPS)
    shapes: list[str] = dataclasses.field(default_factory=list)  # NAME:1x128, for MAC counts
    # the gate the default ranks keep, e.g. "top1_agreement>=0.99"; empty: the default gate
    # (verdict.DEFAULT_GATE)
    target: str = ""
    # calibration batches the default's gate search and its check each read at least (more
    # where its agreements need more reads to be decided)
    check_batches: int = bounded(8, low=1)


# ---------------------------------------------------------------------------------------------
# The pass


@register
class LowRank(Pass):
    """Factorize Gemm/MatMul/Conv weights into chains of smaller layers (see the module doc)."""

    name = "low_rank"
    Settings = LowRankSettings

    def validate(self) -> None:
        s = self.settings
        chosen = [
            key
            for key in ("rank", "ratio", "energy", "macs_target", "params_target")
            if getattr(s, key) is not None
        ]
        if len(chosen) > 1:
            raise SettingsError(
                f"low_rank: set only one of rank, ratio, energy, macs_target, params_target "
                f"(got {', '.join(chosen)})"
            )
        runtime.parse_shape_overrides(s.shapes)
        if s.target:
            gates.parse_gates(s.target)

    @property
    def mode(self) -> str:
        s = self.settings
        for key in ("rank", "ratio", "energy", "macs_target", "params_target"):
            if getattr(s, key) is not None:
                return key
        return "gate"

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        s = self.settings
        if s.data_aware and not context.data.supplied:
            raise SettingsError(
                "low_rank: data_aware=true needs calibration data: pass --calib (a .npz file, "
                "an image folder, or 'random' for a smoke test) or set data_aware=false"
            )
        shapes = runtime.parse_shape_overrides(s.shapes)
        if not shapes:
            try:
                shapes = context.input_shapes(model)
            except ShapeUnknownError:
                if s.macs_target is not None:
                    raise  # a MACs budget needs real MACs
        summary = analysis.analyze(model, shapes=shapes)
        node_macs = {
            id(node): cost.macs
            for node, cost in zip(
                ir.traversal.RecursiveGraphIterator(model.graph), summary.nodes, strict=True
            )
        }
        if any(graph is not model.graph for graph in model.graphs()):
            report.notes.append("nodes inside If/Loop/Scan bodies are not factorized")
        layers = self._layers(model, node_macs, report)
        plans, fallback = {}, {}
        for layer in layers:
            plans[layer], fallback[layer] = plans_for(layer, s.scheme)
        # The default's gate check reads the last batches, kept from the Grams: a whitening
        # fitted to them flattered it (ddddocr_beta: argmax agreement 0.994 on batches the
        # Grams had seen, 0.977 held out).
        gram_batches = None
        if self.mode == "gate":
            check, gram_batches, data = gate_search.gate_check(
                model, context, s.target, s.check_batches
            )
        self._decompose(model, plans, context, gram_batches)
        if self.mode in ("macs_target", "params_target"):
            chosen = self._budget(plans, summary, report)
        elif self.mode == "gate":
            chosen = gate_search.search(
                model,
                lambda level: self._at_level(plans, level),
                context,
                report,
                check=check,
                data=data,
                pass_name=self.name,
            )
            recorded = {record.node for record in report.records}
            for layer in plans:
                if layer not in chosen and layer.name not in recorded:
                    report.skip(layer.node, "kept whole: no rank the gate allows saves MACs")
        else:
            chosen = {
                layer: self._per_layer(layer_plans, report) for layer, layer_plans in plans.items()
            }
        names = UniqueNames(model)
        for layer, option in chosen.items():
            if option is not None:
                factorize_layer(model, option.plan, option.rank, names, self.name)
                self._record(layer, option, fallback[layer], report)
        if report.changed:
            infer_shapes(model, report)

    def _layers(
        self, model: ir.Model, node_macs: dict[int, int], report: PassReport
    ) -> list[Candidate]:
        layers = []
        for node in model.graph:
            op = "Conv" if node.op_type == "ConvTranspose" else node.op_type
            if node.domain not in ("", "ai.onnx") or op not in self.settings.op_types:
                continue
            reason = unselected(node.name or "", self.settings.include, self.settings.exclude)
            if reason:
                report.skip(node, reason)
                continue
            macs = node_macs.get(id(node), 0)
            found = find_candidate(node, macs)
            if isinstance(found, str):
                report.skip(node, found)
            elif macs < self.settings.min_macs:
                report.skip(node, f"{macs} MACs, below min_macs={self.settings.min_macs}")
            else:
                layers.append(found)
        return layers

    def _decompose(
        self,
        model: ir.Model,
        plans: dict[Candidate, list[Plan]],
        context: PassContext,
        batches: int | None,
    ) -> None:
        """Decompose every plan, whitened by its input Gram (over the first ``batches``
        calibration batches; None: all) in data-aware mode.

        Memory is that of one budget group of Grams (``GRAM_BUDGET``), largest first, beside
        the factors of the plans decomposed so far (each kept only up to the ranks that save
        MACs): the Grams are collected group by group, each is overwritten by its damping and
        dropped once the plans that share its input are decomposed (a large Gram needs no
        Cholesky root: :class:`.factorize.Whitening`). Held for every layer at once, they took
        a data-aware ResNet-50 to 2.7 GB. They are not kept in the calibration store: the
        rewritten model is another model, so no later pass could read them."""
        every = [plan for layer_plans in plans.values() for plan in layer_plans]
        specs: dict[Plan, GramSpec | None] = dict.fromkeys(every)
        if self.settings.data_aware:
            specs = {plan: plan.gram_spec() for plan in every}
        by_input: dict[GramSpec | None, list[Plan]] = {}
        for plan, spec in specs.items():
            by_input.setdefault(spec, []).append(plan)
        groups = budget_groups([spec for spec in by_input if spec is not None], GRAM_BUDGET)
        # Largest Grams first, while the fewest factors are held beside them.
        groups.sort(key=lambda group: -max(spec.nbytes for spec in group))
        progress = iter(track(every, "low_rank decompositions"))
        for group in [[None], *groups]:
            wanted = [spec for spec in group if spec is not None]
            grams = (
                collect_grams(
                    model,
                    wanted,
                    context.data,
                    provider=context.providers[0],
                    batches=batches,
                    label="low_rank input statistics",
                    keep=False,
                )
                if wanted
                else {}
            )
            for spec in group:
                moments = grams.pop(spec, None) if spec is not None else None
                white = (
                    factorize.whitening(
                        moments.gram, self.settings.damping, moments.rows, overwrite=True
                    )
                    if moments is not None
                    else None
                )
                del moments  # the damped Gram lives on in the whitening alone
                for plan in by_input.get(spec, []):
                    # Single-threaded: these matrices are small for BLAS, and OpenBLAS threads
                    # spinning on a busy machine made each SVD hundreds of times slower.
                    with blas_threads(1):
                        plan.decompose(white, paying_only=True)
                    next(progress, None)
                del white  # before the next Gram is made or collected

    def _at_level(
        self, plans: dict[Candidate, list[Plan]], energy: float
    ) -> dict[Candidate, Option]:
        """Per layer, the cheapest option that keeps ``energy``, where it saves MACs."""
        found = {}
        for layer, layer_plans in plans.items():
            option = cheapest_with_energy(layer_plans, energy, self.settings.round_to)
            if option.macs < original_cost(layer)[0]:
                found[layer] = option
        return found

    def _per_layer(self, plans: list[Plan], report: PassReport) -> Option | None:
        s = self.settings
        layer = plans[0].candidate
        if self.mode == "energy":
            option = cheapest_with_energy(plans, s.energy, s.round_to)
            why = f"energy {s.energy} needs "
        else:
            plan = next((p for p in plans if p.scheme == "tucker2"), plans[0])
            rank = (
                plan.fixed(s.rank, s.round_to)
                if self.mode == "rank"
                else plan.of_ratio(s.ratio, s.round_to)
            )
            option, why = Option.of(plan, rank), ""
        if option.macs >= original_cost(layer)[0]:
            report.skip(layer.node, unprofitable(option, why))
            return None
        return option

    def _budget(
        self, plans: dict[Candidate, list[Plan]], summary: analysis.ModelSummary, report: PassReport
    ) -> dict[Candidate, Option | None]:
        s = self.settings
        metric = "macs" if self.mode == "macs_target" else "params"
        target = s.macs_target if metric == "macs" else s.params_target
        total = float(summary.macs if metric == "macs" else summary.params)
        index = 0 if metric == "macs" else 1
        candidates = {}
        for layer, layer_plans in plans.items():
            whole = original_cost(layer)
            options = [
                Option.of(plan, rank) for plan in layer_plans for rank in plan.ranks(s.round_to)
            ]
            candidates[layer] = [
                o for o in options if o.macs < whole[0] and (o.macs, o.params)[index] < whole[index]
            ]
        fixed = total - sum(original_cost(layer)[index] for layer in candidates)
        chosen, spent = allocate(candidates, metric, (1 - target) * total, fixed, max(total, 1.0))
        removed = 1 - spent / total if total else 0.0
        report.notes.append(
            f"{metric}_target {target}: {removed:.1%} of the model's {metric} removed"
        )
        if spent > (1 - target) * total * (1 + 1e-6):
            report.notes.append(
                f"{metric}_target {target} not reached: factorizing every layer as far as it pays "
                f"removes {removed:.1%}"
            )
        for layer, option in chosen.items():
            if option is None:
                reason = (
                    "no rank saves MACs" if not candidates[layer] else "the budget kept it whole"
                )
                report.skip(layer.node, reason)
        return chosen

    def _record(self, layer: Candidate, option: Option, fallback: str, report: PassReport) -> None:
        rank = "/".join(map(str, option.rank))
        full = "/".join(map(str, option.plan.full))
        detail = f"{option.plan.scheme} rank {rank} of {full}, energy kept {option.energy:.4f}"
        if self.settings.data_aware:
            detail += " (output energy, data-aware)"
        if fallback:
            detail += f"; {fallback}"
        macs, params = original_cost(layer)
        report.record(
            layer.node, "factorized", detail,
            params_before=params, params_after=option.params, macs_before=macs, macs_after=option.macs,
        )  # fmt: skip
