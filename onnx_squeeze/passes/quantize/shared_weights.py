"""Constant weights that weight-rewriting passes encode once for every node that reads them.

A weight shared by several nodes (an unrolled LSTM's weight read at every step, tied layers) is
encoded once for all of them (GPTQ then sums their input Hessians) and every reader gets the one
copy; a weight that some other op also reads is left alone and reported, since an encoded copy
beside the float one would grow the file. Weights and readers may sit in If/Loop/Scan bodies:
encoded tensors go into the graph that holds the weight, which every reader can see.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, constant_array, new_initializer
from onnx_squeeze.records import PassReport

# Ops that hold a model's weights and compute, for the note on what a pass could not reach.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


@dataclasses.dataclass
class Consumer:
    """One node reading a weight, and how: where the weight sits, which axis is the output
    channel axis (and which it sums over, where a pass needs them), and for Gemm the constant it
    scales by and the bias it adds."""

    node: ir.Node
    index: int
    channel_axis: int
    reduction_axes: tuple[int, ...] = ()
    alpha: float = 1.0
    bias: np.ndarray | None = None


@dataclasses.dataclass
class SharedWeight:
    """A constant weight and every node that reads it."""

    value: ir.Value
    array: np.ndarray
    consumers: list[Consumer]

    @property
    def name(self) -> str:
        return self.value.name or "weight"

    @property
    def nodes(self) -> list[ir.Node]:
        return [c.node for c in self.consumers]


def _names(nodes: Iterable[ir.Node]) -> str:
    return ", ".join(repr(n.name) for n in nodes)


def skip_all(report: PassReport, nodes: Iterable[ir.Node], reason: str) -> None:
    for node in nodes:
        report.skip(node, reason)


def weight_nodes(model: ir.Model, ops: Sequence[str]) -> list[ir.Node]:
    """The nodes of ``ops`` (default domain) in the main graph and in every If/Loop/Scan body:
    an exported model may hold all its compute in a subgraph."""
    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type in ops and node.domain in ("", "ai.onnx")
    ]


def layer_weights(model: ir.Model) -> dict[str, int]:
    """The constant elements each weight layer reads, by node name: taken before a pass rewrites
    them, for :func:`unreached_compute` (empty where names do not tell the layers apart)."""
    layers = weight_nodes(model, LAYER_OPS)
    names = [node.name for node in layers]
    if not all(names) or len(set(names)) < len(names):
        return {}
    return {
        node.name: sum(
            value.const_value.size
            for value in node.inputs
            if value is not None and value.const_value is not None
        )
        for node in layers
    }


# A pass that changed layers holding less than this share of the weight layers' weights says so.
LITTLE_SHARE = 0.1


def unreached_compute(
    model: ir.Model, report: PassReport, ops: Sequence[str], weights: Mapping[str, int]
) -> str | None:
    """A ``WARNING:`` note when a pass changed nothing in a model that has weight layers (which
    layers they are, how many sit in If/Loop/Scan bodies and whether the pass handles their
    op), or changed layers holding less than ``LITTLE_SHARE`` of their ``weights``
    (:func:`layer_weights` before the pass): dynamic INT8 of a ResNet quantizes its classifier
    alone (open_nsfw: 0.07 % of the weights), and neither should be read as done."""
    if report.changed:
        changed = {record.node for record in report.changed}
        total = sum(weights.values())
        if not total:
            return None
        share = sum(size for name, size in weights.items() if name in changed) / total
        rest = collections.Counter(
            node.op_type for node in weight_nodes(model, LAYER_OPS) if node.name not in changed
        )
        if share >= LITTLE_SHARE or not rest:
            return None
        found = ", ".join(f"{count} {op}" for op, count in rest.most_common())
        hint = "; static INT8 (--int8) quantizes Conv" if "Conv" in rest else ""
        return (
            f"WARNING: {report.name} changed layers holding {share:.2%} of the model's weights; "
            f"the rest sit in {found}, which it left as they were (it handles "
            f"{'/'.join(ops)}){hint}"
        )
    layers = weight_nodes(model, LAYER_OPS)
    if not layers:
        return None
    counts = collections.Counter(node.op_type for node in layers)
    found = ", ".join(f"{count} {op}" for op, count in counts.most_common())
    inside = sum(node.graph is not model.graph for node in layers)
    where = f" ({inside} inside If/Loop/Scan bodies)" if inside else ""
    handled = [r for r in report.skipped if r.op_type in ops]
    why = (
        f"none of the {'/'.join(ops)} could be changed, e.g. {handled[0].op_type} "
        f"{handled[0].node!r}: {handled[0].detail}"
        if handled
        else f"{report.name} handles only {'/'.join(ops)}"
    )
    return f"WARNING: the model's weight layers are {found}{where}; {why}"


def group_by_weight(consumers: Iterable[Consumer], report: PassReport) -> list[SharedWeight]:
    """Gather consumers by weight; weights that are not plain float32 constants read only by
    supported consumers are skipped with the reason.

    A weight read by a node outside ``consumers`` stays float for all its readers: an encoded
    copy beside the float one would make the file larger, not smaller.
    """
    groups: dict[int, list[Consumer]] = {}
    values: dict[int, ir.Value] = {}
    for consumer in consumers:
        value = consumer.node.inputs[consumer.index]
        groups.setdefault(id(value), []).append(consumer)
        values[id(value)] = value
    shared = []
    for key, members in groups.items():
        value, nodes = values[key], [c.node for c in members]
        array = constant_array(value)
        claimed = {(id(c.node), c.index) for c in members}
        others = [use.node for use in value.uses() if (id(use.node), use.idx) not in claimed]
        if array is None or value.graph is None:
            skip_all(report, nodes, "weight is not a constant")
        elif value.is_graph_output():
            skip_all(report, nodes, f"weight {value.name!r} is also a graph output")
        elif array.dtype != np.float32:
            skip_all(report, nodes, f"weight {value.name!r} is {array.dtype}, not float32")
        elif others:
            reason = (
                f"weight {value.name!r} is also read by {_names(others)}, which keep the float "
                "weight: an encoded copy beside it would grow the file"
            )
            skip_all(report, nodes, reason)
        elif len({c.channel_axis % array.ndim for c in members}) > 1:
            reason = f"weight {value.name!r} is read with different layouts by {_names(nodes)}"
            skip_all(report, nodes, reason)
        else:
            shared.append(SharedWeight(value, array, members))
    return shared


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove a float initializer that its last consumer stopped reading: a saved model does
    not carry both copies of a weight (graph inputs and outputs stay)."""
    if (
        not value.uses()
        and graph.initializers.get(value.name) is value
        and value not in graph.inputs
        and value not in graph.outputs
    ):
        graph.initializers.pop(value.name)


def array_initializer(
    graph: ir.Graph, names: UniqueNames, wanted: str, array: np.ndarray
) -> ir.Value:
    """``array`` as a new initializer of its own element type (ml_dtypes' INT4 included)."""
    array = np.ascontiguousarray(array)
    return new_initializer(graph, names, wanted, array, ir.DataType.from_numpy(array.dtype))
