"""How each kind of op passes channels on: one rule per op type, registered with
:func:`handles`. A rule sets the layouts of the node's outputs, registers the slots and
structures that follow the kept channels, and returns the input indices it accounted for (the
walk freezes the rest). The rules of the layers with weights are in :mod:`.layer_rules`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import attribute, constant_array
from onnx_squeeze.passes.prune_channels.groups import Layout, Structure

if TYPE_CHECKING:
    from onnx_squeeze.passes.prune_channels.trace import Tracer

# Ops that keep every channel apart and the layout unchanged (extra inputs must be constants).
_ELEMENTWISE_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Erf",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Mish",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "Identity",
        "Dropout",
        "Cast",
        "ThresholdedRelu",
        "Shrink",
    }
)
# Ops that work on the spatial axes of NCHW tensors: the channel axis must be axis 1.
_POOLING = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
_ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"})
# Reductions that keep channels apart when they reduce other axes (zero channels stay zero).
_REDUCE = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare"}
)
# Binary ops whose constant operand is zeroed in "zero" mode (an additive offset per channel).
_ADDITIVE = frozenset({"Add", "Sub", "Sum"})


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def node_label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """The size of axis ``axis`` (negative) of ``value`` when it is known; other axes (a dynamic
    batch) may be symbolic."""
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def rank_of(value: ir.Value | None, layout: Layout | None = None) -> int | None:
    if layout is not None and layout.rank is not None:
        return layout.rank
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def is_exclusive(value: ir.Value) -> bool:
    """Whether a weight is used by exactly one node input (shared weights are never pruned)."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def constant_ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(x) for x in np.asarray(array).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Handlers: one per kind of op. Each sets the layouts of the node's outputs, registers slots and
# structures, and returns the input indices it accounted for (the walk freezes the rest).

Handler = Callable[["Tracer", ir.Node, list[Layout | None]], set[int]]
HANDLERS: dict[str, Handler] = {}


def handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(function: Handler) -> Handler:
        for op_type in op_types:
            HANDLERS[op_type] = function
        return function

    return register


def coupled_pieces(tracer: Tracer, node: ir.Node, layout: Layout, count: int) -> Layout | None:
    """Couple ``count`` equal consecutive pieces of ``layout`` channel by channel (the groups of
    a grouped convolution, the heads of attention); the first piece's layout, None while atoms
    must first be cut at the piece bounds (another round follows) or when they cannot be."""
    size = tracer.length(layout) // count
    pieces = [tracer.sub_layout(layout, k * size, (k + 1) * size, node) for k in range(count)]
    if any(piece is None for piece in pieces):
        return None
    return tracer.unify(pieces, node)  # type: ignore[arg-type]


def _freeze_extra_outputs(tracer: Tracer, node: ir.Node, layout: Layout | None) -> bool:
    """Freeze when an output other than the first is used (MaxPool indices, Dropout mask)."""
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        tracer.freeze_layout(layout, f"{node_label(node)} has a second output in use")
        return True
    return False


def channel_axis_is_one(tracer: Tracer, node: ir.Node, layout: Layout) -> bool:
    if layout.repeat == 1 and layout.rank is not None and layout.positive_axis() == 1:
        return True
    tracer.freeze_layout(layout, f"{node_label(node)} needs the channels on axis 1")
    return False


@handles(*_ELEMENTWISE_UNARY)
def _unary(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is not None and not _freeze_extra_outputs(tracer, node, layout):
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@handles(*_POOLING)
def _pooling(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None or not channel_axis_is_one(tracer, node, layout):
        return {0}
    if not _freeze_extra_outputs(tracer, node, layout):
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@handles("Resize", "Upsample")
def _resize(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None or not channel_axis_is_one(tracer, node, layout):
        return {0}
    scales_index = 1 if node.op_type == "Upsample" or len(node.inputs) == 2 else 2
    scales = constant_array(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
    has_sizes = len(node.inputs) > 3 and node.inputs[3] is not None
    if has_sizes or scales is None or scales.size <= 1 or float(scales.reshape(-1)[1]) != 1.0:
        tracer.freeze_layout(
            layout, f"{node_label(node)} does not keep channels by constant scales"
        )
        return {0}
    tracer.set_layout(node.outputs[0], layout)
    return {0}


@handles("Pad")
def _pad(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    rank, axis = layout.rank, layout.positive_axis()
    pads = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "pads", None)
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    if rank is None or axis is None or pads is None or has_axes or len(pads) != 2 * rank:
        tracer.freeze_layout(layout, f"{node_label(node)}: its pads cannot be read per axis")
    elif pads[axis] or pads[axis + rank]:
        tracer.freeze_layout(layout, f"{node_label(node)} pads the channel axis")
    else:
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@handles(*_ELEMENTWISE_BINARY)
def _binary(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    traced = [s for s in states if s is not None]
    every = set(range(len(states)))
    if not traced:
        return every
    layout = tracer.unify(traced, node)
    if layout is None:
        return every
    total = tracer.length(layout)
    for index, (value, state) in enumerate(zip(node.inputs, states, strict=True)):
        if state is not None or value is None:
            continue
        array = constant_array(value)
        if array is None:
            tracer.freeze_layout(
                layout, f"{node_label(node)} combines it with {value.name!r}, which is not traced"
            )
            return every
        dim = array.shape[array.ndim + layout.axis] if array.ndim >= -layout.axis else 1
        if dim == 1:
            continue
        if dim != total or layout.repeat != 1:
            reason = f"{node_label(node)}: constant {value.name!r} is not one value per channel"
            tracer.freeze_layout(layout, reason)
            return every
        zero = node.op_type in _ADDITIVE
        tracer.add_slot(node, index, layout, array.ndim + layout.axis, "param", zero=zero)
    tracer.set_layout(node.outputs[0], layout)
    return every


def _norm_params(
    tracer: Tracer, node: ir.Node, layout: Layout, indices: Sequence[int], zeroed: set[int]
) -> bool:
    """Register per-channel parameters of a normalization; False (frozen) when not constant."""
    total = tracer.length(layout)
    for index in indices:
        array = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if array is None or array.ndim != 1 or array.size != total:
            tracer.freeze_layout(layout, f"{node_label(node)}: parameter {index} is not constant")
            return False
    for index in indices:
        tracer.add_slot(node, index, layout, 0, "param", zero=index in zeroed)
    return True


@handles("BatchNormalization", "InstanceNormalization")
def _normalization(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    every = set(range(len(states)))
    if layout is None or not channel_axis_is_one(tracer, node, layout):
        return every
    if _freeze_extra_outputs(tracer, node, layout):
        return every
    params = (1, 2, 3, 4) if node.op_type == "BatchNormalization" else (1, 2)
    if _norm_params(tracer, node, layout, params, zeroed={1, 2}):
        tracer.set_layout(node.outputs[0], layout)
    return every


@handles("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax")
def _axis_op(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Ops that mix values along one axis (LayerNorm: that axis and all after it)."""
    layout = states[0]
    every = set(range(len(states)))
    if layout is None:
        return every
    rank = rank_of(node.inputs[0], layout)
    axis = int(attribute(node, "axis", -1))
    if rank is None and axis >= 0:
        tracer.freeze_layout(layout, f"{node_label(node)}: rank unknown")
        return every
    axis = axis - rank if axis >= 0 and rank is not None else axis
    mixes = layout.axis >= axis if node.op_type == "LayerNormalization" else layout.axis == axis
    if mixes:
        tracer.freeze_layout(layout, f"{node_label(node)} mixes values across the channel axis")
    else:
        tracer.set_layout(node.outputs[0], layout)
    return every


@handles("Concat")
def _concat(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    every = set(range(len(states)))
    traced = [s for s in states if s is not None]
    if not traced:
        return every
    rank = rank_of(node.inputs[0], traced[0])
    axis = int(attribute(node, "axis", 0))
    if rank is None and axis >= 0:
        tracer.freeze([a for s in traced for a in s.atoms], f"{node_label(node)}: rank unknown")
        return every
    axis = axis - rank if axis >= 0 and rank is not None else axis
    if axis != traced[0].axis:
        if len(traced) != len(states):
            reason = f"{node_label(node)} joins traced and untraced tensors along another axis"
            tracer.freeze([a for s in traced for a in s.atoms], reason)
            return every
        tracer.set_layout(node.outputs[0], tracer.unify(traced, node))
        return every
    atoms: list[int] = []
    for value, state in zip(node.inputs, states, strict=True):
        if state is not None and state.axis == axis and state.repeat == 1:
            atoms.extend(state.atoms)
            continue
        width = static_dim(value, axis)
        if state is not None or width is None:
            name = value.name if value is not None else None
            reason = f"{node_label(node)}: the channels of input {name!r} cannot be mapped"
            tracer.freeze([a for s in traced for a in s.atoms], reason)
            return every
        atoms.extend(tracer.new_atoms(None, width, "joined with channels of unknown origin"))
    tracer.set_layout(node.outputs[0], Layout(tuple(atoms), axis, rank))
    return every


def _split_sizes(node: ir.Node, total: int) -> list[int] | None:
    sizes = constant_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if sizes is None:
        sizes = attribute(node, "split", None)
    if sizes is None:
        count = int(attribute(node, "num_outputs", len(node.outputs)))
        if count <= 0 or total % count:
            return None
        sizes = [total // count] * count
    return [int(s) for s in sizes] if sum(sizes) == total else None


@handles("Split")
def _split(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    rank = layout.rank
    axis = int(attribute(node, "axis", 0))
    axis = axis - rank if axis >= 0 and rank is not None else axis
    if axis != layout.axis:
        for output in node.outputs:
            tracer.set_layout(output, layout)
        return {0}
    total = tracer.length(layout)
    sizes = _split_sizes(node, total)
    if sizes is None or layout.repeat != 1 or len(sizes) != len(node.outputs):
        tracer.freeze_layout(layout, f"{node_label(node)}: its split sizes cannot be read")
        return {0}
    pieces = []
    for begin, end in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
        pieces.append(tracer.sub_layout(layout, int(begin), int(end), node))
    if any(piece is None for piece in pieces):
        return {0}
    for output, piece in zip(node.outputs, pieces, strict=True):
        tracer.set_layout(output, piece)
    tracer.structures.append(Structure(node, "split", tuple(pieces)))  # type: ignore[arg-type]
    return {0}


@handles("Slice")
def _slice(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    starts, ends = (constant_ints(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
    axes = constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = constant_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    rank = layout.rank
    if starts is None or ends is None or rank is None:
        tracer.freeze_layout(layout, f"{node_label(node)}: its bounds are not constant")
        return {0}
    axes = [a + rank if a < 0 else a for a in (axes or range(len(starts)))]
    axis = layout.positive_axis()
    if axis not in axes:
        tracer.set_layout(node.outputs[0], layout)
        return {0}
    entry = axes.index(axis)
    total = tracer.length(layout)
    if (steps and steps[entry] != 1) or layout.repeat != 1:
        tracer.freeze_layout(layout, f"{node_label(node)} steps through the channels")
        return {0}
    begin, end = (
        min(max(v + total if v < 0 else v, 0), total) for v in (starts[entry], ends[entry])
    )
    piece = tracer.sub_layout(layout, begin, max(begin, end), node)
    if piece is not None:
        tracer.set_layout(node.outputs[0], piece)
        tracer.structures.append(Structure(node, "slice", (layout, piece), entry, begin))
    return {0}


def _flatten_like(tracer: Tracer, node: ir.Node, layout: Layout, start: int) -> Layout | None:
    """Channels on axis ``start`` followed by the dims flattened into the same output axis."""
    inner = _inner_size(tracer, node, layout, start)
    if inner is None:
        tracer.freeze_layout(layout, f"{node_label(node)} merges the channel axis with other axes")
        return None
    out = Layout(layout.atoms, -1, 2, layout.repeat * inner)
    tracer.set_layout(node.outputs[0], out)
    return out


def _inner_size(tracer: Tracer, node: ir.Node, layout: Layout, start: int) -> int | None:
    """How many entries of the input follow each channel when the channels are on axis
    ``start`` and the dims after it are static; None otherwise."""
    shape = tracer.shapes.of(node.inputs[0])
    inner_dims = list(shape)[start + 1 :] if shape is not None else None
    if layout.positive_axis() != start or inner_dims is None:
        return None
    return math.prod(inner_dims) if all(isinstance(d, int) for d in inner_dims) else None


def _flattens_to_width(tracer: Tracer, node: ir.Node, layout: Layout, target: list[int]) -> bool:
    """A Reshape of [N, C, *static] into [-1 or 0, C * prod(static)]: torch.flatten(x, 1) as the
    dynamo exporter writes it, with the width spelled out (rewritten when channels go)."""
    if len(target) != 2 or target[0] not in (-1, 0) or _literal_zeros(node, target):
        return False
    inner = _inner_size(tracer, node, layout, 1)
    return inner is not None and target[1] == tracer.length(layout) * layout.repeat * inner


@handles("Flatten")
def _flatten(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is not None:
        rank = rank_of(node.inputs[0], layout)
        axis = int(attribute(node, "axis", 1))
        _flatten_like(tracer, node, layout, axis + rank if axis < 0 and rank else axis)
    return {0}


@handles("Reshape")
def _reshape(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    target = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    shape = tracer.shapes.of(node.inputs[0])
    if _keeps_batch_flattens_rest(node, target):
        _flatten_like(tracer, node, layout, 1)
    elif target is not None and _flattens_to_width(tracer, node, layout, target):
        out = _flatten_like(tracer, node, layout, 1)
        if out is not None:
            tracer.structures.append(Structure(node, "reshape", (out,), 1))
    elif tracer.split_heads and _splits_heads(node, layout, target, shape):
        _split_into_heads(tracer, node, layout, target)  # type: ignore[arg-type]
    elif tracer.split_heads and _merges_heads(tracer, node, layout, target, shape):
        _merge_heads(tracer, node, layout, target, shape[-2])  # type: ignore[arg-type,index]
    else:
        tracer.freeze_layout(layout, f"{node_label(node)} reshapes the channel axis")
    return {0}


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _first_dim_source(value: ir.Value | None) -> ir.Value | None:
    """The tensor whose first dimension ``value`` holds as a 1-element vector, when ``value`` is
    Unsqueeze(Gather(Shape(x), 0)) or Shape(x, start=0, end=1); None for anything else."""
    unsqueeze = _producer(value, "Unsqueeze")
    if unsqueeze is not None:
        gather = _producer(unsqueeze.inputs[0], "Gather")
        if (
            gather is None
            or constant_ints(gather.inputs[1]) != [0]
            or attribute(gather, "axis", 0) != 0
        ):
            return None
        shape, end = _producer(gather.inputs[0], "Shape"), None
    else:
        shape, end = _producer(value, "Shape"), 1
    if shape is None or attribute(shape, "start", 0) != 0 or attribute(shape, "end", None) != end:
        return None
    return shape.inputs[0]


def _keeps_batch_flattens_rest(node: ir.Node, target: list[int] | None) -> bool:
    """A Reshape to [N, -1]: a constant target (N not -1), or Concat([first dim of the input],
    [-1]) as the TorchScript exporter writes ``x.view(x.size(0), -1)`` with a dynamic batch."""
    if target is not None:
        return len(target) == 2 and target[1] == -1 and target[0] != -1
    concat = _producer(node.inputs[1] if len(node.inputs) > 1 else None, "Concat")
    if concat is None or len(concat.inputs) != 2 or constant_ints(concat.inputs[1]) != [-1]:
        return False
    return _first_dim_source(concat.inputs[0]) is node.inputs[0]


@handles("Shape")
def _shape(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Reading the shape is harmless while only other dimensions than the channel axis are
    used (Gather of a constant index, or a start/end that leaves the axis out)."""
    layout = states[0]
    if layout is None:
        return {0}
    axis, rank = layout.positive_axis(), layout.rank
    start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
    if axis is None or rank is None:
        tracer.freeze_layout(layout, f"{node_label(node)} reads a shape of unknown rank")
        return {0}
    start, end = (v + rank if v < 0 else v for v in (start, rank if end is None else int(end)))
    if not start <= axis < end:
        return {0}
    for use in node.outputs[0].uses():
        index = constant_ints(use.node.inputs[1]) if use.node.op_type == "Gather" else None
        if index is None or len(index) != 1 or attribute(use.node, "axis", 0) != 0:
            tracer.freeze_layout(layout, f"{node_label(node)}: its channel count is read")
            return {0}
        if start + index[0] % (end - start) == axis:  # a negative index counts from the end
            tracer.freeze_layout(layout, f"{node_label(use.node)} reads the channel count")
            return {0}
    return {0}


def _literal_zeros(node: ir.Node, target: Sequence[int]) -> bool:
    """Whether a Reshape target has 0 entries that mean size 0, not "copy" (``allowzero``; the
    dynamo exporter sets it on every Reshape)."""
    return bool(attribute(node, "allowzero", 0)) and 0 in target


def _keeps_leading_dims(
    node: ir.Node, target: Sequence[int], dims: Sequence[Any] | None, count: int
) -> bool:
    """Whether the first ``count`` entries of a Reshape target keep the input's first dims (0,
    a single -1, or the same static size)."""
    if dims is None or _literal_zeros(node, target) or list(target[:count]).count(-1) > 1:
        return False
    return all(t in (0, -1) or t == d for t, d in zip(target[:count], dims[:count], strict=True))


def _splits_heads(
    node: ir.Node, layout: Layout, target: list[int] | None, shape: ir.Shape | None
) -> bool:
    """A Reshape of [..., heads * size] channels (last axis) into [..., heads, size]."""
    rank = layout.rank
    if target is None or rank is None or layout.axis != -1 or layout.repeat != 1:
        return False
    if len(target) != rank + 1 or min(target[-2:]) <= 0:
        return False
    dims = list(shape) if shape is not None and len(shape) == rank else None
    channels = dims[-1] if dims is not None else None
    return channels == target[-2] * target[-1] and _keeps_leading_dims(node, target, dims, rank - 1)


def _split_into_heads(tracer: Tracer, node: ir.Node, layout: Layout, target: list[int]) -> None:
    """Couple the heads channel by channel; the output's last axis holds one head."""
    head = coupled_pieces(tracer, node, layout, target[-2])
    if head is not None:
        out = Layout(head.atoms, -1, len(target))
        tracer.set_layout(node.outputs[0], out)
        tracer.structures.append(Structure(node, "reshape", (out,), len(target) - 1))


def _merge_heads(
    tracer: Tracer, node: ir.Node, layout: Layout, target: list[int], heads: int
) -> None:
    """The merged axis holds the head layout once per head."""
    out = Layout(layout.atoms * heads, -1, len(target))
    tracer.set_layout(node.outputs[0], out)
    tracer.structures.append(Structure(node, "reshape", (out,), len(target) - 1))


def _merges_heads(
    tracer: Tracer,
    node: ir.Node,
    layout: Layout,
    target: list[int] | None,
    shape: ir.Shape | None,
) -> bool:
    """A Reshape of [..., heads, size] (channels on the last axis) into [..., heads * size]."""
    rank = layout.rank
    if target is None or rank is None or rank < 3 or layout.axis != -1 or layout.repeat != 1:
        return False
    dims = list(shape) if shape is not None and len(shape) == rank else None
    heads = dims[-2] if dims is not None else None
    if not isinstance(heads, int) or len(target) != rank - 1:
        return False
    merged = heads * tracer.length(layout)
    return target[-1] == merged and _keeps_leading_dims(node, target, dims, rank - 2)


@handles("Transpose")
def _transpose(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    axis, rank = layout.positive_axis(), layout.rank
    if axis is None or rank is None:
        tracer.freeze_layout(layout, f"{node_label(node)}: rank unknown")
        return {0}
    perm = list(attribute(node, "perm", list(range(rank))[::-1]))
    new_axis = perm.index(axis)
    tracer.set_layout(node.outputs[0], dataclasses.replace(layout, axis=new_axis - rank))
    return {0}


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes a Reduce op reduces ([] for all), None when they are not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return constant_ints(node.inputs[1])
    return list(attribute(node, "axes", []))


@handles(*_REDUCE)
def _reduce(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Reductions over other axes than the channel axis (global pooling written as ReduceMean,
    the squeeze of squeeze-and-excitation) keep every channel apart."""
    layout = states[0]
    every = set(range(len(states)))
    if layout is None:
        return every
    axes, axis, rank = _reduce_axes(node), layout.positive_axis(), layout.rank
    if axes is None or axis is None or rank is None:
        tracer.freeze_layout(layout, f"{node_label(node)}: its axes or the rank are unknown")
        return every
    if not axes and attribute(node, "noop_with_empty_axes", 0):
        tracer.set_layout(node.outputs[0], layout)
        return every
    axes = {a + rank if a < 0 else a for a in axes} or set(range(rank))
    if axis in axes:
        tracer.freeze_layout(layout, f"{node_label(node)} reduces over the channel axis")
    elif attribute(node, "keepdims", 1):
        tracer.set_layout(node.outputs[0], layout)
    else:
        kept_rank = rank - len(axes)
        new_axis = axis - sum(1 for a in axes if a < axis)
        out = Layout(layout.atoms, new_axis - kept_rank, kept_rank, layout.repeat)
        tracer.set_layout(node.outputs[0], out)
    return every


@handles("Squeeze", "Unsqueeze")
def _squeeze(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    axes = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "axes", None)
    axis, rank = layout.positive_axis(), layout.rank
    if axes is None or axis is None or rank is None:
        tracer.freeze_layout(layout, f"{node_label(node)}: its axes or the rank are unknown")
        return {0}
    if node.op_type == "Squeeze":
        axes = [a + rank if a < 0 else a for a in axes]
        if axis in axes:
            tracer.freeze_layout(layout, f"{node_label(node)} removes the channel axis")
            return {0}
        new_rank = rank - len(axes)
        new_axis = axis - sum(1 for a in axes if a < axis)
    else:
        new_rank = rank + len(axes)
        inserted = {a + new_rank if a < 0 else a for a in axes}
        new_axis = [i for i in range(new_rank) if i not in inserted][axis]
    out = Layout(layout.atoms, new_axis - new_rank, new_rank, layout.repeat)
    tracer.set_layout(node.outputs[0], out)
    return {0}
