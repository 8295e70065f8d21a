"""Dynamic INT8 for MatMul/Gemm, LSTM and embedding tables (``quantize_dynamic``): no calibration.

Writes what onnxruntime fuses into DynamicQuantizeMatMul: DynamicQuantizeLinear (one per MatMul,
so that each fuses on its own), MatMulInteger with INT8 weights, Cast and the scale products.
Embedding tables (Gather of rows from a constant matrix) are stored as INT8 rows with one scale
per row, which are gathered alongside and multiplied in after a Cast. An LSTM with constant W
and R becomes onnxruntime's DynamicQuantizeLSTM (INT8 W and R, inputs and states quantized at
run time), as onnxruntime's own quantize_dynamic writes it.

A weight read by several nodes (an LSTM unrolled over its time steps) is quantized once and
every node reads that one copy; nodes in If/Loop/Scan bodies are quantized like the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import attribute, constant_array, new_initializer
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.base import Pass, register, subset
from onnx_squeeze.passes.quantize import accuracy_control
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.eligibility import (
    already_quantized,
    infer_types,
    is_activation,
    selection_of,
)
from onnx_squeeze.passes.quantize.params import IntType
from onnx_squeeze.passes.quantize.qdq import QdqWriter
from onnx_squeeze.passes.quantize.shared_weights import (
    Consumer,
    SharedWeight,
    drop_if_unused,
    group_by_weight,
    layer_weights,
    skip_all,
    unreached_compute,
    weight_nodes,
)
from onnx_squeeze.records import PassContext, PassReport, mark_created

DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "LSTM")
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class QuantizeDynamicSettings(accuracy_control.ControlSettings):
    per_channel: bool = True
    weight_bits: int = 0  # 0: 8, pair-bounded on x86 CPUs without VNNI (no u8s8 overflow)
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: Sequence[str] = subset(DYNAMIC_OPS, DYNAMIC_OPS)
    exclude_op_types: Sequence[str] = subset((), DYNAMIC_OPS)


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


def _dynamic_problem(node: ir.Node) -> str | None:
    """Why a MatMul/Gemm cannot get dynamic INT8, or None."""
    if already_quantized(node):
        return "already quantized (reads a DequantizeLinear or is a quantized op): left untouched"
    if not is_activation(node.inputs[0]):
        return "input 0 is not a float activation"
    layer = Layer.of(node)
    if (
        isinstance(layer, NotLayer)
        or layer.array is None
        or layer.array.ndim != 2
        or layer.array.dtype != np.float32
    ):
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


def _lstm_problem(node: ir.Node) -> str | None:
    """Why an LSTM cannot become com.microsoft.DynamicQuantizeLSTM, or None."""
    if not is_activation(node.inputs[0]):
        return "input X is not a float activation"
    for index, role in ((1, "W"), (2, "R")):
        array = constant_array(node.inputs[index])
        if array is None or array.ndim != 3 or array.dtype != np.float32:
            return f"{role} is not a constant 3-D float32 tensor"
    if attribute(node, "layout", 0) != 0:
        return "LSTM with layout=1 (DynamicQuantizeLSTM has no layout attribute)"
    return None


def _lstm_replacement(
    node: ir.Node, w: tuple[ir.Value, ...], r: tuple[ir.Value, ...], pass_name: str
) -> ir.Node:
    """DynamicQuantizeLSTM with the LSTM's inputs, attributes and outputs: INT8 W and R
    (transposed to ``[D, in, 4H]``) with their scales; X and H quantized at run time."""
    optional = [node.inputs[i] if i < len(node.inputs) else None for i in range(3, 8)]
    inputs = [node.inputs[0], w[0], r[0], *optional, w[1], w[2], r[1], r[2]]
    attributes = [a for name, a in node.attributes.items() if name != "layout"]
    replacement = ir.Node(
        MS_DOMAIN,
        "DynamicQuantizeLSTM",
        inputs,
        attributes,
        num_outputs=len(node.outputs),
        name=node.name,
    )
    mark_created(replacement, pass_name, node)
    return replacement


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


@dataclasses.dataclass
class _Encoder:
    """Quantized weights (and scaled biases), made once per weight and form and read by every
    node that uses them: the copies go into the graph that holds the float original, which the
    readers see (their own graph or an enclosing one), named after the first reader."""

    writer: QdqWriter
    form: _DynamicForm
    _made: dict[tuple, ir.Value | tuple[ir.Value, ...]] = dataclasses.field(default_factory=dict)

    def _constant(self, home: ir.Value, wanted: str, array: np.ndarray, dtype: ir.DataType):
        assert home.graph is not None
        return new_initializer(home.graph, self.writer.names, wanted, array, dtype)

    def embedding(self, weight: SharedWeight) -> tuple[ir.Value, ...]:
        """INT8 rows of a table and one scale per row: symmetric per row, so that a few rows
        of large values (frequent or special tokens) do not coarsen every other row."""
        key = ("embedding", id(weight.value))
        if key not in self._made:
            quantized, scale, _ = quant_params.quantize_weight(weight.array, 0, quant_params.INT8)
            name, value = weight.nodes[0].name or weight.name, weight.value
            self._made[key] = (
                self._constant(value, f"{name}.table_quantized", quantized, ir.DataType.INT8),
                self._constant(
                    value,
                    f"{name}.row_scale",
                    scale.reshape(-1, 1).astype(np.float32),
                    ir.DataType.FLOAT,
                ),
            )
        return self._made[key]  # type: ignore[return-value]

    def _quantized(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A ``[K, N]`` matrix in the dynamic form: integer weight, scale, zero point."""
        form, qtype = self.form, self.form.qtype
        if form.pair_bounded:
            scale = quant_params.pair_bounded_scale(matrix, form.axis)
            zero_point = np.zeros(scale.shape, qtype.numpy)
            return (
                quant_params.quantize(matrix, scale, zero_point, qtype, form.axis),
                scale,
                zero_point,
            )
        return quant_params.quantize_weight(matrix, form.axis, qtype)

    def _store(self, weight: SharedWeight, arrays: tuple[np.ndarray, ...]) -> tuple[ir.Value, ...]:
        name, value, qtype = weight.nodes[0].name or weight.name, weight.value, self.form.qtype
        quantized, scale, zero_point = arrays
        return (
            self._constant(value, f"{name}.weight_quantized", quantized, qtype.dtype),
            self._constant(value, f"{name}.weight_scale", scale, ir.DataType.FLOAT),
            self._constant(value, f"{name}.weight_zero_point", zero_point, qtype.dtype),
        )

    def matrix(self, weight: SharedWeight, node: ir.Node) -> tuple[ir.Value, ...]:
        """The ``[K, N]`` matrix (Gemm's transB undone) in the dynamic form: weight, scale,
        zero point. Readers of one weight share its layout (:func:`group_by_weight`)."""
        key = ("matrix", id(weight.value))
        if key not in self._made:
            layer = Layer.of(node)
            assert isinstance(layer, Layer)
            matrix = np.ascontiguousarray(layer.matrix())
            self._made[key] = self._store(weight, self._quantized(matrix))
        return self._made[key]  # type: ignore[return-value]

    def recurrent(self, weight: SharedWeight) -> tuple[ir.Value, ...]:
        """An LSTM's W ``[D, 4H, I]`` or R ``[D, 4H, H]`` as DynamicQuantizeLSTM reads it:
        each direction's ``[I, 4H]`` matrix in the dynamic form, stacked (scales ``[D, 4H]``
        per column, ``[D]`` per tensor)."""
        key = ("recurrent", id(weight.value))
        if key not in self._made:
            parts = [self._quantized(np.ascontiguousarray(w.T)) for w in weight.array]
            quantized = np.stack([p[0] for p in parts])
            scale, zero_point = (np.stack([np.reshape(p[i], -1) for p in parts]) for i in (1, 2))
            if self.form.axis is None:
                scale, zero_point = scale[:, 0], zero_point[:, 0]
            self._made[key] = self._store(weight, (quantized, scale, zero_point))
        return self._made[key]  # type: ignore[return-value]

    def bias(self, node: ir.Node) -> ir.Value | None:
        """Gemm's C times beta: the float bias itself when beta is 1 (it stays shared with
        every other reader), else one scaled copy per bias and beta."""
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        beta = float(attribute(node, "beta", 1.0))
        if bias is None or beta == 1.0:
            return bias
        key = ("bias", id(bias), beta)
        if key not in self._made:
            scaled = (constant_array(bias) * np.float32(beta)).astype(np.float32)
            self._made[key] = self._constant(bias, f"{bias.name}.scaled", scaled, ir.DataType.FLOAT)
        return self._made[key]  # type: ignore[return-value]


def _embedding_replacement(writer: QdqWriter, node: ir.Node, table: tuple[ir.Value, ...]):
    """Gather of INT8 rows and of their scales, Cast, Mul."""
    q_value, s_value = table
    prefix, indices = node.name, node.inputs[1]
    rows = writer.node("Gather", f"{prefix}/gather_rows", [q_value, indices], prefix)
    scales = writer.node("Gather", f"{prefix}/gather_scales", [s_value, indices], prefix)
    cast = writer.node(
        "Cast", f"{prefix}/cast", [rows.outputs[0]], prefix, to=int(ir.DataType.FLOAT)
    )
    output = writer.node("Mul", f"{prefix}/rescale", [cast.outputs[0], scales.outputs[0]], prefix)
    return [rows, scales, cast, output]


def _dynamic_replacement(
    writer: QdqWriter, node: ir.Node, weight: tuple[ir.Value, ...], bias: ir.Value | None
) -> list[ir.Node]:
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (scales) [-> Add bias] for
    ``node``; onnxruntime fuses it into DynamicQuantizeMatMul."""
    w_value, s_value, z_value = weight
    prefix = node.name
    dynamic = writer.node(
        "DynamicQuantizeLinear", f"{prefix}/quantize_input", [node.inputs[0]], prefix, outputs=3
    )
    x_q, x_scale, x_zero = dynamic.outputs
    matmul = writer.node(
        "MatMulInteger", f"{prefix}/matmul_integer", [x_q, w_value, x_zero, z_value], prefix
    )
    cast = writer.node(
        "Cast", f"{prefix}/cast", [matmul.outputs[0]], prefix, to=int(ir.DataType.FLOAT)
    )
    scales = writer.node("Mul", f"{prefix}/scales", [x_scale, s_value], prefix)
    output = writer.node("Mul", f"{prefix}/rescale", [cast.outputs[0], scales.outputs[0]], prefix)
    nodes = [dynamic, matmul, cast, scales, output]
    if bias is not None:
        nodes.append(writer.node("Add", f"{prefix}/add_bias", [output.outputs[0], bias], prefix))
    return nodes


def _consumers(node: ir.Node) -> list[Consumer]:
    """How an eligible node reads its weights: a table's rows, a matrix's columns, an LSTM's
    W and R (gates on axis 1)."""
    if node.op_type == "Gather":
        return [Consumer(node, 0, channel_axis=0)]
    if node.op_type == "LSTM":
        return [Consumer(node, 1, channel_axis=1), Consumer(node, 2, channel_axis=1)]
    layer = Layer.of(node)
    assert isinstance(layer, Layer) and layer.output_axis is not None
    return [Consumer(node, layer.weight_index, channel_axis=layer.output_axis)]


@register
class QuantizeDynamic(Pass):
    """Dynamic INT8 for MatMul/Gemm/LSTM with constant weights: INT8 weights per output
    column, activations quantized at run time (no calibration data needed)."""

    name = "quantize_dynamic"
    Settings = QuantizeDynamicSettings
    min_opset = 11  # DynamicQuantizeLinear
    reaches_subgraphs = True  # weights in If/Loop/Scan bodies too (shared_weights)

    def validate(self) -> None:
        _dynamic_weight_form(self.settings)  # bits out of range raise here
        accuracy_control.check_settings(self.settings)

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        layers = layer_weights(model)
        infer_types(model)
        weights = accuracy_control.controlled_weights(
            model,
            self._weights(model, report),
            context,
            report,
            self.settings,
            self._weights,
            self._quantize,
        )
        if weights is None:  # a missed gate: the model stays float
            return
        self._quantize(model, weights, report)
        unreached = unreached_compute(model, report, DYNAMIC_OPS, layers)
        if unreached:
            report.notes.append(unreached)

    def _weights(self, model: ir.Model, report: PassReport) -> list[SharedWeight]:
        """The weights to quantize, each with every node that reads it (an LSTM's W and R
        together); the nodes left out are recorded as skipped."""
        selection = selection_of(self.settings)
        problems = {"Gather": _embedding_problem, "LSTM": _lstm_problem}
        consumers = []
        for node in weight_nodes(model, DYNAMIC_OPS):
            if node.op_type == "Gather" and not _is_embedding(node):
                continue
            problem = problems.get(node.op_type, _dynamic_problem)
            reason = selection.reason_to_skip(node) or problem(node)
            if reason:
                report.skip(node, reason)
            else:
                consumers.extend(_consumers(node))
        return _whole_lstms(group_by_weight(consumers, report), report)

    def _quantize(self, model: ir.Model, weights: list[SharedWeight], report: PassReport) -> None:
        """``weights`` stored in INT8, and their readers rewritten to read them."""
        encoder = _Encoder(QdqWriter(model, self.name), _dynamic_weight_form(self.settings))
        readers: dict[ir.Node, dict[int, SharedWeight]] = {}
        for weight in weights:
            for consumer in weight.consumers:
                readers.setdefault(consumer.node, {})[consumer.index] = weight
        if any(node.op_type == "LSTM" for node in readers):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        for node, read in readers.items():
            self._rewrite(encoder, node, read, report)
        for weight in weights:
            drop_if_unused(weight.value.graph, weight.value)

    def _rewrite(
        self, encoder: _Encoder, node: ir.Node, read: dict[int, SharedWeight], report: PassReport
    ) -> None:
        """``node`` rewritten to read the one quantized copy of each of its weights."""
        if node.op_type == "LSTM":
            replacement = _lstm_replacement(
                node, encoder.recurrent(read[1]), encoder.recurrent(read[2]), self.name
            )
            nodes = [replacement]
            detail = f"DynamicQuantizeLSTM: W and R {encoder.form}, uint8 X and H at run time"
        elif node.op_type == "Gather":
            nodes = _embedding_replacement(encoder.writer, node, encoder.embedding(read[0]))
            detail = "embedding: int8 rows, one scale per row"
        else:
            (weight,) = read.values()
            quantized = encoder.matrix(weight, node)
            nodes = _dynamic_replacement(encoder.writer, node, quantized, encoder.bias(node))
            detail = f"dynamic: weight {encoder.form}, uint8 activations at run time"
        for weight in read.values():
            if len(weight.consumers) > 1:
                detail += (
                    f"; weight {weight.name!r} shared by {len(weight.consumers)} nodes, stored once"
                )
        outputs = nodes[-1].outputs
        for old, new in zip(node.outputs, outputs, strict=True):
            new.dtype, new.shape = old.dtype, old.shape
        assert node.graph is not None
        ir.convenience.replace_nodes_and_values(
            node.graph, node, [node], nodes, list(node.outputs), list(outputs)
        )
        report.record(node.name, "quantized", detail, op_type=node.op_type)


def _whole_lstms(weights: list[SharedWeight], report: PassReport) -> list[SharedWeight]:
    """The weights to quantize, less those of an LSTM whose other weight stays float (W and R
    become DynamicQuantizeLSTM together or not at all)."""
    kept = {(id(c.node), c.index) for w in weights for c in w.consumers}
    halves = {
        id(c.node)
        for w in weights
        for c in w.consumers
        if c.node.op_type == "LSTM" and {(id(c.node), 1), (id(c.node), 2)} - kept
    }
    whole = []
    for weight in weights:
        if any(id(node) in halves for node in weight.nodes):
            skip_all(report, weight.nodes, "W and R of an LSTM are quantized together")
        else:
            whole.append(weight)
    return whole
