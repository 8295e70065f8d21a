"""Applying a plan (group id -> kept channel indices): every slot sliced (or zeroed, with shapes
kept), split sizes, slice bounds, depthwise groups and reshape targets updated, the traced
values' shapes set, and the kept indices left on them as metadata for later passes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, constant_array, set_input_constant
from onnx_squeeze.passes.prune_channels.groups import ChannelAnalysis, Slot
from onnx_squeeze.records import BN_SCALE_KEY, KEPT_CHANNELS_KEY, PassReport, bn_scale


def kept_indices(
    channels: ChannelAnalysis,
    plan: Mapping[int, np.ndarray],
    atoms: tuple[int, ...],
    repeat: int = 1,
) -> tuple[np.ndarray, int]:
    """Kept indices along an axis holding ``atoms`` (each channel ``repeat`` entries) under
    ``plan`` (group id -> kept channels), and the axis length."""
    pieces, position = [], 0
    for atom in atoms:
        length = channels.atom_length(atom)
        group = channels.group_of.get(atom)
        local = plan[group] if group in plan else np.arange(length)
        pieces.append(position + local)
        position += length
    indices = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if repeat > 1:
        indices = (indices[:, None] * repeat + np.arange(repeat)[None, :]).reshape(-1)
    return indices.astype(np.int64), position * repeat


class Rewriter:
    """Applies a plan: slices (or zeroes) every slot, updates structures, shapes and metadata."""

    def __init__(
        self,
        model: ir.Model,
        channels: ChannelAnalysis,
        plan: dict[int, np.ndarray],
        mode: str,
        node_macs: dict[int, float],
        report: PassReport,
    ) -> None:
        self.model = model
        self.channels = channels
        self.plan = plan
        self.remove = mode == "remove"
        self.node_macs = node_macs
        self.report = report
        self.names = UniqueNames(model)

    def kept(self, atoms: tuple[int, ...], repeat: int = 1) -> tuple[np.ndarray, int]:
        return kept_indices(self.channels, self.plan, atoms, repeat)

    def run(self) -> None:
        by_input: dict[tuple[int, int], list[Slot]] = {}
        for slot in self.channels.slots:
            by_input.setdefault((id(slot.node), slot.input), []).append(slot)
        touched: dict[int, tuple[ir.Node, int, int]] = {}
        for slots in by_input.values():
            node, index = slots[0].node, slots[0].input
            sizes = self.rewrite_input(node, index, slots)
            if sizes is not None:
                old = touched.get(id(node), (node, 0, 0))
                touched[id(node)] = (node, old[1] + sizes[0], old[2] + sizes[1])
        if self.remove:
            self.update_structures()
            self.update_values()
            self.update_bn_scales()
        self.record(touched)

    def rewrite_input(self, node: ir.Node, index: int, slots: list[Slot]) -> tuple[int, int] | None:
        """Slice (or zero) one constant input; its element counts before and after, or None
        when it keeps every channel."""
        value = node.inputs[index]
        array = constant_array(value)
        changes = [(s, *self.kept(s.atoms, s.repeat)) for s in slots]
        changes = [(s, kept, n) for s, kept, n in changes if len(kept) < n]
        if not self.remove:
            changes = [change for change in changes if change[0].zero]
        if array is None or value is None or not changes:
            return None
        result = array
        if self.remove:
            for slot, kept, _ in changes:
                result = np.take(result, kept, axis=slot.axis)
        else:
            result = array.copy()
            for slot, kept, length in changes:
                if slot.zero:
                    mask = np.ones(length, dtype=bool)
                    mask[kept] = False
                    np.moveaxis(result, slot.axis, 0)[mask] = 0
        dtype = value.dtype or ir.DataType.from_numpy(array.dtype)
        base = node.name or value.name or "pruned"
        set_input_constant(
            node, index, result, dtype, f"{base}.pruned_{index}", self.model.graph, self.names
        )
        return array.size, result.size

    def count(self, layout) -> int:
        return len(self.kept(layout.atoms)[0])

    def update_structures(self) -> None:
        graph = self.model.graph
        for structure in self.channels.structures:
            node = structure.node
            base = node.name or node.outputs[0].name  # names the rewritten constants
            if structure.kind == "depthwise":
                node.attributes["group"] = ir.AttrInt64("group", self.count(structure.layouts[0]))
            elif structure.kind == "split":
                sizes = np.array([self.count(x) for x in structure.layouts], dtype=np.int64)
                if "split" in node.attributes:
                    node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
                else:
                    node.attributes.pop("num_outputs", None)
                    set_input_constant(
                        node, 1, sizes, ir.DataType.INT64, f"{base}.split", graph, self.names
                    )
            elif structure.kind == "reshape":  # the head size, or a flattened width, shrinks
                layout = structure.layouts[0]
                target = constant_array(node.inputs[1]).astype(np.int64).copy()
                target[structure.entry] = len(self.kept(layout.atoms, layout.repeat)[0])
                set_input_constant(
                    node, 1, target, ir.DataType.INT64, f"{base}.shape", graph, self.names
                )
            else:  # slice
                source, piece = structure.layouts
                before = np.count_nonzero(self.kept(source.atoms)[0] < structure.start)
                for index, bound in ((1, before), (2, before + self.count(piece))):
                    bounds = constant_array(node.inputs[index]).astype(np.int64).copy()
                    bounds[structure.entry] = bound
                    set_input_constant(
                        node,
                        index,
                        bounds,
                        ir.DataType.INT64,
                        f"{base}.bounds_{index}",
                        graph,
                        self.names,
                    )

    def update_values(self) -> None:
        """New channel counts on the traced values' shapes, and the kept indices as metadata."""
        for value, layout in self.channels.layouts.items():
            kept, length = self.kept(layout.atoms, layout.repeat)
            if len(kept) == length:
                continue
            axis = layout.positive_axis()
            if value.shape is not None:
                dims = list(value.shape)
                dims[layout.axis] = len(kept)
                value.shape = ir.Shape(dims)
                axis = len(dims) + layout.axis
            value.metadata_props[KEPT_CHANNELS_KEY] = json.dumps(
                {"axis": axis if axis is not None else layout.axis, "kept": kept.tolist()}
            )

    def update_bn_scales(self) -> None:
        for slot in self.channels.slots:
            node = slot.node
            scale = bn_scale(node)
            if slot.role != "producer" or not slot.weight or scale is None:
                continue
            kept, length = self.kept(slot.atoms)
            if scale.size == length and len(kept) < length:
                node.metadata_props[BN_SCALE_KEY] = json.dumps([float(v) for v in scale[kept]])

    def record(self, touched: dict[int, tuple[ir.Node, int, int]]) -> None:
        factors: dict[int, float] = {}
        for slot in self.channels.slots:
            if slot.weight:
                kept, length = self.kept(slot.atoms)
                factors[id(slot.node)] = (
                    factors.get(id(slot.node), 1.0) * len(kept) / max(length, 1)
                )
        for key, (node, before, after) in touched.items():
            macs = self.node_macs.get(key, 0)
            if self.remove:
                after_macs = round(macs * factors.get(key, 1.0))
                self.report.record(
                    node,
                    "pruned",
                    "channels removed",
                    params_before=before,
                    params_after=after,
                    macs_before=macs,
                    macs_after=after_macs,
                )
            else:
                self.report.record(node, "masked", "pruned channels zeroed, shapes kept")


def kept_channels(value: ir.Value) -> dict[str, Any] | None:
    """The ``{"axis", "kept"}`` record a pruning pass left on ``value``, or None."""
    text = value.metadata_props.get(KEPT_CHANNELS_KEY)
    return None if text is None else json.loads(text)
