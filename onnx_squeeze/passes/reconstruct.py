"""Distillation in closed form: refit the compressed model's layers to the original's outputs.

The original (prepared) model is the teacher, the compressed one the student; calibration data
needs no labels. Student and teacher tensors are matched by value name (passes keep the output
names of the nodes they change), and a student tensor whose channel axis was shrunk carries
``onnx_squeeze.kept_channels`` saying which teacher channels it kept.

Layers (Conv, Gemm, MatMul with a constant weight) that differ from the teacher or see inputs that
do are processed in topological order, in *waves*: the student is re-run before each wave, so a
layer is fitted to the inputs that the corrected layers before it produce. Per layer, by method:

- ``lstsq``: ridge regression of the teacher's output on the student's actual input (im2col
  patches for Conv, per group for grouped/depthwise Conv), from Gram matrices accumulated batch
  by batch. A factorized pair (a node made by a pass feeding a pointwise partner that keeps the
  original output) is refitted jointly as the best rank-r map (reduced-rank regression).
- ``bn``: per-channel output mean and variance matched to the teacher (scale the weights, shift
  the bias); on an unfused BatchNormalization, its scale and shift.
- ``bias``: per-channel output mean matched (bias correction); works on quantized layers too,
  re-quantizing an INT32 bias.
- ``head``: the final classifier/projection refitted to the teacher's logits by ridge regression
  (soft-target distillation in closed form), even when ``lstsq`` is off.

A layer takes the first method in the order lstsq (or head), bn, bias that is enabled and applies.
With ``guard`` (default), the refit is undone when it makes the model's outputs on the
calibration data further from the teacher's than before.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import zlib
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnx_squeeze.calibration import ChannelStatistics, feeds_in_memory, joined
from onnx_squeeze.calibration.grams import TensorRunner
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array, set_input_constant
from onnx_squeeze.least_squares import GramAccumulator, RidgeFolds, conv_pads, im2col
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.runtime import input_specs

KEPT_CHANNELS_KEY = "onnx_squeeze.kept_channels"
SOURCE_NODE_KEY = "onnx_squeeze.source_node"
METHODS = ("lstsq", "bn", "bias", "head")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
# A channel whose student output varies less than this (relative) is not rescaled by ``bn``.
_DEAD_VARIANCE = 1e-12
_BATCH = 8  # samples per onnxruntime run (feeds of one shape are joined up to it)
# A layer whose output already matches the teacher's this well (1 - R²) is left as it is.
_EXACT = 1e-10
_SPARSE = 0.25  # share of exact zeros from which a layer's weights count as pruned

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class ReconstructSettings:
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    ridge: float = 1e-5  # relative to the mean input variance; pulls towards the current weights
    cross_validate: bool = True  # pick the ridge among ridge × 1, 10², 10⁴, 10⁶ by 2-fold CV
    samples: int = 64  # calibration samples used
    positions: int = 256  # output positions (rows) sampled per sample and layer
    refresh_every: int = 1  # waves of layers fitted per student run (1: strictly sequential)
    factors: str = "both"  # factorized pairs: "both" (joint refit) or "last" (second only)
    include: list[str] = dataclasses.field(default_factory=list)  # node name patterns
    exclude: list[str] = dataclasses.field(default_factory=list)
    guard: bool = True  # undo everything when the outputs end up further from the teacher


# ---------------------------------------------------------------------------------------------
# Linear layers: weights as (groups, features, outputs) matrices, rows for the regression


class _Linear:
    """A Conv/Gemm/MatMul with a constant float weight, seen as ``groups`` regressions."""

    channel_axis = -1
    groups = 1

    def __init__(self, node: ir.Node, weight: np.ndarray) -> None:
        self.node = node
        self.weight = weight
        self.dtype = node.inputs[1].dtype

    def matrix(self) -> np.ndarray:
        """Weights as (groups, features, outputs)."""
        raise NotImplementedError

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rows(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Regression rows (groups, n, features) and targets (groups, n, outputs)."""
        raise NotImplementedError

    @property
    def outputs(self) -> int:
        return self.matrix().shape[0] * self.matrix().shape[2]

    @property
    def bias_slot(self) -> bool:
        """Whether the layer has, or can be given, a bias."""
        return True

    def bias_value(self) -> ir.Value | None:
        return self.node.inputs[2] if len(self.node.inputs) > 2 else None

    def bias_index(self) -> tuple[ir.Node, int]:
        return self.node, 2


class _Conv(_Linear):
    channel_axis = 1

    def __init__(self, node: ir.Node, weight: np.ndarray) -> None:
        super().__init__(node, weight)
        self.groups = int(attribute(node, "group", 1))
        rank = weight.ndim - 2
        self.kernel = weight.shape[2:]
        self.strides = list(attribute(node, "strides", [1] * rank))
        self.dilations = list(attribute(node, "dilations", [1] * rank))
        self.pads = attribute(node, "pads", None)
        self.auto_pad = attribute(node, "auto_pad", "NOTSET")

    def matrix(self) -> np.ndarray:
        out_channels = self.weight.shape[0]
        flat = self.weight.reshape(self.groups, out_channels // self.groups, -1)
        return flat.transpose(0, 2, 1)

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix.transpose(0, 2, 1).reshape(self.weight.shape)

    def rows(self, x, y, rng, positions):
        pads = conv_pads(
            x.shape[2:], self.kernel, self.strides, self.dilations, self.pads, self.auto_pad
        )
        total = math.prod(y.shape[2:])
        picked = np.sort(rng.choice(total, size=min(positions, total), replace=False))
        patches = im2col(x, self.kernel, self.strides, self.dilations, pads, picked)
        patches = patches.reshape(-1, self.groups, patches.shape[2] // self.groups)
        targets = y.reshape(y.shape[0], y.shape[1], -1)[:, :, picked].transpose(0, 2, 1)
        targets = targets.reshape(-1, self.groups, y.shape[1] // self.groups)
        return patches.transpose(1, 0, 2), targets.transpose(1, 0, 2)

    @property
    def pointwise(self) -> bool:
        return (
            self.groups == 1
            and all(k == 1 for k in self.kernel)
            and all(s == 1 for s in self.strides)
            and not any(self.pads or [])
            and self.auto_pad in ("NOTSET", "VALID")
        )


class _Gemm(_Linear):
    def matrix(self) -> np.ndarray:
        transposed = attribute(self.node, "transB", 0)
        return (self.weight.T if transposed else self.weight)[None]

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix[0].T if attribute(self.node, "transB", 0) else matrix[0]

    def rows(self, x, y, rng, positions):
        return _sample_rows(x, y, rng, positions * x.shape[0])


class _MatMul(_Linear):
    """MatMul by a constant 2-D weight; a following Add of a constant vector is its bias."""

    def __init__(self, node: ir.Node, weight: np.ndarray, bias_add: ir.Node | None) -> None:
        super().__init__(node, weight)
        self.bias_add = bias_add

    def matrix(self) -> np.ndarray:
        return self.weight[None]

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix[0]

    def rows(self, x, y, rng, positions):
        return _sample_rows(x, y, rng, positions * x.shape[0])

    @property
    def bias_slot(self) -> bool:
        return self.bias_add is not None

    def bias_value(self) -> ir.Value | None:
        return self.bias_add.inputs[self._bias_input()] if self.bias_add else None

    def bias_index(self) -> tuple[ir.Node, int]:
        assert self.bias_add is not None
        return self.bias_add, self._bias_input()

    def _bias_input(self) -> int:
        assert self.bias_add is not None
        return 0 if self.bias_add.inputs[1] is self.node.outputs[0] else 1


def _sparse(linear: _Linear) -> bool:
    return float(np.mean(linear.weight == 0)) >= _SPARSE


def _sample_rows(x, y, rng, limit):
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    if x.shape[0] > limit:
        picked = np.sort(rng.choice(x.shape[0], size=limit, replace=False))
        x, y = x[picked], y[picked]
    return x[None], y[None]


def _matmul_bias_add(node: ir.Node) -> ir.Node | None:
    """The Add that adds a constant vector to this MatMul's output (its only use), if any."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    bias = constant_array(other)
    columns = node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None
    if bias is None or bias.size != columns or bias.shape[-1:] != (columns,):
        return None
    return add


def _linear(node: ir.Node) -> tuple[_Linear | None, str | None]:
    """The layer view of ``node``, or None and why it cannot be refitted."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None, f"{node.op_type} is not a Conv, Gemm or MatMul"
    weight_value = node.inputs[1]
    weight = constant_array(weight_value)
    if weight is None:
        producer = weight_value.producer() if weight_value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            return None, "weight is quantized"
        return None, "weight is not a constant"
    if weight_value.dtype not in _FLOATS:
        return None, f"weight is {weight_value.dtype}, not float"
    if len(weight_value.uses()) > 1:
        return None, "weight is shared with another node"
    if node.op_type == "Conv":
        return _Conv(node, weight.astype(np.float64)), None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
            return None, "Gemm with transA or alpha != 1"
        if attribute(node, "beta", 1.0) != 1.0 and len(node.inputs) > 2:
            return None, "Gemm with beta != 1"
        return _Gemm(node, weight.astype(np.float64)), None
    if weight.ndim != 2:
        return None, "MatMul weight is not 2-D"
    return _MatMul(node, weight.astype(np.float64), _matmul_bias_add(node)), None


# ---------------------------------------------------------------------------------------------
# The plan: which layers, how, in which wave


@dataclasses.dataclass
class _Layer:
    name: str  # the node reported on
    method: str  # "lstsq", "lowrank", "bn", "bias", "batchnorm"
    output: ir.Value  # matched with the teacher tensor of the same name
    node: ir.Node  # the node reported on and (but for low-rank) rewritten
    linear: _Linear | None = None  # the layer (lowrank: the second factor)
    first: _Linear | None = None  # lowrank: the first factor, whose input is the regression's
    wave: int = 0

    @property
    def input(self) -> ir.Value:
        fitted = self.first or self.linear
        return fitted.node.inputs[0] if fitted else self.node.inputs[0]


def _differs(student: ir.Value | None, teacher: ir.Value | None) -> bool:
    """Whether two constant inputs hold different data (non-constants are compared elsewhere)."""
    if (student is None) != (teacher is None):
        return True
    if student is None or student.const_value is None:
        return False
    if teacher is None or teacher.const_value is None:
        return True
    if student.const_value is teacher.const_value:
        return False
    a, b = student.const_value.numpy(), teacher.const_value.numpy()
    return a.shape != b.shape or not np.array_equal(a, b)


def _changed_nodes(student: ir.Graph, teacher: ir.Graph) -> set[ir.Node]:
    """Student nodes that compute something else than the teacher's tensor of the same name."""
    producers = {out.name: node for node in teacher for out in node.outputs if out.name}
    changed: set[ir.Node] = set()
    dirty: set[str] = set()
    for node in student:
        twin = producers.get(node.outputs[0].name) if node.outputs else None
        differs = (
            twin is None
            or twin.op_type != node.op_type
            or len(twin.inputs) != len(node.inputs)
            or any(v is not None and v.name in dirty for v in node.inputs)
            or any(_differs(a, b) for a, b in zip(node.inputs, twin.inputs, strict=False))
        )
        if differs:
            changed.add(node)
            dirty.update(out.name for out in node.outputs if out.name)
    return changed


def _downstream_layers(graph: ir.Graph) -> set[ir.Node]:
    """Nodes with a Conv/Gemm/MatMul somewhere after them (so not the model's head)."""
    result: set[ir.Node] = set()
    for node in reversed(list(graph)):
        for out in node.outputs:
            for use in out.uses():
                consumer = use.node
                if consumer in result or (
                    consumer.op_type in ("Conv", "Gemm", "MatMul")
                    and constant_array(consumer.inputs[1]) is not None
                ):
                    result.add(node)
    return result


def _first_factor(layer: _Linear, teacher_names: set[str]) -> _Linear | None:
    """The first node of a factorized pair that ``layer`` ends, when they can be fitted jointly."""
    value = layer.node.inputs[0]
    producer = value.producer() if value is not None else None
    source = layer.node.metadata_props.get(SOURCE_NODE_KEY)
    if (
        producer is None
        or source is None
        or producer.metadata_props.get(SOURCE_NODE_KEY) != source
        or value.name in teacher_names
        or len(value.uses()) != 1
        or not (isinstance(layer, _Gemm | _MatMul) or getattr(layer, "pointwise", False))
    ):
        return None
    first, _ = _linear(producer)
    if first is None or first.groups != 1 or type(first) is not type(layer):
        return None
    return first


class _Planner:
    def __init__(self, settings: ReconstructSettings, teacher: ir.Model, report: PassReport):
        self.settings = settings
        self.report = report
        self.sparse_layers = 0
        graph = teacher.graph
        self.teacher_names = {v.name for v in graph.inputs} | {
            out.name for node in graph for out in node.outputs if out.name
        }

    def wanted(self, name: str) -> bool:
        settings = self.settings
        if settings.include and not any(fnmatch.fnmatch(name, p) for p in settings.include):
            return False
        return not any(fnmatch.fnmatch(name, p) for p in settings.exclude)

    def plan(self, student: ir.Model, teacher: ir.Model) -> list[_Layer]:
        changed = _changed_nodes(student.graph, teacher.graph)
        not_head = _downstream_layers(student.graph)
        layers = []
        for node in student.graph:
            if node not in changed or not node.name or not self.wanted(node.name):
                continue
            layer = self.layer(node, head=node not in not_head)
            if layer is not None:
                layers.append(layer)
        self.assign_waves(student.graph, layers)
        if self.sparse_layers:
            self.report.notes.append(
                f"{self.sparse_layers} sparse layer(s) (≥ {_SPARSE:.0%} zero weights) not refitted "
                "densely: only per-channel scale/bias corrected, so their zeros stay"
            )
        return layers

    def layer(self, node: ir.Node, *, head: bool) -> _Layer | None:
        methods = set(self.settings.methods)
        if node.op_type == "BatchNormalization":
            if "bn" in methods and node.outputs[0].name in self.teacher_names:
                return _Layer(node.name, "batchnorm", node.outputs[0], node)
            return None
        linear, reason = _linear(node)
        if linear is None and node.op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        output = node.outputs[0]
        if isinstance(linear, _MatMul) and linear.bias_add is not None:
            output = linear.bias_add.outputs[0]
        if output.name not in self.teacher_names:
            return None  # a first factor: refitted with its partner, or not at all
        if linear is not None and _sparse(linear):
            # A dense refit would fill the zeros that weight pruning made; the per-channel
            # methods (bn scales rows, bias shifts) keep the pattern.
            methods -= {"lstsq", "head"}
            self.sparse_layers += 1
        if linear is not None and ("lstsq" in methods or (head and "head" in methods)):
            first = None
            if self.settings.factors == "both":
                first = _first_factor(linear, self.teacher_names)
            method = "lowrank" if first is not None else "lstsq"
            return _Layer(node.name, method, output, node, linear, first)
        if linear is not None and "bn" in methods:
            return _Layer(node.name, "bn", output, node, linear)
        if "bias" in methods and _bias_array(node, linear) is not None:
            return _Layer(node.name, "bias", output, node, linear)
        if "lstsq" in methods or "bn" in methods:
            self.report.skip(node, f"cannot refit: {reason or 'no enabled method applies'}")
        return None

    def assign_waves(self, graph: ir.Graph, layers: list[_Layer]) -> None:
        """Wave of a layer: how many planned layers lie on the longest path before it."""
        anchors = {(layer.first or layer.linear or layer).node: layer for layer in layers}
        level: dict[str, int] = {}
        for node in graph:
            depth = max((level.get(v.name, 0) for v in node.inputs if v is not None), default=0)
            if node in anchors:
                anchors[node].wave = depth
                depth += 1
            for out in node.outputs:
                level[out.name] = depth


# ---------------------------------------------------------------------------------------------
# Writing constants back, with undo


class _Edits:
    """Constant replacements made so far, so that they can be undone as a whole."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.names = UniqueNames(model)
        self.undo_log: list[tuple[ir.Node, int, ir.Value | None, Any, Any, Any]] = []

    def set(self, node: ir.Node, index: int, array: np.ndarray, dtype: ir.DataType, role: str):
        old = node.inputs[index] if index < len(node.inputs) else None
        state = (old.const_value, old.shape, old.dtype) if old is not None else (None,) * 3
        self.undo_log.append((node, index, old, *state))
        array = array.astype(dtype.numpy())
        set_input_constant(node, index, array, dtype, f"{node.name}.{role}", self.graph, self.names)

    def undo(self) -> None:
        for node, index, old, const, shape, dtype in reversed(self.undo_log):
            current = node.inputs[index]
            if old is not None and current is old:
                old.const_value, old.shape, old.dtype = const, shape, dtype
            else:
                node.replace_input_with(index, old)
        self.undo_log.clear()


def _bias_array(node: ir.Node, linear: _Linear | None) -> np.ndarray | None:
    """The float bias of a layer (quantized INT32 biases dequantized), None when it has none."""
    value = linear.bias_value() if linear else (node.inputs[2] if len(node.inputs) > 2 else None)
    if value is None:
        return None
    array = constant_array(value)
    if array is not None:
        return array.astype(np.float64).reshape(-1) if value.dtype in _FLOATS else None
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    integers, scale = constant_array(producer.inputs[0]), constant_array(producer.inputs[1])
    if integers is None or scale is None or integers.dtype != np.int32:
        return None
    return integers.astype(np.float64) * scale.astype(np.float64)


def _write_bias(
    edits: _Edits, node: ir.Node, linear: _Linear | None, bias: np.ndarray, dtype: ir.DataType
) -> None:
    """Store a new bias where the layer keeps it (a float constant or an INT32 DequantizeLinear)."""
    target, index = linear.bias_index() if linear else (node, 2)
    value = target.inputs[index] if index < len(target.inputs) else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        scale = constant_array(producer.inputs[1]).astype(np.float64)
        integers = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        edits.set(producer, 0, integers, ir.DataType.INT32, "bias_quantized")
        return
    if value is not None and value.const_value is not None:
        bias = bias.reshape(value.const_value.shape)
        dtype = value.dtype
    edits.set(target, index, bias, dtype, "bias")


def _current(linear: _Linear, node: ir.Node) -> np.ndarray:
    """The layer's weights with its bias as last feature row (when it can have one)."""
    matrix = linear.matrix()
    if not linear.bias_slot:
        return matrix
    bias = _bias_array(node, linear)
    bias = np.zeros(matrix.shape[0] * matrix.shape[2]) if bias is None else bias
    return np.concatenate([matrix, bias.reshape(matrix.shape[0], 1, -1)], axis=1)


# ---------------------------------------------------------------------------------------------
# Running student and teacher


def _teacher_target(array: np.ndarray, value: ir.Value) -> np.ndarray:
    """The teacher's tensor restricted to the channels the student kept."""
    kept = value.metadata_props.get(KEPT_CHANNELS_KEY)
    if kept is None:
        return array
    entry = json.loads(kept)
    return np.take(array, entry["kept"], axis=entry["axis"])


def _output_error(
    student: ir.Model, teacher_outputs: list[dict[str, np.ndarray]], feeds: list[Feed]
) -> float:
    """Worst relative squared error over the graph outputs: Σ|s - t|² / Σ|t - mean t|²."""
    names = list(teacher_outputs[0])
    runner = TensorRunner(student, names)
    errors = dict.fromkeys(names, 0.0)
    spreads = dict.fromkeys(names, 0.0)
    for feed, reference in zip(feeds, teacher_outputs, strict=True):
        result = runner(feed)
        for name in names:
            t = reference[name].astype(np.float64)
            errors[name] += float(np.square(result[name] - t).sum())
            spreads[name] += float(np.square(t - t.mean()).sum())
    return max(errors[name] / max(spreads[name], 1e-30) for name in names)


# ---------------------------------------------------------------------------------------------
# The pass


@register
class Reconstruct(Pass):
    """Refit compressed layers to the teacher's outputs on calibration data (closed form)."""

    name = "reconstruct"
    Settings = ReconstructSettings

    def validate(self) -> None:
        s = self.settings
        unknown = sorted(set(s.methods) - set(METHODS))
        if unknown or not s.methods:
            raise SettingsError(
                f"reconstruct: unknown methods {unknown}; use some of {', '.join(METHODS)}"
            )
        if not s.ridge >= 0:
            raise SettingsError(f"reconstruct: ridge must be >= 0, got {s.ridge}")
        for field in ("samples", "positions", "refresh_every"):
            if getattr(s, field) < 1:
                raise SettingsError(f"reconstruct: {field} must be at least 1")
        if s.factors not in ("both", "last"):
            raise SettingsError(f"reconstruct: factors must be 'both' or 'last', got {s.factors!r}")

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        teacher = context.teacher
        if teacher is None:
            raise SettingsError(
                "reconstruct needs the original model as teacher: run it through compress() "
                "(onnx-squeeze compress), which provides it"
            )
        TopologicalSortPass()(model)
        layers = _Planner(self.settings, teacher, report).plan(model, teacher)
        if not layers:
            report.notes.append("nothing to recover: no layer differs from the teacher")
            return
        feeds = feeds_in_memory(
            context.data.source if context.data.supplied else None,
            input_specs(teacher),
            self.settings.samples,
            seed=context.seed,
            batch_size=_BATCH,
            purpose="recovery",
            notes=report.notes,
            shapes=lambda: context.input_shapes(teacher),
        )
        feeds = joined(feeds, _BATCH, teacher)
        graph_outputs = [v.name for v in model.graph.outputs]
        reference = [TensorRunner(teacher, graph_outputs)(feed) for feed in feeds]
        before = _output_error(model, reference, feeds)
        edits = _Edits(model)
        every = self.settings.refresh_every
        for wave in sorted({layer.wave // every for layer in layers}):
            members = [layer for layer in layers if layer.wave // every == wave]
            _Wave(members, self.settings, context.seed).fit(model, teacher, feeds, edits, report)
        after = _output_error(model, reference, feeds)
        summary = f"output error vs teacher (1 - R², calibration data): {before:.4g} -> {after:.4g}"
        if self.settings.guard and after > before:
            edits.undo()
            report.notes.append(f"{summary}: worse, so every refit was undone")
            for record in report.records:
                if record.action == "refit":
                    record.action, record.detail = "skipped", f"undone by guard; {record.detail}"
            return
        report.notes.append(summary)


class _Wave:
    """Layers fitted from one run of student and teacher over the calibration feeds."""

    def __init__(self, layers: list[_Layer], settings: ReconstructSettings, seed: int) -> None:
        self.layers = layers
        self.settings = settings
        self.rngs = [
            np.random.default_rng([seed, zlib.crc32(layer.name.encode())]) for layer in layers
        ]

    def student_names(self) -> list[str]:
        names = []
        for layer in self.layers:
            names.append(layer.input.name)
            if layer.method in ("bn", "bias"):
                names.append(layer.output.name)
        return names

    def fit(
        self,
        model: ir.Model,
        teacher: ir.Model,
        feeds: list[Feed],
        edits: _Edits,
        report: PassReport,
    ) -> None:
        student_run = TensorRunner(model, self.student_names())
        teacher_run = TensorRunner(teacher, [layer.output.name for layer in self.layers])
        sums: list[Any] = [None] * len(self.layers)
        for feed in feeds:
            student, reference = student_run(feed), teacher_run(feed)
            for index, layer in enumerate(self.layers):
                target = _teacher_target(reference[layer.output.name], layer.output)
                sums[index] = self.accumulate(index, layer, student, target, sums[index])
        for layer, accumulated in zip(self.layers, sums, strict=True):
            problem = self.mismatch(layer, accumulated)
            if problem:
                report.skip(layer.node, problem)
                continue
            getattr(self, f"apply_{layer.method}")(layer, accumulated, edits, report)

    def accumulate(self, index, layer, student, target, sums):
        """Add one batch to the layer's sums (None until a batch matched the layer's shape)."""
        axis = 1 if layer.node.op_type in ("Conv", "BatchNormalization") else -1
        if layer.method in ("lstsq", "lowrank"):
            if target.shape[axis] != layer.linear.outputs:
                return sums
            fitted = layer.first or layer.linear
            x, y = fitted.rows(
                student[layer.input.name], target, self.rngs[index], self.settings.positions
            )
            if sums is None:
                intercept = layer.linear.bias_slot
                sums = RidgeFolds(x.shape[0], x.shape[2], y.shape[2], intercept=intercept)
            sums.update(x, y)
            return sums
        observed = student[layer.input.name if layer.method == "batchnorm" else layer.output.name]
        if target.shape[axis] != observed.shape[axis]:
            return sums
        if sums is None:
            sums = (ChannelStatistics(axis), ChannelStatistics(axis))
        sums[0].update(observed)
        sums[1].update(target)
        return sums

    def mismatch(self, layer: _Layer, sums: Any) -> str | None:
        """Why the teacher's tensor could not serve as target, or None."""
        if sums is None or (isinstance(sums, RidgeFolds) and sums.folds[0].rows == 0):
            return (
                f"the teacher's {layer.output.name!r} does not match the student's channels "
                f"(no {KEPT_CHANNELS_KEY} metadata?)"
            )
        return None

    def ridges(self) -> list[float]:
        ridge = self.settings.ridge
        if not self.settings.cross_validate:
            return [ridge]
        start = ridge if ridge > 0 else 1e-6
        return ([0.0] if ridge == 0 else []) + [start * 10**k for k in range(0, 7, 2)]

    def apply_lstsq(self, layer, folds, edits, report):
        linear = layer.linear
        prior = _current(linear, layer.node)
        ridge = folds.choose_ridge(self.ridges(), prior)
        sums = folds.total()
        solution = sums.solve(ridge, prior)
        before, after = sums.relative_error(prior), sums.relative_error(solution)
        if before < _EXACT or not after < before:
            report.record(layer.node, "kept", f"refit would not help ({before:.3g})")
            return
        dtype = layer.node.inputs[1].dtype
        features = linear.matrix().shape[1]
        edits.set(layer.node, 1, linear.to_weight(solution[:, :features]), dtype, "weight_refit")
        if linear.bias_slot:
            _write_bias(edits, layer.node, linear, solution[:, features].reshape(-1), dtype)
        report.record(layer.node, "refit", self.detail("lstsq", before, after, sums, ridge))

    def apply_lowrank(self, layer, folds, edits, report):
        first, second = layer.first, layer.linear
        rank = first.matrix().shape[2]
        current = first.matrix()[0] @ second.matrix()[0]
        if rank >= min(current.shape):
            self.apply_lstsq(dataclasses.replace(layer, first=None), folds, edits, report)
            return
        prior = current
        if second.bias_slot:
            old_bias = _bias_array(second.node, second)
            bias = np.zeros(current.shape[1]) if old_bias is None else old_bias
            prior = np.concatenate([current, bias[None]])
        prior = prior[None]
        ridge = folds.choose_ridge(self.ridges(), prior)
        sums = folds.total()
        a, b, new_bias = sums.reduced_rank(ridge, prior, rank)
        solution = a @ b
        if second.bias_slot:
            solution = np.concatenate([solution, new_bias[None]])
        solution = solution[None]
        before, after = sums.relative_error(prior), sums.relative_error(solution)
        if not after < before:
            report.record(layer.node, "kept", f"joint refit would not help ({before:.3g})")
            return
        dtype = second.node.inputs[1].dtype
        edits.set(first.node, 1, first.to_weight(a[None]), dtype, "weight_refit")
        if _bias_array(first.node, first) is not None:
            _write_bias(edits, first.node, first, np.zeros(rank), dtype)
        edits.set(second.node, 1, second.to_weight(b[None]), dtype, "weight_refit")
        if second.bias_slot:
            _write_bias(edits, second.node, second, new_bias, dtype)
        detail = self.detail("joint low-rank", before, after, sums, ridge)
        report.record(layer.node, "refit", detail)

    def detail(
        self, method: str, before: float, after: float, sums: GramAccumulator, ridge: float
    ) -> str:
        unknowns = sums.xtx.shape[1]
        text = (
            f"{method}: error {before:.4g} -> {after:.4g} (1 - R², calibration), "
            f"{sums.rows} rows, ridge {ridge:.3g}"
        )
        if sums.rows < unknowns:
            text += f"; fewer rows than the {unknowns} unknowns: regularised"
        return text

    def apply_bias(self, layer, sums, edits, report):
        student, teacher = sums
        shift = teacher.mean - student.mean
        bias = _bias_array(layer.node, layer.linear)
        bias = np.zeros_like(shift) if bias is None else bias
        dtype = layer.output.dtype or ir.DataType.FLOAT
        _write_bias(edits, layer.node, layer.linear, bias + shift, dtype)
        report.record(
            layer.node, "refit", f"bias: mean shift max |Δ| {np.abs(shift).max():.4g} corrected"
        )

    def apply_bn(self, layer, sums, edits, report):
        student, teacher = sums
        linear = layer.linear
        dtype = layer.node.inputs[1].dtype
        if linear.bias_slot:
            scale = _variance_ratio(student.var, teacher.var)
            bias = _bias_array(layer.node, linear)
            bias = np.zeros_like(scale) if bias is None else bias
            _write_bias(
                edits, layer.node, linear, scale * (bias - student.mean) + teacher.mean, dtype
            )
            matched = "mean and variance"
        else:  # no bias to shift (a MatMul without Add): match the mean square instead
            squares = (student.var + student.mean**2, teacher.var + teacher.mean**2)
            scale = _variance_ratio(*squares)
            matched = "mean square (no bias)"
        matrix = linear.matrix()
        scaled = matrix * scale.reshape(matrix.shape[0], 1, -1)
        edits.set(layer.node, 1, linear.to_weight(scaled), dtype, "weight_refit")
        report.record(
            layer.node,
            "refit",
            f"bn: per-channel {matched} matched (scale {scale.min():.3g}..{scale.max():.3g})",
        )

    def apply_batchnorm(self, layer, sums, edits, report):
        """BatchNormalization: new scale and shift so its output statistics match the teacher's."""
        student_in, teacher_out = sums
        node = layer.node
        gamma, _, mean, var = (constant_array(node.inputs[i]) for i in (1, 2, 3, 4))
        if any(a is None for a in (gamma, mean, var)):
            report.skip(node, "BatchNormalization parameters are not constants")
            return
        epsilon = float(attribute(node, "epsilon", 1e-5))
        ratio = _variance_ratio(student_in.var, teacher_out.var) * np.where(gamma < 0, -1, 1)
        new_gamma = ratio * np.sqrt(var.astype(np.float64) + epsilon)
        new_beta = teacher_out.mean - ratio * (student_in.mean - mean)
        dtype = node.inputs[1].dtype
        edits.set(node, 1, new_gamma, dtype, "scale_recalibrated")
        edits.set(node, 2, new_beta, dtype, "bias_recalibrated")
        report.record(
            node, "refit", "bn: scale and shift matched to the teacher's output statistics"
        )


def _variance_ratio(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per-channel std ratio teacher/student; 1 where the student's output does not vary."""
    floor = _DEAD_VARIANCE * max(float(teacher.max(initial=0.0)), 1e-30)
    alive = student > floor
    return np.where(alive, np.sqrt(teacher / np.where(alive, student, 1.0)), 1.0)
