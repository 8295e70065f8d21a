"""Weight-only quantization: INT4/INT8 blocks for MatMul/Gemm, and codebook weights.

``quantize_weights`` quantizes constant MatMul/Gemm weights block-wise along the reduction axis,
by round-to-nearest or GPTQ (calibration data), into the form onnxruntime accelerates
(``com.microsoft.MatMulNBits``, which replaces the node) or the standard one (a blocked
``DequantizeLinear``, opset 21, feeding the unchanged node).

``codebook`` stores Conv/Gemm/MatMul weights as 8- or 4-bit indices into a few levels (k-means
or power-of-two) and decodes them with a constant subgraph (Cast, unpack, Gather, scale,
Reshape). onnxruntime folds that subgraph when the session loads, so the file shrinks 4-8x and
inference runs at float speed.

A weight shared by several nodes is encoded once for all of them (GPTQ then sums their input
Hessians); a weight that some other op also reads is left alone and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnx_squeeze import weight_codecs
from onnx_squeeze.calibration.grams import collect_grams, layer_input_spec
from onnx_squeeze.errors import SettingsError, UnsupportedModelError
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array
from onnx_squeeze.model_io import opset_version
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.records import PassContext, PassReport, mark_created
from onnx_squeeze.report import human_bytes

MS_DOMAIN = "com.microsoft"
SOURCE_KEY = "onnx_squeeze.source_node"
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Opset and IR version of DequantizeLinear with block_size and of the INT4/UINT4 types.
BLOCKED_DQ_OPSET = 21
INT4_IR_VERSION = 10
# Serialized size of a few decode nodes: a codebook must save more than this to be worth it.
DECODE_OVERHEAD_BYTES = 512


@dataclasses.dataclass
class Consumer:
    """One node reading a weight, and how: where the weight sits, which axis is the output
    channel axis, and for Gemm the constant it scales by and the bias it adds."""

    node: ir.Node
    index: int
    channel_axis: int
    alpha: float = 1.0
    bias: np.ndarray | None = None


@dataclasses.dataclass
class SharedWeight:
    """A constant weight and every node that reads it."""

    value: ir.Value
    array: np.ndarray
    consumers: list[Consumer]

    @property
    def name(self) -> str:
        return self.value.name or "weight"

    @property
    def nodes(self) -> list[ir.Node]:
        return [c.node for c in self.consumers]


def _names(nodes: Iterable[ir.Node]) -> str:
    return ", ".join(repr(n.name) for n in nodes)


def _skip_all(report: PassReport, nodes: Iterable[ir.Node], reason: str) -> None:
    for node in nodes:
        report.skip(node, reason)


def _in_subgraph(model: ir.Model, ops: Sequence[str], report: PassReport) -> None:
    """Report the candidate nodes inside If/Loop/Scan bodies, which the passes leave alone."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ops and node.graph is not model.graph and node.domain == "":
            report.skip(node, "inside a subgraph (If/Loop/Scan): left alone")


def _group_by_weight(
    graph: ir.Graph, consumers: Iterable[Consumer], report: PassReport
) -> list[SharedWeight]:
    """Gather consumers by weight; weights that are not plain float32 initializers read only
    by supported consumers are skipped with the reason."""
    groups: dict[int, list[Consumer]] = {}
    values: dict[int, ir.Value] = {}
    for consumer in consumers:
        value = consumer.node.inputs[consumer.index]
        groups.setdefault(id(value), []).append(consumer)
        values[id(value)] = value
    shared = []
    for key, members in groups.items():
        value, nodes = values[key], [c.node for c in members]
        array = constant_array(value)
        claimed = {(id(c.node), c.index) for c in members}
        others = [use.node for use in value.uses() if (id(use.node), use.idx) not in claimed]
        if array is None or not value.is_initializer() or value.graph is not graph:
            _skip_all(report, nodes, "weight is not an initializer of the main graph")
        elif value.is_graph_output():
            _skip_all(report, nodes, f"weight {value.name!r} is also a graph output")
        elif array.dtype != np.float32:
            _skip_all(report, nodes, f"weight {value.name!r} is {array.dtype}, not float32")
        elif others:
            reason = f"weight {value.name!r} is also read by {_names(others)}"
            _skip_all(report, nodes, reason)
        elif len({c.channel_axis % array.ndim for c in members}) > 1:
            reason = f"weight {value.name!r} is read with different layouts by {_names(nodes)}"
            _skip_all(report, nodes, reason)
        else:
            shared.append(SharedWeight(value, array, members))
    return shared


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _initializer(graph: ir.Graph, names: UniqueNames, wanted: str, tensor: ir.Tensor) -> ir.Value:
    name = names.new(wanted)
    tensor.name = name
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _array_initializer(
    graph: ir.Graph, names: UniqueNames, wanted: str, array: np.ndarray
) -> ir.Value:
    return _initializer(graph, names, wanted, ir.tensor(np.ascontiguousarray(array)))


# ---------------------------------------------------------------------------------------------
# INT4 / INT8 blocks


@dataclasses.dataclass
class QuantizeWeightsSettings:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    format: str = "matmulnbits"  # or "dequantizelinear" (standard ONNX, opset 21)
    algorithm: str = "rtn"  # or "gptq" (needs calibration data)
    accuracy_level: int = 0  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    damping: float = 0.01  # GPTQ: added to the Hessian diagonal, relative to its mean
    calibration_batches: int = 32  # GPTQ: batches of calibration data to read
    exclude: list[str] = dataclasses.field(default_factory=list)


def _linear_consumer(node: ir.Node) -> Consumer | str:
    """How a MatMul/Gemm reads its weight (input 1), or why it cannot be block-quantized."""
    activation = node.inputs[0] if node.inputs else None
    if activation is None or activation.dtype not in (None, ir.DataType.FLOAT):
        return "the input is not float32"
    if activation.shape is not None and len(activation.shape) < 2:
        return "the input is 1-D"
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if constant_array(weight) is None:
        return "input 1 is not a constant weight"
    if weight.shape is None or len(weight.shape) != 2:
        return "the weight is not a 2-D tensor"
    if node.op_type == "MatMul":
        return Consumer(node, 1, channel_axis=1)
    if attribute(node, "transA", 0):
        return "Gemm with transA=1"
    consumer = Consumer(node, 1, channel_axis=0 if attribute(node, "transB", 0) else 1)
    consumer.alpha = float(attribute(node, "alpha", 1.0))
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is not None:
        bias = constant_array(bias_value)
        outputs = weight.shape[consumer.channel_axis]
        if (
            bias is None
            or bias.size not in (1, outputs)
            or bias.shape[-1:] not in ((1,), (outputs,), ())
        ):
            return "the Gemm bias is not a constant per output channel"
        consumer.bias = np.broadcast_to(bias.reshape(-1), (outputs,)) * float(
            attribute(node, "beta", 1.0)
        )
    return consumer


@register
class QuantizeWeights(Pass):
    """INT4/INT8 block-wise weight-only quantization of MatMul/Gemm weights."""

    name = "quantize_weights"
    Settings = QuantizeWeightsSettings

    def validate(self) -> None:
        s = self.settings
        if s.bits not in (4, 8):
            raise SettingsError(f"quantize_weights: bits must be 4 or 8, got {s.bits}")
        if s.block_size not in BLOCK_SIZES:
            sizes = ", ".join(map(str, BLOCK_SIZES))
            raise SettingsError(f"quantize_weights: block_size must be one of {sizes}")
        if s.format not in ("matmulnbits", "dequantizelinear"):
            raise SettingsError(
                f"quantize_weights: format {s.format!r} is unknown: use matmulnbits or "
                "dequantizelinear"
            )
        if s.algorithm not in ("rtn", "gptq"):
            raise SettingsError(f"quantize_weights: algorithm {s.algorithm!r}: use rtn or gptq")
        if s.accuracy_level not in range(5):
            raise SettingsError("quantize_weights: accuracy_level must be 0 to 4")
        if not 0 < s.damping < 1:
            raise SettingsError("quantize_weights: damping must be in (0, 1), e.g. 0.01")
        if s.calibration_batches < 1:
            raise SettingsError("quantize_weights: calibration_batches must be at least 1")
        if s.format == "dequantizelinear":
            self.min_opset = BLOCKED_DQ_OPSET

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        s = self.settings
        if s.format == "dequantizelinear" and opset_version(model) < BLOCKED_DQ_OPSET:
            raise UnsupportedModelError(
                f"format=dequantizelinear needs opset >= {BLOCKED_DQ_OPSET} (blocked "
                f"DequantizeLinear), the model has {opset_version(model)}: rerun with "
                f"--target-opset {BLOCKED_DQ_OPSET} or use format=matmulnbits"
            )
        if s.algorithm == "gptq" and not context.data.supplied:
            raise SettingsError(
                "quantize_weights: algorithm=gptq needs calibration data: pass --calib, or use "
                "algorithm=rtn"
            )
        _in_subgraph(model, ("MatMul", "Gemm"), report)
        consumers = []
        for node in model.graph:
            if node.op_type not in ("MatMul", "Gemm") or node.domain != "":
                continue
            found = "excluded by the settings" if node.name in s.exclude else _linear_consumer(node)
            if isinstance(found, str):
                report.skip(node, found)
            else:
                consumers.append(found)
        weights = _group_by_weight(model.graph, consumers, report)
        if not weights:
            return
        grams = self._grams(model, weights, context, report)
        names = UniqueNames(model)
        for weight in weights:
            self._quantize(model, weight, grams, names, report)

    def _grams(
        self,
        model: ir.Model,
        weights: list[SharedWeight],
        context: PassContext,
        report: PassReport,
    ) -> dict[str, np.ndarray]:
        """Input Hessians (``XᵀX``) by activation name for GPTQ; none for round-to-nearest."""
        if self.settings.algorithm != "gptq":
            return {}
        specs = {
            c.node.inputs[0].name: layer_input_spec(c.node, w.array.shape)
            for w in weights
            for c in w.consumers
        }
        moments = collect_grams(
            model,
            specs.values(),
            context.calibration,
            provider=context.providers[0],
            batches=self.settings.calibration_batches,
            max_rows=None,
            cache=context.cache,
            label="GPTQ input statistics",
        )
        grams = {name: (moments[spec].gram, moments[spec].rows) for name, spec in specs.items()}
        short = sorted(name for name, (gram, rows) in grams.items() if rows < len(gram))
        if short:
            report.notes.append(
                f"GPTQ: {len(short)} inputs had fewer calibration rows than features (e.g. "
                f"{short[0]!r}), so their Hessians are rank-deficient and GPTQ may fit the "
                "calibration data rather than the task: give more calibration data or raise damping"
            )
        return {name: gram for name, (gram, _) in grams.items()}

    def _quantize(
        self,
        model: ir.Model,
        weight: SharedWeight,
        grams: dict[str, np.ndarray],
        names: UniqueNames,
        report: PassReport,
    ) -> None:
        s = self.settings
        transposed = weight.consumers[0].channel_axis == 1  # stored [K, N]
        matrix = weight.array.T if transposed else weight.array  # [N, K]
        if grams:
            hessian = sum(grams[c.node.inputs[0].name] for c in weight.consumers)
            quantized = weight_codecs.quantize_blocks_gptq(
                matrix, hessian, s.bits, s.block_size, s.symmetric, damping=s.damping
            )
        else:
            quantized = weight_codecs.quantize_blocks(matrix, s.bits, s.block_size, s.symmetric)
        if s.format == "matmulnbits":
            after = self._to_matmulnbits(model, weight, quantized, names)
        else:
            after = self._to_dequantize_linear(model, weight, quantized, transposed, names)
        _drop_if_unused(model.graph, weight.value)
        kind = "symmetric" if s.symmetric else "asymmetric"
        target = "MatMulNBits" if s.format == "matmulnbits" else "DequantizeLinear"
        detail = (
            f"INT{s.bits} {kind} blocks of {s.block_size}, {s.algorithm} → {target}; weight "
            f"{weight.name!r} {human_bytes(weight.array.nbytes)} → {human_bytes(after)}"
        )
        if len(weight.consumers) > 1:
            detail += f" (shared by {len(weight.consumers)} nodes)"
        for node in weight.nodes:
            report.record(
                node, "quantized", detail, params_before=matrix.size, params_after=matrix.size
            )

    def _to_matmulnbits(
        self,
        model: ir.Model,
        weight: SharedWeight,
        quantized: weight_codecs.BlockQuantized,
        names: UniqueNames,
    ) -> int:
        """Replace every consumer by a MatMulNBits node reading the shared packed weight; the
        number of bytes the quantized weight takes."""
        s, graph = self.settings, model.graph
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        packed, packed_zero_points = weight_codecs.pack_blocks(quantized)
        n, k = quantized.codes.shape[0], quantized.k
        codes = _array_initializer(graph, names, f"{weight.name}/q{s.bits}", packed)
        scales = _array_initializer(graph, names, f"{weight.name}/scales", quantized.scales)
        zero_points = None
        if not s.symmetric:
            zero_points = _array_initializer(
                graph, names, f"{weight.name}/zero_points", packed_zero_points
            )
        size = (
            packed.nbytes
            + quantized.scales.nbytes
            + (0 if s.symmetric else packed_zero_points.nbytes)
        )
        attributes = {"K": k, "N": n, "bits": s.bits, "block_size": s.block_size}
        if s.accuracy_level:
            attributes["accuracy_level"] = s.accuracy_level
        for consumer in weight.consumers:
            node = consumer.node
            node_scales = scales
            if consumer.alpha != 1.0:
                scaled = quantized.scales * np.float32(consumer.alpha)
                node_scales = _array_initializer(graph, names, f"{node.name}/scales", scaled)
            inputs: list[ir.Value | None] = [node.inputs[0], codes, node_scales, zero_points]
            if consumer.bias is not None:
                bias = consumer.bias.astype(np.float32)
                inputs += [None, _array_initializer(graph, names, f"{node.name}/bias", bias)]
            replacement = ir.node(
                "MatMulNBits",
                inputs,
                attributes,
                domain=MS_DOMAIN,
                name=node.name,
                metadata_props={SOURCE_KEY: node.name or ""},
            )
            mark_created(replacement, self.name)
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [replacement], node.outputs, replacement.outputs
            )
        return size

    def _to_dequantize_linear(
        self,
        model: ir.Model,
        weight: SharedWeight,
        quantized: weight_codecs.BlockQuantized,
        transposed: bool,
        names: UniqueNames,
    ) -> int:
        """Feed every consumer from one blocked DequantizeLinear of the weight, in the weight's
        own layout; the number of bytes the quantized weight takes."""
        s, graph = self.settings, model.graph
        codes = quantized.codes[:, : quantized.k].astype(np.int16)
        zero_points = quantized.zero_points
        if s.symmetric:  # signed codes and no zero-point input
            codes = codes - (1 << (s.bits - 1))
        if transposed:
            codes, zero_points = codes.T, zero_points.T
        scales = quantized.scales.T if transposed else quantized.scales
        code_type = _code_type(s.bits, s.symmetric)
        if s.bits == 4:
            model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)
        inputs = [
            _initializer(graph, names, f"{weight.name}/q{s.bits}", _typed(codes, code_type)),
            _array_initializer(graph, names, f"{weight.name}/scales", scales),
        ]
        if not s.symmetric:
            zero_tensor = _typed(zero_points, code_type)
            inputs.append(_initializer(graph, names, f"{weight.name}/zero_points", zero_tensor))
        dequantize = ir.node(
            "DequantizeLinear",
            inputs,
            {"axis": 0 if transposed else 1, "block_size": s.block_size},
            name=names.new(f"{weight.name}/DequantizeLinear"),
        )
        mark_created(dequantize, self.name)
        output = dequantize.outputs[0]
        output.name = names.new(f"{weight.name}/dequantized")
        output.shape = ir.Shape(weight.array.shape)
        output.type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(weight.nodes[0], dequantize)
        for consumer in weight.consumers:
            consumer.node.replace_input_with(consumer.index, output)
        per_code = s.bits / 8
        zero_bytes = 0 if s.symmetric else zero_points.size * per_code
        return int(codes.size * per_code + scales.nbytes + zero_bytes)


def _code_type(bits: int, symmetric: bool) -> ir.DataType:
    if bits == 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def _typed(codes: np.ndarray, dtype: ir.DataType) -> ir.Tensor:
    numpy_type = {
        ir.DataType.INT4: ml_dtypes.int4,
        ir.DataType.UINT4: ml_dtypes.uint4,
        ir.DataType.INT8: np.int8,
        ir.DataType.UINT8: np.uint8,
    }[dtype]
    return ir.tensor(np.ascontiguousarray(codes).astype(numpy_type), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# codebooks


@dataclasses.dataclass
class CodebookSettings:
    levels: str = "kmeans"  # or "pow2": 0 and ±2^-j times the scale
    bits: int = 4  # at most 2^bits levels; indices stored 2 per byte when bits <= 4
    per_channel: bool = True  # a scale per output channel (levels shared, fitted normalized)
    ops: list[str] = dataclasses.field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    exclude: list[str] = dataclasses.field(default_factory=list)


def _weight_consumer(node: ir.Node) -> Consumer | str:
    """Which input of a Conv/Gemm/MatMul is its constant weight, with its output-channel axis."""
    if node.op_type == "Conv":
        return Consumer(node, 1, channel_axis=0)
    if node.op_type == "Gemm":
        return Consumer(node, 1, channel_axis=0 if attribute(node, "transB", 0) else 1)
    for index, axis in ((1, -1), (0, -2)):  # MatMul: constant right (…K, N) or left (M, K…)
        operand = node.inputs[index] if len(node.inputs) > index else None
        if operand is not None and constant_array(operand) is not None:
            if operand.shape is None or len(operand.shape) < 2:
                return "the constant operand is 1-D"
            return Consumer(node, index, channel_axis=axis)
    return "no constant weight"


def _channel_rows(array: np.ndarray, axis: int, per_channel: bool) -> np.ndarray:
    if not per_channel:
        return array.reshape(1, -1)
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)


@register
class CodebookWeights(Pass):
    """Conv/Gemm/MatMul weights as indices into k-means or power-of-two levels."""

    name = "codebook"
    Settings = CodebookSettings

    def validate(self) -> None:
        s = self.settings
        if s.levels not in ("kmeans", "pow2"):
            raise SettingsError(f"codebook: levels {s.levels!r} is unknown: use kmeans or pow2")
        low = 2 if s.levels == "pow2" else 1
        if not low <= s.bits <= 8:
            raise SettingsError(f"codebook: bits must be {low} to 8 for levels={s.levels}")
        unknown = sorted(set(s.ops) - {"Conv", "Gemm", "MatMul"})
        if unknown:
            raise SettingsError(f"codebook: ops {unknown} unsupported: use Conv, Gemm, MatMul")

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        s = self.settings
        _in_subgraph(model, s.ops, report)
        consumers = []
        for node in model.graph:
            if node.op_type not in s.ops or node.domain != "":
                continue
            found = "excluded by the settings" if node.name in s.exclude else _weight_consumer(node)
            if isinstance(found, str):
                report.skip(node, found)
            else:
                consumers.append(found)
        names = UniqueNames(model)
        for weight in _group_by_weight(model.graph, consumers, report):
            self._encode(model.graph, weight, names, report)

    def _encode(
        self, graph: ir.Graph, weight: SharedWeight, names: UniqueNames, report: PassReport
    ) -> None:
        s = self.settings
        axis = weight.consumers[0].channel_axis % weight.array.ndim
        rows = _channel_rows(weight.array, axis, s.per_channel)
        codebook = weight_codecs.fit_codebook(rows, s.levels, s.bits, s.per_channel)
        stored = _stored_indices(codebook.indices, s.bits)
        size = stored.nbytes + codebook.levels.nbytes
        size += 0 if codebook.scales is None else codebook.scales.nbytes
        if size + DECODE_OVERHEAD_BYTES >= weight.array.nbytes:
            _skip_all(
                report, weight.nodes, f"too small for a codebook ({weight.array.size} values)"
            )
            return
        decoded = _Decoder(graph, names, weight, self.name).build(
            stored, codebook, rows.shape[1], weight.array.shape, axis if s.per_channel else 0
        )
        for consumer in weight.consumers:
            consumer.node.replace_input_with(consumer.index, decoded)
        _drop_if_unused(graph, weight.value)
        decoded_array = _restore(codebook.decode(), weight.array.shape, axis, s.per_channel)
        error = np.linalg.norm(decoded_array - weight.array) / np.linalg.norm(weight.array)
        detail = (
            f"{len(codebook.levels)} {s.levels} levels, {s.bits}-bit indices"
            f"{', per-channel scales' if s.per_channel else ''}; weight {weight.name!r} "
            f"{human_bytes(weight.array.nbytes)} → {human_bytes(size)}, relative error {error:.2%}"
        )
        for node in weight.nodes:
            report.record(
                node,
                "encoded",
                detail,
                params_before=weight.array.size,
                params_after=weight.array.size,
            )


def _restore(rows: np.ndarray, shape: tuple[int, ...], axis: int, per_channel: bool) -> np.ndarray:
    """Undo :func:`_channel_rows`."""
    if not per_channel:
        return rows.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.moveaxis(rows.reshape(moved), 0, axis)


def _stored_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Indices as stored: one per byte, or for ``bits <= 4`` two per byte, the first half of
    each row in the low nibbles and the second half in the high nibbles (decoded by Mod/Div and
    a Concat, which every opset has)."""
    if bits > 4:
        return indices.astype(np.uint8)
    half = -(-indices.shape[1] // 2)
    low, high = indices[:, :half], indices[:, half:]
    high = np.pad(high, ((0, 0), (0, half - high.shape[1])))
    return (low | (high << 4)).astype(np.uint8)


class _Decoder:
    """Builds the constant subgraph that turns stored indices back into the weight."""

    def __init__(
        self, graph: ir.Graph, names: UniqueNames, weight: SharedWeight, pass_name: str
    ) -> None:
        self.graph, self.names, self.pass_name = graph, names, pass_name
        self.weight = weight.name
        self.first_user = weight.nodes[0]  # decode nodes go before it, in topological order

    def constant(self, role: str, array: np.ndarray) -> ir.Value:
        return _array_initializer(self.graph, self.names, f"{self.weight}/codebook/{role}", array)

    def op(self, op_type: str, role: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(
            op_type, inputs, attributes, name=self.names.new(f"{self.weight}/codebook/{role}")
        )
        mark_created(node, self.pass_name)
        node.outputs[0].name = self.names.new(f"{self.weight}/codebook/{role}_output")
        self.graph.insert_before(self.first_user, node)
        return node.outputs[0]

    def build(
        self,
        stored: np.ndarray,
        codebook: weight_codecs.Codebook,
        row_length: int,
        shape: tuple[int, ...],
        axis: int,
    ) -> ir.Value:
        """The decoded weight (float32, ``shape``); ``axis`` is the channel axis of the rows."""
        indices = self.op(
            "Cast", "indices", [self.constant("packed", stored)], to=ir.DataType.INT32
        )
        if stored.shape[1] != row_length:  # two indices per byte
            sixteen = self.constant("sixteen", np.array(16, dtype=np.int32))
            low = self.op("Mod", "low", [indices, sixteen])
            high = self.op("Div", "high", [indices, sixteen])
            indices = self.op("Concat", "unpack", [low, high], axis=1)
            if 2 * stored.shape[1] != row_length:
                slice_inputs = [
                    self.constant(role, np.array([bound], dtype=np.int64))
                    for role, bound in (("start", 0), ("end", row_length), ("axis", 1))
                ]
                indices = self.op("Slice", "trim", [indices, *slice_inputs])
        values = self.op("Gather", "lookup", [self.constant("levels", codebook.levels), indices])
        if codebook.scales is not None:
            scales = self.constant("scales", codebook.scales[:, None])
            values = self.op("Mul", "scale", [values, scales])
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
        values = self.op("Reshape", "reshape", [values, self.constant("shape", np.array(moved))])
        if axis:
            perm = [*range(1, axis + 1), 0, *range(axis + 1, len(shape))]
            values = self.op("Transpose", "transpose", [values], perm=perm)
        values.shape = ir.Shape(shape)
        values.type = ir.TensorType(ir.DataType.FLOAT)
        return values
