"""Structural checks of an untrusted model before any work: what would otherwise crash deep in
cloning, a pass or onnxruntime is refused here with one line that names the node or tensor.

Cheap by design (one walk over nodes and tensor headers): cycles, values nothing defines,
tensors whose data does not fill their dims, graph inputs declared larger than this machine's
memory. Weight values (NaN/Inf) are checked separately, by :func:`check_weights`, only where
passes will compute with them.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx_ir as ir

from onnx_squeeze.errors import InputError
from onnx_squeeze.layers import Layer

_FIX = "re-export the model"


def check_structure(model: ir.Model, where: str) -> None:
    """Raise :class:`InputError` naming the first structural problem of ``model``."""
    if model.ir_version is not None and model.ir_version < 4:
        # IR 3 wants every initializer among the graph inputs, which no pass keeps up; IR 4
        # reads the same graph and lets initializers stand alone.
        model.ir_version = 4
    for graph in (model.graph, *model.graph.subgraphs()):
        _check_text(graph, where)
        _check_defined(graph, where)
        _check_acyclic(graph, where)
        _check_tensors(graph, where)
    _check_declared_inputs(model, where)


def _node_name(node: ir.Node) -> str:
    return node.name or f"{node.op_type} producing {node.outputs[0].name!r}"


def _check_text(graph: ir.Graph, where: str) -> None:
    """Names and op types that are not text: protobuf hands back bytes for invalid UTF-8."""
    for index, node in enumerate(graph):
        names = [node.op_type, node.domain, node.name or ""]
        names += [value.name or "" for value in (*node.inputs, *node.outputs) if value is not None]
        if not all(isinstance(name, str) for name in names):
            raise InputError(
                f"{where}: node {index} of graph {graph.name!r} has a name or op type that is "
                f"not valid UTF-8: the file is corrupt; {_FIX}"
            )


def _check_defined(graph: ir.Graph, where: str) -> None:
    for node in graph:
        for value in node.inputs:
            if value is None or value.producer() is not None:
                continue
            if not (value.is_graph_input() or value.is_initializer()):
                raise InputError(
                    f"{where}: node {_node_name(node)!r} reads {value.name!r}, which no node, "
                    f"input or initializer defines; {_FIX}"
                )


def _check_acyclic(graph: ir.Graph, where: str) -> None:
    """Kahn's algorithm over the graph's own nodes: a node left over sits on a cycle."""
    nodes = list(graph)
    members = {id(node) for node in nodes}
    waiting = {}
    readers: dict[int, list[ir.Node]] = {}
    for node in nodes:
        producers = {
            id(value.producer())
            for value in node.inputs
            if value is not None and id(value.producer()) in members
        }
        waiting[id(node)] = len(producers)
        for producer in producers:
            readers.setdefault(producer, []).append(node)
    ready = [node for node in nodes if waiting[id(node)] == 0]
    done = 0
    while ready:
        node = ready.pop()
        done += 1
        for reader in readers.get(id(node), ()):
            waiting[id(reader)] -= 1
            if waiting[id(reader)] == 0:
                ready.append(reader)
    if done < len(nodes):
        stuck = next(node for node in nodes if waiting[id(node)] > 0)
        raise InputError(
            f"{where}: node {_node_name(stuck)!r} is on a cycle (it depends on its own output); "
            f"{_FIX}"
        )


def _check_tensors(graph: ir.Graph, where: str) -> None:
    """Inline tensors whose bytes do not match their type and dims (external ones are checked
    by ``model_io.check_external_data``)."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.TensorProtoTensor):
            continue
        try:
            tensor.numpy()  # a view of raw_data: no copy
        except (ValueError, AssertionError):
            dims = "×".join(str(d) for d in tensor.shape)
            raise InputError(
                f"{where}: initializer {value.name!r}: its data does not fill its declared "
                f"shape {dims} of {tensor.dtype.name}; {_FIX}"
            ) from None


def _check_declared_inputs(model: ir.Model, where: str) -> None:
    """Graph inputs whose static dims alone need more memory than this machine has."""
    limit = _memory_bytes()
    for value in model.graph.inputs:
        if value.shape is None or value.dtype is None or value.is_initializer():
            continue
        # Paddle and others write -1 for a dynamic dimension: only positive ones count
        dims = [d for d in value.shape if isinstance(d, int) and d > 0]
        size = math.prod(dims) * max(value.dtype.itemsize, 1)
        if limit and size > limit:
            raise InputError(
                f"{where}: input {value.name!r} is declared {value.shape} "
                f"({size / 2**30:.0f} GiB), more than this machine's memory; {_FIX}"
            )


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_weights(model: ir.Model) -> None:
    """Refuse weight layers whose weights hold NaN or Inf: every pass would compute garbage
    from them (scales, Grams, norms) or crash. Constants elsewhere may hold -inf (masks)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        layer = Layer.of(node)
        array = getattr(layer, "array", None)
        if array is None or array.dtype.kind != "f":
            continue
        if not np.isfinite(array).all():
            raise InputError(
                f"node {_node_name(node)!r}: its weight holds NaN or Inf values; fix the export "
                "or the training that produced them"
            )
