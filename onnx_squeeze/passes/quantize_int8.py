"""Static INT8 QDQ quantization with calibrated activation ranges (``quantize_int8``).

Plans first (:mod:`.quantize.plan`: anchors, followers, shared parameters), then writes one
QuantizeLinear and one DequantizeLinear per consumer (:mod:`.quantize.qdq`).

Defaults, chosen for fidelity at no speed cost: activation ranges with the least expected squared
error (``mse``, from the histograms), weight ranges per channel likewise (``weight_range``), bias
correction from the input means gathered in the same calibration run (then, at the last
quantized layers, the measured mean output error), and 8-bit weights except for Conv layers with
a signed input on x86 CPUs without VNNI (see ``_static_weight_type``). A Conv over a single input
channel stays float: onnxruntime's QLinearConv runs it slower than the float kernel. The result
is timed once against the model before INT8 (``speed_check`` unset); where it runs slower, the
speed check keeps the layers that do not pay in float, or all of them, and says so.

What keeps real exported models working: the ops after the last weight layer (a detector's
decode) and Concats of differently scaled inputs stay float (:mod:`.quantize.plan`), and
accuracy control (:mod:`.quantize.accuracy_control`) returns the layers that harm the outputs
most to float until the fidelity gate (``target``, by default ``verdict.DEFAULT_GATE``) holds
on calibration data. Where it cannot within its bounds (the error is spread over more layers
than the latency bound lets return to float), the model is left float with a warning
(``if_missed``): an INT8 model that misses the gate does not keep the task (nudenet's kept
86 % of its detections, minilm's moved 8 % of its sentences' nearest neighbours).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import TensorStatistics
from onnx_squeeze.graph_utils import attribute
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.base import Pass, bounded, choice, register, subset
from onnx_squeeze.passes.quantize import accuracy_control, bias_correction, branches, speed_check
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.eligibility import (
    QUANTIZED_OPS,
    already_quantized,
    infer_types,
    is_activation,
    selection_of,
)
from onnx_squeeze.passes.quantize.params import IntType
from onnx_squeeze.passes.quantize.plan import ANCHOR_OPS, CONCAT_RANGE_RATIO, Plan, make_plan
from onnx_squeeze.passes.quantize.qdq import (
    IntWeights,
    Outcome,
    QdqWriter,
    TensorParams,
    anchor_weights,
    input_scale,
    input_zero_point,
)
from onnx_squeeze.passes.quantize.statistics import settled_statistics
from onnx_squeeze.records import PassContext, PassReport

WEIGHT_RANGES = ("max", "mse")


@dataclasses.dataclass
class QuantizeInt8Settings(accuracy_control.ControlSettings):
    # mse (least expected squared error) | minmax | percentile | entropy
    method: str = choice("mse", quant_params.METHODS)
    percentile: float = bounded(99.999, above=50, high=100)  # the percentile method's cut
    # uint8 (asymmetric, fastest on CPU) | int8 (symmetric)
    activation_type: str = choice("uint8", ("uint8", "int8"))
    per_channel: bool = True
    # 0: 8, but 7 for Conv/ConvTranspose with a signed input on x86 CPUs without VNNI
    weight_bits: int = 0
    # max | mse (per-channel clipping with the least squared error)
    weight_range: str = choice("mse", WEIGHT_RANGES)
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: Sequence[str] = subset((), ANCHOR_OPS)  # none: all
    exclude_op_types: Sequence[str] = subset((), ANCHOR_OPS)
    keep_first_last: bool = False  # the first and last weight layers stay float
    # a Concat whose inputs' calibrated range widths differ by more than this stays float
    # (see passes/quantize/plan.py)
    concat_range_ratio: float = bounded(CONCAT_RANGE_RATIO, low=1)
    bias_correction: bool = True  # shift biases by the mean error quantization adds
    calibration_batches: int = bounded(0, low=0)  # 0: all batches of the source
    # stop reading calibration batches once the ranges from half of them would have added at
    # most this much expected quantization noise (dB, on average over the tensors, and no
    # tensor's doubled); see passes/quantize/settling.py. 0: read every batch
    settle_db: float = 0.1
    histogram_bins: int = bounded(2048, low=1)  # bins of each activation's histogram
    # values of each tensor per calibration sample that its histogram counts (a strided sample
    # taken in the graph; min/max stay exact); 0: every value
    histogram_values: int = bounded(16384, low=0)
    # time the model on this machine (CPU, 1 thread) and keep the smallest layers in float while
    # that makes it faster (INT8 loses on narrow and depthwise layers at small batches): true,
    # always; unset, only where the quantized model, timed once, runs slower than the model
    # before INT8 (beyond verdict.SLOWER_MARGIN); false, never (placement by the plan alone)
    speed_check: bool | None = None


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
    zero_point = input_zero_point(node)
    nonnegative = zero_point is not None and zero_point.dtype == np.uint8 and not zero_point.any()
    conv = node.op_type in ("Conv", "ConvTranspose")
    saturates = conv and not nonnegative and not quant_params.cpu_has_vnni()
    return quant_params.weight_type(7 if saturates else 8)


def _anchor_problem(node: ir.Node) -> str | None:
    """Why an anchor cannot be quantized, or None."""
    if already_quantized(node):
        return "already quantized (reads a DequantizeLinear or is a quantized op): left untouched"
    if not is_activation(node.inputs[0]):
        return "input 0 is not a float activation"
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA=1 is not fused by onnxruntime"
    layer = Layer.of(node)
    if isinstance(layer, NotLayer):
        if node.op_type != "MatMul":
            return f"{node.op_type}: {layer.reason}"
        if is_activation(node.inputs[1]):
            return None  # two activations, both quantized
        return "input 1 is neither a constant nor a float activation"
    assert layer.array is not None  # input 0 is an activation, input 1 no DequantizeLinear
    if node.op_type == "Conv" and layer.shape[1] == 1 and layer.groups == 1:
        # a grayscale stem: onnxruntime's QLinearConv runs it about 3x slower than float
        return "Conv over a single input channel is faster in float: left in float"
    if layer.array.dtype != np.float32:
        return f"weight is {layer.array.dtype}, not float32"
    if layer.output_axis is None:
        return "no per-channel axis for this weight (grouped ConvTranspose or 1-D MatMul)"
    return None


def _whole_shared_weights(anchors: Sequence[ir.Node], report: PassReport) -> list[ir.Node]:
    """``anchors`` less those whose constant weight another node reads in float: where the
    speed check, accuracy control or the selection kept one reader of a shared weight float,
    quantizing the others would store the weight twice (an unrolled layer whose readers all
    took the same time grew 1.26x when the speed check floated some of them)."""
    chosen = {id(node) for node in anchors}
    kept = []
    for node in anchors:
        weight = node.inputs[1]
        floated = [
            use.node
            for use in weight.uses()
            if id(use.node) not in chosen and weight.const_value is not None
        ]
        if floated:
            report.skip(
                node,
                f"kept in float: its weight {weight.name!r} is also read in float by "
                f"{floated[0].name!r}{' and others' if len(floated) > 1 else ''}, and one "
                "INT8 copy beside the float one would grow the file",
            )
        else:
            kept.append(node)
    return kept


@register
class QuantizeInt8(Pass):
    """Static INT8 QDQ quantization with calibrated activation ranges."""

    name = "quantize_int8"
    Settings = QuantizeInt8Settings
    min_opset = 13  # per-axis QuantizeLinear/DequantizeLinear
    reaches_subgraphs = True  # If branches as models of their own (quantize/branches.py)

    def validate(self) -> None:
        s = self.settings
        if s.weight_bits:
            quant_params.weight_type(s.weight_bits)
        accuracy_control.check_settings(s)

    @property
    def activation(self) -> IntType:
        return quant_params.int_type(self.settings.activation_type)

    @property
    def symmetric(self) -> bool:
        return self.activation.qmin < 0

    # -- selection ------------------------------------------------------------------------

    def _anchors(self, model: ir.Model, report: PassReport) -> list[ir.Node]:
        selection = selection_of(self.settings)
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

    def _range(self, statistics: TensorStatistics) -> tuple[float, float]:
        """The range one tensor is quantized to, by the calibration method."""
        return quant_params.calibrated_range(
            statistics,
            self.settings.method,
            self.activation,
            symmetric=self.symmetric,
            percentile=self.settings.percentile,
        )

    def _ranges(
        self, plan: Plan, ranges: dict[str, tuple[float, float]]
    ) -> dict[str, TensorParams]:
        """One set of parameters per class: the hull of its members' calibrated ``ranges``."""
        params = {}
        for members in plan.classes.members().values():
            low, high = 0.0, 0.0
            for name in members:
                a, b = ranges[name]
                low, high = min(low, a), max(high, b)
            scale, zero_point = quant_params.scale_zero_point(
                low, high, self.activation, symmetric=self.symmetric
            )
            for name in members:
                params[name] = TensorParams(scale.reshape(()), zero_point.reshape(()), low, high)
        return params

    # -- applying -------------------------------------------------------------------------

    def _apply_plan(
        self,
        model: ir.Model,
        plan: Plan,
        params: dict[str, TensorParams],
        encoded: dict[tuple, tuple] | None = None,
    ) -> Outcome:
        writer = QdqWriter(model, self.name, encoded)
        for name, value in plan.tensors.items():
            writer.quantize_tensor(value, params[name], self.activation.dtype)
        # each anchor's input is now a DequantizeLinear output: its scale and zero point
        input_scales = {node.name: input_scale(node) for node in plan.anchors}
        weight_types = self._weight_types(plan.anchors)
        details, biases = {}, {}
        for node in plan.anchors:
            detail, bias = anchor_weights(
                writer,
                node,
                input_scales[node.name],
                self.settings.per_channel,
                IntWeights(weight_types[node.name], self.settings.weight_range == "mse"),
            )
            details[node.name] = detail
            if bias is not None:
                biases[node.name] = bias
        return Outcome(details, biases)

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

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        infer_types(model)
        present = sum(1 for node in model.graph if node.op_type in QUANTIZED_OPS)
        if present:
            report.notes.append(
                f"the model already holds {present} quantized nodes (QDQ/QOperator/"
                "MatMulNBits): they and the nodes reading them are left untouched"
            )
        branches.quantize_branches(model, context, report, self.apply, ANCHOR_OPS)
        anchors = self._anchors(model, report)
        if not anchors:
            if not report.changed:
                report.notes.append("nothing to quantize")
            return
        # Statistics of every tensor any plan may quantize: all anchors at once.
        full_plan = make_plan(model, anchors, self.symmetric)
        if context.data.is_random:
            report.notes.append(
                f"WARNING: calibrated on random data ({context.data.label}): activation ranges "
                "are smoke-test quality; pass real calibration data (--calib) for a usable model"
            )
        channel_axes, output_axes = {}, {}
        if self.settings.bias_correction:  # input means of the layers whose bias may shift
            channel_axes = {
                node.inputs[0].name: 1 if node.op_type == "Conv" else -1
                for node in anchors
                if node.op_type in ("Conv", "Gemm") and node.inputs[0].name in full_plan.tensors
            }
            finals = bias_correction.final_anchors(model, {node.name for node in anchors})
            output_axes = bias_correction.output_axes(finals)
        s = self.settings
        statistics = settled_statistics(
            model,
            list(full_plan.tensors),
            context,
            report,
            range_of=self._range,
            activation=self.activation,
            channel_axes=channel_axes,
            output_axes=output_axes,
            histogram_bins=s.histogram_bins,
            histogram_values=s.histogram_values,
            calibration_batches=s.calibration_batches,
            settle_db=s.settle_db,
        )

        ranges = {name: self._range(statistics[name]) for name in full_plan.tensors}
        widths = {name: high - low for name, (low, high) in ranges.items()}
        encoded: dict[tuple, tuple] = {}  # weight encodings, made once for every copy

        def plan_for(target: ir.Model, chosen: Sequence[ir.Node]) -> Plan:
            return make_plan(
                target,
                chosen,
                self.symmetric,
                widths=widths,
                concat_range_ratio=s.concat_range_ratio,
            )

        def quantized_copy(chosen: Sequence[ir.Node]) -> ir.Model:
            """A clone of ``model`` (weights shared) with only ``chosen`` quantized, its
            weight rounding's mean error corrected as in the result (not the measured output
            error: that costs a calibration run)."""
            copy = model.clone()
            by_name = {node.name: node for node in copy.graph}
            plan = plan_for(copy, [by_name[node.name] for node in chosen])
            outcome = self._apply_plan(copy, plan, self._ranges(plan, ranges), encoded)
            if s.bias_correction:
                unreported = PassReport(self.name)
                bias_correction.correct_biases(model, copy, outcome, statistics, unreported)
            return copy

        # Speed first (which layers pay in INT8 here at all), then accuracy among those: a
        # control that ran first would time its steps against a model INT8 only slows down.
        slowdown = speed_check.Slowdown(model, context, batch=s.speed_batch)
        if s.speed_check:
            anchors, _ = speed_check.fastest(
                model, anchors, quantized_copy, context, report, batch=s.speed_batch
            )
        elif s.speed_check is None:
            anchors = speed_check.unless_slower(
                model,
                anchors,
                quantized_copy,
                context,
                report,
                batch=s.speed_batch,
                slowdown=slowdown,
            )
        anchors = accuracy_control.controlled(
            model, anchors, quantized_copy, context, report, s, slowdown=slowdown
        )
        if anchors is None:  # a missed gate: the model stays float
            return
        anchors = _whole_shared_weights(anchors, report)
        float_model = model.clone() if s.bias_correction else None
        plan = plan_for(model, anchors)
        params = self._ranges(plan, ranges)
        outcome = self._apply_plan(model, plan, params, encoded)
        if float_model is not None:
            bias_correction.correct_biases(float_model, model, outcome, statistics, report)
            bias_correction.correct_outputs(
                float_model, model, outcome, context, report, sample_values=s.histogram_values
            )
        self._describe_float(plan, report)
        for node in anchors:
            report.record(node, "quantized", outcome.details[node.name])
        self._describe_tensors(plan, params, statistics, report)

    def _describe_float(self, plan: Plan, report: PassReport) -> None:
        """What the plan left float on purpose: Concats of unlike ranges, the tail."""
        for node, ratio in plan.float_concats:
            report.skip(
                node,
                f"Concat left float: its inputs' calibrated ranges differ {ratio:.3g}x (more "
                f"than concat_range_ratio={self.settings.concat_range_ratio:g}); one shared "
                "scale would crush the narrow ones",
            )
        if plan.tail:
            ops = collections.Counter(node.op_type for node in plan.tail)
            listed = ", ".join(f"{count} {op}" for op, count in ops.most_common())
            report.notes.append(
                f"{len(plan.tail)} ops after the last quantized layers stay float (they lead "
                f"to no quantized layer, so an integer op would only add rounding): {listed}"
            )

    def _describe_tensors(
        self,
        plan: Plan,
        params: dict[str, TensorParams],
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
