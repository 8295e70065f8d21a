"""FP16/BF16 conversion (``fp16``).

Plans first, then rewrites: every node, If/Loop/Scan bodies included, is given a precision (low
or FP32) from the target execution provider's kernels (CUDA by default: that is where FP16 pays
off; probed on this onnxruntime when the provider is here, else its built-in block list),
numerically risky ops, already quantized arithmetic, calibrated activation ranges and constants
out of range; then values take the precision of their producer, constants are converted once
per precision (no Cast for them), and one Cast per value and precision is inserted where a
consumer needs the other one. Ops that only move data follow their input's precision so that
they never add a Cast pair around themselves. Graph borders (the model's and every body's
inputs and outputs) stay FP32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_squeeze import runtime
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array
from onnx_squeeze.passes.base import Pass, bounded, choice, register
from onnx_squeeze.passes.fp16 import element_types, kernels
from onnx_squeeze.passes.fp16.quantized import quantized_values
from onnx_squeeze.passes.fp16.rewrite import (
    FP16_MAX,
    Plan,
    all_nodes,
    convert_constants,
    remove_identity_casts,
    retype_and_cast,
)
from onnx_squeeze.passes.quantize.statistics import largest_magnitudes
from onnx_squeeze.records import PassContext, PassReport, unselected

LOW_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}

REDUCTIONS = frozenset(
    {
        "ReduceSum",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "GlobalAveragePool",
        "GlobalLpPool",
    }
)
NORMALIZATIONS = frozenset(
    {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization"}
)
# Ops that only move or select data: exact in any precision, so they follow their input's
# precision instead of adding Casts around themselves.
DATA_MOVEMENT = frozenset(
    {
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Identity",
        "Gather",
        "GatherElements",
        "GatherND",
        "Slice",
        "Split",
        "Concat",
        "Expand",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
        "Shape",
        "Size",
        "Dropout",
        "MaxPool",
    }
)
# The ops worth running in low precision even at the price of Casts around them.
HEAVY_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Einsum",
        "Attention",
        "MultiHeadAttention",
        "LSTM",
        "GRU",
        "RNN",
    }
)
CPU = "CPUExecutionProvider"

Slots = tuple[list[int], list[int]]


@dataclasses.dataclass
class FloatSettings:
    """``dtype``: float16 or bfloat16. ``provider``: the execution provider the model is
    converted for, whose kernels decide which ops convert: ``cuda`` (default; also
    ``tensorrt``) converts nearly every op, which onnxruntime's CPU EP then runs no faster
    than FP32; ``cpu`` converts only ops with native CPU kernels (the model stays as fast on
    CPU, usually little converts); ``none``: no kernel-based blocks. ``block_ops`` and
    ``block_nodes`` (node-name globs) keep ops/nodes in FP32 on top of the defaults.
    ``out_of_range``: ``clamp`` constants to the FP16 range or ``keep_fp32`` their consumers.
    Activations whose calibrated range exceeds FP16 max / ``range_margin`` keep their ops in
    FP32; reductions over more than ``max_reduction`` elements stay FP32."""

    dtype: str = choice("float16", LOW_TYPES)
    provider: str = "cuda"
    keep_io_types: bool = True  # graph inputs/outputs stay FP32 (Casts at the border)
    block_ops: list[str] = dataclasses.field(default_factory=list)
    block_nodes: list[str] = dataclasses.field(default_factory=list)
    softmax_fp32: bool = False  # keep Softmax/LogSoftmax in FP32
    normalization_fp32: bool = False  # keep Layer/Instance/Group/Lp normalization in FP32
    out_of_range: str = choice("clamp", ("clamp", "keep_fp32"))
    range_margin: float = bounded(2.0, low=1)
    max_reduction: int = bounded(4096, low=1)
    calibration_batches: int = bounded(16, low=1)


@register
class ConvertFloat(Pass):
    """Convert a FP32 model to FP16 (or BF16) for a provider's kernels where it is safe."""

    name = "fp16"
    Settings = FloatSettings
    reaches_subgraphs = True  # converts inside If/Loop/Scan bodies too, not only the main graph

    def validate(self) -> None:
        if self.settings.provider != "none":
            runtime.resolve_provider(self.settings.provider)

    @property
    def low(self) -> ir.DataType:
        return LOW_TYPES[self.settings.dtype]

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        typed = element_types.infer_missing(model)
        if typed:
            report.notes.append(f"element types of {typed} untyped values inferred")
        has_kernel = self._kernel_check(model, report)
        quantized = quantized_values(all_nodes(model))
        plan = self._plan(model, has_kernel, {}, quantized)
        amax = self._ranges(model, plan, context, report)
        if amax:  # plan again, keeping FP32 what the calibration data shows too wide for FP16
            plan = self._plan(model, has_kernel, amax, quantized)
        for node in all_nodes(model):
            if node in plan.low:
                report.record(node, "converted", self.settings.dtype)
            elif node in plan.kept:
                report.skip(node, plan.kept[node])
        self._explain(model, plan, report)
        names = UniqueNames(model)
        clamped = convert_constants(model, plan, names, self.low)
        if clamped:
            report.notes.append(
                f"{clamped} constant values clamped into the float16 range "
                "(|x| <= 65504; nonzero |x| >= 2**-24 so that epsilons stay nonzero)"
            )
        casts = retype_and_cast(model, plan, names, self.low, self.settings.keep_io_types)
        remove_identity_casts(model)
        common_passes.TopologicalSortPass()(model)
        report.notes.append(f"{casts} Cast nodes inserted at precision borders")

    def _explain(self, model: ir.Model, plan: Plan, report: PassReport) -> None:
        """Notes on what the plan means for the user: speed on CPU, what stayed FP32."""
        dtype = self.settings.dtype
        provider = self.settings.provider
        if plan.low and provider != "none" and runtime.resolve_provider(provider) != CPU:
            report.notes.append(
                f"converted for {runtime.resolve_provider(provider)}: onnxruntime's CPU EP has "
                f"{dtype} kernels for few ops and casts the others back to float32, so on CPU "
                "this model runs no faster (usually slower) than the original: the gain there is "
                "the smaller file. For CPU use --fp16-for cpu (fp16:provider=cpu)"
            )
        if not plan.low and any("kernel" in reason for reason in plan.kept.values()):
            report.notes.append(
                f"nothing converted: the provider has no {dtype} kernels for this model's ops "
                "(x86 CPU); for a GPU deployment or half the file size leave the default "
                "provider=cuda"
            )
        quantized = sum("quantized" in reason for reason in plan.kept.values())
        if quantized:
            report.notes.append(
                f"{quantized} nodes of the model's quantized arithmetic (scales, integer "
                "accumulators, Q/DQ neighbours) kept float32"
            )
        inside = [n for n in plan.low if n.graph is not model.graph]
        if inside:
            report.notes.append(
                f"{len(inside)} nodes inside If/Loop/Scan bodies converted; the bodies' inputs "
                "and outputs stay float32"
            )
        untyped = [
            n
            for n, reason in plan.kept.items()
            if n.graph is not model.graph and reason.startswith("element type")
        ]
        if untyped:
            report.notes.append(
                f"WARNING: {len(untyped)} nodes inside If/Loop/Scan bodies have values of unknown "
                "element type (onnx's type inference could not give one) and stay float32"
            )

    # -- planning ------------------------------------------------------------------------------

    def _ranges(
        self, model: ir.Model, plan: Plan, context: PassContext, report: PassReport
    ) -> dict[str, float]:
        """Calibrated largest magnitudes of the activations that the plan would convert."""
        if self.low != ir.DataType.FLOAT16 or not plan.low:
            return {}  # BF16 has FP32's exponent range
        if not context.data.supplied:
            report.notes.append("no calibration data: activation ranges not checked against FP16")
            return {}
        main = [node for node in plan.low if node.graph is model.graph]
        if len(main) < len(plan.low):
            report.notes.append(
                "activations inside If/Loop/Scan bodies not checked against the FP16 range "
                "(onnxruntime cannot expose them)"
            )
        names = _float_activations(main, model.graph)
        return largest_magnitudes(model, names, context, self.settings.calibration_batches)

    def _kernel_check(
        self, model: ir.Model, report: PassReport
    ) -> Callable[[ir.Node, Slots], bool]:
        """A function telling whether the provider has a low-precision kernel for a node."""
        if self.settings.provider == "none":
            return lambda node, slots: True
        provider = runtime.resolve_provider(self.settings.provider)
        if provider not in runtime.ort.get_available_providers():
            report.notes.append(
                f"{provider} is not available here: its FP16 block list is the built-in one"
            )
            return lambda node, slots: True
        opset = model.opset_imports.get("", 1)
        return lambda node, slots: kernels.probe(provider, node, slots, self.low, opset)

    def _blocked_ops(self) -> frozenset[str]:
        s = self.settings
        ops = set(kernels.RISKY_OPS) | set(s.block_ops)
        if s.provider != "none":
            ops |= kernels.STATIC_BLOCKS.get(runtime.resolve_provider(s.provider), frozenset())
        if s.softmax_fp32:
            ops |= {"Softmax", "LogSoftmax"}
        if s.normalization_fp32:
            ops |= NORMALIZATIONS
        return frozenset(ops)

    def _plan(
        self,
        model: ir.Model,
        has_kernel: Callable[[ir.Node, Slots], bool],
        amax: dict[str, float],
        quantized: set[ir.Value],
    ) -> Plan:
        plan = Plan(pinned=_pinned(model, self.settings.keep_io_types))
        blocked_ops = self._blocked_ops()
        limit = FP16_MAX / self.settings.range_margin
        opset = model.opset_imports.get("", 1)
        for node in all_nodes(model):
            if node.op_type == "Constant" or not _touches_float(node):
                continue  # Constant values are converted with the initializers
            reason, slots = self._structural_reason(node, opset, blocked_ops, quantized)
            if reason is None:
                reason = self._numeric_reason(node, slots, amax, limit)
            if reason is None and _follows_fp32(node, slots, plan):
                reason = "moves data of an FP32 producer: follows it (fewer Casts)"
            if reason is None and not has_kernel(node, slots):
                reason = f"no {self.settings.dtype} kernel for {node.op_type} on this provider"
            if reason is None:
                plan.low[node] = slots
            else:
                plan.kept[node] = reason
        for node in _drop_islands(plan):
            plan.kept[node] = "alone among FP32 neighbours: converting it would only add Casts"
        return plan

    def _structural_reason(
        self, node: ir.Node, opset: int, blocked_ops: frozenset[str], quantized: set[ir.Value]
    ) -> tuple[str | None, Slots]:
        """Settings, control flow, types and schemas that keep ``node`` FP32; else its slots."""
        none: Slots = ([], [])
        if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return "control flow (If/Loop/Scan): its inputs and outputs stay FP32", none
        if unselected(node.name or "", exclude=self.settings.block_nodes):
            return "in block_nodes", none
        if node.op_type in blocked_ops:
            return f"{node.op_type} is in the FP32 block list", none
        if any(v in quantized for v in (*node.inputs, *node.outputs) if v is not None):
            return "part of the model's quantized arithmetic: kept FP32", none
        if not all(_typed(v) for v in (*node.inputs, *node.outputs)):
            return "element type of an input or output unknown", none
        schema = kernels.schema(node, opset)
        if schema is None:
            return f"no ONNX schema for {node.domain or 'ai.onnx'}.{node.op_type}", none
        slots = kernels.convertible_slots(node, schema, self.low)
        if slots is None:
            return f"{node.op_type} has no {self.settings.dtype} type in its schema", none
        if node.op_type == "Cast":
            slots = ([], slots[1])  # a Cast takes any input type: never cast before it
        return None, slots

    def _numeric_reason(
        self, node: ir.Node, slots: Slots, amax: dict[str, float], limit: float
    ) -> str | None:
        """Large reductions, wide activations and out-of-range constants keep ``node`` FP32."""
        if node.op_type in REDUCTIONS:
            size = _reduced_size(node)
            if size is None or size > self.settings.max_reduction:
                shown = "unknown" if size is None else str(size)
                return f"reduction over {shown} elements kept FP32 (max_reduction)"
        for value in (*node.inputs, *node.outputs):
            if value is not None and amax.get(value.name or "", 0.0) > limit:
                return f"activation {value.name} reaches {amax[value.name]:.4g}, beyond FP16 range"
        if self.settings.out_of_range == "keep_fp32" and self.low == ir.DataType.FLOAT16:
            for index in slots[0]:
                array = constant_array(node.inputs[index])
                if array is not None and array.size and np.abs(array).max() > FP16_MAX:
                    return f"constant input {index} exceeds the FP16 range"
        return None


def _pinned(model: ir.Model, keep_io_types: bool) -> set[ir.Value]:
    """Graph inputs and outputs that keep FP32: every body's, and the model's own unless
    ``keep_io_types`` is off."""
    pinned: set[ir.Value] = set()
    for graph in model.graphs():
        if graph is not model.graph or keep_io_types:
            pinned.update(graph.inputs)
            pinned.update(graph.outputs)
    return pinned


def _float_activations(nodes: Iterable[ir.Node], graph: ir.Graph) -> list[str]:
    """Names of the FP32 tensors (not constants) of ``graph`` that ``nodes`` read or write."""
    names: dict[str, None] = {}
    for node in nodes:
        for value in (*node.inputs, *node.outputs):
            if (
                value is not None
                and value.name
                and value.dtype == ir.DataType.FLOAT
                and value.graph is graph
                and constant_array(value) is None
            ):
                names[value.name] = None
    return list(names)


def _drop_islands(plan: Plan) -> list[ir.Node]:
    """Return low-precision nodes to FP32 (except heavy compute ops) while that needs fewer
    Casts than keeping them low: an elementwise op between FP32 neighbours gains nothing."""
    dropped: list[ir.Node] = []
    changed = True
    while changed:
        changed = False
        for node in list(plan.low):
            if node.op_type in HEAVY_OPS:
                continue
            low_edges, fp32_edges = _border_edges(node, plan)
            if fp32_edges > low_edges:
                del plan.low[node]
                dropped.append(node)
                changed = True
    return dropped


def _border_edges(node: ir.Node, plan: Plan) -> tuple[int, int]:
    """How many of a low node's float neighbours (non-constant) are low and how many FP32."""
    low = fp32 = 0
    inputs, outputs = plan.low[node]
    for index in inputs:
        value = node.inputs[index]
        if value is None or constant_array(value) is not None:
            continue
        is_fp32 = plan.produced_fp32(value)
        low, fp32 = low + (not is_fp32), fp32 + is_fp32
    for index in outputs:
        value = node.outputs[index]
        needs = {plan.wants_low(user, i) for user, i in value.uses()}
        if value.is_graph_output():
            needs.add(value not in plan.pinned)
        low, fp32 = low + (True in needs), fp32 + (False in needs)
    return low, fp32


def _follows_fp32(node: ir.Node, slots: Slots, plan: Plan) -> bool:
    """True for an op that only moves data of an FP32 producer (it keeps that precision)."""
    return node.op_type in DATA_MOVEMENT and any(
        plan.produced_fp32(node.inputs[i]) for i in slots[0]
    )


def _typed(value: ir.Value | None) -> bool:
    """True when ``value``'s element type is known, or it is a non-float constant (a folded
    constant may come without a type: its tensor has one)."""
    if value is None or value.dtype is not None:
        return True
    tensor = value.const_value
    return tensor is not None and tensor.dtype != ir.DataType.FLOAT


def _touches_float(node: ir.Node) -> bool:
    values = (*node.inputs, *node.outputs)
    return any(v is not None and v.dtype == ir.DataType.FLOAT for v in values)


def _reduced_size(node: ir.Node) -> int | None:
    """How many elements each output element of a reduction sums over (None: unknown)."""
    source = node.inputs[0]
    if source is None or source.shape is None:
        return None
    dims = list(source.shape)
    if node.op_type.startswith("Global"):
        axes = list(range(2, len(dims)))
    else:
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        constant = constant_array(axes_value) if axes_value is not None else None
        axes = list(constant) if constant is not None else attribute(node, "axes", None)
        if axes is None or len(axes) == 0:
            axes = list(range(len(dims)))
    size = 1
    for axis in axes:
        dim = dims[int(axis)]
        if not isinstance(dim, int):
            return None
        size *= dim
    return size
