"""Codebook weights (``codebook``): Conv/Gemm/MatMul weights as 8- or 4-bit indices into a few
levels (k-means or power-of-two), decoded by a constant subgraph (Cast, unpack, Gather, scale,
Reshape). onnxruntime folds that subgraph when the session loads, so the file shrinks 4-8x and
inference runs at float speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.base import Pass, choice, register, subset
from onnx_squeeze.passes.quantize import weight_codecs
from onnx_squeeze.passes.quantize.shared_weights import (
    Consumer,
    SharedWeight,
    array_initializer,
    drop_if_unused,
    group_by_weight,
    layer_weights,
    skip_all,
    unreached_compute,
    weight_nodes,
)
from onnx_squeeze.records import PassContext, PassReport, mark_created, unselected
from onnx_squeeze.units import human_bytes

# Serialized size of a few decode nodes: a codebook must save more than this to be worth it.
DECODE_OVERHEAD_BYTES = 512
CODEBOOK_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class CodebookSettings:
    levels: str = choice("kmeans", ("kmeans", "pow2"))  # pow2: 0 and ±2^-j times the scale
    bits: int = 4  # at most 2^bits levels; indices stored 2 per byte when bits <= 4
    per_channel: bool = True  # a scale per output channel (levels shared, fitted normalized)
    ops: Sequence[str] = subset(CODEBOOK_OPS, CODEBOOK_OPS)  # op types whose weights are encoded
    exclude: list[str] = dataclasses.field(default_factory=list)


def _weight_consumer(node: ir.Node) -> Consumer | str:
    """Which input of a Conv/Gemm/MatMul is its constant weight, with its output-channel axis."""
    layer = Layer.of(node)
    if isinstance(layer, NotLayer) or layer.array is None:
        return "no constant weight"
    if layer.output_axis is None:
        return "the constant operand is 1-D"
    return Consumer(node, layer.weight_index, channel_axis=layer.output_axis)


def _channel_rows(array: np.ndarray, axis: int, per_channel: bool) -> np.ndarray:
    if not per_channel:
        return array.reshape(1, -1)
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)


@register
class CodebookWeights(Pass):
    """Conv/Gemm/MatMul weights as indices into k-means or power-of-two levels."""

    name = "codebook"
    Settings = CodebookSettings
    reaches_subgraphs = True  # weights in If/Loop/Scan bodies too (shared_weights)

    def validate(self) -> None:
        s = self.settings
        low = 2 if s.levels == "pow2" else 1
        if not low <= s.bits <= 8:
            raise SettingsError(f"codebook: bits must be {low} to 8 for levels={s.levels}")

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        s = self.settings
        layers = layer_weights(model)
        consumers = []
        for node in weight_nodes(model, s.ops):
            found = unselected(node.name or "", exclude=s.exclude) or _weight_consumer(node)
            if isinstance(found, str):
                report.skip(node, found)
            else:
                consumers.append(found)
        names = UniqueNames(model)
        for weight in group_by_weight(consumers, report):
            self._encode(weight, names, report)
        unreached = unreached_compute(model, report, s.ops, layers)
        if unreached:
            report.notes.append(unreached)

    def _encode(self, weight: SharedWeight, names: UniqueNames, report: PassReport) -> None:
        """One decoded copy of ``weight`` for all its readers, in the graph that holds it."""
        s, graph = self.settings, weight.value.graph
        assert graph is not None
        axis = weight.consumers[0].channel_axis % weight.array.ndim
        rows = _channel_rows(weight.array, axis, s.per_channel)
        codebook = weight_codecs.fit_codebook(rows, s.levels, s.bits, s.per_channel)
        stored = _stored_indices(codebook.indices, s.bits)
        size = stored.nbytes + codebook.levels.nbytes
        size += 0 if codebook.scales is None else codebook.scales.nbytes
        if size + DECODE_OVERHEAD_BYTES >= weight.array.nbytes:
            skip_all(report, weight.nodes, f"too small for a codebook ({weight.array.size} values)")
            return
        decoded = _Decoder(graph, names, weight, self.name).build(
            stored, codebook, rows.shape[1], weight.array.shape, axis if s.per_channel else 0
        )
        for consumer in weight.consumers:
            consumer.node.replace_input_with(consumer.index, decoded)
        drop_if_unused(graph, weight.value)
        decoded_array = _restore(codebook.decode(), weight.array.shape, axis, s.per_channel)
        error = np.linalg.norm(decoded_array - weight.array) / np.linalg.norm(weight.array)
        detail = (
            f"{len(codebook.levels)} {s.levels} levels, {s.bits}-bit indices"
            f"{', per-channel scales' if s.per_channel else ''}; weight {weight.name!r} "
            f"{human_bytes(weight.array.nbytes)} → {human_bytes(size)}, relative error {error:.2%}"
        )
        if len(weight.consumers) > 1:
            detail += f" (shared by {len(weight.consumers)} nodes, stored once)"
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
        # decode nodes read initializers only: they go first, before every reader (also those
        # in If/Loop/Scan bodies, which see the graph that holds the weight)
        self.first_node = graph[0]

    def constant(self, role: str, array: np.ndarray) -> ir.Value:
        return array_initializer(self.graph, self.names, f"{self.weight}/codebook/{role}", array)

    def op(self, op_type: str, role: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(
            op_type, inputs, attributes, name=self.names.new(f"{self.weight}/codebook/{role}")
        )
        mark_created(node, self.pass_name)
        node.outputs[0].name = self.names.new(f"{self.weight}/codebook/{role}_output")
        self.graph.insert_before(self.first_node, node)
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
