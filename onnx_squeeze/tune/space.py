"""Search spaces: which passes and settings a search may combine, per model family, and how one
point of a space becomes a recipe.

A space is a list of parameters drawn by Optuna (define-by-run: a parameter that only matters
when another is set, such as the INT8 method, is drawn only then). ``prune`` is the fraction
the search bisects on (:mod:`onnx_squeeze.tune.search`); a family's ``pilots`` are its preset
recipes (arms) with that fraction left open, which the search bisects first, one arm after the
other, before TPE's draws. Its ``presets`` are the named recipes (``--recipe NAME``) a user would
try by hand, run as they are (aimed at the budget) before the pilot: their pruning finds its
own fraction, so no point of the space is quite one of them, and a search should not end
behind one (ppocr_cls: ``fast`` met latency=0.8 at 0.75x within a point of top-1, the arms
ended at 0.83x).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnx_squeeze.analysis import MAC_OPS, RECURRENT_GATES
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.recipe import PRESETS, Recipe, Step
from onnx_squeeze.shortcuts import PASS_ORDER

FAMILIES = ("cnn", "detector", "transformer")
GPU_PROVIDERS = ("cuda", "tensorrt")
FINETUNE_STEPS = (100, 300)  # fine-tuning's steps in the space (0: none)
# A pilot arm's first try at each fraction scores channels by weight norm, which needs no data:
# on the digits CNN, latency-steered to 0.35 and 0.5 of the time with recovery and INT8, it kept
# the reconstruction criterion's top-1 (0.9933 and 0.9917 on 599 test images) at two thirds of
# the trial's time (the reconstruction scores took 6.8 s of 23). At 0.6 it kept less (0.9816
# against 0.9883), so where it breaks the budget the arm's own criterion is tried at that
# fraction before the fraction counts as too much. Fine-tuned arms too: fine-tuned 300 steps
# after 0.7 of the time pruned (0.30-0.32x), a retrained digits CNN kept 0.9883 of top-1 scored
# by weight norm and 0.9766 by reconstruction, against a floor of 0.985.
CHEAP_CRITERION = "l2"
# The passes of a preset whose ``target`` the budget's gate becomes.
AIMED = ("prune_channels", "quantize_int8")


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension: a float in [low, high] on a grid of ``step``, or one of ``choices``;
    drawn only when ``when`` (parameter -> values it must have) holds."""

    name: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float = 0.05
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(name) in values for name, values in self.when)

    def describe(self) -> str:
        values = (
            "{" + ", ".join(map(str, self.choices)) + "}"
            if self.choices
            else f"[{self.low:g}, {self.high:g}] step {self.step:g}"
        )
        condition = " and ".join(f"{n} in {{{', '.join(map(str, v))}}}" for n, v in self.when)
        return f"{self.name} {values}" + (f"  (when {condition})" if condition else "")


@dataclasses.dataclass(frozen=True)
class Space:
    """The parameters, ``pilots``: the arms, each the values of the other parameters in one of
    the family's preset recipes, at which the search bisects ``prune`` first, in this order
    (none: no pilot), and ``presets``: the named recipes tried as they are before it."""

    family: str
    params: tuple[Param, ...]
    pilots: tuple[Mapping[str, Any], ...] = ()
    presets: tuple[str, ...] = ()

    def draw(self, suggest: Any) -> dict[str, Any]:
        """A point: ``suggest`` is an Optuna trial (``suggest_float``/``suggest_categorical``)."""
        params: dict[str, Any] = {}
        for param in self.params:
            if not param.active(params):
                continue
            if param.choices:
                params[param.name] = suggest.suggest_categorical(param.name, list(param.choices))
            else:
                params[param.name] = round(
                    suggest.suggest_float(param.name, param.low, param.high, step=param.step), 4
                )
        return params

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def pilot_point(
        self, arm: Mapping[str, Any], fraction: float, timed: bool, cheap: bool = False
    ) -> dict[str, Any]:
        """An arm's recipe at a pruning fraction, pruning steered by time for a latency target
        (``timed``), by MACs otherwise; ``cheap``: with ``CHEAP_CRITERION`` instead of the
        arm's."""
        point = {**arm, "prune": fraction}
        if cheap and "criterion" in point:
            point["criterion"] = CHEAP_CRITERION
        if self.param("steer") is not None and fraction > 0:
            point["steer"] = "latency" if timed else "macs"
        return {p.name: point[p.name] for p in self.params if p.name in point and p.active(point)}

    def describe(self) -> list[str]:
        lines = [f"search space ({self.family}):", *(f"  {p.describe()}" for p in self.params)]
        if self.presets:
            named = ", ".join(f"--recipe {name}" for name in self.presets)
            lines.append(f"  first: {named}, aimed at the budget")
        for number, arm in enumerate(self.pilots):
            fixed = ", ".join(f"{k}={v}" for k, v in arm.items() if self.param(k))
            first = not number and not self.presets
            lines.append(f"  {'first' if first else 'then'}: prune bisected with {fixed}")
        if any("criterion" in arm for arm in self.pilots):
            lines.append(
                f"  (an arm tries criterion={CHEAP_CRITERION} first at each fraction, its own "
                "where that breaks the budget)"
            )
        return lines


def family_of(model: ir.Model) -> str:
    """cnn, detector (at least as many convolutions as other layers that multiply by weights,
    outputs that are not one score per class) or transformer (more matrix products, recurrent
    layers or neither: MLPs and RNNs too). Counted in every graph (If branches hold silero-vad's
    layers), quantized ones too: tashkeel, two LSTMs and no MatMul or Conv, was searched as a
    detector, with no dynamic INT8 in its space."""
    ops = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))
    layers = {op: n for op, n in ops.items() if op in MAC_OPS or op in RECURRENT_GATES}
    convs = sum(n for op, n in layers.items() if "Conv" in op)
    matrices = sum(layers.values()) - convs
    if convs >= matrices and convs:
        outputs = [len(o.shape) if o.shape is not None else 0 for o in model.graph.outputs]
        return "detector" if any(rank != 2 for rank in outputs) else "cnn"
    return "transformer"


def build_space(family: str, providers: Sequence[str] = ("cpu",), finetune: bool = False) -> Space:
    """The preset space of a family; FP16 joins where the first provider is a GPU's,
    fine-tuning (PyTorch) when asked."""
    if family not in FAMILIES:
        raise SettingsError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    gpu = bool(providers) and providers[0] in GPU_PROVIDERS
    structural = family != "transformer"
    quantizers = ("none", "int8") if structural else ("none", "int8", "int8_dynamic", "int4")
    if gpu:
        quantizers += ("fp16",)
    prune_high = {"cnn": 0.7, "detector": 0.5, "transformer": 0.5}[family]
    pruned = tuple(round(x * 0.05, 2) for x in range(1, round(prune_high / 0.05) + 1))
    params = [Param("prune", low=0.0, high=prune_high)]
    if structural:
        params += [
            Param("steer", ("macs", "latency"), when=(("prune", pruned),)),
            Param(
                "criterion", ("l1", "l2", "activation", "reconstruction"), when=(("prune", pruned),)
            ),
        ]
    else:
        params.append(Param("low_rank", low=0.0, high=0.5))
    params.append(Param("recover", (True, False)))
    if finetune:
        params.append(Param("finetune", (0, *FINETUNE_STEPS)))
    params += [
        Param("quantize", quantizers),
        Param("int8_method", ("mse", "percentile", "minmax"), when=(("quantize", ("int8",)),)),
        Param("speed_check", (False, True), when=(("quantize", ("int8",)),)),
    ]
    # the mild end first: INT8 under accuracy control (its own fallback to float keeps the
    # budget), speed-checked, after pruning with recovery; the reconstruction criterion kept the
    # most accuracy at high fractions on the trained digits CNN (benchmarks/results/distill.md)
    pruned_arm: dict[str, Any] = {
        "recover": True,
        "finetune": 0,
        **({"criterion": "reconstruction"} if structural else {"low_rank": 0.0}),
    }
    int8_arm = {**pruned_arm, "quantize": "int8", "int8_method": "mse", "speed_check": True}
    # then pruning alone, deeper: INT8's fixed costs (quantizing the input, layout changes,
    # quantized adds) outweigh what it saves on convolutions pruning already made small (the
    # digits CNN: INT8 after 50-60 % of the time pruned stalls at 0.40x, pruning alone reaches
    # 0.29x), and then the same pruning fine-tuned, which keeps the metric at fractions where
    # recovery alone breaks the budget (0.29x at 0.5 points of top-1 below, 1.8 without)
    arms = [int8_arm, {**pruned_arm, "quantize": "none"}]
    if finetune:
        arms.append({**pruned_arm, "quantize": "none", "finetune": FINETUNE_STEPS[-1]})
    presets = ("fast",) if structural else ("fast-transformer",)
    return Space(family, tuple(params), tuple(arms), presets)


def recipe_for(params: Mapping[str, Any], gate: str | None = None) -> Recipe:
    """The recipe of one point; ``gate``: the target of INT8's accuracy control (the layers that
    harm the metric most go back to float until it holds) and of a preset's default pruning
    (as much as holds it). A point ``{"preset": NAME}`` is that named recipe."""
    if params.get("preset"):
        named = Recipe.from_dict(PRESETS[params["preset"]])
        aimed = gate is not None
        return Recipe(
            steps=[
                Step(
                    s.name,
                    {**s.settings, "target": gate} if aimed and s.name in AIMED else s.settings,
                )
                for s in named.steps
            ],
            prepare=named.prepare,
        )
    steps: list[Step] = []
    prune = float(params.get("prune") or 0)
    if prune > 0:
        key = "latency_target" if params.get("steer") == "latency" else "macs_target"
        settings: dict[str, Any] = {key: prune}
        if params.get("criterion"):
            settings["criterion"] = params["criterion"]
        steps.append(Step("prune_channels", settings))
    low_rank = float(params.get("low_rank") or 0)
    if low_rank > 0:
        steps.append(Step("low_rank", {"macs_target": low_rank, "data_aware": True}))
    if steps and params.get("recover"):
        steps.append(Step("reconstruct"))
    if params.get("finetune"):
        steps.append(Step("finetune", {"steps": int(params["finetune"])}))
    quantize = params.get("quantize", "none")
    if quantize == "int8":
        settings = {"method": params.get("int8_method", "mse")}
        if params.get("speed_check"):
            settings["speed_check"] = True
        if gate:
            settings["target"] = gate
        steps.append(Step("quantize_int8", settings))
    elif quantize == "int8_dynamic":
        steps.append(Step("quantize_dynamic"))
    elif quantize == "int4":
        steps.append(Step("quantize_weights", {"bits": 4, "algorithm": "gptq"}))
    elif quantize == "fp16":
        steps.append(Step("fp16"))
    steps.sort(key=lambda step: PASS_ORDER.index(step.name))
    return Recipe(steps=steps)
