"""Which nodes and tensors a quantizer may touch: the node selection of the settings, float
activations, and what is already quantized (read from a DequantizeLinear or a quantized op)."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnx_squeeze import layers
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.records import unselected

# The quantized weight ops (layers.QUANTIZED_OPS) and the Q/DQ and integer ops around them.
QUANTIZED_OPS = layers.QUANTIZED_OPS | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearAdd",
    "QLinearMul",
}


@dataclasses.dataclass
class Selection:
    """Which nodes a quantizer may touch: op types, and node-name globs (:func:`unselected`)."""

    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: list[str] = dataclasses.field(default_factory=list)
    exclude_op_types: list[str] = dataclasses.field(default_factory=list)

    def reason_to_skip(self, node: ir.Node) -> str | None:
        if node.op_type in self.exclude_op_types:
            return f"op type {node.op_type} excluded"
        if self.op_types and node.op_type not in self.op_types:
            return f"op type {node.op_type} not in op_types"
        return unselected(node.name or "", self.include, self.exclude)


def selection_of(settings: Any) -> Selection:
    return Selection(
        list(settings.include),
        list(settings.exclude),
        list(settings.op_types),
        list(settings.exclude_op_types),
    )


def is_activation(value: ir.Value | None) -> bool:
    return (
        value is not None
        and constant_array(value) is None
        and value.dtype == ir.DataType.FLOAT
        and not from_dequantize(value)
    )


def from_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type in QUANTIZED_OPS


def already_quantized(node: ir.Node) -> bool:
    """A node that reads a DequantizeLinear output or is itself a quantized op."""
    if node.op_type in QUANTIZED_OPS or node.domain not in ("", "ai.onnx"):
        return node.op_type in QUANTIZED_OPS
    return any(v is not None and from_dequantize(v) for v in node.inputs)


def infer_types(model: ir.Model) -> None:
    """Element types of intermediate values (the plan needs to know which are float) on a
    model that was not prepared."""
    if any(v.dtype is None for node in model.graph for v in node.outputs):
        ShapeInferencePass(strict_mode=False)(model)
