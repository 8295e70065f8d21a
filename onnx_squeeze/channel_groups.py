"""Channel dependency groups: which channel axes of a graph must be pruned together.

Every layer with a constant weight (Conv, Gemm, MatMul) *produces* channels. Their indices are
traced forward through the graph as a *layout*: the list of channel blocks ("atoms") a tensor
holds along its channel axis, in order. Shape-preserving ops and reductions over other axes pass
a layout on, and a Shape read is allowed while its channel entry goes unused; Concat joins
layouts and Split/Slice cut them (an atom cut in the middle is split at its producer, and the
trace runs again until no more cuts are needed); Flatten and flatten-like Reshape (``[N, -1]``,
``[first dim of the input, -1]`` computed from its Shape, or ``[-1, width]`` whose width is
rewritten) record how many rows each channel spans in the next Gemm/MatMul; binary ops with two
traced inputs (residual Add, SiLU's Mul) *couple* their atoms. Coupled atoms form one
:class:`ChannelGroup`: one set of channel indices, removed from every member at once. A grouped
convolution couples its groups channel by channel (channel ``j`` of every group is one
channel), so every group keeps the same channels and ``group`` stays.

Members are the constant tensors that hold one entry per channel of a group, each a
:class:`Slot` (node, input, axis, layout): producers' weights and biases, per-channel
parameters (BatchNormalization, PRelu slopes, per-channel Add/Mul constants, depthwise Conv
weights) and consumers' weight slices (Conv axis 1, Gemm/MatMul rows, with Concat offsets and the
spatial size after Flatten). Split sizes, Slice bounds, depthwise ``group`` attributes and the
targets of head-splitting and flattening Reshapes are :class:`Structure` entries that follow the
kept counts.

Attention (``split_heads``): a Reshape that splits the channel axis into (heads, head size)
couples the heads channel by channel (head size ``d`` of every head is one channel of the group),
the Reshape that merges them back repeats the head layout once per head, and a MatMul of two
activations either contracts two traced axes (Q·Kᵀ: the Q and K channels are coupled, the product
has none) or passes the columns of its traced second operand through (probabilities·V).

A group is *frozen*, with the reason, when its channels reach a graph output, an op the trace
does not know, an axis it cannot map, a subgraph, or a weight shared by several nodes: it is then
listed but never pruned.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnx_squeeze.graph_utils import attribute, constant_array

__all__ = [
    "Atom",
    "ChannelAnalysis",
    "ChannelGroup",
    "Layout",
    "Member",
    "Slot",
    "Structure",
    "analyze_channels",
    "build_groups",
    "format_groups",
]

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
_MAX_ROUNDS = 16


@dataclasses.dataclass
class Atom:
    """A block of consecutive output channels of one producer, always pruned as one group.

    ``producer`` is None for channels of unknown origin (a graph input joined by Concat).
    """

    id: int
    length: int
    producer: ir.Node | None
    start: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """The channel axis of a traced tensor: its atoms in order, the axis (negative, counted from
    the end), the rank when known, and how many consecutive entries each channel spans
    (``repeat`` > 1 after Flatten of a spatial map)."""

    atoms: tuple[int, ...]
    axis: int
    rank: int | None
    repeat: int = 1

    def positive_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclasses.dataclass
class Slot:
    """A constant input of a node with one entry (``repeat`` entries) per channel of ``atoms``
    along ``axis``. ``role`` is producer, param or consumer; ``weight`` marks the MAC weight
    (its kept share scales the node's MACs); ``zero`` marks entries zeroed in "zero" mode."""

    node: ir.Node
    input: int
    axis: int
    atoms: tuple[int, ...]
    role: str
    repeat: int = 1
    weight: bool = False
    zero: bool = False


@dataclasses.dataclass
class Structure:
    """A node whose attributes or shape inputs follow the kept channel counts.

    ``kind`` is ``split`` (``layouts`` are the outputs), ``slice`` (``layouts`` are the input
    and the output, ``entry`` the index in starts/ends, ``start`` the first channel taken) or
    ``depthwise`` (``layouts`` is the input; ``group`` becomes the kept count) or ``reshape``
    (``layouts`` is the output; entry ``entry`` of the target shape becomes its kept entries).
    """

    node: ir.Node
    kind: str
    layouts: tuple[Layout, ...]
    entry: int = 0
    start: int = 0


@dataclasses.dataclass
class Member:
    """Where a group's channels sit in one slot: channel offsets along its axis (several after
    a Concat that takes the same tensor twice)."""

    slot: Slot
    offsets: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.slot.node.name or "",
            "op_type": self.slot.node.op_type,
            "role": self.slot.role,
            "input": self.slot.input,
            "axis": self.slot.axis,
            "offsets": list(self.offsets),
            "repeat": self.slot.repeat,
        }


@dataclasses.dataclass
class ChannelGroup:
    """Channels pruned together: ``channels`` indices shared by every member."""

    id: int
    channels: int
    atoms: list[Atom]
    members: list[Member]
    frozen: str | None = None

    @property
    def producers(self) -> list[ir.Node]:
        seen: dict[int, ir.Node] = {}
        for atom in self.atoms:
            if atom.producer is not None:
                seen.setdefault(id(atom.producer), atom.producer)
        return list(seen.values())

    @property
    def name(self) -> str:
        """The first producer's name, which identifies the group for people."""
        producers = self.producers
        return (producers[0].name or producers[0].op_type) if producers else f"group {self.id}"

    def node_names(self) -> set[str]:
        names = {node.name for node in self.producers if node.name}
        names.update(m.slot.node.name for m in self.members if m.slot.node.name)
        return names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (for ``onnx-squeeze inspect --groups``)."""
        return {
            "id": self.id,
            "name": self.name,
            "channels": self.channels,
            "frozen": self.frozen,
            "producers": [node.name or node.op_type for node in self.producers],
            "members": [member.to_dict() for member in self.members],
        }


@dataclasses.dataclass
class ChannelAnalysis:
    """Everything the trace found: groups, slots to slice, structures to update, and the layout
    of every traced value (to update its shape)."""

    groups: list[ChannelGroup]
    slots: list[Slot]
    structures: list[Structure]
    layouts: dict[ir.Value, Layout]
    atoms: dict[int, Atom]
    group_of: dict[int, int]  # atom id -> group id

    def atom_length(self, atom_id: int) -> int:
        return self.atoms[atom_id].length


def build_groups(model: ir.Model, *, split_heads: bool = False) -> list[ChannelGroup]:
    """The channel dependency groups of the model's main graph, in graph order."""
    return analyze_channels(model, split_heads=split_heads).groups


def analyze_channels(model: ir.Model, *, split_heads: bool = False) -> ChannelAnalysis:
    """Trace channels through the main graph until no atom needs cutting; group coupled atoms.

    ``split_heads`` follows channels through the Reshapes that split them into attention heads
    and merge them back (``reshape`` structures: the caller must rewrite those targets)."""
    cuts: dict[ir.Node, set[int]] = {}
    shapes = _InferredShapes(model)
    for _ in range(_MAX_ROUNDS):
        tracer = _Tracer(model.graph, cuts, shapes, split_heads)
        tracer.run()
        if not tracer.new_cuts:
            return tracer.result()
        for node, positions in tracer.new_cuts.items():
            cuts.setdefault(node, set()).update(positions)
    tracer.freeze_all("the channel trace did not settle on a set of cuts")
    return tracer.result()


def format_groups(groups: Sequence[ChannelGroup]) -> list[tuple[str, ...]]:
    """Rows for a table: id, first producer, channels, producers/params/consumers, status."""
    rows = []
    for group in groups:
        counts = {role: 0 for role in ("producer", "param", "consumer")}
        for member in group.members:
            counts[member.slot.role] = counts.get(member.slot.role, 0) + 1
        rows.append(
            (
                str(group.id),
                group.name,
                str(group.channels),
                f"{len(group.producers)}/{counts['param']}/{counts['consumer']}",
                f"frozen: {group.frozen}" if group.frozen else "prunable",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The trace


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """Nodes in an order where producers come first (the graph's own order when it is sorted)."""
    nodes = list(graph)
    position = {id(node): index for index, node in enumerate(nodes)}
    waiting = {
        id(node): sum(1 for v in node.inputs if v is not None and id(v.producer()) in position)
        for node in nodes
    }
    ready = [node for node in nodes if waiting[id(node)] == 0]
    ordered: list[ir.Node] = []
    while ready:
        node = ready.pop(0)
        ordered.append(node)
        for output in node.outputs:
            for use in output.uses():
                key = id(use.node)
                if key in waiting:
                    waiting[key] -= 1
                    if waiting[key] == 0:
                        ready.append(use.node)
    return ordered if len(ordered) == len(nodes) else nodes


class _InferredShapes:
    """Shapes of values the model does not annotate, from shape inference on a clone (run once,
    only when asked)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.shapes: dict[str, ir.Shape | None] | None = None

    def of(self, value: ir.Value) -> ir.Shape | None:
        if value.shape is not None or not value.name:
            return value.shape
        if self.shapes is None:
            clone = self.model.clone()
            ShapeInferencePass(strict_mode=False)(clone)
            self.shapes = {v.name: v.shape for n in clone.graph for v in n.outputs if v.name}
        return self.shapes.get(value.name)


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _static_dim(value: ir.Value | None, axis: int) -> int | None:
    """The size of axis ``axis`` (negative) of ``value`` when it is known; other axes (a dynamic
    batch) may be symbolic."""
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _rank(value: ir.Value | None, layout: Layout | None = None) -> int | None:
    if layout is not None and layout.rank is not None:
        return layout.rank
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _exclusive(value: ir.Value) -> bool:
    """Whether a weight is used by exactly one node input (shared weights are never pruned)."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def _ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(x) for x in np.asarray(array).reshape(-1)]


class _Tracer:
    """One round of the trace with a fixed set of producer cuts."""

    def __init__(
        self,
        graph: ir.Graph,
        cuts: dict[ir.Node, set[int]],
        shapes: _InferredShapes,
        split_heads: bool = False,
    ) -> None:
        self.graph = graph
        self.cuts = cuts
        self.shapes = shapes
        self.split_heads = split_heads
        self.new_cuts: dict[ir.Node, set[int]] = {}
        self.atoms: list[Atom] = []
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}  # root atom -> reason
        self.layouts: dict[ir.Value, Layout] = {}
        self.slots: list[Slot] = []
        self.structures: list[Structure] = []

    # atoms and classes ---------------------------------------------------------------------

    def new_atoms(self, node: ir.Node | None, length: int, frozen: str | None = None) -> list[int]:
        bounds = sorted({0, length, *(c for c in self.cuts.get(node, ()) if 0 < c < length)})
        made = []
        for start, end in itertools.pairwise(bounds):
            atom = Atom(len(self.atoms), end - start, node, start)
            self.atoms.append(atom)
            self.parent.append(atom.id)
            if frozen:
                self.frozen[atom.id] = frozen
            made.append(atom.id)
        return made

    def find(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        self.parent[root_b] = root_a
        reason = self.frozen.pop(root_b, None)
        if reason and root_a not in self.frozen:
            self.frozen[root_a] = reason

    def freeze(self, atoms: Iterable[int], reason: str) -> None:
        for atom in atoms:
            self.frozen.setdefault(self.find(atom), reason)

    def freeze_layout(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            self.freeze(layout.atoms, reason)

    def freeze_all(self, reason: str) -> None:
        self.freeze(range(len(self.atoms)), reason)

    def cut(self, atom_id: int, offset: int) -> bool:
        """Ask for ``atom_id`` to be cut ``offset`` channels in; False when it cannot be."""
        atom = self.atoms[atom_id]
        if atom.producer is None:
            return False
        self.new_cuts.setdefault(atom.producer, set()).add(atom.start + offset)
        return True

    def length(self, layout: Layout) -> int:
        return sum(self.atoms[a].length for a in layout.atoms)

    def bounds(self, layout: Layout) -> list[int]:
        return [0, *np.cumsum([self.atoms[a].length for a in layout.atoms]).tolist()]

    # layouts --------------------------------------------------------------------------------

    def unify(self, layouts: Sequence[Layout], node: ir.Node) -> Layout | None:
        """Couple layouts that meet channel by channel; None when they cannot be (then frozen)
        or when atoms must first be cut (another round follows)."""
        first = layouts[0]
        every = [a for layout in layouts for a in layout.atoms]
        if any(
            (x.axis, x.repeat, self.length(x)) != (first.axis, first.repeat, self.length(first))
            for x in layouts
        ):
            self.freeze(every, f"{_label(node)} combines tensors whose channel axes differ")
            return None
        all_bounds = set().union(*(self.bounds(x) for x in layouts))
        aligned = True
        for layout in layouts:
            for cut_at in sorted(all_bounds - set(self.bounds(layout))):
                aligned = False
                if not self.split_at(layout, cut_at):
                    self.freeze(every, f"{_label(node)} couples channels of unknown origin")
                    return None
        if not aligned:
            return None
        for layout in layouts[1:]:
            for a, b in zip(first.atoms, layout.atoms, strict=True):
                self.union(a, b)
        rank = max((x.rank for x in layouts if x.rank is not None), default=None)
        return dataclasses.replace(first, rank=rank)

    def split_at(self, layout: Layout, position: int) -> bool:
        """Ask for the atom of ``layout`` that spans ``position`` to be cut there."""
        start = 0
        for atom in layout.atoms:
            length = self.atoms[atom].length
            if start < position < start + length:
                return self.cut(atom, position - start)
            start += length
        return True

    def sub_layout(self, layout: Layout, begin: int, end: int, node: ir.Node) -> Layout | None:
        """Channels ``begin:end`` of ``layout``; None when atoms must be cut first."""
        ok = self.split_at(layout, begin) and self.split_at(layout, end)
        if not ok:
            self.freeze_layout(layout, f"{_label(node)} cuts channels of unknown origin")
            return None
        bounds = self.bounds(layout)
        if begin not in bounds or end not in bounds:
            return None
        atoms = layout.atoms[bounds.index(begin) : bounds.index(end)]
        return dataclasses.replace(layout, atoms=atoms)

    def set_layout(self, value: ir.Value, layout: Layout | None) -> None:
        if layout is not None and layout.atoms:
            self.layouts[value] = layout

    def add_slot(self, node: ir.Node, index: int, layout: Layout, axis: int, role: str, **kw):
        self.slots.append(Slot(node, index, axis, layout.atoms, role, layout.repeat, **kw))

    # the walk ---------------------------------------------------------------------------------

    def run(self) -> None:
        for node in _topological(self.graph):
            states = [self.layouts.get(v) if v is not None else None for v in node.inputs]
            handler = _HANDLERS.get(node.op_type) if _is_default_domain(node) else None
            has_subgraph = any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                for a in node.attributes.values()
            )
            if handler is None or has_subgraph:
                reason = f"reaches {_label(node)}, which the channel analysis does not know"
                for state in states:
                    self.freeze_layout(state, reason)
                continue
            claimed = handler(self, node, states)
            for index, state in enumerate(states):
                if state is not None and index not in claimed:
                    self.freeze_layout(state, f"is input {index} of {_label(node)}")
        self.freeze_escapes()

    def freeze_escapes(self) -> None:
        """Freeze channels that reach graph outputs or are read inside subgraphs."""
        for value, layout in self.layouts.items():
            if value.is_graph_output():
                self.freeze_layout(layout, f"reaches graph output {value.name!r}")
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.freeze_layout(layout, f"is read inside a subgraph of {_label(use.node)}")

    def result(self) -> ChannelAnalysis:
        members: dict[int, list[Member]] = {}
        by_root: dict[int, list[Atom]] = {}
        for atom in self.atoms:
            by_root.setdefault(self.find(atom.id), []).append(atom)
        for slot in self.slots:
            positions: dict[int, list[int]] = {}
            offset = 0
            for atom in slot.atoms:
                positions.setdefault(self.find(atom), []).append(offset)
                offset += self.atoms[atom].length
            for root, offsets in positions.items():
                members.setdefault(root, []).append(Member(slot, tuple(offsets)))
        groups: list[ChannelGroup] = []
        group_of: dict[int, int] = {}
        for root, atoms in sorted(by_root.items(), key=lambda item: item[1][0].id):
            if all(atom.producer is None for atom in atoms):
                continue  # channels of unknown origin only: nothing to prune
            group = ChannelGroup(
                len(groups), atoms[0].length, atoms, members.get(root, []), self.frozen.get(root)
            )
            groups.append(group)
            for atom in atoms:
                group_of[atom.id] = group.id
        return ChannelAnalysis(
            groups,
            self.slots,
            self.structures,
            dict(self.layouts),
            {atom.id: atom for atom in self.atoms},
            group_of,
        )


# ---------------------------------------------------------------------------------------------
# Handlers: one per kind of op. Each sets the layouts of the node's outputs, registers slots and
# structures, and returns the input indices it accounted for (the walk freezes the rest).

Handler = Callable[[_Tracer, ir.Node, list[Layout | None]], set[int]]
_HANDLERS: dict[str, Handler] = {}


def _handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(function: Handler) -> Handler:
        for op_type in op_types:
            _HANDLERS[op_type] = function
        return function

    return register


def _freeze_extra_outputs(tracer: _Tracer, node: ir.Node, layout: Layout | None) -> bool:
    """Freeze when an output other than the first is used (MaxPool indices, Dropout mask)."""
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        tracer.freeze_layout(layout, f"{_label(node)} has a second output in use")
        return True
    return False


def _channel_axis_is_one(tracer: _Tracer, node: ir.Node, layout: Layout) -> bool:
    if layout.repeat == 1 and layout.rank is not None and layout.positive_axis() == 1:
        return True
    tracer.freeze_layout(layout, f"{_label(node)} needs the channels on axis 1")
    return False


@_handles(*_ELEMENTWISE_UNARY)
def _unary(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is not None and not _freeze_extra_outputs(tracer, node, layout):
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@_handles(*_POOLING)
def _pooling(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None or not _channel_axis_is_one(tracer, node, layout):
        return {0}
    if not _freeze_extra_outputs(tracer, node, layout):
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@_handles("Resize", "Upsample")
def _resize(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None or not _channel_axis_is_one(tracer, node, layout):
        return {0}
    scales_index = 1 if node.op_type == "Upsample" or len(node.inputs) == 2 else 2
    scales = constant_array(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
    has_sizes = len(node.inputs) > 3 and node.inputs[3] is not None
    if has_sizes or scales is None or scales.size <= 1 or float(scales.reshape(-1)[1]) != 1.0:
        tracer.freeze_layout(layout, f"{_label(node)} does not keep channels by constant scales")
        return {0}
    tracer.set_layout(node.outputs[0], layout)
    return {0}


@_handles("Pad")
def _pad(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    rank, axis = layout.rank, layout.positive_axis()
    pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "pads", None)
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    if rank is None or axis is None or pads is None or has_axes or len(pads) != 2 * rank:
        tracer.freeze_layout(layout, f"{_label(node)}: its pads cannot be read per axis")
    elif pads[axis] or pads[axis + rank]:
        tracer.freeze_layout(layout, f"{_label(node)} pads the channel axis")
    else:
        tracer.set_layout(node.outputs[0], layout)
    return {0}


@_handles(*_ELEMENTWISE_BINARY)
def _binary(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
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
                layout, f"{_label(node)} combines it with {value.name!r}, which is not traced"
            )
            return every
        dim = array.shape[array.ndim + layout.axis] if array.ndim >= -layout.axis else 1
        if dim == 1:
            continue
        if dim != total or layout.repeat != 1:
            reason = f"{_label(node)}: constant {value.name!r} is not one value per channel"
            tracer.freeze_layout(layout, reason)
            return every
        zero = node.op_type in _ADDITIVE
        tracer.add_slot(node, index, layout, array.ndim + layout.axis, "param", zero=zero)
    tracer.set_layout(node.outputs[0], layout)
    return every


def _norm_params(
    tracer: _Tracer, node: ir.Node, layout: Layout, indices: Sequence[int], zeroed: set[int]
) -> bool:
    """Register per-channel parameters of a normalization; False (frozen) when not constant."""
    total = tracer.length(layout)
    for index in indices:
        array = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if array is None or array.ndim != 1 or array.size != total:
            tracer.freeze_layout(layout, f"{_label(node)}: parameter {index} is not constant")
            return False
    for index in indices:
        tracer.add_slot(node, index, layout, 0, "param", zero=index in zeroed)
    return True


@_handles("BatchNormalization", "InstanceNormalization")
def _normalization(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    every = set(range(len(states)))
    if layout is None or not _channel_axis_is_one(tracer, node, layout):
        return every
    if _freeze_extra_outputs(tracer, node, layout):
        return every
    params = (1, 2, 3, 4) if node.op_type == "BatchNormalization" else (1, 2)
    if _norm_params(tracer, node, layout, params, zeroed={1, 2}):
        tracer.set_layout(node.outputs[0], layout)
    return every


@_handles("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax")
def _axis_op(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Ops that mix values along one axis (LayerNorm: that axis and all after it)."""
    layout = states[0]
    every = set(range(len(states)))
    if layout is None:
        return every
    rank = _rank(node.inputs[0], layout)
    axis = int(attribute(node, "axis", -1))
    if rank is None and axis >= 0:
        tracer.freeze_layout(layout, f"{_label(node)}: rank unknown")
        return every
    axis = axis - rank if axis >= 0 and rank is not None else axis
    mixes = layout.axis >= axis if node.op_type == "LayerNormalization" else layout.axis == axis
    if mixes:
        tracer.freeze_layout(layout, f"{_label(node)} mixes values across the channel axis")
    else:
        tracer.set_layout(node.outputs[0], layout)
    return every


@_handles("Concat")
def _concat(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    every = set(range(len(states)))
    traced = [s for s in states if s is not None]
    if not traced:
        return every
    rank = _rank(node.inputs[0], traced[0])
    axis = int(attribute(node, "axis", 0))
    if rank is None and axis >= 0:
        tracer.freeze([a for s in traced for a in s.atoms], f"{_label(node)}: rank unknown")
        return every
    axis = axis - rank if axis >= 0 and rank is not None else axis
    if axis != traced[0].axis:
        if len(traced) != len(states):
            reason = f"{_label(node)} joins traced and untraced tensors along another axis"
            tracer.freeze([a for s in traced for a in s.atoms], reason)
            return every
        tracer.set_layout(node.outputs[0], tracer.unify(traced, node))
        return every
    atoms: list[int] = []
    for value, state in zip(node.inputs, states, strict=True):
        if state is not None and state.axis == axis and state.repeat == 1:
            atoms.extend(state.atoms)
            continue
        width = _static_dim(value, axis)
        if state is not None or width is None:
            name = value.name if value is not None else None
            reason = f"{_label(node)}: the channels of input {name!r} cannot be mapped"
            tracer.freeze([a for s in traced for a in s.atoms], reason)
            return every
        atoms.extend(tracer.new_atoms(None, width, "joined with channels of unknown origin"))
    tracer.set_layout(node.outputs[0], Layout(tuple(atoms), axis, rank))
    return every


def _split_sizes(node: ir.Node, total: int) -> list[int] | None:
    sizes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if sizes is None:
        sizes = attribute(node, "split", None)
    if sizes is None:
        count = int(attribute(node, "num_outputs", len(node.outputs)))
        if count <= 0 or total % count:
            return None
        sizes = [total // count] * count
    return [int(s) for s in sizes] if sum(sizes) == total else None


@_handles("Split")
def _split(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
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
        tracer.freeze_layout(layout, f"{_label(node)}: its split sizes cannot be read")
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


@_handles("Slice")
def _slice(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    starts, ends = (_ints(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    rank = layout.rank
    if starts is None or ends is None or rank is None:
        tracer.freeze_layout(layout, f"{_label(node)}: its bounds are not constant")
        return {0}
    axes = [a + rank if a < 0 else a for a in (axes or range(len(starts)))]
    axis = layout.positive_axis()
    if axis not in axes:
        tracer.set_layout(node.outputs[0], layout)
        return {0}
    entry = axes.index(axis)
    total = tracer.length(layout)
    if (steps and steps[entry] != 1) or layout.repeat != 1:
        tracer.freeze_layout(layout, f"{_label(node)} steps through the channels")
        return {0}
    begin, end = (
        min(max(v + total if v < 0 else v, 0), total) for v in (starts[entry], ends[entry])
    )
    piece = tracer.sub_layout(layout, begin, max(begin, end), node)
    if piece is not None:
        tracer.set_layout(node.outputs[0], piece)
        tracer.structures.append(Structure(node, "slice", (layout, piece), entry, begin))
    return {0}


def _flatten_like(tracer: _Tracer, node: ir.Node, layout: Layout, start: int) -> Layout | None:
    """Channels on axis ``start`` followed by the dims flattened into the same output axis."""
    inner = _inner_size(tracer, node, layout, start)
    if inner is None:
        tracer.freeze_layout(layout, f"{_label(node)} merges the channel axis with other axes")
        return None
    out = Layout(layout.atoms, -1, 2, layout.repeat * inner)
    tracer.set_layout(node.outputs[0], out)
    return out


def _inner_size(tracer: _Tracer, node: ir.Node, layout: Layout, start: int) -> int | None:
    """How many entries of the input follow each channel when the channels are on axis
    ``start`` and the dims after it are static; None otherwise."""
    shape = tracer.shapes.of(node.inputs[0])
    inner_dims = list(shape)[start + 1 :] if shape is not None else None
    if layout.positive_axis() != start or inner_dims is None:
        return None
    return math.prod(inner_dims) if all(isinstance(d, int) for d in inner_dims) else None


def _flattens_to_width(tracer: _Tracer, node: ir.Node, layout: Layout, target: list[int]) -> bool:
    """A Reshape of [N, C, *static] into [-1 or 0, C * prod(static)]: torch.flatten(x, 1) as the
    dynamo exporter writes it, with the width spelled out (rewritten when channels go)."""
    if len(target) != 2 or target[0] not in (-1, 0) or _literal_zeros(node, target):
        return False
    inner = _inner_size(tracer, node, layout, 1)
    return inner is not None and target[1] == tracer.length(layout) * layout.repeat * inner


@_handles("Flatten")
def _flatten(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is not None:
        rank = _rank(node.inputs[0], layout)
        axis = int(attribute(node, "axis", 1))
        _flatten_like(tracer, node, layout, axis + rank if axis < 0 and rank else axis)
    return {0}


@_handles("Reshape")
def _reshape(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    target = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
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
        tracer.freeze_layout(layout, f"{_label(node)} reshapes the channel axis")
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
        if gather is None or _ints(gather.inputs[1]) != [0] or attribute(gather, "axis", 0) != 0:
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
    if concat is None or len(concat.inputs) != 2 or _ints(concat.inputs[1]) != [-1]:
        return False
    return _first_dim_source(concat.inputs[0]) is node.inputs[0]


@_handles("Shape")
def _shape(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Reading the shape is harmless while only other dimensions than the channel axis are
    used (Gather of a constant index, or a start/end that leaves the axis out)."""
    layout = states[0]
    if layout is None:
        return {0}
    axis, rank = layout.positive_axis(), layout.rank
    start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
    if axis is None or rank is None:
        tracer.freeze_layout(layout, f"{_label(node)} reads a shape of unknown rank")
        return {0}
    start, end = (v + rank if v < 0 else v for v in (start, rank if end is None else int(end)))
    if not start <= axis < end:
        return {0}
    for use in node.outputs[0].uses():
        index = _ints(use.node.inputs[1]) if use.node.op_type == "Gather" else None
        if index is None or len(index) != 1 or attribute(use.node, "axis", 0) != 0:
            tracer.freeze_layout(layout, f"{_label(node)}: its channel count is read")
            return {0}
        if start + index[0] % (end - start) == axis:  # a negative index counts from the end
            tracer.freeze_layout(layout, f"{_label(use.node)} reads the channel count")
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


def _split_into_heads(tracer: _Tracer, node: ir.Node, layout: Layout, target: list[int]) -> None:
    """Couple the heads channel by channel; the output's last axis holds one head."""
    head = _coupled_pieces(tracer, node, layout, target[-2])
    if head is not None:
        out = Layout(head.atoms, -1, len(target))
        tracer.set_layout(node.outputs[0], out)
        tracer.structures.append(Structure(node, "reshape", (out,), len(target) - 1))


def _merge_heads(
    tracer: _Tracer, node: ir.Node, layout: Layout, target: list[int], heads: int
) -> None:
    """The merged axis holds the head layout once per head."""
    out = Layout(layout.atoms * heads, -1, len(target))
    tracer.set_layout(node.outputs[0], out)
    tracer.structures.append(Structure(node, "reshape", (out,), len(target) - 1))


def _merges_heads(
    tracer: _Tracer,
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


@_handles("Transpose")
def _transpose(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    axis, rank = layout.positive_axis(), layout.rank
    if axis is None or rank is None:
        tracer.freeze_layout(layout, f"{_label(node)}: rank unknown")
        return {0}
    perm = list(attribute(node, "perm", list(range(rank))[::-1]))
    new_axis = perm.index(axis)
    tracer.set_layout(node.outputs[0], dataclasses.replace(layout, axis=new_axis - rank))
    return {0}


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes a Reduce op reduces ([] for all), None when they are not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _ints(node.inputs[1])
    return list(attribute(node, "axes", []))


@_handles(*_REDUCE)
def _reduce(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    """Reductions over other axes than the channel axis (global pooling written as ReduceMean,
    the squeeze of squeeze-and-excitation) keep every channel apart."""
    layout = states[0]
    every = set(range(len(states)))
    if layout is None:
        return every
    axes, axis, rank = _reduce_axes(node), layout.positive_axis(), layout.rank
    if axes is None or axis is None or rank is None:
        tracer.freeze_layout(layout, f"{_label(node)}: its axes or the rank are unknown")
        return every
    if not axes and attribute(node, "noop_with_empty_axes", 0):
        tracer.set_layout(node.outputs[0], layout)
        return every
    axes = {a + rank if a < 0 else a for a in axes} or set(range(rank))
    if axis in axes:
        tracer.freeze_layout(layout, f"{_label(node)} reduces over the channel axis")
    elif attribute(node, "keepdims", 1):
        tracer.set_layout(node.outputs[0], layout)
    else:
        kept_rank = rank - len(axes)
        new_axis = axis - sum(1 for a in axes if a < axis)
        out = Layout(layout.atoms, new_axis - kept_rank, kept_rank, layout.repeat)
        tracer.set_layout(node.outputs[0], out)
    return every


@_handles("Squeeze", "Unsqueeze")
def _squeeze(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    if layout is None:
        return {0}
    axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "axes", None)
    axis, rank = layout.positive_axis(), layout.rank
    if axes is None or axis is None or rank is None:
        tracer.freeze_layout(layout, f"{_label(node)}: its axes or the rank are unknown")
        return {0}
    if node.op_type == "Squeeze":
        axes = [a + rank if a < 0 else a for a in axes]
        if axis in axes:
            tracer.freeze_layout(layout, f"{_label(node)} removes the channel axis")
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


def _weight_problem(node: ir.Node, index: int, *, shareable: bool = False) -> str | None:
    """Why input ``index`` of ``node`` cannot be sliced, or None. A MAC weight used by other
    nodes too is never pruned; a ``shareable`` one (a bias) is copied when it is sliced."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    array = constant_array(value)
    if array is None:
        return f"{_label(node)}: input {value.name!r} is not a constant initializer"
    if not np.issubdtype(array.dtype, np.floating):
        return f"{_label(node)}: input {value.name!r} is not floating point"
    if not shareable and not _exclusive(value):
        return f"{_label(node)}: weight {value.name!r} is shared with other nodes"
    return None


@_handles("Conv", "ConvTranspose")
def _conv(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        tracer.freeze_layout(layout, f"{_label(node)}: weight is not a constant")
        return {0}
    # Conv weights are (out, in/group, *kernel); ConvTranspose weights (in, out/group, *kernel):
    # of a grouped convolution, the weight holds one group's share of the channels on one axis
    transposed = node.op_type == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    group = int(attribute(node, "group", 1))
    problem = _weight_problem(node, 1) or _weight_problem(node, 2, shareable=True)
    depthwise = group > 1 and group == weight.shape[0] and weight.shape[1] == 1
    if problem is None and depthwise and not transposed:  # channels pass through
        if layout is not None:
            _depthwise(tracer, node, layout, group)
        return {0}
    if layout is not None:
        if problem is not None:
            tracer.freeze_layout(layout, problem)
        elif _channel_axis_is_one(tracer, node, layout):
            consumed = _weight_share(tracer, node, layout, group, in_axis == 1)
            if consumed is not None:
                tracer.add_slot(node, 1, consumed, in_axis, "consumer", weight=True, zero=True)
    width = weight.shape[out_axis] * (group if transposed else 1)
    atoms = tuple(tracer.new_atoms(node, width, problem))
    out = Layout(atoms, 1 - weight.ndim, weight.ndim)
    tracer.set_layout(node.outputs[0], out)
    if problem is None:
        produced = _weight_share(tracer, node, out, group, out_axis == 1)
        if produced is not None:
            tracer.add_slot(node, 1, produced, out_axis, "producer", weight=True, zero=True)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            tracer.add_slot(node, 2, out, 0, "producer", zero=True)
    return {0}


def _weight_share(
    tracer: _Tracer, node: ir.Node, layout: Layout, group: int, per_group: bool
) -> Layout | None:
    """The layout of a convolution's weight axis for the channels of ``layout``: all of them, or
    one group's share when ``per_group``. A grouped convolution's channels are coupled group by
    group (channel ``j`` of every group is one channel), so every group keeps the same channels
    and ``group`` stays; None while atoms must first be cut at the group bounds."""
    if group == 1:
        return layout
    share = _coupled_pieces(tracer, node, layout, group)
    return share if per_group else (None if share is None else layout)


def _coupled_pieces(tracer: _Tracer, node: ir.Node, layout: Layout, count: int) -> Layout | None:
    """Couple ``count`` equal consecutive pieces of ``layout`` channel by channel (the groups of
    a grouped convolution, the heads of attention); the first piece's layout, None while atoms
    must first be cut at the piece bounds (another round follows) or when they cannot be."""
    size = tracer.length(layout) // count
    pieces = [tracer.sub_layout(layout, k * size, (k + 1) * size, node) for k in range(count)]
    if any(piece is None for piece in pieces):
        return None
    return tracer.unify(pieces, node)  # type: ignore[arg-type]


def _depthwise(tracer: _Tracer, node: ir.Node, layout: Layout, group: int) -> None:
    if not _channel_axis_is_one(tracer, node, layout):
        return
    if tracer.length(layout) != group:
        tracer.freeze_layout(layout, f"{_label(node)}: group={group} differs from the channels")
        return
    tracer.add_slot(node, 1, layout, 0, "param", weight=True, zero=True)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        tracer.add_slot(node, 2, layout, 0, "param", zero=True)
    tracer.structures.append(Structure(node, "depthwise", (layout,)))
    tracer.set_layout(node.outputs[0], layout)


def _bias_axis(node: ir.Node, index: int, units: int) -> tuple[int | None, str | None]:
    """The axis of a Gemm bias to slice with the output units (None: broadcast, nothing to do)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    array = constant_array(value)
    if value is None:
        return None, None
    if array is None:
        return None, f"{_label(node)}: bias is not constant"
    if array.size == 1:
        return None, None
    if array.shape[-1] == units and array.size == units:
        return array.ndim - 1, None
    return None, f"{_label(node)}: bias is not one value per output unit"


@_handles("Gemm", "MatMul")
def _linear(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None and node.op_type == "MatMul" and node.inputs[1] is not None:
        _activation_product(tracer, node, states)
        return set(range(len(states)))
    if weight is None or weight.ndim != 2:
        for state in states:
            tracer.freeze_layout(state, f"{_label(node)} has no constant 2-D weight")
        return set(range(len(states)))
    is_gemm = node.op_type == "Gemm"
    trans_b = is_gemm and attribute(node, "transB", 0) == 1
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    problem = _weight_problem(node, 1)
    if is_gemm and attribute(node, "transA", 0) == 1:
        problem = problem or f"{_label(node)} has transA=1"
    bias_axis, bias_problem = (
        _bias_axis(node, 2, weight.shape[out_axis]) if is_gemm else (None, None)
    )
    if layout is not None:
        if problem is None and layout.axis == -1:
            tracer.add_slot(node, 1, layout, in_axis, "consumer", weight=True, zero=True)
        else:
            tracer.freeze_layout(
                layout, problem or f"{_label(node)}: channels not on the last axis"
            )
    rank = 2 if is_gemm else _rank(node.inputs[0], layout)
    problem = problem or bias_problem
    out = Layout(tuple(tracer.new_atoms(node, weight.shape[out_axis], problem)), -1, rank)
    tracer.set_layout(node.outputs[0], out)
    if problem is None:
        tracer.add_slot(node, 1, out, out_axis, "producer", weight=True, zero=True)
        if bias_axis is not None:
            tracer.add_slot(node, 2, out, bias_axis, "producer", zero=True)
    return {0}


def _activation_product(tracer: _Tracer, node: ir.Node, states: list[Layout | None]) -> None:
    """MatMul of two activations: channels on the contracted axes of both (Q·Kᵀ) are coupled
    and leave no channels in the product; columns of a traced second operand whose first
    operand is untraced (probabilities·V) pass through."""
    a, b = states
    if a is not None and b is not None and (a.axis, b.axis, a.repeat, b.repeat) == (-1, -2, 1, 1):
        tracer.unify([a, dataclasses.replace(b, axis=-1)], node)
    elif a is None and b is not None and b.axis == -1 and b.repeat == 1:
        rank = max(_rank(node.inputs[0]) or 0, b.rank or 0) or None
        tracer.set_layout(node.outputs[0], dataclasses.replace(b, rank=rank))
    else:
        for state in states:
            reason = f"{_label(node)} multiplies two activations along the channel axis"
            tracer.freeze_layout(state, reason)
