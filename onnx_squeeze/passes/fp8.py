"""FP8 (E4M3FN) QDQ around Conv/Gemm/MatMul (``fp8``).

Weights are stored as FLOAT8E4M3FN with a per-output-channel scale (``amax / 448``) and the
activation input is quantized with a calibrated per-tensor scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnx_squeeze import runtime
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.graph_utils import attribute
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.base import Pass, bounded, register, subset
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.eligibility import from_dequantize
from onnx_squeeze.passes.quantize.plan import point_before_clamp
from onnx_squeeze.passes.quantize.qdq import Fp8Weights, QdqWriter, TensorParams
from onnx_squeeze.passes.quantize.statistics import largest_magnitudes
from onnx_squeeze.records import PassContext, PassReport, unselected

# What loading a model in onnxruntime raises when a kernel is missing (runtime.create_session
# wraps only some of onnxruntime's errors in InputError).
LOAD_ERRORS = (InputError, runtime.ort.capi.onnxruntime_pybind11_state.NotImplemented)
FP8 = Fp8Weights()
FP8_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Fp8Settings:
    """``op_types``: ops whose weights (and activation input) are quantized to FLOAT8E4M3FN.
    ``activations``: also quantize the activation input with a calibrated scale (needs
    calibration data); false stores weights only in FP8. ``exclude``: node-name globs left
    alone."""

    op_types: Sequence[str] = subset(FP8_OPS, FP8_OPS)
    activations: bool = True
    per_channel: bool = True
    exclude: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = bounded(16, low=1)


@register
class QuantizeFp8(Pass):
    """FP8 (E4M3FN) QuantizeLinear/DequantizeLinear around Conv/Gemm/MatMul (opset >= 19)."""

    name = "fp8"
    Settings = Fp8Settings
    min_opset = 19

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        layers = [layer for node in model.graph if (layer := self._layer(node, report))]
        targets = [layer.node for layer in layers]
        chosen = set(targets)
        points = {node: point_before_clamp(node, chosen) for node in targets}  # before rewiring
        amax: dict[str, float] = {}
        if self.settings.activations and targets:
            if not context.data.supplied:
                raise SettingsError(
                    "fp8: activation scales need calibration data: pass --calib SRC, or set "
                    "activations=false to store weights only in FP8"
                )
            names = sorted({value.name or "" for value in points.values()})
            amax = largest_magnitudes(model, names, context, self.settings.calibration_batches)
        writer = QdqWriter(model, self.name)
        if self.settings.activations:
            for point, uses in _point_uses(points).items():
                writer.quantize_tensor(point, _params(amax[point.name or ""]), FP8.dtype, uses)
        detail = "float8e4m3fn weights" + (" and activation" if self.settings.activations else "")
        for layer in layers:
            axis = layer.output_axis if self.settings.per_channel else None
            writer.quantize_weight(layer.node, layer.weight_index, axis, FP8)
            size = math.prod(layer.shape)
            report.record(layer.node, "quantized", detail, params_before=size, params_after=size)
        problem = fp8_kernel_problem(model, (context.providers or ("cpu",))[0])
        if problem:
            report.notes.append(problem)

    def _layer(self, node: ir.Node, report: PassReport) -> Layer | None:
        """The layer view of a node to quantize, or None (skips recorded with the reason)."""
        if node.op_type not in self.settings.op_types:
            return None
        layer = Layer.of(node)
        source = node.inputs[0]
        if isinstance(layer, NotLayer):
            reason = "weight is not a constant (both inputs are activations)"
        elif layer.weight_index != 1:
            reason = "the weight is the first operand (W·X): activation layout not handled"
        elif layer.quantized or from_dequantize(source):
            reason = "already quantized (input comes from DequantizeLinear)"
        elif source.dtype != ir.DataType.FLOAT or layer.weight.dtype != ir.DataType.FLOAT:
            reason = "input or weight is not FP32"
        elif node.op_type == "Gemm" and attribute(node, "transA", 0):
            reason = "Gemm with transA=1: activation layout not handled"
        else:
            reason = None
        reason = unselected(node.name or "", exclude=self.settings.exclude) or reason
        if reason:
            report.skip(node, reason)
            return None
        return layer


def _point_uses(points: dict[ir.Node, ir.Value]) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
    """Each quantization point and the inputs its DequantizeLinear outputs feed: the quantized
    nodes' activation inputs, or the Relu/Clip before them (other readers stay float)."""
    uses: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
    for node, point in points.items():
        reader = node if point is node.inputs[0] else node.inputs[0].producer()
        assert reader is not None
        if (reader, 0) not in uses.setdefault(point, []):
            uses[point].append((reader, 0))
    return uses


def _params(amax: float) -> TensorParams:
    """Per-tensor FP8 parameters for an activation of largest magnitude ``amax``."""
    scale = quant_params.fp8_scale(amax).reshape(())
    zero_point = np.zeros((), dtype=ml_dtypes.float8_e4m3fn)
    return TensorParams(scale, zero_point, -amax, amax)


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
