"""Structural checks of an untrusted model before any work: what would otherwise crash deep in
cloning, a pass or onnxruntime is refused here with one line that names the node or tensor.

Cheap by design (one walk over nodes and tensor headers, one shape inference without the
weights): cycles, values nothing defines, tensors whose data does not fill their dims, graph
inputs declared larger than this machine's memory, and tensors a run would make that are far
larger than the model (a 6.8 KB model with a 1 GiB ConstantOfShape peaked at 5.3 GB). Weight
values (NaN/Inf) are checked separately, by :func:`check_weights`, only where passes will
compute with them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from onnx_squeeze.errors import InputError, SettingsError
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
    check_tensor_sizes(model, where)


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
        size = math.prod(dims) * _itemsize(value.dtype)
        if limit and size > limit:
            raise InputError(
                f"{where}: input {value.name!r} is declared {value.shape} "
                f"({size / 2**30:.0f} GiB), more than this machine's memory; {_FIX}"
            )


# One tensor a run makes may hold this many times the model's weights and declared inputs
# together (at least TENSOR_FLOOR_BYTES, at most a quarter of the machine's memory).
# Real models stay far below: at batch 1 the widest activation of the real-model corpus and
# the zoo is at most 0.7 times of it (magika; a YOLO 0.37, ResNet-50 0.03).
# ONNX_SQUEEZE_MAX_TENSOR_BYTES sets the limit in bytes instead.
TENSOR_GROWTH = 64
TENSOR_FLOOR_BYTES = 512 * 2**20


def tensor_limit_bytes(model: ir.Model) -> int:
    """The largest tensor a run of ``model`` may make (see :data:`TENSOR_GROWTH`)."""
    setting = os.environ.get("ONNX_SQUEEZE_MAX_TENSOR_BYTES")
    if setting:
        try:
            return int(float(setting))
        except ValueError:
            raise SettingsError(
                f"ONNX_SQUEEZE_MAX_TENSOR_BYTES={setting!r}: give a number of bytes"
            ) from None
    weights = sum(tensor.nbytes for tensor in model_tensors(model))
    inputs = sum(_static_bytes(value) for value in model.graph.inputs)
    limit = max(TENSOR_FLOOR_BYTES, TENSOR_GROWTH * (weights + inputs))
    memory = _memory_bytes()
    return min(limit, memory // 4) if memory else limit


def _static_bytes(value: ir.Value) -> int:
    """Bytes of a value's known dims (symbolic ones counted as 1)."""
    if value.shape is None or value.dtype is None:
        return 0
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
    return math.prod(dims) * _itemsize(value.dtype)


def check_tensor_sizes(model: ir.Model, where: str, limit: int | None = None) -> None:
    """Refuse a model whose statically inferred tensors exceed :func:`tensor_limit_bytes`:
    a Reshape, Expand, Tile or ConstantOfShape to a huge constant shape would be made by
    constant folding and by every onnxruntime session, each a copy. Shapes inference cannot
    settle (symbolic dims) are bounded at run time instead (``runtime.BoundedSession``)."""
    limit = limit if limit is not None else tensor_limit_bytes(model)
    for name, dtype, dims, producer in _inferred_values(model):
        size = math.prod(dims) * _itemsize(dtype)
        if size <= limit:
            continue
        maker = f"node {_node_name(producer)!r} ({producer.op_type})"
        shape = "×".join(str(d) for d in dims)
        raise InputError(
            f"{where}: {maker} makes {name!r} of shape {shape} ({size / 2**30:.1f} GiB of "
            f"{dtype.name}), above the {limit / 2**30:.2f} GiB one tensor may hold for this "
            "model; if that is meant, set ONNX_SQUEEZE_MAX_TENSOR_BYTES=BYTES"
        )


# Integer initializers up to this size stay in the copy shape inference reads (shapes, axes,
# position tables); larger ones (INT8 weights) are left out like float weights.
_SHAPE_DATA_BYTES = 64 << 10


def _inferred_values(model: ir.Model) -> Iterator[tuple[str, ir.DataType, list[int], ir.Node]]:
    """(name, dtype, dims, producing node) of every value onnx's shape inference gives a
    shape, subgraphs included. Weights are left out of the inferred copy (their dims are
    enough; tensors are shared, not copied); small integer ones stay, as shapes may be read
    from them."""
    clone = model.clone()
    for graph in (clone.graph, *clone.graph.subgraphs()):
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or (tensor.dtype.is_integer() and tensor.nbytes <= _SHAPE_DATA_BYTES):
                continue
            value.shape, value.dtype = ir.Shape(tensor.shape), tensor.dtype
            value.const_value = None
            graph.initializers.pop(name)
            if value not in graph.inputs:
                graph.inputs.append(value)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            ir.to_proto(clone), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:  # onnx raises several types; what it cannot infer is bounded at run time
        return
    producers = {
        output.name: node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for output in node.outputs
        if output.name
    }
    for graph in _proto_graphs(inferred.graph):
        for info in (*graph.value_info, *graph.output):
            tensor_type = info.type.tensor_type
            if info.type.WhichOneof("value") != "tensor_type" or not tensor_type.HasField("shape"):
                continue
            # a symbolic or unknown dim counts as 1: the size is a lower bound
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
            if info.name not in producers:
                continue
            try:
                dtype = ir.DataType(tensor_type.elem_type)
            except ValueError:
                continue
            yield info.name, dtype, dims, producers[info.name]


def model_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor the model holds: initializers of every graph and tensor attributes
    (Constant nodes: some exporters keep all weights there)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _proto_graphs(subgraph)


def _itemsize(dtype: ir.DataType) -> int:
    """Bytes per element, 1 for strings (a lower bound) and sub-byte types."""
    try:
        return max(dtype.itemsize, 1)
    except TypeError:  # STRING has no fixed width
        return 1


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
