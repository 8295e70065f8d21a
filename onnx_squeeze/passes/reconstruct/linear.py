"""Linear layers seen as regressions: weights as (groups, features, outputs) matrices, rows for
the regression, biases read and written where the layer keeps them, and every constant written
so that it can be undone."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import scratch
from onnx_squeeze.graph_utils import UniqueNames, attribute, constant_array, set_input_constant
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.least_squares import conv_pads, im2col

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
SPARSE = 0.25  # share of exact zeros from which a layer's weights count as pruned
SPILL_BYTES = 2**20  # replaced constants this large wait on disk for an undo (:class:`Edits`)
_SPILLABLE = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


class Linear:
    """A Conv/Gemm/MatMul with a constant float weight, seen as ``groups`` regressions.

    It holds no array: :attr:`weight` reads the node's weight when asked. Float64 copies kept
    per planned layer held a ResNet-50's weights twice over (166 MiB more through recovery),
    and a reference to the planned array kept each replaced weight alive beside its refit."""

    channel_axis = -1
    groups = 1

    def __init__(self, layer: Layer) -> None:
        assert layer.array is not None
        self.node = layer.node
        self.shape = layer.shape
        self.output_axis = layer.output_axis

    @property
    def weight(self) -> np.ndarray:
        """The node's weight as it is now, in float64 (a new array each time)."""
        array = constant_array(self.node.inputs[1])
        assert array is not None
        return array.astype(np.float64)

    def matrix(self) -> np.ndarray:
        """Weights as (groups, features, outputs)."""
        raise NotImplementedError

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pick(
        self, shape: tuple[int, ...], rng: np.random.Generator, positions: int
    ) -> np.ndarray | None:
        """Which rows of a batch whose output has ``shape`` enter the regression (sorted
        indices; None: all): ``positions`` per sample, drawn from ``rng``. The same picks serve
        the teacher's targets and, a run later, the student's inputs."""
        rows = math.prod(shape[:-1])
        limit = positions * shape[0]
        if rows <= limit:
            return None
        return np.sort(rng.choice(rows, size=limit, replace=False))

    def inputs(self, x: np.ndarray, picked: np.ndarray | None) -> np.ndarray:
        """Regression rows (groups, n, features) of the layer's input ``x``."""
        x = x.reshape(-1, x.shape[-1])
        return (x if picked is None else x[picked])[None]

    def targets(self, y: np.ndarray, picked: np.ndarray | None) -> np.ndarray:
        """Regression targets (groups, n, outputs) of the layer's output ``y``."""
        return self.inputs(y, picked)

    @property
    def outputs(self) -> int:
        """Output channels (over all groups)."""
        assert self.output_axis is not None
        return self.shape[self.output_axis]

    @property
    def bias_slot(self) -> bool:
        """Whether the layer has, or can be given, a bias."""
        return True

    def bias_value(self) -> ir.Value | None:
        return self.node.inputs[2] if len(self.node.inputs) > 2 else None

    def bias_index(self) -> tuple[ir.Node, int]:
        return self.node, 2


class ConvLinear(Linear):
    channel_axis = 1

    def __init__(self, layer: Layer) -> None:
        super().__init__(layer)
        self.groups = layer.groups
        self.kernel = layer.kernel
        geometry = layer.geometry()
        self.strides, self.dilations = geometry["strides"], geometry["dilations"]
        self.pads, self.auto_pad = geometry["pads"], geometry["auto_pad"]

    def matrix(self) -> np.ndarray:
        flat = self.weight.reshape(self.groups, self.shape[0] // self.groups, -1)
        return flat.transpose(0, 2, 1)

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix.transpose(0, 2, 1).reshape(self.shape)

    def pick(self, shape, rng, positions):
        total = math.prod(shape[2:])
        return np.sort(rng.choice(total, size=min(positions, total), replace=False))

    def inputs(self, x, picked):
        pads = conv_pads(
            x.shape[2:], self.kernel, self.strides, self.dilations, self.pads, self.auto_pad
        )
        patches = im2col(x, self.kernel, self.strides, self.dilations, pads, picked)
        patches = patches.reshape(-1, self.groups, patches.shape[2] // self.groups)
        return np.ascontiguousarray(patches.transpose(1, 0, 2))

    def targets(self, y, picked):
        targets = y.reshape(y.shape[0], y.shape[1], -1)[:, :, picked].transpose(0, 2, 1)
        targets = targets.reshape(-1, self.groups, y.shape[1] // self.groups)
        return np.ascontiguousarray(targets.transpose(1, 0, 2))

    @property
    def pointwise(self) -> bool:
        return (
            self.groups == 1
            and all(k == 1 for k in self.kernel)
            and all(s == 1 for s in self.strides)
            and not any(self.pads or [])
            and self.auto_pad in ("NOTSET", "VALID")
        )


class GemmLinear(Linear):
    def __init__(self, layer: Layer) -> None:
        super().__init__(layer)
        # The weight is stored (outputs, features): Gemm with transB.
        self.transposed = layer.reduction_axes != (0,)

    def matrix(self) -> np.ndarray:
        weight = self.weight
        return (weight.T if self.transposed else weight)[None]

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix[0].T if self.transposed else matrix[0]


class MatMulLinear(Linear):
    """MatMul by a constant 2-D weight; a following Add of a constant vector is its bias."""

    def __init__(self, layer: Layer, bias_add: ir.Node | None) -> None:
        super().__init__(layer)
        self.bias_add = bias_add

    def matrix(self) -> np.ndarray:
        return self.weight[None]

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        return matrix[0]

    @property
    def bias_slot(self) -> bool:
        return self.bias_add is not None

    def bias_value(self) -> ir.Value | None:
        return self.bias_add.inputs[self._bias_input()] if self.bias_add else None

    def bias_index(self) -> tuple[ir.Node, int]:
        assert self.bias_add is not None
        return self.bias_add, self._bias_input()

    def _bias_input(self) -> int:
        assert self.bias_add is not None
        return 0 if self.bias_add.inputs[1] is self.node.outputs[0] else 1


def is_sparse(linear: Linear) -> bool:
    return float(np.mean(linear.weight == 0)) >= SPARSE


def _matmul_bias_add(node: ir.Node) -> ir.Node | None:
    """The Add that adds a constant vector to this MatMul's output (its only use), if any."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    bias = constant_array(other)
    columns = node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None
    if bias is None or bias.size != columns or bias.shape[-1:] != (columns,):
        return None
    return add


def linear_of(node: ir.Node) -> tuple[Linear | None, str | None]:
    """The regression view of ``node``, or None and why it cannot be refitted."""
    if node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None, f"{node.op_type} is not a Conv, Gemm or MatMul"
    layer = Layer.of(node)
    if isinstance(layer, NotLayer):
        return None, layer.reason
    if layer.left:
        return None, "the weight is the first operand (only X·W is refitted)"
    if layer.quantized:
        return None, "weight is quantized"
    if layer.weight.dtype not in _FLOATS:
        return None, f"weight is {layer.weight.dtype}, not float"
    if layer.shared:
        return None, "weight is shared with another node"
    if node.op_type == "Conv":
        return ConvLinear(layer), None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
            return None, "Gemm with transA or alpha != 1"
        if attribute(node, "beta", 1.0) != 1.0 and len(node.inputs) > 2:
            return None, "Gemm with beta != 1"
        return GemmLinear(layer), None
    if len(layer.shape) != 2:
        return None, "MatMul weight is not 2-D"
    return MatMulLinear(layer, _matmul_bias_add(node)), None


class _Spilled:
    """A replaced constant kept on disk until an undo reads it back."""

    def __init__(self, tensor: ir.TensorProtocol, path: str) -> None:
        np.save(path, tensor.numpy())
        self.path, self.dtype, self.name = path, tensor.dtype, tensor.name

    def tensor(self) -> ir.Tensor:
        return ir.tensor(np.load(self.path), dtype=self.dtype, name=self.name)


class Edits:
    """Constant replacements made so far, so that they can be undone as a whole.

    Replaced float constants of ``SPILL_BYTES`` or more that the teacher does not hold too
    wait in a scratch folder, read back only to undo: held in memory, every refit weight was
    there twice (recovery of a ResNet-50 after weight pruning grew by 90 MiB over its waves)."""

    def __init__(self, model: ir.Model, teacher: ir.Model) -> None:
        self.graph = model.graph
        self.names = UniqueNames(model)
        self.teacher_tensors = {id(v.const_value) for v in teacher.graph.initializers.values()}
        self.undo_log: list[tuple[ir.Node, int, ir.Value | None, Any, Any, Any]] = []
        self.folder = scratch.folder("undo")  # removed with this object

    def _kept(self, tensor: ir.TensorProtocol | None) -> Any:
        if (
            tensor is None
            or tensor.nbytes < SPILL_BYTES
            or tensor.dtype not in _SPILLABLE
            or id(tensor) in self.teacher_tensors
        ):
            return tensor
        return _Spilled(tensor, os.path.join(self.folder.name, f"{len(self.undo_log)}.npy"))

    def set(self, node: ir.Node, index: int, array: np.ndarray, dtype: ir.DataType, role: str):
        old = node.inputs[index] if index < len(node.inputs) else None
        state = (None,) * 3 if old is None else (self._kept(old.const_value), old.shape, old.dtype)
        self.undo_log.append((node, index, old, *state))
        array = array.astype(dtype.numpy())
        set_input_constant(node, index, array, dtype, f"{node.name}.{role}", self.graph, self.names)

    def undo(self) -> None:
        for node, index, old, const, shape, dtype in reversed(self.undo_log):
            const = const.tensor() if isinstance(const, _Spilled) else const
            current = node.inputs[index]
            if old is not None and current is old:
                old.const_value, old.shape, old.dtype = const, shape, dtype
            else:
                node.replace_input_with(index, old)
        self.undo_log.clear()


def bias_array(node: ir.Node, linear: Linear | None) -> np.ndarray | None:
    """The float bias of a layer (quantized INT32 biases dequantized), None when it has none."""
    value = linear.bias_value() if linear else (node.inputs[2] if len(node.inputs) > 2 else None)
    if value is None:
        return None
    array = constant_array(value)
    if array is not None:
        return array.astype(np.float64).reshape(-1) if value.dtype in _FLOATS else None
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    integers, scale = constant_array(producer.inputs[0]), constant_array(producer.inputs[1])
    if integers is None or scale is None or integers.dtype != np.int32:
        return None
    return integers.astype(np.float64) * scale.astype(np.float64)


def write_bias(
    edits: Edits, node: ir.Node, linear: Linear | None, bias: np.ndarray, dtype: ir.DataType
) -> None:
    """Store a new bias where the layer keeps it (a float constant or an INT32 DequantizeLinear)."""
    target, index = linear.bias_index() if linear else (node, 2)
    value = target.inputs[index] if index < len(target.inputs) else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        scale = constant_array(producer.inputs[1]).astype(np.float64)
        integers = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        edits.set(producer, 0, integers, ir.DataType.INT32, "bias_quantized")
        return
    if value is not None and value.const_value is not None:
        bias = bias.reshape(value.const_value.shape)
        dtype = value.dtype
    edits.set(target, index, bias, dtype, "bias")


def current(linear: Linear, node: ir.Node) -> np.ndarray:
    """The layer's weights with its bias as last feature row (when it can have one)."""
    matrix = linear.matrix()
    if not linear.bias_slot:
        return matrix
    bias = bias_array(node, linear)
    bias = np.zeros(matrix.shape[0] * matrix.shape[2]) if bias is None else bias
    return np.concatenate([matrix, bias.reshape(matrix.shape[0], 1, -1)], axis=1)
