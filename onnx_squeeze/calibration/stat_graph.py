"""The calibration model that reduces tensors to statistics inside onnxruntime.

Returning every collected tensor whole costs twice: onnxruntime copies each one out (and cannot
reuse its buffer), and numpy then reads it again for extremes, histogram and channel means. On
ResNet-18 that overhead was as large as the inference itself. Here a tensor becomes its min and
max (ReduceMin/ReduceMax, exact), a strided sample of its values for the histogram, and where
asked its per-channel means (ReduceMean), so a run returns kilobytes instead of megabytes.

The output of a non-decreasing elementwise op (Relu, Sigmoid, Clip...) whose input is reduced
too is not reduced at all: its extremes and sample are the op applied to the input's. On a
YOLO-style detector this spares a third of the reductions (every SiLU's Sigmoid) and lets
onnxruntime fuse Sigmoid and Mul again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array, new_initializer
from onnx_squeeze.model_io import opset_version

# element types ReduceMin/ReduceMax/ReduceMean accept from opset 13 on
REDUCIBLE = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass(frozen=True)
class Wanted:
    """What to reduce one tensor to: ``step`` is the sample stride (None: no sample),
    ``channel_axis`` the axis of the channel means (None: no means), ``rank`` its rank."""

    rank: int
    step: int | None = None
    channel_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class Reduction:
    """Output names of one tensor's reductions in the reduced model (None: not computed)."""

    low: str
    high: str
    count: str
    sample: str | None
    means: str | None


@dataclasses.dataclass(frozen=True)
class Derived:
    """A tensor whose statistics follow from the reductions of ``source``: ``function`` is
    non-decreasing and elementwise, so it maps the source's extremes to the tensor's and its
    strided sample to the tensor's sample (same shape, same stride)."""

    source: str
    function: Callable[[np.ndarray], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """Clip's constant bounds (inputs from opset 11, attributes before), None if not constant."""
    if len(node.inputs) == 1 and ("min" in node.attributes or "max" in node.attributes):
        return attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if index < len(node.inputs) else None
        array = constant_array(value) if value is not None else None
        if value is not None and array is None:
            return None
        bounds.append(default if array is None else float(array))
    return bounds[0], bounds[1]


def _monotone(node: ir.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    """The numpy form of ``node`` when it is a non-decreasing elementwise op of one input."""
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if op == "Relu":
        return functools.partial(np.maximum, 0.0)
    if op == "Sigmoid":
        return _sigmoid
    if op == "Tanh":
        return np.tanh
    if op == "LeakyRelu" and attribute(node, "alpha", 0.01) >= 0:
        alpha = attribute(node, "alpha", 0.01)
        return lambda x: np.where(x >= 0, x, alpha * np.asarray(x))
    if op == "HardSigmoid" and attribute(node, "alpha", 0.2) >= 0:
        alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
        return lambda x: np.clip(alpha * np.asarray(x) + beta, 0.0, 1.0)
    if op == "Clip" and (bounds := _clip_bounds(node)) is not None:
        return lambda x: np.clip(x, *bounds)
    return None


def derived(model: ir.Model, wanted: Mapping[str, Wanted]) -> dict[str, Derived]:
    """The tensors of ``wanted`` whose statistics follow from another one's reductions: made
    by a non-decreasing elementwise op from a tensor reduced alike (or itself derived), with
    no channel means asked."""
    found: dict[str, Derived] = {}
    for node in model.graph:  # topological: a source is settled before what reads it
        output = node.outputs[0] if len(node.outputs) == 1 else None
        want = wanted.get(output.name) if output is not None else None
        function = _monotone(node) if want is not None and want.channel_axis is None else None
        first = node.inputs[0] if function is not None and node.inputs else None
        source = first.name if first is not None else None
        if source is None or source not in wanted:
            continue
        if (wanted[source].rank, wanted[source].step) != (want.rank, want.step):
            continue
        if source in found:  # chained: apply after the source's own function
            earlier = found[source]
            source, function = earlier.source, _compose(function, earlier.function)
        found[output.name] = Derived(source, function)
    return found


def _compose(
    outer: Callable[[np.ndarray], np.ndarray], inner: Callable[[np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: outer(inner(x))


def stride(size: int, values: int) -> int:
    """A step that keeps at most ``values`` of every ``size`` values and is coprime to
    ``size``, so the sample walks through every position of every axis (a step that divides
    the image size would read one column of each channel only)."""
    step = max(1, math.ceil(size / max(1, values)))
    while math.gcd(step, size) != 1:
        step += 1
    return step


class _Builder:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.names = UniqueNames(model)
        self.opset = opset_version(model)

    def constant(self, values: list[int]) -> ir.Value:
        array = np.array(values, dtype=np.int64)
        return new_initializer(
            self.graph, self.names, "onnx_squeeze.stat.const", array, ir.DataType.INT64
        )

    def node(self, op: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        created = ir.node(op, inputs, attributes, name=self.names.new(f"onnx_squeeze.stat.{op}"))
        created.outputs[0].name = self.names.new(f"{created.name}_output")
        self.graph.append(created)
        return created.outputs[0]

    def reduce(self, op: str, value: ir.Value, axes: list[int] | None) -> ir.Value:
        """``op`` over ``axes`` (all axes when None), without kept dimensions; axes are an
        input from opset 18 on, an attribute before."""
        if axes is None:
            return self.node(op, [value], keepdims=0)
        if self.opset >= 18:
            return self.node(op, [value, self.constant(axes)], keepdims=0)
        return self.node(op, [value], keepdims=0, axes=axes)

    def sample(self, value: ir.Value, step: int) -> ir.Value:
        flat = self.node("Reshape", [value, self.constant([-1])])
        if step == 1:
            return flat
        bounds = [self.constant([0]), self.constant([2**62]), self.constant([0])]
        return self.node("Slice", [flat, *bounds, self.constant([step])])


def reduced_model(
    model: ir.Model, wanted: Mapping[str, Wanted], leave_out: Collection[str] = ()
) -> tuple[ir.Model, dict[str, Reduction]]:
    """A clone of ``model``, whose graph outputs are the collected tensors, where each output
    named in ``wanted`` is replaced by its reductions (and its number of values), those named
    in ``leave_out`` are dropped (their statistics are derived) and the others stay whole."""
    copy = model.clone()  # initializer tensors shared
    builder = _Builder(copy)
    outputs: list[ir.Value] = []
    reductions: dict[str, Reduction] = {}
    for value in list(copy.graph.outputs):
        if value.name in leave_out:
            continue
        want = wanted.get(value.name)
        if want is None:
            outputs.append(value)
            continue
        low = builder.reduce("ReduceMin", value, None)
        high = builder.reduce("ReduceMax", value, None)
        count = builder.node("Size", [value])
        computed = [low, high, count]
        sample = means = None
        if want.step is not None:
            sample = builder.sample(value, want.step)
            computed.append(sample)
        if want.channel_axis is not None:
            axis = want.channel_axis % want.rank
            others = [i for i in range(want.rank) if i != axis]
            means = builder.reduce("ReduceMean", value, others)
            computed.append(means)
        outputs.extend(computed)
        reductions[value.name] = Reduction(
            low.name,
            high.name,
            count.name,
            sample.name if sample else None,
            means.name if means else None,
        )
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(outputs)
    return copy, reductions
