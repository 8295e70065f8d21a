"""FP8 (E4M3FN) QDQ around Conv/Gemm/MatMul (``fp8``).

Weights are stored as FLOAT8E4M3FN with a per-output-channel scale (``amax / 448``) and the
activation input is quantized with a calibrated per-tensor scale.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_squeeze import runtime
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array, new_initializer
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.statistics import largest_magnitudes
from onnx_squeeze.records import PassContext, PassReport, mark_created

# What loading a model in onnxruntime raises when a kernel is missing (runtime.create_session
# wraps only some of onnxruntime's errors in InputError).
LOAD_ERRORS = (InputError, runtime.ort.capi.onnxruntime_pybind11_state.NotImplemented)


@dataclasses.dataclass
class Fp8Settings:
    """``op_types``: ops whose weights (and activation input) are quantized to FLOAT8E4M3FN.
    ``activations``: also quantize the activation input with a calibrated scale (needs
    calibration data); false stores weights only in FP8. ``exclude``: node names left alone."""

    op_types: list[str] = dataclasses.field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    activations: bool = True
    per_channel: bool = True
    exclude: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = 16


FP8_OPS = frozenset({"Conv", "Gemm", "MatMul"})


# onnxruntime's CPU rewrites of Relu -> QuantizeLinear and Clip -> QuantizeLinear (when the
# QuantizeLinear is the activation's only consumer) assume integer types: with a float8 zero
# point ReluQuantRewrite drops the Relu (wrong results) and ClipQuantFusion throws at load. The
# Q/DQ pair goes before such a Relu/Clip instead: the same values, as E4M3 rounding is symmetric
# and Relu(0) = 0.
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})


@register
class QuantizeFp8(Pass):
    """FP8 (E4M3FN) QuantizeLinear/DequantizeLinear around Conv/Gemm/MatMul (opset >= 19)."""

    name = "fp8"
    Settings = Fp8Settings
    min_opset = 19

    def validate(self) -> None:
        unknown = sorted(set(self.settings.op_types) - FP8_OPS)
        if unknown:
            raise SettingsError(
                f"fp8: op_types {unknown} not supported; use any of Conv, Gemm, MatMul"
            )
        if self.settings.calibration_batches < 1:
            raise SettingsError("fp8: calibration_batches must be at least 1")

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        graph = model.graph
        targets = [node for node in graph if self._eligible(node, report)]
        chosen = set(targets)
        points = {node: _quantization_point(node, chosen) for node in targets}  # before rewiring
        amax: dict[str, float] = {}
        if self.settings.activations and targets:
            if not context.data.supplied:
                raise SettingsError(
                    "fp8: activation scales need calibration data: pass --calib SRC, or set "
                    "activations=false to store weights only in FP8"
                )
            names = sorted({value.name or "" for value in points.values()})
            amax = largest_magnitudes(model, names, context, self.settings.calibration_batches)
        builder = _QdqBuilder(graph, UniqueNames(model))
        for node in targets:
            weight = constant_array(_weight_of(node))
            assert weight is not None
            builder.weight(node, self.settings.per_channel)
            detail = "float8e4m3fn weights"
            if self.settings.activations:
                builder.activation(node, points[node], amax)
                detail += " and activation"
            report.record(
                node, "quantized", detail, params_before=weight.size, params_after=weight.size
            )
        common_passes.TopologicalSortPass()(model)
        problem = fp8_kernel_problem(model, (context.providers or ("cpu",))[0])
        if problem:
            report.notes.append(problem)

    def _eligible(self, node: ir.Node, report: PassReport) -> bool:
        if node.op_type not in self.settings.op_types:
            return False
        if node.name in self.settings.exclude:
            report.skip(node, "in exclude")
            return False
        weight = _weight_of(node)
        if weight is None or constant_array(weight) is None:
            report.skip(node, "weight is not a constant (both inputs are activations)")
            return False
        source = node.inputs[0]
        if source is None or source.dtype != ir.DataType.FLOAT or weight.dtype != ir.DataType.FLOAT:
            report.skip(node, "input or weight is not FP32")
            return False
        if any(_is_dequantized(v) for v in (source, weight)):
            report.skip(node, "already quantized (input comes from DequantizeLinear)")
            return False
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            report.skip(node, "Gemm with transA=1: activation layout not handled")
            return False
        return True


def _quantization_point(node: ir.Node, targets: set[ir.Node]) -> ir.Value:
    """The value whose Q/DQ pair feeds ``node``'s activation input: the input itself, or the
    input of a Relu/Clip whose consumers are all quantized (see FUSED_ACTIVATIONS)."""
    source = node.inputs[0]
    assert source is not None
    producer = source.producer()
    if (
        producer is not None
        and producer.op_type in FUSED_ACTIVATIONS
        and all(user in targets and index == 0 for user, index in source.uses())
        and not source.is_graph_output()
        and producer.inputs[0] is not None
    ):
        return producer.inputs[0]
    return source


def _weight_of(node: ir.Node) -> ir.Value | None:
    return node.inputs[1] if len(node.inputs) > 1 else None


def _is_dequantized(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def _output_channel_axis(node: ir.Node, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return rank - 1  # MatMul: B is (..., K, N)


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else ir.Shape(shape)


class _QdqBuilder:
    """Inserts DequantizeLinear for weights (FP8 initializers) and Q/DQ pairs for activations,
    each shared by every quantized consumer of the same value."""

    def __init__(self, graph: ir.Graph, names: UniqueNames) -> None:
        self.graph = graph
        self.names = names
        self.weights: dict[tuple[int, int | None], ir.Value] = {}
        self.activations: dict[int, ir.Value] = {}
        self._zero: ir.Value | None = None

    def _initializer(self, wanted: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
        return new_initializer(self.graph, self.names, wanted, array, dtype)

    def zero_point(self) -> ir.Value:
        if self._zero is None:
            zero = np.zeros((), dtype=ml_dtypes.float8_e4m3fn)
            self._zero = self._initializer("fp8_zero_point", zero, ir.DataType.FLOAT8E4M3FN)
        return self._zero

    def _add(self, node: ir.Node, op: str, inputs: list, attributes: dict, role: str) -> ir.Value:
        created = ir.node(op, inputs, attributes, name=self.names.new(f"{node.name}/{role}"))
        created.outputs[0].name = self.names.new(f"{inputs[0].name}/{role}")
        mark_created(created, "fp8", node)
        self.graph.append(created)
        return created.outputs[0]

    def weight(self, node: ir.Node, per_channel: bool) -> None:
        weight = _weight_of(node)
        assert weight is not None
        array = np.asarray(constant_array(weight), dtype=np.float32)
        axis = _output_channel_axis(node, array.ndim) if per_channel else None
        key = (id(weight), axis)
        if key not in self.weights:
            scale = quant_params.fp8_scale(quant_params.largest_magnitude(array, axis))
            stored = self._initializer(
                f"{weight.name}/fp8",
                quant_params.quantize_fp8(array, scale, axis),
                ir.DataType.FLOAT8E4M3FN,
            )
            scale_value = self._initializer(f"{weight.name}/scale", scale, ir.DataType.FLOAT)
            attributes = {} if axis is None else {"axis": axis}
            output = self._add(node, "DequantizeLinear", [stored, scale_value], attributes, "dq")
            output.dtype, output.shape = ir.DataType.FLOAT, _copy(weight.shape)
            self.weights[key] = output
        node.replace_input_with(1, self.weights[key])

    def activation(self, node: ir.Node, source: ir.Value, amax: dict[str, float]) -> None:
        """Feed ``node``'s activation input through the Q/DQ pair of ``source`` (the input, or
        the input of the Relu/Clip that produces it)."""
        if id(source) not in self.activations:
            scale = self._initializer(
                f"{source.name}/scale",
                quant_params.fp8_scale(amax[source.name or ""]).reshape(()),
                ir.DataType.FLOAT,
            )
            zero = self.zero_point()
            quantized = self._add(node, "QuantizeLinear", [source, scale, zero], {}, "q")
            quantized.dtype, quantized.shape = ir.DataType.FLOAT8E4M3FN, _copy(source.shape)
            output = self._add(node, "DequantizeLinear", [quantized, scale, zero], {}, "dq")
            output.dtype, output.shape = ir.DataType.FLOAT, _copy(source.shape)
            self.activations[id(source)] = output
        consumer = node if source is node.inputs[0] else node.inputs[0].producer()
        assert consumer is not None
        consumer.replace_input_with(0, self.activations[id(source)])


def fp8_kernel_problem(model: ir.Model, provider: str) -> str | None:
    """None when onnxruntime loads the FP8 model on ``provider`` here; otherwise a one-line
    explanation (no kernel, provider missing) instead of onnxruntime's error."""
    full = runtime.resolve_provider(provider)
    if full not in runtime.ort.get_available_providers():
        return (
            f"{full} is not available in this onnxruntime: the FP8 model could not be tried; "
            "it needs a build with FP8 kernels (CUDA/TensorRT on GPUs with FP8, SM 8.9+)"
        )
    try:  # a plain session on the provider: the question is whether onnxruntime loads it
        runtime.create_session(model, provider)
    except LOAD_ERRORS as error:
        return fp8_failure_message(str(error.__cause__ or error), full)
    return None


def fp8_failure_message(error: str, provider: str) -> str:
    """Turn onnxruntime's session error for an FP8 model into a message that says what to do."""
    if "NOT_IMPLEMENTED" in error or "Could not find an implementation" in error:
        return (
            f"onnxruntime {runtime.ort.__version__} has no {provider} kernel for part of the "
            "FP8 (float8e4m3fn) QDQ graph; the model is valid: run it with a provider that has "
            "FP8 kernels (CUDA/TensorRT on an FP8 GPU) or use the int8 pass for this provider"
        )
    return f"onnxruntime cannot load the FP8 model on {provider}: {error.splitlines()[0]}"
