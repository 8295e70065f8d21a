"""The default rank choice, when no rank, ratio, energy or budget is given: the most each layer
can be cut while the factorized model still meets the fidelity gate, and only where it pays.

Every layer is cut at one energy level: the cheapest of its plans whose energy reaches it, the
energy being one minus the mean over the layer's output channels of each channel's error
relative to its own energy (:mod:`.factorize`), so a level means the same error in every layer.
The level is the lowest of ``LEVELS`` at which a factorized copy still meets the gate
(``verdict.DEFAULT_GATE``, or the pass's ``target``) against the model as it came, on the first
calibration batches, found by bisection (fidelity falls as the level falls), then checked on the
last batches, which data-aware Grams do not see, stepping back to gentler levels while it fails.
Each reads as many batches as its agreement gates need to be decided
(:mod:`onnx_squeeze.gate_check`: 50 reads for a 0.98 gate, up to half the data each); on
fewer, no level is taken to meet them, and the warning says how many reads the gate needs. A
layer whose factors do not run faster than the layer, as onnxruntime's profiler times them at
batch 1 (:mod:`onnx_squeeze.layer_times`), stays whole: fewer MACs in two thin Convs can take
longer than one wide one. When no level both meets the gate and changes a layer, the model is
left as it came and a warning says why.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Callable

import onnx_ir as ir

from onnx_squeeze import layer_times, runtime
from onnx_squeeze.calibration.service import resized
from onnx_squeeze.gate_check import GateCheck
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.layers import Layer
from onnx_squeeze.passes.low_rank.plans import Candidate
from onnx_squeeze.passes.low_rank.ranks import Option
from onnx_squeeze.passes.low_rank.rewrite import factorize_layer
from onnx_squeeze.records import SOURCE_NODE_KEY, PassContext, PassReport

# Energy levels tried, gentlest first (1 - mean relative channel error of each layer).
LEVELS = (0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)

Choice = dict[Candidate, Option]


def factorized_copy(model: ir.Model, chosen: Choice, pass_name: str) -> ir.Model:
    """A copy of ``model`` with the chosen layers factorized (the model itself is untouched;
    the copy shares its weight tensors)."""
    clone = model.clone()
    twins = dict(zip(map(id, model.graph), clone.graph, strict=True))
    names = UniqueNames(clone)
    for layer, option in chosen.items():
        twin = Layer.of(twins[id(layer.node)])
        assert isinstance(twin, Layer)
        plan = copy.copy(option.plan)
        plan.candidate = dataclasses.replace(layer, layer=twin)
        factorize_layer(clone, plan, option.rank, names, pass_name)
    return clone


def gate_check(
    model: ir.Model, context: PassContext, target: str, batches: int
) -> tuple[GateCheck, int | None, str]:
    """The gate's check against ``model``: on the first calibration batches (``search``: at
    least ``batches``, more as its agreements need, up to half the data) and on the last
    (``check``: the level the search picked, the lowest that passed among several noisy
    measurements, is judged on batches it was not picked on; captcha_crnn's held 13.4 dB on the
    search's batches and 10.7 on held-out ones), a quarter of the data up to ``batches``, or as
    many as its agreements need of those the search did not read; the batches before the
    check's, which data-aware Grams may read (None: all, for data of unknown length, whose
    check follows the search's batches); and a description of that data."""
    try:
        total: int | None = len(context.data)
    except TypeError:
        total = None
    provider = context.providers[0]
    if total is None:  # the check follows the search's batches
        check = GateCheck(model, {"search": context.data.batches()}, target, provider, batches)
        searched = len(check.feeds["search"])
        rest = itertools.islice(context.data.batches(), searched, None)
        check.add("check", rest, searched, max(searched, check.batches_to_decide("search")))
        gram_batches = None
    else:
        most = max(batches, total // 2)
        check = GateCheck(model, {}, target, provider)
        check.add("search", context.data.batches(), batches, most)
        searched = len(check.feeds["search"])
        # the last quarter up to ``batches``, or as many as the agreements need
        wanted = max(min(batches, total // 4), check.batches_to_decide("search"))
        held = min(wanted, total - searched) or min(batches, total // 4)
        gram_batches = total - held if held else None
        check.add("check", itertools.islice(context.data.batches(), total - held, None), held)
    if not check.feeds["check"]:
        check.add("check", check.feeds["search"])
    data = f"{searched} + {len(check.feeds['check'])} calibration batches"
    if context.data.is_random:
        data += f" of RANDOM data ({context.data.label})"
    return check, gram_batches, data


class LayerTiming:
    """Kernel time per layer of the model and of factorized copies, at batch 1 on the first
    calibration batch."""

    def __init__(self, model: ir.Model, context: PassContext) -> None:
        names = {spec.name for spec in runtime.input_specs(model)}
        first = {k: v for k, v in context.data.feed_at(0).items() if k in names}
        self.feed, self.provider = resized(first, model, 1), context.providers[0]
        self.original = layer_times.measure(model, self.feed, provider=self.provider).nodes

    def slower(self, copy_: ir.Model, chosen: Choice) -> dict[Candidate, tuple[float, float]]:
        """The chosen layers whose factors in ``copy_`` take at least the layer's time:
        (layer µs, factors µs)."""
        times = layer_times.measure(copy_, self.feed, provider=self.provider).nodes
        factors: dict[str, float] = {}
        for node, time in times.items():
            source = node.metadata_props.get(SOURCE_NODE_KEY)
            if source is not None:
                factors[source] = factors.get(source, 0.0) + time
        found = {}
        for layer in chosen:
            before, after = self.original.get(layer.node), factors.get(layer.name)
            if before is not None and after is not None and after >= before:
                found[layer] = (before, after)
        return found


def search(
    model: ir.Model,
    at_level: Callable[[float], Choice],
    context: PassContext,
    report: PassReport,
    *,
    check: GateCheck,
    data: str,
    pass_name: str,
) -> Choice:
    """The layers to factorize and how, by the gate and the profiler (the module doc), judged
    by ``check`` (:func:`gate_check`) on ``data``."""
    gate = check.gate
    timing = LayerTiming(model, context)
    deepest = at_level(LEVELS[-1])
    if not deepest:
        report.notes.append(
            f"WARNING: low_rank left the model unchanged: no layer's factors cost fewer MACs "
            f"than the layer, even at energy {LEVELS[-1]}"
        )
        return {}
    # Layers whose factors are slower even at the lowest ranks tried stay whole.
    slow = timing.slower(factorized_copy(model, deepest, pass_name), deepest)
    for layer, (before, after) in slow.items():
        report.skip(
            layer.node,
            f"its factors take {after:.0f} µs, the layer {before:.0f} µs (batch 1, profiled)",
        )

    @functools.cache
    def choice(level: float) -> Choice:
        return {k: v for k, v in at_level(level).items() if k not in slow}

    chosen, level, said = _bisect(choice, check, model, pass_name)
    if not chosen:
        gentlest = next((lv for lv in LEVELS if choice(lv)), LEVELS[-1])
        why = (
            f"at energy {gentlest}, the gentlest that changes a layer, the factorized model "
            f"misses the gate {gate}: {said}"
            if said
            else "no layer's factors both cost fewer MACs and run faster than the layer"
        )
        report.notes.append(
            f"WARNING: low_rank left the model unchanged: {why} (on {data}); "
            "give an energy, rank or macs_target to factorize anyway"
        )
        return {}
    slower = timing.slower(factorized_copy(model, chosen, pass_name), chosen)
    for layer, (before, after) in slower.items():
        del chosen[layer]
        report.skip(
            layer.node,
            f"its factors take {after:.0f} µs, the layer {before:.0f} µs (batch 1, profiled)",
        )
    if not chosen:
        report.notes.append(
            "WARNING: low_rank left the model unchanged: the factors the gate allows run no "
            "faster than their layers"
        )
        return {}
    report.notes.append(
        f"ranks by the gate {gate}: energy {level} per layer (of {', '.join(map(str, LEVELS))}), "
        f"the lowest at which it holds on the search's batches and then the check's ({said}; "
        f"on {data}); {len(chosen)} layers factorized"
    )
    return chosen


def _bisect(
    choice: Callable[[float], Choice], check: GateCheck, model: ir.Model, pass_name: str
) -> tuple[Choice, float, str]:
    """The choice at the lowest level whose copy meets the gate on the search's batches and
    then on the check's, stepping back to gentler levels while the check fails (levels that
    change no layer are passed over); that level, and what its check measured (the gentlest
    level's failure when none met it; empty when no level changes a layer)."""
    levels = [level for level in LEVELS if choice(level)]
    measured: dict[tuple[float, str], tuple[bool, str]] = {}

    def passes(index: int, on: str = "search") -> bool:
        key = (levels[index], on)
        if key not in measured:
            measured[key] = check(factorized_copy(model, choice(levels[index]), pass_name), on)
        return measured[key][0]

    if not levels:
        return {}, 0.0, ""
    if not passes(0):
        return {}, levels[0], measured[levels[0], "search"][1]
    low, high = 0, len(levels)  # levels[low] passes; levels[high:] fail (or are unknown)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if passes(middle) else (low, middle)
    while not passes(low, "check"):
        if low == 0:
            return {}, levels[0], measured[levels[0], "check"][1]
        low -= 1
    return dict(choice(levels[low])), levels[low], measured[levels[low], "check"][1]
