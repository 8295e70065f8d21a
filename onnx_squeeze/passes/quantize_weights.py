"""Weight-only INT4/INT8 blocks for MatMul/Gemm (``quantize_weights``).

Constant MatMul/Gemm weights are quantized block-wise along the reduction axis, by
round-to-nearest or GPTQ (calibration data), into the form onnxruntime accelerates
(``com.microsoft.MatMulNBits``, which replaces the node) or the standard one (a blocked
``DequantizeLinear``, opset 21, feeding the unchanged node).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.grams import collect_grams
from onnx_squeeze.errors import SettingsError, UnsupportedModelError
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.model_io import opset_version
from onnx_squeeze.passes.base import Pass, bounded, choice, register
from onnx_squeeze.passes.quantize import accuracy_control, weight_codecs
from onnx_squeeze.passes.quantize.shared_weights import (
    Consumer,
    SharedWeight,
    array_initializer,
    drop_if_unused,
    group_by_weight,
    layer_weights,
    unreached_compute,
    weight_nodes,
)
from onnx_squeeze.records import PassContext, PassReport, mark_created, unselected
from onnx_squeeze.units import human_bytes

MS_DOMAIN = "com.microsoft"


BLOCK_SIZES = (16, 32, 64, 128, 256)
LINEAR_OPS = ("MatMul", "Gemm")


# Opset and IR version of DequantizeLinear with block_size and of the INT4/UINT4 types.
BLOCKED_DQ_OPSET = 21


INT4_IR_VERSION = 10


@dataclasses.dataclass
class QuantizeWeightsSettings(accuracy_control.ControlSettings):
    bits: int = choice(4, (4, 8))  # bits per weight
    block_size: int = choice(32, BLOCK_SIZES)  # weights along K sharing one scale
    symmetric: bool = False  # no zero point (symmetric range around 0)
    # dequantizelinear: standard ONNX, opset 21
    format: str = choice("matmulnbits", ("matmulnbits", "dequantizelinear"))
    algorithm: str = choice("rtn", ("rtn", "gptq"))  # gptq needs calibration data
    # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    accuracy_level: int = bounded(0, low=0, high=4)
    # GPTQ: added to the Hessian diagonal, relative to its mean (e.g. 0.01)
    damping: float = bounded(0.01, above=0, below=1)
    calibration_batches: int = bounded(32, low=1)  # GPTQ: batches of calibration data to read
    exclude: list[str] = dataclasses.field(default_factory=list)


def _linear_consumer(node: ir.Node) -> Consumer | str:
    """How a MatMul/Gemm reads its weight (input 1), or why it cannot be block-quantized."""
    activation = node.inputs[0] if node.inputs else None
    if activation is None or activation.dtype not in (None, ir.DataType.FLOAT):
        return "the input is not float32"
    if activation.shape is not None and len(activation.shape) < 2:
        return "the input is 1-D"
    layer = Layer.of(node)
    if isinstance(layer, NotLayer) or layer.weight_index != 1 or layer.array is None:
        return "input 1 is not a constant weight"
    if len(layer.shape) != 2 or layer.output_axis is None:
        return "the weight is not a 2-D tensor"
    consumer = Consumer(node, 1, channel_axis=layer.output_axis)
    if node.op_type == "MatMul":
        return consumer
    if attribute(node, "transA", 0):
        return "Gemm with transA=1"
    consumer.alpha = float(attribute(node, "alpha", 1.0))
    if layer.bias is not None:
        bias = constant_array(layer.bias)
        outputs = layer.shape[consumer.channel_axis]
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
    reaches_subgraphs = True  # weights in If/Loop/Scan bodies too (shared_weights)

    def validate(self) -> None:
        if self.settings.format == "dequantizelinear":
            self.min_opset = BLOCKED_DQ_OPSET
        accuracy_control.check_settings(self.settings)

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
        layers = layer_weights(model)
        weights = self._weights(model, report)
        grams = self._grams(model, weights, context, report) if weights else {}
        blocks: dict[str, tuple[weight_codecs.BlockQuantized, str]] = {}

        def quantize(target: ir.Model, chosen: list[SharedWeight], notes: PassReport) -> None:
            names = UniqueNames(target)
            for weight in chosen:  # each weight's blocks found once, for every copy
                if weight.name not in blocks:
                    blocks[weight.name] = self._blocks(weight, grams)
                self._quantize(target, weight, *blocks[weight.name], names, notes)

        chosen = accuracy_control.controlled_weights(
            model, weights, context, report, s, self._weights, quantize
        )
        if chosen is None:  # a missed gate: the model stays float
            return
        quantize(model, chosen, report)
        unobserved = [w.name for w in chosen if w.name not in grams]
        if s.algorithm == "gptq" and unobserved:
            report.notes.append(
                f"GPTQ: {len(unobserved)} weights (e.g. {unobserved[0]!r}) are read inside "
                "If/Loop/Scan bodies, whose inputs cannot be observed: rounded to nearest"
            )
        unreached = unreached_compute(model, report, LINEAR_OPS, layers)
        if unreached:
            report.notes.append(unreached)

    def _weights(self, model: ir.Model, report: PassReport) -> list[SharedWeight]:
        """The weights to quantize, each with every node that reads it; the nodes left out are
        recorded as skipped."""
        consumers = []
        for node in weight_nodes(model, LINEAR_OPS):
            found = unselected(node.name or "", exclude=self.settings.exclude)
            found = found or _linear_consumer(node)
            if isinstance(found, str):
                report.skip(node, found)
            else:
                consumers.append(found)
        return group_by_weight(consumers, report)

    def _grams(
        self,
        model: ir.Model,
        weights: list[SharedWeight],
        context: PassContext,
        report: PassReport,
    ) -> dict[str, np.ndarray]:
        """Input Hessians (``XᵀX``, summed over the weight's readers) by weight name for GPTQ;
        none for round-to-nearest. Inputs inside If/Loop/Scan bodies cannot be exposed as
        outputs: a weight read there is rounded to nearest (:meth:`_quantize` says so)."""
        if self.settings.algorithm != "gptq":
            return {}
        sums = {
            w.name: [Layer.of(c.node).gram_spec() for c in w.consumers]
            for w in weights
            if all(c.node.graph is model.graph for c in w.consumers)
        }
        if not sums:
            return {}
        moments = collect_grams(
            model,
            sums,
            context.data,
            provider=context.providers[0],
            batches=self.settings.calibration_batches,
            max_rows=None,
            label="GPTQ input statistics",
        )
        short = sorted(name for name, m in moments.items() if m.rows < len(m.gram))
        if short:
            report.notes.append(
                f"GPTQ: {len(short)} weights had fewer calibration rows than input features "
                f"(e.g. {short[0]!r}), so their Hessians are rank-deficient and GPTQ may fit the "
                "calibration data rather than the task: give more calibration data or raise damping"
            )
        return {name: m.gram for name, m in moments.items()}

    def _blocks(
        self, weight: SharedWeight, grams: dict[str, np.ndarray]
    ) -> tuple[weight_codecs.BlockQuantized, str]:
        """``weight``'s blocks (by GPTQ where ``grams`` has its inputs' Hessian), and the
        algorithm in words."""
        s = self.settings
        transposed = weight.consumers[0].channel_axis == 1  # stored [K, N]
        matrix = weight.array.T if transposed else weight.array  # [N, K]
        if weight.name in grams:
            quantized = weight_codecs.quantize_blocks_gptq(
                matrix, grams[weight.name], s.bits, s.block_size, s.symmetric, damping=s.damping
            )
            return quantized, s.algorithm
        algorithm = s.algorithm
        if algorithm == "gptq":
            algorithm = "rtn (its inputs sit in a subgraph, where GPTQ cannot observe them)"
        return weight_codecs.quantize_blocks(matrix, s.bits, s.block_size, s.symmetric), algorithm

    def _quantize(
        self,
        model: ir.Model,
        weight: SharedWeight,
        quantized: weight_codecs.BlockQuantized,
        algorithm: str,
        names: UniqueNames,
        report: PassReport,
    ) -> None:
        """``weight`` replaced by its ``quantized`` blocks, in the configured format."""
        s = self.settings
        transposed = weight.consumers[0].channel_axis == 1  # stored [K, N]
        matrix = weight.array.T if transposed else weight.array  # [N, K]
        if s.format == "matmulnbits":
            after = self._to_matmulnbits(model, weight, quantized, names)
        else:
            after = self._to_dequantize_linear(model, weight, quantized, transposed, names)
        drop_if_unused(weight.value.graph, weight.value)
        kind = "symmetric" if s.symmetric else "asymmetric"
        target = "MatMulNBits" if s.format == "matmulnbits" else "DequantizeLinear"
        detail = (
            f"INT{s.bits} {kind} blocks of {s.block_size}, {algorithm} → {target}; weight "
            f"{weight.name!r} {human_bytes(weight.array.nbytes)} → {human_bytes(after)}"
        )
        if len(weight.consumers) > 1:
            detail += f" (shared by {len(weight.consumers)} nodes, stored once)"
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
        """Replace every consumer by a MatMulNBits node reading the shared packed weight (and
        the shared scales and bias of consumers alike); the number of bytes the quantized weight
        takes."""
        s, graph = self.settings, weight.value.graph
        assert graph is not None
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        packed, packed_zero_points = weight_codecs.pack_blocks(quantized)
        n, k = quantized.codes.shape[0], quantized.k
        codes = array_initializer(graph, names, f"{weight.name}/q{s.bits}", packed)
        scales = array_initializer(graph, names, f"{weight.name}/scales", quantized.scales)
        zero_points = None
        if not s.symmetric:
            zero_points = array_initializer(
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
        made: dict[tuple, ir.Value] = {(float(np.float32(1.0)),): scales}
        for consumer in weight.consumers:
            node = consumer.node
            alpha = (float(np.float32(consumer.alpha)),)
            if alpha not in made:
                scaled = quantized.scales * np.float32(consumer.alpha)
                made[alpha] = array_initializer(graph, names, f"{node.name}/scales", scaled)
            inputs: list[ir.Value | None] = [node.inputs[0], codes, made[alpha], zero_points]
            if consumer.bias is not None:
                bias = consumer.bias.astype(np.float32)
                key = ("bias", bias.tobytes())
                if key not in made:
                    made[key] = array_initializer(graph, names, f"{node.name}/bias", bias)
                inputs += [None, made[key]]
            replacement = ir.node(
                "MatMulNBits",
                inputs,
                attributes,
                domain=MS_DOMAIN,
                name=node.name,
            )
            mark_created(replacement, self.name, node)
            assert node.graph is not None
            ir.convenience.replace_nodes_and_values(
                node.graph, node, [node], [replacement], node.outputs, replacement.outputs
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
        own layout, first in the graph that holds the weight (which every consumer sees, in its
        own graph or an enclosing one); the number of bytes the quantized
        weight takes."""
        s, graph = self.settings, weight.value.graph
        assert graph is not None
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
            array_initializer(graph, names, f"{weight.name}/q{s.bits}", _typed(codes, code_type)),
            array_initializer(graph, names, f"{weight.name}/scales", scales),
        ]
        if not s.symmetric:
            zero_codes = _typed(zero_points, code_type)
            inputs.append(array_initializer(graph, names, f"{weight.name}/zero_points", zero_codes))
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
        graph.insert_before(graph[0], dequantize)  # it reads initializers only
        for consumer in weight.consumers:
            consumer.node.replace_input_with(consumer.index, output)
        per_code = s.bits / 8
        zero_bytes = 0 if s.symmetric else zero_points.size * per_code
        return int(codes.size * per_code + scales.nbytes + zero_bytes)


def _code_type(bits: int, symmetric: bool) -> ir.DataType:
    if bits == 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def _typed(codes: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    numpy_type = {
        ir.DataType.INT4: ml_dtypes.int4,
        ir.DataType.UINT4: ml_dtypes.uint4,
        ir.DataType.INT8: np.int8,
        ir.DataType.UINT8: np.uint8,
    }[dtype]
    return np.ascontiguousarray(codes).astype(numpy_type)
