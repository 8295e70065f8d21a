"""Applying an FP16/BF16 plan: constants converted once per precision, new value types, and one
Cast per value, graph and precision where a consumer needs the other precision.

Graph borders keep FP32: the model's inputs and outputs (unless told otherwise) and every
If/Loop/Scan body's inputs and outputs, so that a control-flow node's types never change. An
outer-scope value read inside a body is cast inside that body when the reader needs the other
precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, constant_array
from onnx_squeeze.records import mark_created

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24
NUMPY_LOW = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}


@dataclasses.dataclass
class Plan:
    """Which nodes run in low precision, with the FLOAT slots that change type; ``pinned``:
    graph inputs and outputs (of the model and of every body) that stay FP32."""

    low: dict[ir.Node, tuple[list[int], list[int]]] = dataclasses.field(default_factory=dict)
    kept: dict[ir.Node, str] = dataclasses.field(default_factory=dict)  # FP32, with the reason
    pinned: set[ir.Value] = dataclasses.field(default_factory=set)

    def wants_low(self, node: ir.Node, index: int) -> bool:
        slots = self.low.get(node)
        return slots is not None and index in slots[0]

    def produced_fp32(self, value: ir.Value | None) -> bool:
        """True when ``value`` comes from an FP32 node or pinned graph input (constants
        convert freely)."""
        if value is None or constant_array(value) is not None:
            return False
        producer = value.producer()
        return value in self.pinned if producer is None else producer not in self.low


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model, If/Loop/Scan bodies included."""
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def to_low(array: np.ndarray, low: ir.DataType) -> tuple[np.ndarray, int]:
    """The array in the low type, and how many values had to be clamped into its range."""
    array = np.asarray(array, dtype=np.float32)
    if low != ir.DataType.FLOAT16:
        return array.astype(NUMPY_LOW[low]), 0
    magnitude = np.abs(array)
    tiny = (magnitude > 0) & (magnitude < FP16_TINY)
    huge = magnitude > FP16_MAX
    count = int(tiny.sum() + huge.sum())
    if count:
        array = np.where(tiny, np.copysign(FP16_TINY, array), array)
        array = np.clip(array, -FP16_MAX, FP16_MAX)
    return array.astype(np.float16), count


def convert_constants(model: ir.Model, plan: Plan, names: UniqueNames, low: ir.DataType) -> int:
    """Give low-precision consumers low-precision constants, one copy per constant (in the
    graph that holds the constant, so every body that reads it sees the copy); returns how
    many values were clamped into the low type's range."""
    clamped = 0
    for value in _constant_values(model):
        uses = [(n, i) for n, i in value.uses() if plan.wants_low(n, i)]
        original = constant_array(value)  # None for an initializer that is also an input
        if not uses or value.dtype != ir.DataType.FLOAT or original is None:
            continue
        array, count = to_low(original, low)
        clamped += count
        exclusive = len(uses) == len(value.uses()) and not value.is_graph_output()
        producer = value.producer()
        if exclusive and value.is_initializer():
            value.const_value = ir.tensor(array, dtype=low, name=value.name)
            _retype(value, low)
            continue
        if exclusive and producer is not None:  # a Constant node: its attribute changes
            tensor = ir.tensor(array, dtype=low, name=value.name)
            producer.attributes.clear()
            producer.attributes["value"] = ir.AttrTensor("value", tensor)
            value.const_value = tensor
            _retype(value, low)
            continue
        name = names.new(f"{value.name or 'constant'}/{low.name.lower()}")
        copy = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(low),
            const_value=ir.tensor(array, dtype=low, name=name),
        )
        graph = value.graph
        assert graph is not None, f"constant {value.name} belongs to no graph"
        graph.register_initializer(copy)
        for node, index in uses:
            node.replace_input_with(index, copy)
    return clamped


def retype_and_cast(
    model: ir.Model, plan: Plan, names: UniqueNames, low: ir.DataType, keep_io_types: bool
) -> int:
    """Set the new types, then add one Cast per value, graph and precision where needed;
    returns how many Casts were added."""
    for node, (_, outputs) in plan.low.items():
        for index in outputs:
            _retype(node.outputs[index], low)
        if node.op_type == "Cast" and outputs:  # a Cast to float becomes a Cast to low
            node.attributes["to"] = ir.AttrInt64("to", int(low))
    if not keep_io_types:
        for value in model.graph.inputs:
            if value.dtype == ir.DataType.FLOAT:
                _retype(value, low)
    casts = _Casts(names)
    for node in all_nodes(model):
        assert node.graph is not None
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype not in (ir.DataType.FLOAT, low):
                continue
            want = low if plan.wants_low(node, index) else ir.DataType.FLOAT
            if value.dtype != want and node.op_type != "Cast":
                node.replace_input_with(index, casts.of(value, want, node.graph))
    for graph in model.graphs():
        for position, value in enumerate(list(graph.outputs)):
            if value.dtype != low or (graph is model.graph and not keep_io_types):
                continue
            if graph is model.graph:
                graph.outputs[position] = casts.graph_output(value, graph)
            else:  # a body's outputs are matched by position: any name will do
                graph.outputs[position] = casts.of(value, ir.DataType.FLOAT, graph)
    return len(casts.created)


def remove_identity_casts(model: ir.Model) -> None:
    """Drop Casts whose input already has the target type (left by converting a model's Casts)."""
    for node in all_nodes(model):
        if node.op_type != "Cast" or node.inputs[0] is None or node.graph is None:
            continue
        output = node.outputs[0]
        if node.inputs[0].dtype == output.dtype and not output.is_graph_output():
            output.replace_all_uses_with(node.inputs[0])
            node.graph.remove(node, safe=True)


class _Casts:
    """Cast nodes shared between the consumers of a value in one graph (one per value, graph
    and target type)."""

    def __init__(self, names: UniqueNames) -> None:
        self.names = names
        self.made: dict[tuple[int, int, ir.DataType], ir.Value] = {}
        self.created: set[ir.Node] = set()

    def _cast(
        self, value: ir.Value, dtype: ir.DataType, graph: ir.Graph, output_name: str
    ) -> ir.Node:
        producer = value.producer()
        base = producer.name if producer is not None and producer.name else value.name
        node = ir.node(
            "Cast",
            [value],
            {"to": int(dtype)},
            name=self.names.new(f"{base}/cast_{dtype.name.lower()}"),
        )
        output = node.outputs[0]
        output.name, output.dtype, output.shape = output_name, dtype, _copy(value.shape)
        mark_created(node, "fp16", producer)
        graph.append(node)
        self.created.add(node)
        self.made[(id(graph), id(value), dtype)] = output
        return node

    def of(self, value: ir.Value, dtype: ir.DataType, graph: ir.Graph) -> ir.Value:
        made = self.made.get((id(graph), id(value), dtype))
        if made is not None:
            return made
        wanted = f"{value.name}/{dtype.name.lower()}"
        return self._cast(value, dtype, graph, self.names.new(wanted)).outputs[0]

    def graph_output(self, value: ir.Value, graph: ir.Graph) -> ir.Value:
        """A Cast to FP32 that takes over the model output's name; the low-precision value is
        renamed (and reused by FP32 consumers through the same Cast)."""
        name = value.name or "output"
        value.name = self.names.new(f"{name}/{value.dtype.name.lower()}")
        existing = self.made.get((id(graph), id(value), ir.DataType.FLOAT))
        if existing is not None:
            existing.name = name
            return existing
        return self._cast(value, ir.DataType.FLOAT, graph, name).outputs[0]


def _retype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a new type object: clones (the teacher) share type objects, so setting
    ``value.dtype`` would change the teacher's value too."""
    value.type = ir.TensorType(dtype)


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else ir.Shape(shape)


def _constant_values(model: ir.Model) -> Iterable[ir.Value]:
    for graph in model.graphs():
        yield from list(graph.initializers.values())
    for node in all_nodes(model):
        if node.op_type == "Constant" and constant_array(node.outputs[0]) is not None:
            yield node.outputs[0]
