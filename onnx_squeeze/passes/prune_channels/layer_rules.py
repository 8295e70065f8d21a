"""Channel rules of the layers with weights: Conv and ConvTranspose (grouped and depthwise),
Gemm and MatMul (and MatMul of two activations, as in attention). They produce the channels the
groups are made of, and consume them on their weights' input axes."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import attribute, constant_array
from onnx_squeeze.layers import Layer
from onnx_squeeze.passes.prune_channels.groups import Layout, Structure
from onnx_squeeze.passes.prune_channels.op_rules import (
    channel_axis_is_one,
    coupled_pieces,
    handles,
    is_exclusive,
    node_label,
    rank_of,
)

if TYPE_CHECKING:
    from onnx_squeeze.passes.prune_channels.trace import Tracer


def _weight_problem(node: ir.Node, index: int, *, shareable: bool = False) -> str | None:
    """Why input ``index`` of ``node`` cannot be sliced, or None. A MAC weight used by other
    nodes too is never pruned; a ``shareable`` one (a bias) is copied when it is sliced."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    array = constant_array(value)
    if array is None:
        return f"{node_label(node)}: input {value.name!r} is not a constant initializer"
    if not np.issubdtype(array.dtype, np.floating):
        return f"{node_label(node)}: input {value.name!r} is not floating point"
    if not shareable and not is_exclusive(value):
        return f"{node_label(node)}: weight {value.name!r} is shared with other nodes"
    return None


@handles("Conv", "ConvTranspose")
def _conv(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        tracer.freeze_layout(layout, f"{node_label(node)}: weight is not a constant")
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
        elif channel_axis_is_one(tracer, node, layout):
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
    tracer: Tracer, node: ir.Node, layout: Layout, group: int, per_group: bool
) -> Layout | None:
    """The layout of a convolution's weight axis for the channels of ``layout``: all of them, or
    one group's share when ``per_group``. A grouped convolution's channels are coupled group by
    group (channel ``j`` of every group is one channel), so every group keeps the same channels
    and ``group`` stays; None while atoms must first be cut at the group bounds."""
    if group == 1:
        return layout
    share = coupled_pieces(tracer, node, layout, group)
    return share if per_group else (None if share is None else layout)


def _depthwise(tracer: Tracer, node: ir.Node, layout: Layout, group: int) -> None:
    if not channel_axis_is_one(tracer, node, layout):
        return
    if tracer.length(layout) != group:
        tracer.freeze_layout(layout, f"{node_label(node)}: group={group} differs from the channels")
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
        return None, f"{node_label(node)}: bias is not constant"
    if array.size == 1:
        return None, None
    if array.shape[-1] == units and array.size == units:
        return array.ndim - 1, None
    return None, f"{node_label(node)}: bias is not one value per output unit"


@handles("Gemm", "MatMul")
def _linear(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> set[int]:
    layout = states[0]
    layer = Layer.of(node)
    weight = layer.array if isinstance(layer, Layer) and layer.weight_index == 1 else None
    if weight is None and node.op_type == "MatMul" and node.inputs[1] is not None:
        _activation_product(tracer, node, states)
        return set(range(len(states)))
    if weight is None or weight.ndim != 2:
        for state in states:
            tracer.freeze_layout(state, f"{node_label(node)} has no constant 2-D weight")
        return set(range(len(states)))
    assert isinstance(layer, Layer) and layer.output_axis is not None
    is_gemm = node.op_type == "Gemm"
    (in_axis,), out_axis = layer.reduction_axes, layer.output_axis
    problem = _weight_problem(node, 1)
    if is_gemm and attribute(node, "transA", 0) == 1:
        problem = problem or f"{node_label(node)} has transA=1"
    bias_axis, bias_problem = (
        _bias_axis(node, 2, weight.shape[out_axis]) if is_gemm else (None, None)
    )
    if layout is not None:
        if problem is None and layout.axis == -1:
            tracer.add_slot(node, 1, layout, in_axis, "consumer", weight=True, zero=True)
        else:
            tracer.freeze_layout(
                layout, problem or f"{node_label(node)}: channels not on the last axis"
            )
    rank = 2 if is_gemm else rank_of(node.inputs[0], layout)
    problem = problem or bias_problem
    out = Layout(tuple(tracer.new_atoms(node, weight.shape[out_axis], problem)), -1, rank)
    tracer.set_layout(node.outputs[0], out)
    if problem is None:
        tracer.add_slot(node, 1, out, out_axis, "producer", weight=True, zero=True)
        if bias_axis is not None:
            tracer.add_slot(node, 2, out, bias_axis, "producer", zero=True)
    return {0}


def _activation_product(tracer: Tracer, node: ir.Node, states: list[Layout | None]) -> None:
    """MatMul of two activations: channels on the contracted axes of both (Q·Kᵀ) are coupled
    and leave no channels in the product; columns of a traced second operand whose first
    operand is untraced (probabilities·V) pass through."""
    a, b = states
    if a is not None and b is not None and (a.axis, b.axis, a.repeat, b.repeat) == (-1, -2, 1, 1):
        tracer.unify([a, dataclasses.replace(b, axis=-1)], node)
    elif a is None and b is not None and b.axis == -1 and b.repeat == 1:
        rank = max(rank_of(node.inputs[0]) or 0, b.rank or 0) or None
        tracer.set_layout(node.outputs[0], dataclasses.replace(b, rank=rank))
    else:
        for state in states:
            reason = f"{node_label(node)} multiplies two activations along the channel axis"
            tracer.freeze_layout(state, reason)
