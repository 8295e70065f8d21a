"""Rewriting: a plan's factor nodes and weights swapped in for the original layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.graph_utils import UniqueNames, new_initializer, typed_attributes
from onnx_squeeze.passes.low_rank.plans import Candidate, Plan, Rank
from onnx_squeeze.records import mark_created


class Builder:
    """Makes the factor nodes and weights of one layer and swaps them in for the original."""

    def __init__(
        self, candidate: Candidate, graph: ir.Graph, names: UniqueNames, pass_name: str
    ) -> None:
        self.candidate, self.graph, self.names, self.pass_name = candidate, graph, names, pass_name
        self.source = candidate.name

    def weight(self, role: str, array: np.ndarray) -> ir.Value:
        dtype = self.candidate.dtype
        array = np.ascontiguousarray(array, dtype=dtype.numpy())
        wanted = f"{self.source}/lowrank_{role}.weight"
        return new_initializer(self.graph, self.names, wanted, array, dtype)

    def node(
        self,
        role: str,
        op: str,
        inputs: Sequence[ir.Value | None],
        attrs: dict[str, Any] | None = None,
    ) -> ir.Node:
        output = ir.Value(
            name=self.names.new(f"{self.source}/{role}_output"),
            type=ir.TensorType(self.candidate.dtype),
        )
        node = ir.Node(
            "",
            op,
            inputs,
            typed_attributes(attrs or {}),
            outputs=[output],
            name=f"{self.source}/{role}",
        )
        mark_created(node, self.pass_name, source=self.candidate.node)
        return node

    def conv(
        self, role: str, x: ir.Value, kernel: np.ndarray, geometry: dict[str, Any] | None = None,
        *, bias: bool = False,
    ) -> ir.Node:  # fmt: skip
        attrs: dict[str, Any] = {"kernel_shape": kernel.shape[2:]}
        for key, value in (geometry or {}).items():
            if key == "auto_pad":
                if value not in ("NOTSET", ""):
                    attrs["auto_pad"] = value
            elif key != "pads" or (geometry or {}).get("auto_pad", "NOTSET") in ("NOTSET", ""):
                attrs[key] = value
        inputs = [x, self.weight(role.removeprefix("lowrank_"), kernel)]
        if bias:
            inputs += list(self.candidate.node.inputs[2:3])
        return self.node(role, "Conv", inputs, attrs)

    def replace(self, nodes: list[ir.Node]) -> None:
        """Swap the factor chain in; the last node takes over the original output value's name."""
        original, last = self.candidate.node, nodes[-1]
        old_output, new_output = original.outputs[0], last.outputs[0]
        self.names.used.discard(new_output.name)
        metadata = dict(original.metadata_props)
        metadata.update(last.metadata_props)
        last.metadata_props.clear()
        last.metadata_props.update(metadata)
        new_output.metadata_props.update(old_output.metadata_props)
        ir.convenience.replace_nodes_and_values(
            self.graph, original, [original], nodes, [old_output], [new_output]
        )


def factorize_layer(
    model: ir.Model, plan: Plan, rank: Rank, names: UniqueNames, pass_name: str = "low_rank"
) -> list[ir.Node]:
    """Replace the plan's layer by its factors at ``rank`` (the plan must be decomposed)."""
    node = plan.candidate.node
    if not node.name:
        node.name = names.new(f"{node.op_type}_lowrank")
    builder = Builder(plan.candidate, model.graph, names, pass_name)
    nodes = plan.build(rank, builder)
    builder.replace(nodes)
    return nodes
