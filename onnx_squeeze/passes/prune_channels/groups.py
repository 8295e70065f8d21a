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
from typing import Any

import onnx_ir as ir


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
