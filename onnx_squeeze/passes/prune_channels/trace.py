"""The channel trace: one walk over the main graph in producer-first order, each node handled by
the rule for its op (:mod:`.op_rules`, :mod:`.layer_rules`), run again with the atoms cut where a
Concat, Split or Slice needs them until no more cuts are asked for; coupled atoms then form the
:class:`~.groups.ChannelGroup` list."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnx_squeeze.passes.prune_channels import layer_rules  # noqa: F401 (registers its rules)
from onnx_squeeze.passes.prune_channels.groups import (
    Atom,
    ChannelAnalysis,
    ChannelGroup,
    Layout,
    Member,
    Slot,
    Structure,
)
from onnx_squeeze.passes.prune_channels.op_rules import HANDLERS, is_default_domain, node_label

_MAX_ROUNDS = 16


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
        tracer = Tracer(model.graph, cuts, shapes, split_heads)
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


class Tracer:
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
            self.freeze(every, f"{node_label(node)} combines tensors whose channel axes differ")
            return None
        all_bounds = set().union(*(self.bounds(x) for x in layouts))
        aligned = True
        for layout in layouts:
            for cut_at in sorted(all_bounds - set(self.bounds(layout))):
                aligned = False
                if not self.split_at(layout, cut_at):
                    self.freeze(every, f"{node_label(node)} couples channels of unknown origin")
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
            self.freeze_layout(layout, f"{node_label(node)} cuts channels of unknown origin")
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
            handler = HANDLERS.get(node.op_type) if is_default_domain(node) else None
            has_subgraph = any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                for a in node.attributes.values()
            )
            if handler is None or has_subgraph:
                reason = f"reaches {node_label(node)}, which the channel analysis does not know"
                for state in states:
                    self.freeze_layout(state, reason)
                continue
            claimed = handler(self, node, states)
            for index, state in enumerate(states):
                if state is not None and index not in claimed:
                    self.freeze_layout(state, f"is input {index} of {node_label(node)}")
        self.freeze_escapes()

    def freeze_escapes(self) -> None:
        """Freeze channels that reach graph outputs or are read inside subgraphs."""
        for value, layout in self.layouts.items():
            if value.is_graph_output():
                self.freeze_layout(layout, f"reaches graph output {value.name!r}")
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.freeze_layout(
                        layout, f"is read inside a subgraph of {node_label(use.node)}"
                    )

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
