"""The one QDQ writer, for INT8 and FP8: QuantizeLinear/DequantizeLinear pairs on activations,
quantized weights and INT32 biases.

Every tensor gets one QuantizeLinear plus one DequantizeLinear *per consumer*: onnxruntime's
QDQ fusion wants a DequantizeLinear with a single consumer, and a shared one (a residual
branch, q/k/v reading one tensor) leaves the float op in place. A weight is stored once for all
its consumers, each of which gets its own DequantizeLinear. What differs between element types
(how a weight's scale is chosen, whether it has a zero point, how values saturate) is a
:class:`WeightRules` setting; activation parameters come from the pass as :class:`TensorParams`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, constant_array, new_initializer
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.eligibility import from_dequantize
from onnx_squeeze.passes.quantize.params import INT8, INT32, IntType
from onnx_squeeze.passes.quantize.shared_weights import drop_if_unused
from onnx_squeeze.records import SOURCE_NODE_KEY, mark_created


@dataclasses.dataclass
class TensorParams:
    """An activation's scale and zero point (in the element type), and the range they cover."""

    scale: np.ndarray
    zero_point: np.ndarray
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class IntWeights:
    """Integer weights: symmetric per slice, saturated to ``qtype``; ``search_clip`` picks each
    slice's clipping bound by the least squared error (:func:`params.quantize_weight`)."""

    qtype: IntType = INT8
    search_clip: bool = False

    @property
    def dtype(self) -> ir.DataType:
        return self.qtype.dtype

    def encode(self, array: np.ndarray, axis: int | None) -> tuple[np.ndarray, ...]:
        return quant_params.quantize_weight(array, axis, self.qtype, search_clip=self.search_clip)


@dataclasses.dataclass(frozen=True)
class Fp8Weights:
    """FLOAT8E4M3FN weights: scale ``amax / 448`` per slice, saturated to ±448, no zero point
    (E4M3 rounding is symmetric)."""

    dtype: ir.DataType = ir.DataType.FLOAT8E4M3FN

    def encode(self, array: np.ndarray, axis: int | None) -> tuple[np.ndarray, ...]:
        array = np.asarray(array, dtype=np.float32)
        scale = quant_params.fp8_scale(quant_params.largest_magnitude(array, axis))
        return quant_params.quantize_fp8(array, scale, axis), scale


WeightRules = IntWeights | Fp8Weights


class QdqWriter:
    """Inserts Q/DQ pairs and quantized weights into one graph."""

    def __init__(
        self, model: ir.Model, pass_name: str, encoded: dict[tuple, tuple] | None = None
    ) -> None:
        """``encoded`` keeps weight encodings across writers on clones of one model (whose
        weight tensors are shared): each is made once however many copies are quantized."""
        self.graph = model.graph
        self.names = UniqueNames(model)
        self.pass_name = pass_name
        self._encoded = {} if encoded is None else encoded
        self._weights: dict[tuple, tuple[ir.Value, ...]] = {}
        self._pending: list[ir.Node] = []  # nodes made since the last insertion

    def constant(self, wanted: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
        return new_initializer(self.graph, self.names, wanted, array, dtype)

    def node(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        source: str,
        outputs: int = 1,
        **attributes: Any,
    ) -> ir.Node:
        values = [ir.Value(name=self.names.new(f"{name}_output_{i}")) for i in range(outputs)]
        node = ir.Node(
            "",
            op_type,
            inputs,
            [ir.AttrInt64(k, v) for k, v in attributes.items()],
            outputs=values,
            name=self.names.new(name),
        )
        mark_created(node, self.pass_name)
        node.metadata_props[SOURCE_NODE_KEY] = source
        return node

    def dequantize(
        self,
        quantized: ir.Value,
        scale: ir.Value,
        zero_point: ir.Value | None,
        name: str,
        source: str,
        shape: ir.Shape | None,
        axis: int | None = None,
    ) -> ir.Value:
        extra = {} if axis is None else {"axis": axis}
        inputs = [quantized, scale] if zero_point is None else [quantized, scale, zero_point]
        node = self.node("DequantizeLinear", name, inputs, source, **extra)
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = shape
        self._pending.append(node)
        return node.outputs[0]

    def quantize_tensor(
        self,
        value: ir.Value,
        params: TensorParams,
        dtype: ir.DataType,
        uses: Sequence[tuple[ir.Node, int]] | None = None,
    ) -> ir.Value:
        """QuantizeLinear (to ``dtype``) after ``value`` and one DequantizeLinear per use (the
        ``uses`` given, as (node, input index), or all); returns the scale."""
        uses = list(value.uses()) if uses is None else uses  # before the Q node is a use itself
        producer = value.producer()
        source = producer.name if producer is not None and producer.name else value.name
        scale = self.constant(f"{value.name}_scale", params.scale, ir.DataType.FLOAT)
        zero_point = self.constant(f"{value.name}_zero_point", params.zero_point, dtype)
        quantize = self.node(
            "QuantizeLinear", f"{source}/quantize_output", [value, scale, zero_point], source
        )
        quantize.outputs[0].dtype = dtype
        quantize.outputs[0].shape = value.shape
        self._pending = [quantize]
        for user, index in uses:
            dq = self.dequantize(
                quantize.outputs[0],
                scale,
                zero_point,
                f"{user.name}/dequantize_input_{index}",
                user.name or source,
                value.shape,
            )
            user.replace_input_with(index, dq)
        self._insert_after(value, self._pending)
        return scale

    def _insert_after(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, nodes)
        else:
            self.graph.insert_before(self.graph[0], nodes)

    def quantize_weight(
        self, node: ir.Node, index: int, axis: int | None, rules: WeightRules
    ) -> tuple[np.ndarray, np.ndarray]:
        """The weight stored by ``rules`` (once for every consumer of the same initializer)
        and a dedicated DequantizeLinear for ``node``; returns the stored weight and its
        scales."""
        weight = node.inputs[index]
        assert weight is not None
        key = (id(weight), axis, rules)
        if key not in self._weights:
            tensor = weight.const_value
            cached = self._encoded.get((id(tensor), axis, rules))
            if cached is None or cached[0] is not tensor:
                array = constant_array(weight)
                assert array is not None
                cached = (tensor, rules.encode(array, axis))
                self._encoded[(id(tensor), axis, rules)] = cached
            stored, scale, *zero_point = cached[1]
            self._weights[key] = (
                self.constant(f"{weight.name}_quantized", stored, rules.dtype),
                self.constant(f"{weight.name}_scale", scale, ir.DataType.FLOAT),
                *(self.constant(f"{weight.name}_zero_point", z, rules.dtype) for z in zero_point),
            )
        stored, scale, *zero_point = self._weights[key]
        self._pending = []
        dq = self.dequantize(
            stored,
            scale,
            zero_point[0] if zero_point else None,
            f"{node.name}/dequantize_weight",
            node.name,
            weight.shape,
            axis,
        )
        self.graph.insert_before(node, self._pending)
        node.replace_input_with(index, dq)
        drop_if_unused(self.graph, weight)
        return stored.const_value.numpy(), scale.const_value.numpy()

    def quantize_bias(self, node: ir.Node, index: int, scale: np.ndarray) -> ir.Value:
        """INT32 bias with scale = input scale x weight scale, dequantized for ``node``."""
        bias = node.inputs[index]
        array = constant_array(bias)
        assert bias is not None and array is not None
        quantized = quant_params.quantize(array, scale, np.zeros(scale.shape), INT32)
        q_value = self.constant(f"{node.name}.bias_quantized", quantized, ir.DataType.INT32)
        s_value = self.constant(f"{node.name}.bias_scale", scale, ir.DataType.FLOAT)
        zero = np.zeros(scale.shape, np.int32)
        z_value = self.constant(f"{node.name}.bias_zero_point", zero, ir.DataType.INT32)
        self._pending = []
        axis = 0 if scale.ndim == 1 and scale.size > 1 else None
        dq = self.dequantize(
            q_value, s_value, z_value, f"{node.name}/dequantize_bias", node.name, bias.shape, axis
        )
        self.graph.insert_before(node, self._pending)
        node.replace_input_with(index, dq)
        drop_if_unused(self.graph, bias)
        return q_value


def _input_dequantize(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear feeding input 0 (None if the input is float)."""
    first = node.inputs[0]
    return first.producer() if first is not None and from_dequantize(first) else None


def input_scale(node: ir.Node) -> np.ndarray | None:
    dq = _input_dequantize(node)
    return constant_array(dq.inputs[1]) if dq is not None else None


def input_zero_point(node: ir.Node) -> np.ndarray | None:
    dq = _input_dequantize(node)
    return constant_array(dq.inputs[2]) if dq is not None else None


@dataclasses.dataclass
class Outcome:
    """What applying a plan did, per anchor: detail text and the bias it may correct."""

    details: dict[str, str]
    biases: dict[str, ir.Value]


def anchor_weights(
    writer: QdqWriter,
    node: ir.Node,
    input_scale: np.ndarray | None,
    per_channel: bool,
    rules: IntWeights,
) -> tuple[str, ir.Value | None]:
    """Quantize an anchor's integer weight (and bias); a description and the INT32 bias."""
    layer = Layer.of(node)
    if isinstance(layer, NotLayer) or layer.array is None:
        return "two quantized activations", None
    array = layer.array
    axis = layer.output_axis if per_channel else None
    quantized, weight_scale = writer.quantize_weight(node, 1, axis, rules)
    sqnr = quant_params.sqnr_db(array, quant_params.dequantize(quantized, weight_scale, 0, axis))
    where = f"axis {axis}" if axis is not None else "per-tensor"
    detail = f"weight {rules.qtype.name} {where}"
    detail += f" (SQNR {sqnr:.1f} dB)"
    bias_index = 2
    bias_array = constant_array(layer.bias)
    channels = array.shape[axis] if axis is not None else None
    quantizable_bias = (
        bias_array is not None
        and input_scale is not None
        and node.op_type != "ConvTranspose"
        and bias_array.ndim == 1
        and (channels is None or bias_array.size == channels)
    )
    if not quantizable_bias:
        return detail, None
    scale = (input_scale.astype(np.float64) * weight_scale.astype(np.float64)).astype(np.float32)
    if scale.size == 1 and bias_array.size > 1:
        scale = np.full(bias_array.shape, float(scale.ravel()[0]), np.float32)
    bias_value = writer.quantize_bias(node, bias_index, scale.reshape(-1))
    return detail + ", bias INT32", bias_value
