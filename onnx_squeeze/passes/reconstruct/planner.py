"""The plan: which student layers differ from the teacher, how each is refitted, in which wave."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_squeeze.layers import Layer
from onnx_squeeze.passes.reconstruct.linear import (
    SPARSE,
    GemmLinear,
    Linear,
    MatMulLinear,
    bias_array,
    is_sparse,
    linear_of,
)
from onnx_squeeze.passes.reconstruct.settings import ReconstructSettings
from onnx_squeeze.records import SOURCE_NODE_KEY, PassReport, unselected


@dataclasses.dataclass
class Target:
    """A layer to refit, how, and the student tensor matched with the teacher's."""

    name: str  # the node reported on
    method: str  # "lstsq", "lowrank", "bn", "bias", "batchnorm"
    output: ir.Value  # matched with the teacher tensor of the same name
    node: ir.Node  # the node reported on and (but for low-rank) rewritten
    linear: Linear | None = None  # the layer (lowrank: the second factor)
    first: Linear | None = None  # lowrank: the first factor, whose input is the regression's
    wave: int = 0
    # no weight layer after it: its outputs are judged at the graph outputs, per channel
    output_layer: bool = False

    @property
    def input(self) -> ir.Value:
        fitted = self.first or self.linear
        return fitted.node.inputs[0] if fitted else self.node.inputs[0]


def _differs(student: ir.Value | None, teacher: ir.Value | None) -> bool:
    """Whether two constant inputs hold different data (non-constants are compared elsewhere)."""
    if (student is None) != (teacher is None):
        return True
    if student is None or student.const_value is None:
        return False
    if teacher is None or teacher.const_value is None:
        return True
    if student.const_value is teacher.const_value:
        return False
    a, b = student.const_value.numpy(), teacher.const_value.numpy()
    return a.shape != b.shape or not np.array_equal(a, b)


def _changed_nodes(student: ir.Graph, teacher: ir.Graph) -> set[ir.Node]:
    """Student nodes that compute something else than the teacher's tensor of the same name."""
    producers = {out.name: node for node in teacher for out in node.outputs if out.name}
    changed: set[ir.Node] = set()
    dirty: set[str] = set()
    for node in student:
        twin = producers.get(node.outputs[0].name) if node.outputs else None
        differs = (
            twin is None
            or twin.op_type != node.op_type
            or len(twin.inputs) != len(node.inputs)
            or any(v is not None and v.name in dirty for v in node.inputs)
            or any(_differs(a, b) for a, b in zip(node.inputs, twin.inputs, strict=False))
        )
        if differs:
            changed.add(node)
            dirty.update(out.name for out in node.outputs if out.name)
    return changed


def _downstream_layers(graph: ir.Graph) -> set[ir.Node]:
    """Nodes with a Conv/Gemm/MatMul somewhere after them (so not the model's head)."""
    result: set[ir.Node] = set()
    for node in reversed(list(graph)):
        for out in node.outputs:
            for use in out.uses():
                consumer = use.node
                if consumer in result or (
                    consumer.op_type in ("Conv", "Gemm", "MatMul")
                    and isinstance(Layer.of(consumer), Layer)
                ):
                    result.add(node)
    return result


def _first_factor(layer: Linear, teacher_names: set[str]) -> Linear | None:
    """The first node of a factorized pair that ``layer`` ends, when they can be fitted jointly."""
    value = layer.node.inputs[0]
    producer = value.producer() if value is not None else None
    source = layer.node.metadata_props.get(SOURCE_NODE_KEY)
    if (
        producer is None
        or source is None
        or producer.metadata_props.get(SOURCE_NODE_KEY) != source
        or value.name in teacher_names
        or len(value.uses()) != 1
        or not (isinstance(layer, GemmLinear | MatMulLinear) or getattr(layer, "pointwise", False))
    ):
        return None
    first, _ = linear_of(producer)
    if first is None or first.groups != 1 or type(first) is not type(layer):
        return None
    return first


class Planner:
    """Chooses the student layers to refit and their method and wave."""

    def __init__(self, settings: ReconstructSettings, teacher: ir.Model, report: PassReport):
        self.settings = settings
        self.report = report
        self.sparse_layers = 0
        graph = teacher.graph
        self.teacher_names = {v.name for v in graph.inputs} | {
            out.name for node in graph for out in node.outputs if out.name
        }

    def plan(self, student: ir.Model, teacher: ir.Model) -> list[Target]:
        changed = _changed_nodes(student.graph, teacher.graph)
        not_head = _downstream_layers(student.graph)
        layers = []
        for node in student.graph:
            if node not in changed or not node.name:
                continue
            if unselected(node.name, self.settings.include, self.settings.exclude):
                continue
            layer = self.layer(node, head=node not in not_head)
            if layer is not None:
                layers.append(layer)
        self.assign_waves(student.graph, layers)
        if self.sparse_layers:
            self.report.notes.append(
                f"{self.sparse_layers} sparse layer(s) (≥ {SPARSE:.0%} zero weights) not refitted "
                "densely: only per-channel scale/bias corrected, so their zeros stay"
            )
        return layers

    def layer(self, node: ir.Node, *, head: bool) -> Target | None:
        methods = set(self.settings.methods)
        if node.op_type == "BatchNormalization":
            if "bn" in methods and node.outputs[0].name in self.teacher_names:
                return Target(node.name, "batchnorm", node.outputs[0], node)
            return None
        linear, reason = linear_of(node)
        if linear is None and node.op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        output = node.outputs[0]
        if isinstance(linear, MatMulLinear) and linear.bias_add is not None:
            output = linear.bias_add.outputs[0]
        if output.name not in self.teacher_names:
            return None  # a first factor: refitted with its partner, or not at all
        if linear is not None and is_sparse(linear):
            # A dense refit would fill the zeros that weight pruning made; the per-channel
            # methods (bn scales rows, bias shifts) keep the pattern.
            methods -= {"lstsq", "head"}
            self.sparse_layers += 1
        if linear is not None and ("lstsq" in methods or (head and "head" in methods)):
            first = None
            if self.settings.factors == "both":
                first = _first_factor(linear, self.teacher_names)
            method = "lowrank" if first is not None else "lstsq"
            return Target(node.name, method, output, node, linear, first, output_layer=head)
        if linear is not None and "bn" in methods:
            return Target(node.name, "bn", output, node, linear)
        if "bias" in methods and bias_array(node, linear) is not None:
            others = _bias_sharers(node, linear)
            if others:
                # captcha_crnn's unrolled LSTM: 20 Gemms read one bias, and a shift per node
                # stored it 20 times (the file grew by 0.5 %)
                self.report.skip(
                    node,
                    f"bias shared with {others} other node(s): a shift per node would "
                    f"store it {others + 1} times",
                )
                return None
            return Target(node.name, "bias", output, node, linear)
        if "lstsq" in methods or "bn" in methods:
            self.report.skip(node, f"cannot refit: {reason or 'no enabled method applies'}")
        return None

    def assign_waves(self, graph: ir.Graph, layers: list[Target]) -> None:
        """Wave of a layer: how many planned layers lie on the longest path before it."""
        anchors = {(layer.first or layer.linear or layer).node: layer for layer in layers}
        level: dict[str, int] = {}
        for node in graph:
            depth = max((level.get(v.name, 0) for v in node.inputs if v is not None), default=0)
            if node in anchors:
                anchors[node].wave = depth
                depth += 1
            for out in node.outputs:
                level[out.name] = depth


def _bias_sharers(node: ir.Node, linear: Linear | None) -> int:
    """How many other nodes read the layer's bias (or the tensor it is dequantized from)."""
    value = linear.bias_value() if linear else (node.inputs[2] if len(node.inputs) > 2 else None)
    if value is None:
        return 0
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        value = producer.inputs[0]
    return len({use.node for use in value.uses()}) - 1
