"""One view of a weight layer: which input of a Conv, ConvTranspose, Gemm or MatMul is its weight,
along which weight axes it produces and reduces, its bias, and whether the weight is shared or
already quantized.

Passes ask :meth:`Layer.of` instead of reading inputs and attributes themselves, so each answer
is written once: a MatMul or Gemm weight may be either operand, Gemm's ``transA``/``transB``
turn its axes, and a ConvTranspose weight ``(C_in, C_out / group, k...)`` has its output
channels on axis 1, not 0. A node that is not such a layer gets a :class:`NotLayer` with a
one-line reason a pass can put in its report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.grams import GramSpec
from onnx_squeeze.graph_utils import attribute, constant_array

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops whose weight is already stored as integers (QDQ formats keep a float op behind a
# DequantizeLinear instead: see Layer.quantized).
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    }
)


@dataclasses.dataclass(frozen=True)
class NotLayer:
    """A node that is not a weight layer a pass can work on, and why (one line)."""

    node: ir.Node
    reason: str
    quantized: bool = False  # the node is a quantized op (QLinearConv, MatMulNBits, ...)


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A Conv, ConvTranspose, Gemm or MatMul and its weight.

    ``weight_index`` is the input holding the weight: 1, or 0 for a MatMul ``W·X`` and a Gemm
    whose constant is A (:attr:`left`). ``array`` is the constant weight, None when the weight
    comes from a DequantizeLinear (``quantized``). ``output_axis`` is the weight axis of output
    channels (None where there is no single one: a 1-D MatMul operand, a grouped
    ConvTranspose); ``reduction_axes`` the weight axes summed over (input channels and kernel
    taps). Axes are non-negative.
    """

    node: ir.Node
    weight_index: int
    array: np.ndarray | None
    shape: tuple[int, ...]
    output_axis: int | None
    reduction_axes: tuple[int, ...]
    groups: int = 1
    quantized: bool = False
    other_users: tuple[ir.Node, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> Layer | NotLayer:
        """The layer view of ``node``, or why it has none."""
        op = node.op_type
        if op in QUANTIZED_OPS:
            return NotLayer(node, f"already quantized ({op})", quantized=True)
        if op not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            return NotLayer(node, f"{op} is not a Conv, ConvTranspose, Gemm or MatMul")
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return NotLayer(node, "no weight input")
        order = (1,) if op in ("Conv", "ConvTranspose") else (1, 0)
        index = next((i for i in order if _is_constant(node.inputs[i])), None)
        if index is None:
            index = next((i for i in order if _from_dequantize(node.inputs[i])), None)
        if index is None:
            if op == "MatMul":
                return NotLayer(node, "both operands are activations")
            return NotLayer(node, "weight is not a constant")
        value = node.inputs[index]
        assert value is not None
        array = constant_array(value)
        shape = _weight_shape(value, array)
        if shape is None:
            return NotLayer(node, f"the shape of weight {value.name!r} is unknown")
        groups = int(attribute(node, "group", 1))
        output_axis, reduction_axes = _axes(node, index, len(shape), groups)
        users = {use.node for use in value.uses()}
        return cls(
            node,
            index,
            array,
            shape,
            output_axis,
            reduction_axes,
            groups,
            quantized=array is None,
            other_users=tuple(sorted(users - {node}, key=lambda n: n.name or "")),
        )

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def weight(self) -> ir.Value:
        value = self.node.inputs[self.weight_index]
        assert value is not None
        return value

    @property
    def input(self) -> ir.Value | None:
        """The activation the weight multiplies."""
        return self.node.inputs[1 - self.weight_index if self.op_type in ("Gemm", "MatMul") else 0]

    @property
    def left(self) -> bool:
        """The weight is the first operand (MatMul ``W·X``, Gemm with a constant A)."""
        return self.weight_index == 0

    @property
    def shared(self) -> bool:
        """Other nodes read the same weight: changing it changes them too."""
        return bool(self.other_users)

    @property
    def bias(self) -> ir.Value | None:
        """Gemm's C or Conv's/ConvTranspose's B, when the node has one."""
        return self.node.inputs[2] if len(self.node.inputs) > 2 else None

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:] if self.op_type in ("Conv", "ConvTranspose") else ()

    def matrix(self) -> np.ndarray:
        """A 2-D constant weight as the (reduction, output) matrix of ``y = x·W``."""
        assert self.array is not None and self.array.ndim == 2
        return self.array if self.reduction_axes == (0,) else self.array.T

    def geometry(self) -> dict[str, Any]:
        """A Conv's strides, dilations, pads and auto_pad (:class:`GramSpec` fields)."""
        return conv_geometry(self.node, len(self.kernel))

    def gram_spec(self) -> GramSpec | None:
        """What ``Σ x xᵀ`` of the weight's input vectors is taken over, with features in the
        order of the weight's reduction axes; None where one Gram does not describe the layer
        (grouped Conv, ConvTranspose, batched MatMul) or the input is unnamed."""
        source = self.input
        if source is None or not source.name:
            return None
        if self.op_type == "Conv" and self.groups == 1 and len(self.shape) >= 3:
            features = self.shape[1] * math.prod(self.kernel)
            return GramSpec(source.name, "patches", features, self.kernel, **self.geometry())
        if self.op_type not in ("Gemm", "MatMul") or len(self.shape) != 2:
            return None
        features = self.shape[self.reduction_axes[0]]
        if self.op_type == "MatMul":
            layout = "columns" if self.left else "last"
        elif self.left:  # Y = A·B': the columns of B' = B (transB=0) or the rows of B
            layout = "last" if attribute(self.node, "transB", 0) else "columns"
        else:
            layout = "first" if attribute(self.node, "transA", 0) else "last"
        return GramSpec(source.name, layout, features)


def conv_geometry(node: ir.Node, dims: int) -> dict[str, Any]:
    """A Conv's strides, dilations, pads and auto_pad as :class:`GramSpec` fields."""
    return {
        "strides": tuple(attribute(node, "strides", [1] * dims)),
        "dilations": tuple(attribute(node, "dilations", [1] * dims)),
        "pads": tuple(attribute(node, "pads", [0] * 2 * dims)),
        "auto_pad": str(attribute(node, "auto_pad", "NOTSET")),
    }


def _is_constant(value: ir.Value | None) -> bool:
    return constant_array(value) is not None


def _from_dequantize(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _weight_shape(value: ir.Value, array: np.ndarray | None) -> tuple[int, ...] | None:
    if array is not None:
        return tuple(array.shape)
    producer = value.producer()
    stored = constant_array(producer.inputs[0]) if producer is not None else None
    if stored is not None:
        return tuple(stored.shape)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(int(d) for d in value.shape)  # type: ignore[arg-type]
    return None


def _axes(node: ir.Node, index: int, ndim: int, groups: int) -> tuple[int | None, tuple[int, ...]]:
    """(output axis, reduction axes) of the weight at input ``index`` of rank ``ndim``."""
    op = node.op_type
    kernel = tuple(range(2, ndim))
    if op == "Conv":  # W: (C_out, C_in / group, k...)
        return 0, (1, *kernel)
    if op == "ConvTranspose":  # W: (C_in, C_out / group, k...)
        return (1 if groups == 1 else None), (0, *kernel)
    if op == "Gemm":  # Y = A'·B' with A' = Aᵀ under transA, B' = Bᵀ under transB
        transposed = attribute(node, "transB" if index == 1 else "transA", 0)
        if index == 1:
            return (0, (1,)) if transposed else (1, (0,))
        return (1, (0,)) if transposed else (0, (1,))
    if ndim == 1:  # MatMul by a vector: a dot product, no output axis in the weight
        return None, (0,)
    if index == 1:  # X·W, W: (..., K, N)
        return ndim - 1, (ndim - 2,)
    return ndim - 2, (ndim - 1,)  # W·X, W: (..., M, K)
