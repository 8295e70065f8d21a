"""Per-node parameters, multiply-accumulates (MACs) and weight sparsity, with model totals.

MACs are counted from concrete shapes: symbolic input dimensions are set from the caller's
``shapes`` (:mod:`onnx_squeeze.shapes`: never guessed; MACs are unknown without them), and onnx
shape inference with data propagation runs on a clone of
the model, with its large initializers turned into typed graph inputs, so that the caller's model
is never modified and large models are not serialized with their weights.

What counts as a MAC (one multiply and one add):

- Conv / ConvInteger / QLinearConv / FusedConv: ``output elements * (Cin / groups) * prod(kernel)``.
- ConvTranspose: ``input elements * (Cout / groups) * prod(kernel)``.
- Gemm / QGemm / FusedGemm: ``M * N * K``.
- MatMul / MatMulInteger / QLinearMatMul / FusedMatMul, with a constant operand or between two
  activations (attention scores): ``prod(broadcast batch dims) * M * N * K``.
- MatMulNBits: ``prod(A.shape[:-1]) * N * K``.
- Attention (opset 23): ``batch * q_heads * q_len * kv_len * (qk_head_size + v_head_size)``.
- Einsum with two or more operands: the product of the sizes of all its subscripts.
- LSTM / GRU / RNN / DynamicQuantizeLSTM: ``steps * batch * directions * gates * hidden *
  (input + hidden)`` (4, 3 and 1 gates).

Biases, activations, normalizations and elementwise ops count no MACs. A node with a MAC formula
whose shapes cannot be inferred gets 0 and is named in :attr:`ModelSummary.unknown_macs`.
Nodes inside subgraphs (If/Loop/Scan) are counted once, not per loop iteration; nodes inside
model-local functions are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnx_squeeze import scratch
from onnx_squeeze.shapes import Shape, display_dims, resolve_input_shapes

__all__ = [
    "MAC_OPS",
    "RECURRENT_GATES",
    "ModelSummary",
    "NodeCost",
    "analyze",
    "node_macs",
    "value_shapes",
]

ShapeOf = Callable[["ir.Value | None"], "Shape | None"]

# Initializers larger than this are fed to shape inference as typed inputs, without their data.
_INLINE_TENSOR_BYTES = 1024

# op type -> (weight input indices in order of preference, bias input index or None)
_WEIGHT_INPUTS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "Conv": ((1,), 2),
    "FusedConv": ((1,), 2),
    "ConvInteger": ((1,), None),
    "QLinearConv": ((3,), 8),
    "ConvTranspose": ((1,), 2),
    "Gemm": ((1, 0), 2),
    "FusedGemm": ((1, 0), 2),
    "QGemm": ((3, 0), 6),
    "MatMul": ((1, 0), None),
    "FusedMatMul": ((1, 0), None),
    "MatMulInteger": ((1, 0), None),
    "QLinearMatMul": ((3, 0), None),
    "MatMulNBits": ((1,), 5),
    "Einsum": ((1, 0), None),
}
MAC_OPS = frozenset(_WEIGHT_INPUTS) | {"Attention"}

# Ops a constant weight may pass through on its way to the node that uses it.
_WEIGHT_PATH_OPS = frozenset(
    {"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
)
_DEQUANTIZE_OPS = frozenset({"DequantizeLinear", "QuantizeLinear"})


@dataclasses.dataclass
class NodeCost:
    """Parameters and MACs of one node.

    ``params`` counts the elements of the node's constant weight and bias (for ops without a
    MAC formula: of its floating-point constant inputs, e.g. BatchNormalization's statistics).
    A weight reached through DequantizeLinear (QDQ models) is the quantized initializer.
    ``sparsity`` is the share of exact zeros in that weight (quantized values equal to their
    zero point), None when the node has no constant weight.
    """

    name: str
    op_type: str
    params: int
    macs: int
    weight: str | None = None
    weight_shape: tuple[int, ...] | None = None
    sparsity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        data = dataclasses.asdict(self)
        data["weight_shape"] = list(self.weight_shape) if self.weight_shape is not None else None
        return data


@dataclasses.dataclass
class ModelSummary:
    """What a model holds and costs.

    ``params`` counts every numeric initializer and Constant tensor once (shared ones included
    once; MatMulNBits' packed weights count as ``N * K``). ``initializer_bytes`` is their size in
    memory. ``size_bytes`` is the file on disk with its external data, when the path is known.
    ``sparsity`` is the share of exact zeros over the unique weights of MAC ops (Conv, Gemm,
    MatMul families). ``input_shapes`` are the concrete shapes MACs were counted for; ``macs`` is
    None when an input dimension was given by nothing (the hint is in ``notes``).
    """

    nodes: list[NodeCost]
    params: int
    macs: int | None
    op_histogram: dict[str, int]
    inputs: list[tuple[str, str, tuple[int | str, ...]]]
    outputs: list[tuple[str, str, tuple[int | str, ...]]]
    opsets: dict[str, int]
    ir_version: int | None
    producer: str
    size_bytes: int | None
    initializer_bytes: int
    sparsity: float
    unknown_macs: list[str] = dataclasses.field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists)."""
        return {
            "params": self.params,
            "macs": self.macs,
            "size_bytes": self.size_bytes,
            "initializer_bytes": self.initializer_bytes,
            "sparsity": self.sparsity,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "opsets": dict(self.opsets),
            "inputs": [_io_dict(item) for item in self.inputs],
            "outputs": [_io_dict(item) for item in self.outputs],
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "op_histogram": dict(self.op_histogram),
            "unknown_macs": list(self.unknown_macs),
            "notes": list(self.notes),
            "nodes": [node.to_dict() for node in self.nodes],
        }


def _io_dict(item: tuple[str, str, tuple[int | str, ...]]) -> dict[str, Any]:
    name, dtype, shape = item
    return {"name": name, "dtype": dtype, "shape": list(shape)}


# ---------------------------------------------------------------------------------------------
# Shapes


def _is_dim_known(dim: object) -> bool:
    return isinstance(dim, int) and dim >= 0


def _static(shape: ir.Shape | Sequence[object] | None) -> Shape | None:
    if shape is None:
        return None
    dims = tuple(shape)
    if all(_is_dim_known(d) for d in dims):
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return None


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return str(np.dtype(dtype.numpy()))
    except (TypeError, ValueError, NotImplementedError):
        return dtype.name.lower()


def _collect_proto_shapes(graph: onnx.GraphProto, into: dict[str, tuple[int | None, ...]]) -> None:
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        into[info.name] = tuple(  # Paddle's exporters write -1 for a dimension they do not know
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in info.type.tensor_type.shape.dim
        )
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _collect_proto_shapes(attribute.g, into)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _collect_proto_shapes(subgraph, into)


def value_shapes(
    model: ir.Model, input_shapes: Mapping[str, Shape]
) -> dict[str, tuple[int | None, ...]]:
    """Shapes of every value, from onnx shape inference on a clone with concrete inputs."""
    clone = model.clone()
    for value in clone.graph.inputs:
        if value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
    input_set = set(clone.graph.inputs)
    for name, value in list(clone.graph.initializers.items()):
        tensor = value.const_value
        if tensor is not None and (
            tensor.nbytes <= _INLINE_TENSOR_BYTES or not tensor.dtype.is_floating_point()
        ):
            continue  # small or integer (shape data, position ids): inference may read it
        if tensor is not None:
            value.shape = ir.Shape(tensor.shape)
            value.dtype = tensor.dtype
        value.const_value = None
        clone.graph.initializers.pop(name)
        if value not in input_set and value.dtype is not None:
            clone.graph.inputs.append(value)
    proto = ir.to_proto(clone)
    inferred = onnx.shape_inference.infer_shapes(
        proto, check_type=False, strict_mode=False, data_prop=True
    )
    shapes: dict[str, tuple[int | None, ...]] = {}
    _collect_proto_shapes(inferred.graph, shapes)
    if any(None in shape for shape in shapes.values()):
        _fill_from_symbolic_inference(proto, shapes)
    return shapes


@functools.cache
def symbolic_shape_inference() -> type:
    """onnxruntime's ``SymbolicShapeInference``, loaded from its file: the package that holds it
    (``onnxruntime.tools``) imports PyTorch where it is installed, 1.5 s of a process's start
    against 0.35 s for the file alone."""
    found = importlib.util.find_spec("onnxruntime")
    path = Path(found.origin).parent / "tools" / "symbolic_shape_infer.py" if found else None
    if path is None or not path.is_file():
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference
    name = "onnx_squeeze._symbolic_shape_infer"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module.SymbolicShapeInference


def _fill_from_symbolic_inference(
    proto: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...]]
) -> None:
    """Fill dims onnx's inference left unknown using onnxruntime's symbolic shape inference.

    onnx's data propagation stops at patterns exporters emit for transformers (position ids
    sliced by a length read from the input's shape); onnxruntime's tool was written for them.
    It fails on some graphs (unknown ops), and needs sympy (onnxruntime's ``symbolic`` extra):
    then the onnx result stands.
    """
    try:
        inference = symbolic_shape_inference()
    except ImportError:
        return

    # When it cannot infer every shape, the tool saves its partial model with external data in
    # the current folder (sym_shape_infer_temp.onnx and a uuid.data): keep that out of the
    # user's folder.
    here = os.getcwd()
    with scratch.folder("shapes") as folder:
        os.chdir(folder)
        try:
            inferred = inference.infer_shapes(proto, auto_merge=True)
        except Exception:  # a best-effort refinement, never fatal
            return
        finally:
            os.chdir(here)
    found: dict[str, tuple[int | None, ...]] = {}
    _collect_proto_shapes(inferred.graph, found)
    for name, shape in found.items():
        known = shapes.get(name)
        if None not in shape and (known is None or None in known):
            shapes[name] = shape


def _make_shape_of(
    inferred: Mapping[str, tuple[int | None, ...]], input_shapes: Mapping[str, Shape]
) -> ShapeOf:
    def shape_of(value: ir.Value | None) -> Shape | None:
        if value is None:
            return None
        tensor = _const_tensor(value)
        if tensor is not None:
            return tuple(int(d) for d in tensor.shape)
        if value.name in input_shapes:
            return tuple(input_shapes[value.name])
        found = _static(inferred.get(value.name))  # type: ignore[arg-type]
        if found is not None:
            return found
        if value.name not in inferred:
            # Shape inference said nothing (unknown op): trust a static annotation if present.
            return _static(value.shape)
        return None

    return shape_of


# ---------------------------------------------------------------------------------------------
# Constants and weights


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _trace_weight(
    value: ir.Value | None,
) -> tuple[ir.Value, ir.TensorProtocol, ir.Node | None] | None:
    """The constant behind a node input: (its value, tensor, the DequantizeLinear on the way)."""
    dequantize = None
    for _ in range(8):
        if value is None:
            return None
        tensor = _const_tensor(value)
        if tensor is not None:
            return value, tensor, dequantize
        producer = value.producer()
        if producer is None or not producer.inputs:
            return None
        if producer.op_type == "DequantizeLinear" and dequantize is None:
            dequantize = producer
        elif producer.op_type not in _WEIGHT_PATH_OPS:
            return None
        value = producer.inputs[0]
    return None


def _is_numeric(dtype: ir.DataType | None) -> bool:
    return dtype is not None and (dtype.is_floating_point() or dtype.is_integer())


def _zero_count(tensor: ir.TensorProtocol, dequantize: ir.Node | None) -> int | None:
    """Elements of a weight that are exactly zero (after dequantization), None if unknown."""
    try:
        array = np.asarray(tensor.numpy())
        zero: Any = 0
        if dequantize is not None and len(dequantize.inputs) > 2:
            zp_tensor = _const_tensor(dequantize.inputs[2])
            if zp_tensor is not None:
                zero = _broadcast_zero_point(np.asarray(zp_tensor.numpy()), array, dequantize)
                if zero is None:
                    return None
        return int(np.count_nonzero(array == zero))
    except (TypeError, ValueError, NotImplementedError, OSError):
        # Unreadable data (e.g. external data that is not where the model says): no sparsity.
        return None


def _broadcast_zero_point(zp: np.ndarray, array: np.ndarray, node: ir.Node) -> Any:
    if zp.size == 1:
        return zp.reshape(()).astype(array.dtype)
    axis = node.attributes.get_int("axis", 1)
    axis = axis + array.ndim if axis < 0 else axis
    if zp.ndim == 1 and 0 <= axis < array.ndim and zp.shape[0] == array.shape[axis]:
        shape = [1] * array.ndim
        shape[axis] = zp.shape[0]
        return zp.reshape(shape).astype(array.dtype)
    block = node.attributes.get_int("block_size", 0)
    if zp.ndim == array.ndim and block > 0 and 0 <= axis < array.ndim:
        expanded = np.repeat(zp, block, axis=axis)
        expanded = np.take(expanded, np.arange(array.shape[axis]), axis=axis)
        if expanded.shape == array.shape:
            return expanded.astype(array.dtype)
    return None


def _tensor_params(tensor: ir.TensorProtocol, node: ir.Node | None = None) -> int:
    if node is not None and node.op_type == "MatMulNBits":
        n = node.attributes.get_int("N", 0)
        k = node.attributes.get_int("K", 0)
        if n and k:
            return n * k
    return int(math.prod(tensor.shape))


# ---------------------------------------------------------------------------------------------
# MACs


def _matmul_macs(a: Shape, b: Shape, *, trans_a: bool = False, trans_b: bool = False) -> int | None:
    if not a or not b:
        return None
    a_batch: Shape = ()
    b_batch: Shape = ()
    if len(a) == 1:
        m, k = 1, a[0]
    else:
        m, k = (a[-1], a[-2]) if trans_a else (a[-2], a[-1])
        a_batch = a[:-2]
    if len(b) == 1:
        n = 1
    else:
        n = b[-2] if trans_b else b[-1]
        b_batch = b[:-2]
    try:
        batch = np.broadcast_shapes(a_batch, b_batch)
    except ValueError:
        return None
    return int(math.prod(batch)) * m * n * k


def _einsum_macs(node: ir.Node, shape_of: ShapeOf) -> int | None:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    operands = equation.split("->")[0].split(",")
    if len(operands) < 2:
        return 0
    if "..." in equation or len(operands) != len(node.inputs):
        return None
    sizes: dict[str, int] = {}
    for letters, value in zip(operands, node.inputs, strict=True):
        shape = shape_of(value)
        if shape is None or len(shape) != len(letters):
            return None
        for letter, size in zip(letters, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return int(math.prod(sizes.values()))


def _attention_macs(node: ir.Node, shape_of: ShapeOf) -> int | None:
    q, k, v = (shape_of(node.inputs[i]) if len(node.inputs) > i else None for i in range(3))
    if q is None or k is None or v is None:
        return None
    past = shape_of(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    if len(q) == 4 and len(k) == 4 and len(v) == 4:
        batch, q_heads, q_len, head = q
        kv_len = k[2] + (past[2] if past is not None else 0)
        return batch * q_heads * q_len * kv_len * (head + v[3])
    if len(q) == 3 and len(k) == 3 and len(v) == 3:
        q_heads = node.attributes.get_int("q_num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        if not q_heads or not kv_heads:
            return None
        batch, q_len, q_hidden = q
        kv_len = k[1] + (past[2] if past is not None else 0)
        return batch * q_len * kv_len * (q_hidden + v[2] * q_heads // kv_heads)
    return None


# Recurrent layers: gates computed per step (onnxruntime's DynamicQuantizeLSTM keeps the LSTM's
# attributes). Counted as 0 before, an LSTM model's MACs ratio was 0/0 (tashkeel).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}


def _recurrent_macs(node: ir.Node, shape_of: ShapeOf) -> int | None:
    """Steps x batch x directions x gates x hidden x (input + hidden): each gate's products
    with the step's input and the previous hidden state."""
    x = shape_of(node.inputs[0]) if node.inputs else None
    # hidden_size is optional: else R's, [directions, gates * hidden, hidden] (onnxruntime's
    # DynamicQuantizeLSTM stores it transposed: [directions, hidden, gates * hidden])
    recurrence = shape_of(node.inputs[2]) if len(node.inputs) > 2 else None
    axis = 1 if node.op_type == "DynamicQuantizeLSTM" else -1
    hidden = node.attributes.get_int("hidden_size", 0) or (recurrence[axis] if recurrence else 0)
    if x is None or len(x) != 3 or not hidden:
        return None
    both = node.attributes.get_string("direction", "forward") == "bidirectional"
    gates = RECURRENT_GATES[node.op_type]
    return x[0] * x[1] * (2 if both else 1) * gates * hidden * (x[2] + hidden)


def node_macs(node: ir.Node, shape_of: ShapeOf) -> int | None:
    """MACs of one node given a function from values to concrete shapes.

    Returns 0 for ops without a MAC formula, None when the formula's shapes are unknown.
    """
    op = node.op_type
    if op in RECURRENT_GATES:
        return _recurrent_macs(node, shape_of)
    if op not in MAC_OPS:
        return 0

    def shape(index: int) -> Shape | None:
        return shape_of(node.inputs[index]) if len(node.inputs) > index else None

    if op in {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}:
        weight = shape(3 if op == "QLinearConv" else 1)
        out = shape_of(node.outputs[0])
        if weight is None or out is None or len(weight) < 2:
            return None
        return math.prod(out) * math.prod(weight[1:])
    if op == "ConvTranspose":
        x, weight = shape(0), shape(1)
        if x is None or weight is None or len(weight) < 2:
            return None
        return math.prod(x) * math.prod(weight[1:])
    if op in {
        "Gemm",
        "FusedGemm",
        "QGemm",
        "MatMul",
        "FusedMatMul",
        "MatMulInteger",
        "QLinearMatMul",
    }:
        a = shape(0)
        b = shape(3 if op in {"QGemm", "QLinearMatMul"} else 1)
        if a is None or b is None:
            return None
        trans_a = bool(node.attributes.get_int("transA", 0))
        trans_b = bool(node.attributes.get_int("transB", 0))
        if op in {"Gemm", "FusedGemm", "QGemm"} and (len(a) != 2 or len(b) != 2):
            return None
        return _matmul_macs(a, b, trans_a=trans_a, trans_b=trans_b)
    if op == "MatMulNBits":
        a = shape(0)
        n = node.attributes.get_int("N", 0)
        k = node.attributes.get_int("K", 0)
        if a is None or not n or not k:
            return None
        return math.prod(a[:-1]) * n * k
    if op == "Einsum":
        return _einsum_macs(node, shape_of)
    if op == "Attention" and node.domain in ("", "ai.onnx"):
        return _attention_macs(node, shape_of)
    return 0


# ---------------------------------------------------------------------------------------------
# The analysis


def _node_label(node: ir.Node, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _iter_constant_tensors(model: ir.Model):
    """(tensor, MatMulNBits consumer or None) for every initializer and Constant node."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is None:
                continue
            consumer = None
            for use in value.uses():
                if use.node.op_type == "MatMulNBits" and use.idx == 1:
                    consumer = use.node
            yield value.const_value, consumer
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = _const_tensor(node.outputs[0])
            if tensor is not None:
                yield tensor, None


def _file_size(model: ir.Model, path: str | os.PathLike | None) -> int | None:
    if path is None or not os.path.isfile(path):
        return None
    total = os.path.getsize(path)
    seen: set[str] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                data_path = os.path.abspath(tensor.path)
                if data_path not in seen and os.path.isfile(data_path):
                    seen.add(data_path)
                    total += os.path.getsize(data_path)
    return total


def _as_ir_model(model: Any) -> tuple[ir.Model, str | None]:
    if isinstance(model, ir.Model):
        return model, None
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model), None
    if isinstance(model, str | os.PathLike):
        return ir.load(os.fspath(model)), os.fspath(model)
    raise TypeError(
        f"expected an onnx_ir.Model, onnx.ModelProto or path, got {type(model).__name__}"
    )


def analyze(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    path: str | os.PathLike | None = None,
    batch: int | None = None,
    default_dim: int | None = None,
) -> ModelSummary:
    """Count parameters, MACs and weight sparsity per node and in total.

    ``shapes`` sets concrete input shapes (a symbolic first dimension otherwise becomes
    ``batch``, default 1; any other symbolic one ``default_dim`` if given). Where nothing gives a
    dimension, MACs are unknown (``macs`` None, the hint in ``notes``), never counted at an
    invented size. ``path`` is the model's file, for its size on disk. The model is not modified.
    """
    model, loaded_from = _as_ir_model(model)
    path = path if path is not None else loaded_from
    notes: list[str] = []
    resolved = resolve_input_shapes(model, shapes, batch=batch, default_dim=default_dim)
    input_shapes = {name: shape for name, shape in resolved.shapes.items() if None not in shape}
    if resolved.missing:
        notes.append(f"MACs unknown: {resolved.hint()}")
    try:
        inferred = value_shapes(model, input_shapes)
    except Exception as error:  # onnx raises several types; MACs then use the stored shapes.
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        notes.append(
            f"shape inference failed, MACs use the shapes stored in the model: {first_line}"
        )
        inferred = {}
    shape_of = _make_shape_of(inferred, input_shapes)

    nodes: list[NodeCost] = []
    unknown: list[str] = []
    histogram: Counter[str] = Counter()
    weight_zeros: dict[int, tuple[int, int]] = {}
    for index, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        histogram[node.op_type] += 1
        label = _node_label(node, index)
        macs = node_macs(node, shape_of)
        if macs is None:
            unknown.append(label)
        nodes.append(_node_cost(node, label, macs or 0, weight_zeros))

    params = 0
    initializer_bytes = 0
    for tensor, consumer in _iter_constant_tensors(model):
        if not _is_numeric(tensor.dtype):
            continue
        params += _tensor_params(tensor, consumer)
        initializer_bytes += int(tensor.nbytes)

    zeros = sum(z for z, _ in weight_zeros.values())
    elements = sum(n for _, n in weight_zeros.values())
    initializer_names = set(model.graph.initializers)
    return ModelSummary(
        nodes=nodes,
        params=params,
        macs=None if resolved.missing else sum(node.macs for node in nodes),
        op_histogram=dict(sorted(histogram.items(), key=lambda item: (-item[1], item[0]))),
        inputs=[
            (v.name, _dtype_name(v.dtype), display_dims(v.shape))
            for v in model.graph.inputs
            if v.name not in initializer_names
        ],
        outputs=[
            (v.name, _dtype_name(v.dtype), display_dims(v.shape)) for v in model.graph.outputs
        ],
        opsets=dict(model.opset_imports),
        ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        size_bytes=_file_size(model, path),
        initializer_bytes=initializer_bytes,
        sparsity=zeros / elements if elements else 0.0,
        unknown_macs=unknown,
        input_shapes=input_shapes,
        notes=notes,
    )


def _node_cost(
    node: ir.Node, label: str, macs: int, weight_zeros: dict[int, tuple[int, int]]
) -> NodeCost:
    """The cost record of a node: its weight, parameters and the weight's sparsity."""
    cost = NodeCost(label, node.op_type, 0, int(macs))
    op = node.op_type
    if op in _WEIGHT_INPUTS:
        weight_indices, bias_index = _WEIGHT_INPUTS[op]
        for weight_index in weight_indices:
            if weight_index >= len(node.inputs):
                continue
            traced = _trace_weight(node.inputs[weight_index])
            if traced is None:
                continue
            value, tensor, dequantize = traced
            cost.weight = value.name
            cost.weight_shape = tuple(int(d) for d in tensor.shape)
            cost.params += _tensor_params(tensor, node)
            if op != "MatMulNBits":
                key = id(value)
                if key not in weight_zeros:
                    zeros = _zero_count(tensor, dequantize)
                    if zeros is not None:
                        weight_zeros[key] = (zeros, int(math.prod(tensor.shape)))
                if key in weight_zeros:
                    zeros, count = weight_zeros[key]
                    cost.sparsity = zeros / count if count else 0.0
            break
        if bias_index is not None and bias_index < len(node.inputs):
            traced = _trace_weight(node.inputs[bias_index])
            if traced is not None:
                cost.params += _tensor_params(traced[1])
    elif op not in _WEIGHT_PATH_OPS and op not in _DEQUANTIZE_OPS and op != "Constant":
        for value in node.inputs:
            traced = _trace_weight(value)
            if traced is None:
                continue
            _, tensor, dequantize = traced
            if dequantize is not None or (
                tensor.dtype is not None and tensor.dtype.is_floating_point()
            ):
                cost.params += _tensor_params(tensor)
    return cost
