"""FP16/BF16 conversion (``fp16``).

Plans first, then rewrites: every node is given a precision (low or FP32) from the
execution provider's kernels (probed on this onnxruntime, cached), numerically risky ops,
calibrated activation ranges and constants out of range; then values take the precision of their
producer, constants are converted once per precision (no Cast for them), and one Cast per value
and precision is inserted where a consumer needs the other one. Ops that only move data follow
their input's precision so that they never add a Cast pair around themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_squeeze import runtime
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array
from onnx_squeeze.passes.base import Pass, bounded, choice, register
from onnx_squeeze.passes.quantize.statistics import largest_magnitudes
from onnx_squeeze.records import PassContext, PassReport, mark_created, unselected

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24

LOW_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
NUMPY_LOW = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}

# Kept in FP32 on every provider: indices/counters, sampling, and ops whose FP16 results are
# known to drift (cumulative sums, box decoding, sorting on ties).
RISKY_OPS = frozenset(
    {
        "Range",
        "CumSum",
        "NonMaxSuppression",
        "TopK",
        "RoiAlign",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "EyeLike",
        "ConstantOfShape",
    }
)
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
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention", "MultiHeadAttention"}
)
# Used when the provider is not available here to probe. CUDA registers FP16 kernels for nearly
# every op; Upsample (deprecated) is blocked as onnxruntime.transformers.float16 does.
STATIC_BLOCKS = {
    "CUDAExecutionProvider": frozenset({"Upsample"}),
    "TensorrtExecutionProvider": frozenset({"Upsample"}),
}


# ---------------------------------------------------------------------------------------------
# Kernel probing


def _one_node_model(node: ir.Node, input_types: tuple, output_types: tuple, opset: int) -> bytes:
    """A model holding only a copy of ``node`` with the given element types (None: absent)."""
    inputs = [
        onnx.helper.make_tensor_value_info(f"x{i}", t, None)
        for i, t in enumerate(input_types)
        if t is not None
    ]
    outputs = [
        onnx.helper.make_tensor_value_info(f"y{i}", t, None) for i, t in enumerate(output_types)
    ]
    proto = ir.serde.serialize_node(node)
    del proto.input[:], proto.output[:]
    proto.input.extend(f"x{i}" if t is not None else "" for i, t in enumerate(input_types))
    proto.output.extend(f"y{i}" for i in range(len(output_types)))
    proto.name, proto.doc_string = "probe", ""
    if node.op_type == "Cast":  # its output type is its "to" attribute
        proto.attribute.remove(next(a for a in proto.attribute if a.name == "to"))
        proto.attribute.append(onnx.helper.make_attribute("to", output_types[0]))
    del proto.metadata_props[:]  # per-node notes would defeat the cache
    graph = onnx.helper.make_graph([proto], "probe", inputs, outputs)
    opsets = [onnx.helper.make_opsetid("", opset)]
    if node.domain:
        opsets.append(onnx.helper.make_opsetid(node.domain, 1))
    return onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString()


@functools.lru_cache(maxsize=4096)
def _has_kernel(provider: str, data: bytes, is_cast: bool) -> bool:
    """True when ``provider`` runs the one-node model natively: the session loads and
    onnxruntime inserted no Cast (its CPU EP silently wraps FP16 nodes without kernels in
    Casts to float); ``is_cast`` says the probed node is itself a Cast."""
    with tempfile.TemporaryDirectory(prefix="onnx-squeeze-probe-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = runtime.session_options(optimization="none", optimized_model_path=path)
        if provider != "CPUExecutionProvider":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:  # a plain session: the probe asks the provider itself, no exposed copy to run
            runtime.ort.InferenceSession(data, options, providers=[provider])
        except Exception:  # any failure (no kernel, bad attributes) means no usable kernel
            return False
        optimized = onnx.load(path)
    return sum(n.op_type == "Cast" for n in optimized.graph.node) == int(is_cast)


# ---------------------------------------------------------------------------------------------
# Type bindings from the op schemas


def _schema(node: ir.Node, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None


def _formal(params: list, index: int) -> onnx.defs.OpSchema.FormalParameter | None:
    if index < len(params):
        return params[index]
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return params[-1] if params and params[-1].option == variadic else None


def _convertible_slots(
    node: ir.Node, schema: onnx.defs.OpSchema, low: ir.DataType
) -> tuple[list[int], list[int]] | None:
    """Indices of the FLOAT inputs and outputs that may take ``low`` together (they are bound
    to type parameters that allow both), or None when a FLOAT slot cannot take it."""
    wanted = f"tensor({'float16' if low == ir.DataType.FLOAT16 else 'bfloat16'})"
    allowed = {
        c.type_param_str: set(c.allowed_type_strs)
        for c in schema.type_constraints
        if {"tensor(float)", wanted} <= set(c.allowed_type_strs)
    }
    slots: tuple[list[int], list[int]] = ([], [])
    for side, (values, params) in enumerate(
        ((node.inputs, schema.inputs), (node.outputs, schema.outputs))
    ):
        for index, value in enumerate(values):
            if value is None or value.dtype != ir.DataType.FLOAT:
                continue
            formal = _formal(params, index)
            if formal is not None and formal.type_str == "tensor(float)":
                continue  # a fixed FP32 slot (e.g. Resize scales) stays FP32
            if formal is None or formal.type_str not in allowed:
                return None
            slots[side].append(index)
    return slots


# ---------------------------------------------------------------------------------------------
# Calibrated ranges


def _float_activations(nodes: Iterable[ir.Node]) -> list[str]:
    """Names of the FP32 tensors (not constants) that ``nodes`` read or write."""
    names: dict[str, None] = {}
    for node in nodes:
        for value in (*node.inputs, *node.outputs):
            if (
                value is not None
                and value.name
                and value.dtype == ir.DataType.FLOAT
                and constant_array(value) is None
            ):
                names[value.name] = None
    return list(names)


# ---------------------------------------------------------------------------------------------
# FP16 / BF16


@dataclasses.dataclass
class FloatSettings:
    """``dtype``: float16 or bfloat16. ``provider``: whose kernels decide the block list
    (empty: the run's first provider; ``none``: no kernel-based blocks). ``block_ops`` and
    ``block_nodes`` (node-name globs) keep ops/nodes in FP32 on top of the defaults.
    ``out_of_range``: ``clamp`` constants to the FP16 range or ``keep_fp32`` their consumers.
    Activations whose calibrated
    range exceeds FP16 max / ``range_margin`` keep their ops in FP32; reductions over more than
    ``max_reduction`` elements stay FP32."""

    dtype: str = choice("float16", LOW_TYPES)
    provider: str = ""
    keep_io_types: bool = True
    block_ops: list[str] = dataclasses.field(default_factory=list)
    block_nodes: list[str] = dataclasses.field(default_factory=list)
    softmax_fp32: bool = False
    normalization_fp32: bool = False
    out_of_range: str = choice("clamp", ("clamp", "keep_fp32"))
    range_margin: float = bounded(2.0, low=1)
    max_reduction: int = bounded(4096, low=1)
    calibration_batches: int = bounded(16, low=1)


@dataclasses.dataclass
class _Plan:
    """Which nodes run in low precision, with the FLOAT slots that change type."""

    low: dict[ir.Node, tuple[list[int], list[int]]] = dataclasses.field(default_factory=dict)
    kept: dict[ir.Node, str] = dataclasses.field(default_factory=dict)  # FP32, with the reason

    def wants_low(self, node: ir.Node, index: int) -> bool:
        slots = self.low.get(node)
        return slots is not None and index in slots[0]


@register
class ConvertFloat(Pass):
    """Convert a FP32 model to FP16 (or BF16) where the provider has kernels and it is safe."""

    name = "fp16"
    Settings = FloatSettings

    def validate(self) -> None:
        provider = self.settings.provider
        if provider and provider != "none":
            runtime.resolve_provider(provider)

    @property
    def low(self) -> ir.DataType:
        return LOW_TYPES[self.settings.dtype]

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        graph = model.graph
        has_kernel = self._kernel_check(model, context, report)
        plan = self._plan(model, has_kernel, {})
        amax = self._ranges(model, plan, context, report)
        if amax:  # plan again, keeping FP32 what the calibration data shows too wide for FP16
            plan = self._plan(model, has_kernel, amax)
        for node in graph:
            if node in plan.low:
                report.record(node, "converted", self.settings.dtype)
            elif node in plan.kept:
                report.skip(node, plan.kept[node])
        if not plan.low and any("kernel" in r.detail for r in report.skipped):
            report.notes.append(
                f"nothing converted: the provider has no {self.settings.dtype} kernels for this "
                "model's ops (x86 CPU); for a GPU deployment set provider=cuda"
            )
        names = UniqueNames(model)
        clamped = self._convert_constants(graph, plan, names)
        if clamped:
            report.notes.append(
                f"{clamped} constant values clamped into the float16 range "
                "(|x| <= 65504; nonzero |x| >= 2**-24 so that epsilons stay nonzero)"
            )
        casts = self._retype_and_cast(graph, plan, names)
        _remove_identity_casts(graph)
        common_passes.TopologicalSortPass()(model)
        report.notes.append(f"{casts} Cast nodes inserted at precision borders")

    # -- planning ------------------------------------------------------------------------------

    def _ranges(
        self, model: ir.Model, plan: _Plan, context: PassContext, report: PassReport
    ) -> dict[str, float]:
        """Calibrated largest magnitudes of the activations that the plan would convert."""
        if self.low != ir.DataType.FLOAT16 or not plan.low:
            return {}  # BF16 has FP32's exponent range
        if not context.data.supplied:
            report.notes.append("no calibration data: activation ranges not checked against FP16")
            return {}
        names = _float_activations(plan.low)
        return largest_magnitudes(model, names, context, self.settings.calibration_batches)

    def _kernel_check(
        self, model: ir.Model, context: PassContext, report: PassReport
    ) -> Callable[[ir.Node, tuple[list[int], list[int]]], bool]:
        """A function telling whether the provider has a low-precision kernel for a node."""
        wanted = self.settings.provider or (context.providers or ("cpu",))[0]
        if wanted == "none":
            return lambda node, slots: True
        provider = runtime.resolve_provider(wanted)
        if provider not in runtime.ort.get_available_providers():
            blocked = STATIC_BLOCKS.get(provider, frozenset())
            report.notes.append(
                f"{provider} is not available here: its FP16 block list is the built-in one"
            )
            return lambda node, slots: node.op_type not in blocked
        opset = model.opset_imports.get("", 1)
        low = int(self.low)

        def check(node: ir.Node, slots: tuple[list[int], list[int]]) -> bool:
            inputs = tuple(
                None if v is None else (low if i in slots[0] else int(v.dtype or 1))
                for i, v in enumerate(node.inputs)
            )
            outputs = tuple(
                low if i in slots[1] else int(v.dtype or 1) for i, v in enumerate(node.outputs)
            )
            data = _one_node_model(node, inputs, outputs, opset)
            return _has_kernel(provider, data, node.op_type == "Cast")

        return check

    def _blocked_ops(self) -> frozenset[str]:
        s = self.settings
        ops = set(RISKY_OPS) | set(s.block_ops)
        if s.softmax_fp32:
            ops |= {"Softmax", "LogSoftmax"}
        if s.normalization_fp32:
            ops |= NORMALIZATIONS
        return frozenset(ops)

    def _plan(
        self,
        model: ir.Model,
        has_kernel: Callable[[ir.Node, tuple[list[int], list[int]]], bool],
        amax: dict[str, float],
    ) -> _Plan:
        plan = _Plan()
        blocked_ops = self._blocked_ops()
        limit = FP16_MAX / self.settings.range_margin
        opset = model.opset_imports.get("", 1)
        for node in model.graph:
            if node.op_type == "Constant" or not _touches_float(node):
                continue  # Constant values are converted with the initializers
            reason, slots = self._reason_fp32(node, opset, blocked_ops, amax, limit, plan)
            if reason is None and not has_kernel(node, slots):
                reason = f"no {self.settings.dtype} kernel for {node.op_type} on this provider"
            if reason is None:
                plan.low[node] = slots
            else:
                plan.kept[node] = reason
        for node in _drop_islands(plan, self.settings.keep_io_types):
            plan.kept[node] = "alone among FP32 neighbours: converting it would only add Casts"
        return plan

    def _reason_fp32(
        self,
        node: ir.Node,
        opset: int,
        blocked_ops: frozenset[str],
        amax: dict[str, float],
        limit: float,
        plan: _Plan,
    ) -> tuple[str | None, tuple[list[int], list[int]]]:
        """Why ``node`` stays FP32 (None when it may convert) and its convertible slots."""
        none: tuple[list[int], list[int]] = ([], [])
        reason, slots = self._structural_reason(node, opset, blocked_ops)
        if reason is None:
            reason = self._numeric_reason(node, slots, amax, limit)
        if reason is None and node.op_type in DATA_MOVEMENT:
            fp32_inputs = self.settings.keep_io_types
            if any(_produced_fp32(node.inputs[i], plan, fp32_inputs) for i in slots[0]):
                reason = "moves data of an FP32 producer: follows it (fewer Casts)"
        return (reason, none) if reason is not None else (None, slots)

    def _structural_reason(
        self, node: ir.Node, opset: int, blocked_ops: frozenset[str]
    ) -> tuple[str | None, tuple[list[int], list[int]]]:
        """Settings, subgraphs, types and schemas that keep ``node`` FP32; else its slots."""
        none: tuple[list[int], list[int]] = ([], [])
        if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return "has subgraphs (If/Loop/Scan): kept FP32", none
        if unselected(node.name or "", exclude=self.settings.block_nodes):
            return "in block_nodes", none
        if node.op_type in blocked_ops:
            return f"{node.op_type} is in the FP32 block list", none
        if any(v is not None and v.dtype is None for v in (*node.inputs, *node.outputs)):
            return "element type of an input or output unknown", none
        schema = _schema(node, opset)
        if schema is None:
            return f"no ONNX schema for {node.domain or 'ai.onnx'}.{node.op_type}", none
        slots = _convertible_slots(node, schema, self.low)
        if slots is None:
            return f"{node.op_type} has no {self.settings.dtype} type in its schema", none
        if node.op_type == "Cast":
            slots = ([], slots[1])  # a Cast takes any input type: never cast before it
        return None, slots

    def _numeric_reason(
        self,
        node: ir.Node,
        slots: tuple[list[int], list[int]],
        amax: dict[str, float],
        limit: float,
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

    # -- rewriting -------------------------------------------------------------------------

    def _convert_constants(self, graph: ir.Graph, plan: _Plan, names: UniqueNames) -> int:
        """Give low-precision consumers low-precision constants, one copy per constant."""
        clamped = 0
        for value in _constant_values(graph):
            uses = [(n, i) for n, i in value.uses() if plan.wants_low(n, i)]
            original = constant_array(value)  # None for an initializer that is also an input
            if not uses or value.dtype != ir.DataType.FLOAT or original is None:
                continue
            array, count = self._to_low(original)
            clamped += count
            tensor_name = value.name or "constant"
            exclusive = (
                len(uses) == len(value.uses())
                and value.is_initializer()
                and not value.is_graph_output()
            )
            if exclusive:
                value.const_value = ir.tensor(array, dtype=self.low, name=value.name)
                _retype(value, self.low)
                continue
            name = names.new(f"{tensor_name}/{self.settings.dtype}")
            copy = ir.Value(
                name=name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(self.low),
                const_value=ir.tensor(array, dtype=self.low, name=name),
            )
            graph.register_initializer(copy)
            for node, index in uses:
                node.replace_input_with(index, copy)
        return clamped

    def _to_low(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        """The array in the low type, and how many values had to be clamped into its range."""
        array = np.asarray(array, dtype=np.float32)
        if self.low != ir.DataType.FLOAT16:
            return array.astype(NUMPY_LOW[self.low]), 0
        magnitude = np.abs(array)
        tiny = (magnitude > 0) & (magnitude < FP16_TINY)
        huge = magnitude > FP16_MAX
        count = int(tiny.sum() + huge.sum())
        if count:
            array = np.where(tiny, np.copysign(FP16_TINY, array), array)
            array = np.clip(array, -FP16_MAX, FP16_MAX)
        return array.astype(np.float16), count

    def _retype_and_cast(self, graph: ir.Graph, plan: _Plan, names: UniqueNames) -> int:
        """Set the new types, then add one Cast per value and precision where needed."""
        for node, (_, outputs) in plan.low.items():
            for index in outputs:
                _retype(node.outputs[index], self.low)
            if node.op_type == "Cast":
                node.attributes["to"] = ir.AttrInt64("to", int(self.low))
        if not self.settings.keep_io_types:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT:
                    _retype(value, self.low)
        casts = _Casts(graph, names)
        for node in list(graph):
            if node in casts.created:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in (ir.DataType.FLOAT, self.low):
                    continue
                want = self.low if plan.wants_low(node, index) else ir.DataType.FLOAT
                if value.dtype != want and node.op_type != "Cast":
                    node.replace_input_with(index, casts.of(value, want))
        for position, value in enumerate(list(graph.outputs)):
            want = ir.DataType.FLOAT if self.settings.keep_io_types else value.dtype
            if value.dtype == self.low and want == ir.DataType.FLOAT:
                graph.outputs[position] = casts.graph_output(value)
        return len(casts.created)


class _Casts:
    """Cast nodes shared between the consumers of a value (one per value and target type)."""

    def __init__(self, graph: ir.Graph, names: UniqueNames) -> None:
        self.graph = graph
        self.names = names
        self.made: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.created: set[ir.Node] = set()

    def _cast(self, value: ir.Value, dtype: ir.DataType, output_name: str) -> ir.Node:
        producer = value.producer()
        base = producer.name if producer is not None and producer.name else value.name
        node = ir.node(
            "Cast",
            [value],
            {"to": int(dtype)},
            name=self.names.new(f"{base}/cast_{dtype.name.lower()}"),
        )
        output = node.outputs[0]
        output.name, output.dtype, output.shape = output_name, dtype, _copy(value.shape)
        mark_created(node, "fp16", producer)
        self.graph.append(node)
        self.created.add(node)
        self.made[(id(value), dtype)] = output
        return node

    def of(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        made = self.made.get((id(value), dtype))
        if made is not None:
            return made
        wanted = f"{value.name}/{dtype.name.lower()}"
        return self._cast(value, dtype, self.names.new(wanted)).outputs[0]

    def graph_output(self, value: ir.Value) -> ir.Value:
        """A Cast to FP32 that takes over the graph output's name; the low-precision value is
        renamed (and reused by FP32 consumers through the same Cast)."""
        name = value.name or "output"
        value.name = self.names.new(f"{name}/{value.dtype.name.lower()}")
        existing = self.made.get((id(value), ir.DataType.FLOAT))
        if existing is not None:
            existing.name = name
            return existing
        return self._cast(value, ir.DataType.FLOAT, name).outputs[0]


def _drop_islands(plan: _Plan, fp32_borders: bool) -> list[ir.Node]:
    """Return low-precision nodes to FP32 (except heavy compute ops) while that needs fewer
    Casts than keeping them low: an elementwise op between FP32 neighbours gains nothing."""
    dropped: list[ir.Node] = []
    changed = True
    while changed:
        changed = False
        for node in list(plan.low):
            if node.op_type in HEAVY_OPS:
                continue
            low_edges, fp32_edges = _border_edges(node, plan, fp32_borders)
            if fp32_edges > low_edges:
                del plan.low[node]
                dropped.append(node)
                changed = True
    return dropped


def _border_edges(node: ir.Node, plan: _Plan, fp32_borders: bool) -> tuple[int, int]:
    """How many of a low node's float neighbours (non-constant) are low and how many FP32."""
    low = fp32 = 0
    inputs, outputs = plan.low[node]
    for index in inputs:
        value = node.inputs[index]
        if value is None or constant_array(value) is not None:
            continue
        producer = value.producer()
        is_low = producer in plan.low if producer is not None else not fp32_borders
        low, fp32 = low + is_low, fp32 + (not is_low)
    for index in outputs:
        value = node.outputs[index]
        needs = {plan.wants_low(user, i) for user, i in value.uses()}
        if value.is_graph_output():
            needs.add(not fp32_borders)
        low, fp32 = low + (True in needs), fp32 + (False in needs)
    return low, fp32


def _retype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a new type object: clones (the teacher) share type objects, so setting
    ``value.dtype`` would change the teacher's value too."""
    value.type = ir.TensorType(dtype)


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else ir.Shape(shape)


def _touches_float(node: ir.Node) -> bool:
    values = (*node.inputs, *node.outputs)
    return any(v is not None and v.dtype == ir.DataType.FLOAT for v in values)


def _constant_values(graph: ir.Graph) -> Iterable[ir.Value]:
    yield from list(graph.initializers.values())
    for node in list(graph):
        if node.op_type == "Constant" and node.outputs[0].const_value is not None:
            yield node.outputs[0]


def _produced_fp32(value: ir.Value | None, plan: _Plan, fp32_inputs: bool) -> bool:
    """True when ``value`` comes from an FP32 node or graph input (constants convert freely)."""
    if value is None or constant_array(value) is not None:
        return False
    producer = value.producer()
    return fp32_inputs if producer is None else producer not in plan.low


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


def _remove_identity_casts(graph: ir.Graph) -> None:
    """Drop Casts whose input already has the target type (left by converting a model's Casts)."""
    for node in list(graph):
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        output = node.outputs[0]
        if node.inputs[0].dtype == output.dtype and not output.is_graph_output():
            output.replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
