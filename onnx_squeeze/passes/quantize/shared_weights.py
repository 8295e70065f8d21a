"""Constant weights that weight-only passes encode once for every node that reads them.

A weight shared by several nodes is encoded once for all of them (GPTQ then sums their input
Hessians); a weight that some other op also reads is left alone and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, constant_array, new_initializer
from onnx_squeeze.records import PassReport


@dataclasses.dataclass
class Consumer:
    """One node reading a weight, and how: where the weight sits, which axis is the output
    channel axis, and for Gemm the constant it scales by and the bias it adds."""

    node: ir.Node
    index: int
    channel_axis: int
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


def in_subgraph(model: ir.Model, ops: Sequence[str], report: PassReport) -> None:
    """Report the candidate nodes inside If/Loop/Scan bodies, which the passes leave alone."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ops and node.graph is not model.graph and node.domain == "":
            report.skip(node, "inside a subgraph (If/Loop/Scan): left alone")


def group_by_weight(
    graph: ir.Graph, consumers: Iterable[Consumer], report: PassReport
) -> list[SharedWeight]:
    """Gather consumers by weight; weights that are not plain float32 initializers read only
    by supported consumers are skipped with the reason."""
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
        if array is None or not value.is_initializer() or value.graph is not graph:
            skip_all(report, nodes, "weight is not an initializer of the main graph")
        elif value.is_graph_output():
            skip_all(report, nodes, f"weight {value.name!r} is also a graph output")
        elif array.dtype != np.float32:
            skip_all(report, nodes, f"weight {value.name!r} is {array.dtype}, not float32")
        elif others:
            reason = f"weight {value.name!r} is also read by {_names(others)}"
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
