"""The calibration model that reduces tensors to statistics inside onnxruntime.

Returning every collected tensor whole costs twice: onnxruntime copies each one out (and cannot
reuse its buffer), and numpy then reads it again for extremes, histogram and channel means. On
ResNet-18 that overhead was as large as the inference itself. Here a tensor becomes its min and
max (ReduceMin/ReduceMax, exact), a strided sample of its values for the histogram, and where
asked its per-channel means (ReduceMean), so a run returns kilobytes instead of megabytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, new_initializer
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
    model: ir.Model, wanted: Mapping[str, Wanted]
) -> tuple[ir.Model, dict[str, Reduction]]:
    """A clone of ``model``, whose graph outputs are the collected tensors, where each output
    named in ``wanted`` is replaced by its reductions (and its number of values); the other
    outputs stay whole."""
    copy = model.clone()  # initializer tensors shared
    builder = _Builder(copy)
    outputs: list[ir.Value] = []
    reductions: dict[str, Reduction] = {}
    for value in list(copy.graph.outputs):
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
