"""INT8 quantization: static QDQ with calibration (``quantize_int8``) and dynamic
(``quantize_dynamic``).

Static QDQ plans first, then applies. The plan picks *anchors* (Conv, ConvTranspose, Gemm,
MatMul: they get INT8 weights and quantized inputs) and *followers* (ops onnxruntime runs in
integer form when their input is already quantized: Add/Mul, Concat, pooling, Sigmoid, Softmax,
and the data-movement ops that must keep their input's scale: MaxPool, Reshape, Transpose,
Resize, ...). Tensors that must share parameters are joined into classes; every class gets one
range (from calibration) and every tensor one QuantizeLinear plus one DequantizeLinear *per
consumer*: onnxruntime's QDQ fusion wants a DequantizeLinear with a single consumer, and a shared
one (a residual branch, q/k/v reading one tensor) leaves the float op in place.

Placement follows onnxruntime's QDQ selectors (``qdq_selector_action_transformer.cc``): Conv
needs a quantized output to become QLinearConv; Gemm/MatMul become QGemm/QLinearMatMul with a
quantized output and QGemm/MatMulIntegerToFloat without one, so their output is quantized only
when a consumer wants it. With UINT8 activations a Relu (or Clip from 0) after a Conv is left
to onnxruntime's Relu/Clip-QuantizeLinear fusion (zero point 0 makes the clamp free); with
symmetric INT8 activations it keeps its input's parameters. Graph outputs stay float.

Defaults, chosen for fidelity at no speed cost: activation ranges with the least expected squared
error (``mse``, from the histograms), weight ranges per channel likewise (``weight_range``), bias
correction from the input means gathered in the same calibration run (then, at the last
quantized layers, the measured mean output error), and 8-bit weights except for Conv layers with
a signed input on x86 CPUs without VNNI (see ``_static_weight_type``). A Conv over a single input
channel stays float: onnxruntime's QLinearConv runs it slower than the float kernel.

Dynamic INT8 writes what onnxruntime fuses into DynamicQuantizeMatMul: DynamicQuantizeLinear
(one per MatMul, for the same reason as above), MatMulInteger with INT8 weights, Cast and the
scale products. Embedding tables (Gather of rows from a constant matrix) are stored as INT8
rows with one scale per row, which are gathered alongside and multiplied in after a Cast.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnx_squeeze import comparison, latency_search, quant_params
from onnx_squeeze.calibration import (
    ChannelMeans,
    RandomSource,
    StatisticsCollector,
    TensorStatistics,
)
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.gates import parse_gate
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array, new_initializer
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.quant_params import INT8, INT32, IntType
from onnx_squeeze.records import PassContext, PassReport, mark_created
from onnx_squeeze.runtime import input_specs
from onnx_squeeze.settling import RangeSettling

SOURCE_KEY = "onnx_squeeze.source_node"

ANCHOR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Followers whose output keeps the parameters of input 0 (onnxruntime drops their Q/DQ).
SHARING_OPS = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Slice",
        "Expand",
        "Tile",
        "Gather",
        "Split",
    }
)
# Followers with their own output parameters (com.microsoft QLinear* kernels on CPU).
UNARY_OPS = frozenset({"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax"})
BINARY_OPS = frozenset({"Add", "Mul"})
CLAMP_OPS = frozenset({"Relu", "Clip"})
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearAdd",
        "QLinearMul",
    }
)
_CACHE_KEY = "quantize_int8.statistics"
_OUTPUT_BATCHES = 32  # calibration batches that measure the last layers' mean output error
WEIGHT_RANGES = ("max", "mse")


# ---------------------------------------------------------------------------------------------
# Settings


def _check_names(values: Iterable[str], known: Iterable[str], what: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"unknown {what} {unknown}: use any of {', '.join(sorted(known))}")


@dataclasses.dataclass
class Selection:
    """Which nodes a quantizer may touch: node-name globs and op types."""

    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: list[str] = dataclasses.field(default_factory=list)
    exclude_op_types: list[str] = dataclasses.field(default_factory=list)

    def reason_to_skip(self, node: ir.Node) -> str | None:
        name = node.name or ""
        if node.op_type in self.exclude_op_types:
            return f"op type {node.op_type} excluded"
        if self.op_types and node.op_type not in self.op_types:
            return f"op type {node.op_type} not in op_types"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return "excluded by name"
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return "not in include"
        return None


@dataclasses.dataclass
class QuantizeInt8Settings:
    method: str = "mse"  # mse (least expected squared error) | minmax | percentile | entropy
    percentile: float = 99.999
    activation_type: str = "uint8"  # uint8 (asymmetric, fastest on CPU) | int8 (symmetric)
    per_channel: bool = True
    # 0: 8, but 7 for Conv/ConvTranspose with a signed input on x86 CPUs without VNNI
    weight_bits: int = 0
    weight_range: str = "mse"  # max | mse (per-channel clipping with the least squared error)
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: list[str] = dataclasses.field(default_factory=list)
    exclude_op_types: list[str] = dataclasses.field(default_factory=list)
    keep_first_last: bool = False
    target: str = ""  # e.g. "top1_agreement>=0.99": keep the most sensitive layers in float
    sensitivity: bool = False  # measure per-layer sensitivity even without a target
    sensitivity_batches: int = 4
    bias_correction: bool = True
    calibration_batches: int = 0  # 0: all batches of the source
    # stop reading calibration batches once the ranges from half of them would have added at
    # most this much expected quantization noise (dB, on average over the tensors, and no
    # tensor's doubled); see onnx_squeeze.settling. 0: read every batch
    settle_db: float = 0.1
    random_samples: int = 16  # without calibration data: random samples (smoke tests only)
    histogram_bins: int = 2048
    # values of each tensor per calibration sample that its histogram counts (a strided sample
    # taken in the graph; min/max stay exact); 0: every value
    histogram_values: int = 16384
    # time the model on this machine (CPU, 1 thread) and keep the smallest layers in float while
    # that makes it faster: INT8 loses on narrow layers at small batches on CPUs without VNNI
    speed_check: bool = False
    speed_batch: int = 1  # the batch the speed check times, for inputs with a free batch size


DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")


@dataclasses.dataclass
class QuantizeDynamicSettings:
    per_channel: bool = True
    weight_bits: int = 0  # 0: 8, pair-bounded on x86 CPUs without VNNI (no u8s8 overflow)
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(DYNAMIC_OPS))
    exclude_op_types: list[str] = dataclasses.field(default_factory=list)


def _static_weight_type(settings: QuantizeInt8Settings, node: ir.Node) -> IntType:
    """The weight type of an anchor whose quantized input is ``node.inputs[0]``.

    x86 CPUs without VNNI multiply UINT8 activations by INT8 weights in pairs that saturate at
    16 bits. A signed input sits around its mid-range zero point, so large pairs are the rule:
    measured on MobileNetV2, 8-bit QLinearConv then drifts from the QDQ graph it fuses and
    7 bits keep it exact. MatMul/Gemm keep 8 bits: onnxruntime rewrites their constant INT8
    weights as UINT8 there, and the transformer's cosine rose from 0.915 (7 bits) to 0.949.
    """
    if settings.weight_bits:
        return quant_params.weight_type(settings.weight_bits)
    zero_point = _input_zero_point(node)
    nonnegative = zero_point is not None and zero_point.dtype == np.uint8 and not zero_point.any()
    conv = node.op_type in ("Conv", "ConvTranspose")
    saturates = conv and not nonnegative and not quant_params.cpu_has_vnni()
    return quant_params.weight_type(7 if saturates else 8)


@dataclasses.dataclass(frozen=True)
class _DynamicForm:
    """How dynamic INT8 stores weights: ``axis`` 1 per column, None per tensor; ``pair_bounded``
    scales them so that x86 u8s8 pairs cannot saturate (:func:`quant_params.pair_bounded_scale`).
    """

    qtype: IntType
    axis: int | None
    pair_bounded: bool = False

    def __str__(self) -> str:
        kind = f"{self.qtype.name} pair-bounded" if self.pair_bounded else self.qtype.name
        return f"{kind} {'per column' if self.axis is not None else 'per tensor'}"


def _dynamic_weight_form(settings: QuantizeDynamicSettings) -> _DynamicForm:
    """Weights of dynamic INT8: 8 bits with VNNI (or other CPUs); without, x86 CPUs multiply
    the UINT8 activations by INT8 weights in pairs that saturate at 16 bits, so the scale bounds
    every pair instead. How often plain 8-bit pairs overflow depends on the activations, which
    dynamic quantization never sees: 8 bits per tensor saturated on a ViT (cosine 0.851;
    onnxruntime's quantize_dynamic 0.848) and not on a BERT-style encoder, where 7 bits, safe
    everywhere, lost fidelity (0.966 vs 0.983); pair-bounded 8 bits reach 0.986 there.
    """
    axis = 1 if settings.per_channel else None
    if settings.weight_bits:
        return _DynamicForm(quant_params.weight_type(settings.weight_bits), axis)
    vnni = quant_params.cpu_has_vnni()
    return _DynamicForm(quant_params.INT8, axis, pair_bounded=not vnni)


def _selection(settings: Any) -> Selection:
    return Selection(
        list(settings.include),
        list(settings.exclude),
        list(settings.op_types),
        list(settings.exclude_op_types),
    )


# ---------------------------------------------------------------------------------------------
# Graph facts shared by both passes


def _weight_axis(node: ir.Node, rank: int) -> int | None:
    """The output-channel axis of the node's weight (input 1), or None if unsupported."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attribute(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def _is_activation(value: ir.Value | None) -> bool:
    return (
        value is not None
        and constant_array(value) is None
        and value.dtype == ir.DataType.FLOAT
        and not _from_dequantize(value)
    )


def _from_dequantize(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type in QUANTIZED_OPS


def _already_quantized(node: ir.Node) -> bool:
    """A node that reads a DequantizeLinear output or is itself a quantized op."""
    if node.op_type in QUANTIZED_OPS or node.domain not in ("", "ai.onnx"):
        return node.op_type in QUANTIZED_OPS
    return any(v is not None and _from_dequantize(v) for v in node.inputs)


def _anchor_problem(node: ir.Node) -> str | None:
    """Why an anchor cannot be quantized, or None."""
    if _already_quantized(node):
        return "already quantized (reads a DequantizeLinear or is a quantized op): left untouched"
    if not _is_activation(node.inputs[0]):
        return "input 0 is not a float activation"
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = constant_array(weight)
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA=1 is not fused by onnxruntime"
        if array is None:
            return "Gemm weight is not constant"
    if node.op_type in ("Conv", "ConvTranspose") and array is None:
        return f"{node.op_type} weight is not constant"
    if node.op_type == "Conv" and array.shape[1] == 1 and attribute(node, "group", 1) == 1:
        # a grayscale stem: onnxruntime's QLinearConv runs it about 3x slower than float
        return "Conv over a single input channel is faster in float: left in float"
    if array is not None:
        if array.dtype != np.float32:
            return f"weight is {array.dtype}, not float32"
        if _weight_axis(node, array.ndim) is None:
            return "no per-channel axis for this weight (grouped ConvTranspose or 1-D MatMul)"
    elif not _is_activation(weight):
        return "input 1 is neither a constant nor a float activation"
    return None


def _model_fingerprint(model: ir.Model) -> str:
    """A digest of the graph's structure and weights, so cached statistics are reused only for
    the model they were measured on (another pass may have changed it in between)."""
    digest = hashlib.sha1()
    for node in model.graph:
        digest.update(f"{node.op_type}|{node.name}|".encode())
        digest.update("|".join(v.name if v else "" for v in node.inputs).encode())
    for name, value in model.graph.initializers.items():
        digest.update(name.encode())
        if value.const_value is not None:
            array = value.const_value.numpy()
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array.ravel()[:4096]).tobytes())
    return digest.hexdigest()


def _infer_types(model: ir.Model) -> None:
    """Element types of intermediate values (the plan needs to know which are float) on a
    model that was not prepared."""
    if any(v.dtype is None for node in model.graph for v in node.outputs):
        ShapeInferencePass(strict_mode=False)(model)


def _tag(node: ir.Node, source: str, pass_name: str) -> ir.Node:
    node.metadata_props[SOURCE_KEY] = source
    mark_created(node, pass_name)
    return node


# ---------------------------------------------------------------------------------------------
# The plan


class _Classes:
    """Union-find over tensor names: tensors in one class share quantization parameters."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent.setdefault(name, name)

    def find(self, name: str) -> str:
        self.add(name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, names: Sequence[str]) -> None:
        roots = [self.find(n) for n in names]
        for root in roots[1:]:
            self.parent[root] = roots[0]

    def members(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name in self.parent:
            groups.setdefault(self.find(name), []).append(name)
        return groups


@dataclasses.dataclass
class _Plan:
    """What to quantize: anchor nodes, follower nodes and the activation tensors (in classes)."""

    anchors: list[ir.Node]
    followers: list[ir.Node]
    tensors: dict[str, ir.Value]
    classes: _Classes


def _fused_clamp(value: ir.Value, symmetric: bool) -> ir.Node | None:
    """The Relu/Clip(0, ...) that is the only consumer of ``value`` and that onnxruntime folds
    into the QuantizeLinear after it (UINT8 activations only)."""
    uses = list(value.uses())
    if symmetric or len(uses) != 1 or value.is_graph_output():
        return None
    consumer = uses[0].node
    if consumer.op_type == "Relu":
        return consumer
    if consumer.op_type == "Clip":
        low = constant_array(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
        if low is not None and low.size == 1 and float(low) == 0.0:
            return consumer
    return None


def _quantizable(value: ir.Value | None) -> bool:
    """A float activation that may get Q/DQ (graph outputs stay float)."""
    return value is not None and _is_activation(value) and not value.is_graph_output()


def make_plan(model: ir.Model, anchors: Sequence[ir.Node], symmetric: bool) -> _Plan:
    """Decide which tensors get Q/DQ and which share parameters, for the given anchors."""
    tensors: dict[str, ir.Value] = {}
    classes = _Classes()

    def want(values: Sequence[ir.Value | None]) -> bool:
        """Plan all ``values`` if every one can be quantized; whether they were."""
        if not all(_quantizable(v) for v in values):
            return False
        for value in values:
            tensors[value.name] = value
            classes.add(value.name)
        return True

    for node in anchors:
        want([node.inputs[0]])
        if node.op_type == "MatMul" and constant_array(node.inputs[1]) is None:
            want([node.inputs[1]])
        if node.op_type == "Conv":  # QLinearConv needs a quantized output
            clamp = _fused_clamp(node.outputs[0], symmetric)
            want([clamp.outputs[0] if clamp is not None else node.outputs[0]])
    anchor_set = {id(n) for n in anchors}
    followers = []
    for node in model.graph:  # topological order: a follower sees its inputs' decisions
        if id(node) in anchor_set or _already_quantized(node):
            continue
        if _plan_follower(node, tensors, classes, want, symmetric):
            followers.append(node)
    return _Plan(list(anchors), followers, tensors, classes)


def _reads_quantized(node: ir.Node, tensors: dict[str, ir.Value]) -> bool:
    """Whether the input that makes ``node`` a follower (any input of Add/Mul, else input 0)
    is already planned quantized."""
    inputs = node.inputs if node.op_type in BINARY_OPS else node.inputs[:1]
    return any(v is not None and v.name in tensors for v in inputs)


def _plan_follower(
    node: ir.Node,
    tensors: dict[str, ir.Value],
    classes: _Classes,
    want: Callable[[Sequence[ir.Value | None]], bool],
    symmetric: bool,
) -> bool:
    """Plan ``node`` as a follower if its input is quantized; whether it was."""
    if not _reads_quantized(node, tensors):
        return False
    op = node.op_type
    outputs = list(node.outputs)
    if op in BINARY_OPS:  # a Relu after an Add folds into its QuantizeLinear, as after a Conv
        clamp = _fused_clamp(outputs[0], symmetric) if op == "Add" else None
        planned = [clamp.outputs[0]] if clamp is not None else outputs
        return len(node.inputs) == 2 and want([*node.inputs, *planned])
    if op == "Concat":
        members = [*node.inputs, *outputs]
        planned = want(members)
        if planned:
            classes.join([v.name for v in members])
        return planned
    sharing = op in SHARING_OPS or op in CLAMP_OPS
    if not (sharing or op in UNARY_OPS) or not want(outputs):
        return False
    if sharing:  # with UINT8, a Relu not folded into a Conv also keeps its input's scale
        classes.join([node.inputs[0].name, *(v.name for v in outputs)])
    return True


# ---------------------------------------------------------------------------------------------
# Applying a plan


@dataclasses.dataclass
class _Params:
    scale: np.ndarray
    zero_point: np.ndarray
    low: float
    high: float


class _Writer:
    """Inserts Q/DQ pairs and quantized weights into one graph."""

    def __init__(self, model: ir.Model, pass_name: str) -> None:
        self.graph = model.graph
        self.names = UniqueNames(model)
        self.pass_name = pass_name
        self._weights: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self._pending: list[ir.Node] = []  # nodes made since the last insertion

    def constant(self, wanted: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
        return new_initializer(self.graph, self.names, wanted, array, dtype)

    def _node(
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
        return _tag(node, source, self.pass_name)

    def dequantize(
        self,
        quantized: ir.Value,
        scale: ir.Value,
        zero_point: ir.Value,
        name: str,
        source: str,
        shape: ir.Shape | None,
        axis: int | None = None,
    ) -> ir.Value:
        extra = {} if axis is None else {"axis": axis}
        node = self._node("DequantizeLinear", name, [quantized, scale, zero_point], source, **extra)
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = shape
        self._pending.append(node)
        return node.outputs[0]

    def quantize_tensor(self, value: ir.Value, params: _Params, qtype: IntType) -> ir.Value:
        """QuantizeLinear after ``value`` and one DequantizeLinear per use; returns the scale."""
        uses = list(value.uses())  # before the Q node becomes a use itself
        producer = value.producer()
        source = producer.name if producer is not None and producer.name else value.name
        scale = self.constant(f"{value.name}_scale", params.scale, ir.DataType.FLOAT)
        zero_point = self.constant(f"{value.name}_zero_point", params.zero_point, qtype.dtype)
        quantize = self._node(
            "QuantizeLinear", f"{source}/quantize_output", [value, scale, zero_point], source
        )
        quantize.outputs[0].dtype = qtype.dtype
        quantize.outputs[0].shape = value.shape
        self._pending = [quantize]
        for use in uses:
            dq = self.dequantize(
                quantize.outputs[0],
                scale,
                zero_point,
                f"{use.node.name}/dequantize_input_{use.idx}",
                use.node.name or source,
                value.shape,
            )
            use.node.replace_input_with(use.idx, dq)
        self._insert_after(value, self._pending)
        return scale

    def _insert_after(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, nodes)
        else:
            self.graph.insert_before(self.graph[0], nodes)

    def quantize_weight(
        self,
        node: ir.Node,
        index: int,
        axis: int | None,
        qtype: IntType = INT8,
        search_clip: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """INT8 weight (shared by every consumer of the same initializer) and a dedicated
        DequantizeLinear for ``node``; returns the integer weight and its scales."""
        weight = node.inputs[index]
        assert weight is not None
        key = (id(weight), axis, qtype.name, search_clip)
        if key not in self._weights:
            array = constant_array(weight)
            assert array is not None
            quantized, scale, zero_point = quant_params.quantize_weight(
                array, axis, qtype, search_clip=search_clip
            )
            self._weights[key] = (
                self.constant(f"{weight.name}_quantized", quantized, qtype.dtype),
                self.constant(f"{weight.name}_scale", scale, ir.DataType.FLOAT),
                self.constant(f"{weight.name}_zero_point", zero_point, qtype.dtype),
            )
        values = self._weights[key]
        self._pending = []
        dq = self.dequantize(
            *values, f"{node.name}/dequantize_weight", node.name, weight.shape, axis
        )
        self.graph.insert_before(node, self._pending)
        node.replace_input_with(index, dq)
        self._drop_if_unused(weight)
        return values[0].const_value.numpy(), values[1].const_value.numpy()

    def _drop_if_unused(self, value: ir.Value) -> None:
        """Remove a float initializer that its last consumer stopped reading: a saved model
        does not carry both copies of a weight (graph inputs and outputs stay)."""
        if (
            not value.uses()
            and self.graph.initializers.get(value.name) is value
            and value not in self.graph.inputs
            and value not in self.graph.outputs
        ):
            self.graph.initializers.pop(value.name)

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
        self._drop_if_unused(bias)
        return q_value


def _input_dequantize(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear feeding input 0 (None if the input is float)."""
    first = node.inputs[0]
    return first.producer() if first is not None and _from_dequantize(first) else None


def _input_scale(node: ir.Node) -> np.ndarray | None:
    dq = _input_dequantize(node)
    return constant_array(dq.inputs[1]) if dq is not None else None


def _input_zero_point(node: ir.Node) -> np.ndarray | None:
    dq = _input_dequantize(node)
    return constant_array(dq.inputs[2]) if dq is not None else None


def _anchor_weights(
    writer: _Writer,
    node: ir.Node,
    input_scale: np.ndarray | None,
    per_channel: bool,
    qtype: IntType,
    search_clip: bool,
) -> tuple[str, ir.Value | None]:
    """Quantize an anchor's weight (and bias); a description and the INT32 bias value."""
    array = constant_array(node.inputs[1])
    if array is None:
        return "two quantized activations", None
    axis = _weight_axis(node, array.ndim) if per_channel else None
    quantized, weight_scale = writer.quantize_weight(node, 1, axis, qtype, search_clip)
    sqnr = quant_params.sqnr_db(array, quant_params.dequantize(quantized, weight_scale, 0, axis))
    where = f"axis {axis}" if axis is not None else "per-tensor"
    detail = f"weight {qtype.name} {where}"
    detail += f" (SQNR {sqnr:.1f} dB)"
    bias_index = 2
    bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
    bias_array = constant_array(bias)
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


# ---------------------------------------------------------------------------------------------
# Static pass


@dataclasses.dataclass
class _Outcome:
    """What applying a plan did, per anchor: detail text and the bias it may correct."""

    details: dict[str, str]
    biases: dict[str, ir.Value]


@register
class QuantizeInt8(Pass):
    """Static INT8 QDQ quantization with calibrated activation ranges."""

    name = "quantize_int8"
    Settings = QuantizeInt8Settings
    min_opset = 13  # per-axis QuantizeLinear/DequantizeLinear

    def validate(self) -> None:
        s = self.settings
        if s.method not in quant_params.METHODS:
            raise SettingsError(
                f"quantize_int8: unknown method {s.method!r}; use one of "
                f"{', '.join(quant_params.METHODS)}"
            )
        quant_params.int_type(s.activation_type)
        if s.weight_bits:
            quant_params.weight_type(s.weight_bits)
        if s.weight_range not in WEIGHT_RANGES:
            raise SettingsError(
                f"quantize_int8: unknown weight_range {s.weight_range!r}; use one of "
                f"{', '.join(WEIGHT_RANGES)}"
            )
        if not 50 < s.percentile <= 100:
            raise SettingsError(
                f"quantize_int8: percentile must be in (50, 100], got {s.percentile}"
            )
        _check_names(s.op_types, ANCHOR_OPS, "op_types")
        _check_names(s.exclude_op_types, ANCHOR_OPS, "exclude_op_types")
        if s.target:
            parse_gate(s.target)
        for field in ("sensitivity_batches", "random_samples", "histogram_bins", "speed_batch"):
            if getattr(s, field) < 1:
                raise SettingsError(f"quantize_int8: {field} must be at least 1")
        for field in ("calibration_batches", "histogram_values"):
            if getattr(s, field) < 0:
                raise SettingsError(f"quantize_int8: {field} must be 0 (all) or more")

    @property
    def activation(self) -> IntType:
        return quant_params.int_type(self.settings.activation_type)

    @property
    def symmetric(self) -> bool:
        return self.activation.qmin < 0

    # -- selection ------------------------------------------------------------------------

    def _anchors(self, model: ir.Model, report: PassReport) -> list[ir.Node]:
        selection = _selection(self.settings)
        candidates = []
        for node in model.graph:
            if node.op_type not in ANCHOR_OPS or node.domain not in ("", "ai.onnx"):
                continue
            reason = selection.reason_to_skip(node) or _anchor_problem(node)
            if reason:
                report.skip(node, reason)
            else:
                candidates.append(node)
        if self.settings.keep_first_last and candidates:
            ends = {id(candidates[0]), id(candidates[-1])}
            for node in candidates:
                if id(node) in ends:
                    report.skip(node, "first/last layer kept in float (keep_first_last)")
            candidates = [n for n in candidates if id(n) not in ends]
        return candidates

    # -- calibration ----------------------------------------------------------------------

    def _source(self, model: ir.Model, context: PassContext, report: PassReport) -> Any:
        source: Any = context.calibration
        if not context.data.supplied:
            source = RandomSource(
                input_specs(model),
                self.settings.random_samples,
                seed=context.seed,
                overrides=context.input_shapes(model),
            )
        if getattr(source, "is_random", False):
            report.notes.append(
                f"WARNING: calibrated on random data ({source.label}): activation ranges are "
                "smoke-test quality; pass real calibration data (--calib) for a usable model"
            )
        return source

    def _range(self, statistics: TensorStatistics) -> tuple[float, float]:
        """The range one tensor is quantized to, by the calibration method."""
        return quant_params.calibrated_range(
            statistics,
            self.settings.method,
            self.activation,
            symmetric=self.symmetric,
            percentile=self.settings.percentile,
        )

    def _statistics(
        self,
        model: ir.Model,
        names: Sequence[str],
        source: Any,
        context: PassContext,
        channel_axes: dict[str, int],
        report: PassReport,
        output_axes: Mapping[str, int],
    ) -> dict[str, TensorStatistics]:
        """Min/max and histograms of ``names``, and per-channel statistics along
        ``channel_axes`` (bias correction's input means) in the same calibration run, read
        until the ranges settle; cached per model, source and reading settings. The same run
        keeps, for output bias correction, the channel means of ``output_axes``'s tensors over
        its first batches."""
        key = (
            _CACHE_KEY,
            _model_fingerprint(model),
            _source_label(source),
            self.settings.histogram_bins,
            self.settings.histogram_values,
            self.settings.calibration_batches,
            self.settings.settle_db,
        )
        cached: dict[str, TensorStatistics] = context.cache.setdefault(key, {})
        missing = [
            name
            for name in names
            if name not in cached or (name in channel_axes and cached[name].means is None)
        ]
        if missing:
            axes = {n: channel_axes[n] for n in missing if n in channel_axes}
            outputs = _FirstMeans({n: a for n, a in output_axes.items() if n not in axes})
            collector = StatisticsCollector(
                model,
                [*missing, *outputs.axes],
                histogram_bins=self.settings.histogram_bins,
                channel_axis={**axes, **outputs.axes},
                keep=("minmax", "histogram", "means"),
                sample_values=self.settings.histogram_values,
            )
            limit = self.settings.calibration_batches or None
            settling = RangeSettling(
                self._range, self.activation, self.settings.settle_db, tensors=set(missing)
            )
            collected = collector.collect(
                source,
                limit=limit,
                stop=lambda read, kept: outputs(read, kept) or settling(read, kept),
            )
            if outputs.axes:
                outputs.take_last(collected, limit)
                context.cache[_outputs_key(model, source)] = outputs
            cached.update({name: collected[name] for name in missing})
            if settling.stopped_at is not None:
                _, average, worst, name = settling.checks[-1]
                report.notes.append(
                    f"calibration read {settling.stopped_at} batches and stopped: the ranges "
                    f"had settled (those from the first half would have added {average:+.3f} "
                    f"dB of noise on average, at most {worst:+.3f} dB at {name}); "
                    "settle_db=0 reads every batch"
                )
        return {name: cached[name] for name in names}

    def _ranges(self, plan: _Plan, statistics: dict[str, TensorStatistics]) -> dict[str, _Params]:
        """One set of parameters per class: the hull of its members' calibrated ranges."""
        params = {}
        for members in plan.classes.members().values():
            low, high = 0.0, 0.0
            for name in members:
                a, b = self._range(statistics[name])
                low, high = min(low, a), max(high, b)
            scale, zero_point = quant_params.scale_zero_point(
                low, high, self.activation, symmetric=self.symmetric
            )
            for name in members:
                params[name] = _Params(scale.reshape(()), zero_point.reshape(()), low, high)
        return params

    # -- applying -------------------------------------------------------------------------

    def _apply_plan(self, model: ir.Model, plan: _Plan, params: dict[str, _Params]) -> _Outcome:
        writer = _Writer(model, self.name)
        for name, value in plan.tensors.items():
            writer.quantize_tensor(value, params[name], self.activation)
        # each anchor's input is now a DequantizeLinear output: its scale and zero point
        input_scales = {node.name: _input_scale(node) for node in plan.anchors}
        weight_types = self._weight_types(plan.anchors)
        details, biases = {}, {}
        for node in plan.anchors:
            detail, bias = _anchor_weights(
                writer,
                node,
                input_scales[node.name],
                self.settings.per_channel,
                weight_types[node.name],
                self.settings.weight_range == "mse",
            )
            details[node.name] = detail
            if bias is not None:
                biases[node.name] = bias
        return _Outcome(details, biases)

    def _weight_types(self, anchors: Sequence[ir.Node]) -> dict[str, IntType]:
        """Each anchor's weight type; a shared weight gets the narrowest that any of its
        consumers needs, so that it keeps a single INT8 copy."""
        narrowest: dict[int, IntType] = {}
        for node in anchors:
            wanted = _static_weight_type(self.settings, node)
            known = narrowest.setdefault(id(node.inputs[1]), wanted)
            if wanted.qmax < known.qmax:
                narrowest[id(node.inputs[1])] = wanted
        return {node.name: narrowest[id(node.inputs[1])] for node in anchors}

    def quantized_copy(
        self, model: ir.Model, anchors: Sequence[ir.Node], statistics: dict[str, TensorStatistics]
    ) -> ir.Model:
        """A quantized clone of ``model`` (weights shared) with only ``anchors`` quantized."""
        copy = model.clone()
        by_name = {node.name: node for node in copy.graph}
        plan = make_plan(copy, [by_name[n.name] for n in anchors], self.symmetric)
        self._apply_plan(copy, plan, self._ranges(plan, statistics))
        return copy

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        _infer_types(model)
        present = sum(1 for node in model.graph if node.op_type in QUANTIZED_OPS)
        if present:
            report.notes.append(
                f"the model already holds {present} quantized nodes (QDQ/QOperator/"
                "MatMulNBits): they and the nodes reading them are left untouched"
            )
        anchors = self._anchors(model, report)
        if not anchors:
            report.notes.append("nothing to quantize")
            return
        # Statistics of every tensor any plan may quantize: all anchors at once.
        full_plan = make_plan(model, anchors, self.symmetric)
        source = self._source(model, context, report)
        channel_axes, output_axes = {}, {}
        if self.settings.bias_correction:  # input means of the layers whose bias may shift
            channel_axes = {
                node.inputs[0].name: 1 if node.op_type == "Conv" else -1
                for node in anchors
                if node.op_type in ("Conv", "Gemm") and node.inputs[0].name in full_plan.tensors
            }
            output_axes = _output_axes(_final_anchors(model, {node.name for node in anchors}))
        statistics = self._statistics(
            model, list(full_plan.tensors), source, context, channel_axes, report, output_axes
        )
        if self.settings.target or self.settings.sensitivity:
            anchors = self._mixed_precision(model, anchors, statistics, source, report)
        if self.settings.speed_check:
            anchors = self._fastest(model, anchors, statistics, source, report)
        float_model = model.clone() if self.settings.bias_correction else None
        plan = make_plan(model, anchors, self.symmetric)
        params = self._ranges(plan, statistics)
        outcome = self._apply_plan(model, plan, params)
        if float_model is not None:
            self._correct_biases(float_model, model, outcome, statistics, report)
            self._correct_outputs(float_model, model, outcome, source, context, report)
        for node in anchors:
            report.record(node, "quantized", outcome.details[node.name])
        self._describe_tensors(plan, params, statistics, report)

    def _describe_tensors(
        self,
        plan: _Plan,
        params: dict[str, _Params],
        statistics: dict[str, TensorStatistics],
        report: PassReport,
    ) -> None:
        worst = []
        for name in plan.tensors:
            p = params[name]
            sqnr = quant_params.sqnr_from_histogram(
                statistics[name].histogram, p.low, p.high, self.activation
            )
            if sqnr is not None:
                worst.append((sqnr, name))
        worst.sort()
        report.notes.append(
            f"{len(plan.tensors)} activation tensors quantized ({self.settings.activation_type}, "
            f"{self.settings.method}); {len(plan.followers)} follower ops run in integer form"
        )
        if worst:
            listed = ", ".join(f"{name} {sqnr:.1f} dB" for sqnr, name in worst[:5])
            report.notes.append(f"lowest activation SQNR (expected, from histograms): {listed}")

    # -- mixed precision ------------------------------------------------------------------

    def _feeds(self, source: Any) -> list[dict[str, np.ndarray]]:
        feeds = []
        for feed in source:
            feeds.append(feed)
            if len(feeds) >= self.settings.sensitivity_batches:
                break
        return feeds

    def _mixed_precision(
        self,
        model: ir.Model,
        anchors: list[ir.Node],
        statistics: dict[str, TensorStatistics],
        source: Any,
        report: PassReport,
    ) -> list[ir.Node]:
        """Rank anchors by sensitivity (output SQNR with only that anchor quantized) and keep
        the worst in float until the target holds."""
        feeds = self._feeds(source)
        reference = _outputs(model, feeds)
        sensitivity = {}
        for node in anchors:
            candidate = self.quantized_copy(model, [node], statistics)
            sensitivity[node.name] = _output_sqnr(reference, _outputs(candidate, feeds))
        ranked = sorted(anchors, key=lambda n: sensitivity[n.name])
        listed = ", ".join(f"{n.name} {sensitivity[n.name]:.1f} dB" for n in ranked[:8])
        report.notes.append(f"sensitivity (output SQNR with one layer quantized), worst: {listed}")
        if not self.settings.target:
            return anchors
        gate = parse_gate(self.settings.target)
        kept_float: list[ir.Node] = []
        while True:
            chosen = [n for n in anchors if n not in kept_float]
            value = _metric(
                model, self.quantized_copy(model, chosen, statistics), feeds, gate.metric
            )
            if gate.passes(value) or len(kept_float) == len(ranked):
                break
            kept_float.append(ranked[len(kept_float)])
        for node in kept_float:
            report.skip(
                node,
                f"kept in float for {gate} (sensitivity {sensitivity[node.name]:.1f} dB)",
            )
        verdict = "met" if gate.passes(value) else "NOT met even with every layer in float"
        report.notes.append(
            f"target {gate}: {verdict} with {len(kept_float)} of {len(anchors)} layers in float "
            f"({gate.metric} = {value:.4g} on {len(feeds)} calibration batches)"
        )
        return [n for n in anchors if n not in kept_float]

    # -- speed check ----------------------------------------------------------------------

    def _fastest(
        self,
        model: ir.Model,
        anchors: list[ir.Node],
        statistics: dict[str, TensorStatistics],
        source: Any,
        report: PassReport,
    ) -> list[ir.Node]:
        """Keep in float the smallest layers (by weight size) for as many as makes the whole
        model fastest on this machine."""
        by_size = sorted(anchors, key=_weight_size)
        batch = self.settings.speed_batch
        feed = _batch_feed(model, next(iter(source)), batch)

        def build(left_out: int) -> ir.Model:
            if left_out == len(by_size):
                return model
            return self.quantized_copy(model, by_size[left_out:], statistics)

        left_out, timings = latency_search.fastest_split(build, len(by_size), feed)
        for node in by_size[:left_out]:
            report.skip(
                node, f"kept in float: the model runs faster so (speed check, batch {batch})"
            )
        stages = "; then ".join(
            ", ".join(f"{t.left_out}: {t.median_ms:.3g}" for t in stage) for stage in timings
        )
        report.notes.append(
            f"speed check (batch {batch}, 1 thread), ms with the k smallest layers in float, "
            f"k: ms: {stages}; kept the {left_out} smallest of {len(by_size)} in float"
        )
        return [node for node in anchors if node not in by_size[:left_out]]

    # -- bias correction ------------------------------------------------------------------

    def _correct_biases(
        self,
        float_model: ir.Model,
        model: ir.Model,
        outcome: _Outcome,
        statistics: dict[str, TensorStatistics],
        report: PassReport,
    ) -> None:
        """Cancel the mean output error that weight rounding causes (Nagel et al. 2019): shift
        each output channel's INT32 bias by ``-(W_q - W) · E[x]``, with ``E[x]`` the mean of
        each input channel on calibration data (collected with the ranges). Local to each
        layer, so corrections do not add up along the network."""
        nodes = {node.name: node for node in float_model.graph}
        if not outcome.biases:
            report.notes.append("bias correction: no quantized layer with a bias")
            return
        quantized_nodes = {node.name: node for node in model.graph}
        for name, bias in outcome.biases.items():
            original = nodes[name]
            weight = constant_array(original.inputs[1])
            dq = quantized_nodes[name].inputs[1].producer()
            axis = dq.attributes["axis"].value if "axis" in dq.attributes else None
            rounded = quant_params.dequantize(
                constant_array(dq.inputs[0]), constant_array(dq.inputs[1]), 0, axis
            )
            means = statistics[original.inputs[0].name].means
            if means is None:  # an input whose channel axis is out of range
                continue
            _shift_bias(bias, -_weight_error_times_mean(original, rounded - weight, means.mean))
        report.notes.append(f"bias correction applied to {len(outcome.biases)} layers")

    def _correct_outputs(
        self,
        float_model: ir.Model,
        model: ir.Model,
        outcome: _Outcome,
        source: Any,
        context: PassContext,
        report: PassReport,
    ) -> None:
        """Cancel the whole mean error, measured, at the last quantized layers with a bias.

        Weight bias correction leaves the error that quantized activations carry into a layer;
        at the layers whose outputs reach no other quantized layer, the mean difference from
        the float model on calibration data is the model's own and can be subtracted without
        later layers compensating twice (on the transformer it lifted output cosine by 0.02)."""
        finals = [n for n in _final_anchors(model, outcome.details) if n.name in outcome.biases]
        if not finals:
            return
        axes = _output_axes(finals)

        def output_means(each: ir.Model, limit: int | None) -> dict[str, TensorStatistics]:
            collector = StatisticsCollector(
                each,
                list(axes),
                keep=("means",),
                channel_axis=axes,
                sample_values=self.settings.histogram_values,
                join=False,  # few small outputs: joined runs would hold many samples' activations
            )
            return collector.collect(source, limit=limit, progress=False)

        # the float model's side is the same for every method: kept by calibration, which read
        # it over its first batches, or measured here once per model and source
        key = _outputs_key(float_model, source)
        reference = context.cache.get(key)
        if reference is None or not set(axes) <= set(reference.means):
            reference = _FirstMeans(axes)
            reference.take_last(output_means(float_model, _OUTPUT_BATCHES), _OUTPUT_BATCHES)
            context.cache[key] = reference
        measured_means = output_means(model, reference.read)
        for node in finals:
            name = node.outputs[0].name
            expected, measured = reference.means[name], measured_means[name].means
            if expected is None or measured is None:  # channel axis out of range
                continue
            _shift_bias(outcome.biases[node.name], expected.mean - measured.mean)
        listed = ", ".join(n.name for n in finals[:4]) + (" ..." if len(finals) > 4 else "")
        batches = "all" if reference.read is None else f"the first {reference.read}"
        report.notes.append(
            f"output bias correction: mean error of {len(finals)} last layer(s) ({listed}) "
            f"measured on {batches} calibration batches and subtracted"
        )


def _weight_size(node: ir.Node) -> float:
    """Elements of an anchor's weight: the work its INT8 kernel spreads its overhead over."""
    shape = node.inputs[1].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return math.inf
    return math.prod(shape)


def _batch_feed(model: ir.Model, feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``feed`` cut or repeated along axis 0 to ``batch`` for inputs whose batch size is free."""
    free = {
        spec.name
        for spec in input_specs(model)
        if spec.shape and not isinstance(spec.shape[0], int)
    }
    return {
        name: np.take(array, np.arange(batch) % len(array), axis=0) if name in free else array
        for name, array in feed.items()
    }


def _source_label(source: Any) -> Any:
    """What identifies a calibration source in cache keys."""
    return getattr(source, "label", id(source))


def _shift_bias(bias: ir.Value, shift: np.ndarray) -> None:
    """Add ``shift`` (float, per output channel) to an INT32 bias in its own scale."""
    scale = constant_array(next(iter(bias.uses())).node.inputs[1]).astype(np.float64)
    corrected = bias.const_value.numpy().astype(np.int64) + np.rint(shift / scale)
    corrected = np.clip(corrected, INT32.qmin, INT32.qmax).astype(np.int32)
    bias.const_value = ir.tensor(corrected, dtype=ir.DataType.INT32, name=bias.name)


def _final_anchors(model: ir.Model, names: Container[str]) -> list[ir.Node]:
    """The anchors (by name) from whose output no other of them can be reached."""
    anchors = {node.name: node for node in model.graph if node.name in names}
    finals = []
    for node in anchors.values():
        stack, seen, reaches = list(node.outputs), set(), False
        while stack and not reaches:
            for use in stack.pop().uses():
                consumer = use.node
                reaches = consumer.name in anchors and consumer is not node
                if reaches:
                    break
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    stack.extend(consumer.outputs)
        if not reaches:
            finals.append(node)
    return finals


def _output_axes(anchors: Iterable[ir.Node]) -> dict[str, int]:
    """Each anchor's output and its channel axis."""
    return {node.outputs[0].name: 1 if node.op_type == "Conv" else -1 for node in anchors}


def _outputs_key(model: ir.Model, source: Any) -> tuple:
    """Where the float model's output means over the first calibration batches are cached."""
    return (_CACHE_KEY, "outputs", _model_fingerprint(model), _source_label(source))


class _FirstMeans:
    """The channel means of tensors (named in ``axes``, with their channel axis) over the first
    ``read`` batches of a collection, at least ``_OUTPUT_BATCHES`` of them (None: all it read):
    a ``stop`` callback that never stops, so that the quantized model can be measured on the
    very same batches."""

    def __init__(self, axes: Mapping[str, int]) -> None:
        self.axes = dict(axes)
        self.read: int | None = None
        self.means: dict[str, ChannelMeans | None] = {}

    def __call__(self, read: int, statistics: Mapping[str, TensorStatistics]) -> bool:
        if self.axes and not self.means and read >= _OUTPUT_BATCHES:
            self.read = read
            self._keep(statistics)
        return False

    def take_last(self, statistics: Mapping[str, TensorStatistics], limit: int | None) -> None:
        """Keep the means a whole collection (at most ``limit`` batches) ended with, unless
        the first batches' were kept already."""
        if not self.means:
            self.read = limit
            self._keep(statistics)

    def _keep(self, statistics: Mapping[str, TensorStatistics]) -> None:
        self.means = {name: copy.deepcopy(statistics[name].means) for name in self.axes}


def _weight_error_times_mean(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The mean output error per output channel that a weight error causes, given the mean of
    each input channel (padding borders ignored)."""
    if node.op_type == "Conv":
        group = attribute(node, "group", 1)
        outputs, per_group = error.shape[0], error.shape[1]
        per_input = error.sum(axis=tuple(range(2, error.ndim)))  # [out, in/group]
        means = mean.reshape(group, per_group)
        return np.einsum(
            "gok,gk->go", per_input.reshape(group, outputs // group, -1), means
        ).ravel()
    matrix = error.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else error
    return mean @ matrix


def _outputs(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from onnx_squeeze.runtime import create_session

    session = create_session(model)
    return [session.run(None, feed) for feed in feeds]


def _output_sqnr(reference: list[list[np.ndarray]], result: list[list[np.ndarray]]) -> float:
    """Worst output's SQNR over all feeds."""
    worst = math.inf
    count = len(reference[0]) if reference else 0
    for index in range(count):
        a = np.concatenate([np.ravel(outputs[index]) for outputs in reference])
        b = np.concatenate([np.ravel(outputs[index]) for outputs in result])
        if np.issubdtype(a.dtype, np.floating):
            worst = min(worst, quant_params.sqnr_db(a, b))
    return worst


def _metric(reference: ir.Model, model: ir.Model, feeds: Sequence[dict], metric: str) -> float:
    """One fidelity metric (as the gates name them) of ``model`` against ``reference``."""
    results = comparison.fidelity(reference, model, list(feeds))
    values = {
        "cosine": min(r.cosine for r in results),
        "max_abs_error": max(r.max_abs for r in results),
        "mean_abs_error": max(r.mean_abs for r in results),
    }
    top1 = [r.top1_agreement for r in results if r.top1_agreement is not None]
    if top1:
        values["top1_agreement"] = min(top1)
    if metric not in values:
        raise SettingsError(
            f"quantize_int8 target: {metric} cannot be measured during quantization; "
            f"use one of {', '.join(values)}"
        )
    return float(values[metric])


# ---------------------------------------------------------------------------------------------
# Dynamic pass


def _dynamic_problem(node: ir.Node) -> str | None:
    """Why a MatMul/Gemm cannot get dynamic INT8, or None."""
    if _already_quantized(node):
        return "already quantized (reads a DequantizeLinear or is a quantized op): left untouched"
    if not _is_activation(node.inputs[0]):
        return "input 0 is not a float activation"
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return "weight is not a constant 2-D float32 matrix"
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA=1"
        if attribute(node, "alpha", 1.0) != 1.0:
            return "Gemm with alpha != 1"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and constant_array(bias) is None:
            return "Gemm bias is not constant"
    return None


def _is_embedding(node: ir.Node) -> bool:
    """A Gather of rows from a constant matrix by indices known at run time only (not shape
    arithmetic or token picking, which are passed over without a note)."""
    table = constant_array(node.inputs[0])
    return table is not None and table.ndim == 2 and constant_array(node.inputs[1]) is None


def _embedding_problem(node: ir.Node) -> str | None:
    """Why an embedding table cannot be stored as INT8, or None."""
    if constant_array(node.inputs[0]).dtype != np.float32:
        return "embedding table is not float32"
    if attribute(node, "axis", 0) != 0:
        return "Gather along the columns of the table"
    return None


def _embedding_replacement(writer: _Writer, node: ir.Node) -> tuple[list[ir.Node], str]:
    """Gather of INT8 rows and of their scales, Cast, Mul: symmetric per row, so that a few
    rows of large values (frequent or special tokens) do not coarsen every other row."""
    table = constant_array(node.inputs[0])
    quantized, scale, _ = quant_params.quantize_weight(table, 0, quant_params.INT8)
    prefix, indices = node.name, node.inputs[1]
    q_value = writer.constant(f"{prefix}.table_quantized", quantized, ir.DataType.INT8)
    s_value = writer.constant(
        f"{prefix}.row_scale", scale.reshape(-1, 1).astype(np.float32), ir.DataType.FLOAT
    )
    rows = writer._node("Gather", f"{prefix}/gather_rows", [q_value, indices], prefix)
    scales = writer._node("Gather", f"{prefix}/gather_scales", [s_value, indices], prefix)
    cast = writer._node(
        "Cast", f"{prefix}/cast", [rows.outputs[0]], prefix, to=int(ir.DataType.FLOAT)
    )
    output = writer._node("Mul", f"{prefix}/rescale", [cast.outputs[0], scales.outputs[0]], prefix)
    return [rows, scales, cast, output], "embedding: int8 rows, one scale per row"


def _dynamic_weight(node: ir.Node) -> np.ndarray:
    """The weight as a [K, N] matrix (Gemm's transB undone)."""
    weight = constant_array(node.inputs[1])
    assert weight is not None
    return weight.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else weight


def _dynamic_replacement(writer: _Writer, node: ir.Node, form: _DynamicForm) -> list[ir.Node]:
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (scales) [-> Add bias] for
    ``node``; onnxruntime fuses it into DynamicQuantizeMatMul."""
    weight = np.ascontiguousarray(_dynamic_weight(node))
    qtype = form.qtype
    if form.pair_bounded:
        scale = quant_params.pair_bounded_scale(weight, form.axis)
        zero_point = np.zeros(scale.shape, qtype.numpy)
        quantized = quant_params.quantize(weight, scale, zero_point, qtype, form.axis)
    else:
        quantized, scale, zero_point = quant_params.quantize_weight(weight, form.axis, qtype)
    prefix = node.name
    w_value = writer.constant(f"{prefix}.weight_quantized", quantized, qtype.dtype)
    s_value = writer.constant(f"{prefix}.weight_scale", scale, ir.DataType.FLOAT)
    z_value = writer.constant(f"{prefix}.weight_zero_point", zero_point, qtype.dtype)
    dynamic = writer._node(
        "DynamicQuantizeLinear", f"{prefix}/quantize_input", [node.inputs[0]], prefix, outputs=3
    )
    x_q, x_scale, x_zero = dynamic.outputs
    matmul = writer._node(
        "MatMulInteger", f"{prefix}/matmul_integer", [x_q, w_value, x_zero, z_value], prefix
    )
    cast = writer._node(
        "Cast", f"{prefix}/cast", [matmul.outputs[0]], prefix, to=int(ir.DataType.FLOAT)
    )
    scales = writer._node("Mul", f"{prefix}/scales", [x_scale, s_value], prefix)
    output = writer._node("Mul", f"{prefix}/rescale", [cast.outputs[0], scales.outputs[0]], prefix)
    nodes = [dynamic, matmul, cast, scales, output]
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        bias_array = constant_array(bias) * np.float32(attribute(node, "beta", 1.0))
        bias_value = writer.constant(
            f"{prefix}.bias", bias_array.astype(np.float32), ir.DataType.FLOAT
        )
        nodes.append(
            writer._node("Add", f"{prefix}/add_bias", [output.outputs[0], bias_value], prefix)
        )
    return nodes


@register
class QuantizeDynamic(Pass):
    """Dynamic INT8 for MatMul/Gemm with constant weights: INT8 weights per output column,
    activations quantized at run time (no calibration data needed)."""

    name = "quantize_dynamic"
    Settings = QuantizeDynamicSettings
    min_opset = 11  # DynamicQuantizeLinear

    def validate(self) -> None:
        _check_names(self.settings.op_types, DYNAMIC_OPS, "op_types")
        _check_names(self.settings.exclude_op_types, DYNAMIC_OPS, "exclude_op_types")
        _dynamic_weight_form(self.settings)  # bits out of range raise here

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        _infer_types(model)
        selection = _selection(self.settings)
        writer = _Writer(model, self.name)
        form = _dynamic_weight_form(self.settings)
        for node in list(model.graph):
            if node.op_type not in DYNAMIC_OPS or node.domain not in ("", "ai.onnx"):
                continue
            embedding = node.op_type == "Gather"
            if embedding and not _is_embedding(node):
                continue
            problem = _embedding_problem if embedding else _dynamic_problem
            reason = selection.reason_to_skip(node) or problem(node)
            if reason:
                report.skip(node, reason)
                continue
            if embedding:
                nodes, detail = _embedding_replacement(writer, node)
            else:
                nodes = _dynamic_replacement(writer, node, form)
                detail = f"dynamic: weight {form}, uint8 activations at run time"
            last = nodes[-1].outputs[0]
            last.dtype, last.shape = node.outputs[0].dtype, node.outputs[0].shape
            ir.convenience.replace_nodes_and_values(
                model.graph, node, [node], nodes, [node.outputs[0]], [last]
            )
            report.record(node.name, "quantized", detail, op_type=node.op_type)
