"""Evaluate an onnx-ir graph with PyTorch functional ops, so that its weights can be trained.

PyTorch is an optional dependency (``pip install 'onnx-squeeze[torch]'``): import this module
only after checking that torch is installed, as :mod:`onnx_squeeze.passes.finetune` does.

:class:`TorchGraph` runs the main graph node by node in eager mode (shapes come from the data,
so symbolic dimensions stay symbolic). The float initializers named as trainable become
``torch.nn.Parameter``\\ s keyed by initializer name; every other initializer is a constant.
:meth:`TorchGraph.write_back` puts the trained values into the onnx-ir model as new tensors
(the old ones are shared with the teacher and never written into).

The op set covers what exported CNNs and transformers use before quantization. A node outside it
(op, domain or attribute combination) is listed by :func:`unsupported_nodes` before anything runs,
or raises :class:`EvaluationError` naming the node when a limit shows only with data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnx_squeeze.graph_utils import UniqueNames, constant_array, set_input_constant

Tensor = torch.Tensor

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


class EvaluationError(Exception):
    """A node that the evaluator cannot compute; the message names the node and op."""


class _Unsupported(Exception):
    """Raised by an op implementation for an attribute combination it does not cover."""


class _Step:
    """One node with its attributes read once, and the opset its op is defined by."""

    def __init__(self, node: ir.Node, opset: int) -> None:
        self.node = node
        self.opset = opset
        self.attrs = {name: _attribute_value(attr) for name, attr in node.attributes.items()}

    def get(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def _attribute_value(attr: ir.Attr) -> Any:
    value = attr.value
    if attr.type == ir.AttributeType.TENSOR:
        return torch.tensor(value.numpy())
    return value


# ---------------------------------------------------------------------------------------------
# Padding helpers


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begins, ends) as F.pad's (last axis first) flat list."""
    pairs = [(int(b), int(e)) for b, e in zip(begins, ends, strict=True)]
    return [side for pair in reversed(pairs) for side in pair]


def _window_pads(
    step: _Step, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Begin and end pads of a Conv/Pool window from ``pads`` or ``auto_pad``."""
    rank = len(sizes)
    dilations = step.get("dilations", [1] * rank)
    auto_pad = step.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins, ends
    pads = [0] * (2 * rank) if auto_pad == "VALID" else step.get("pads", [0] * (2 * rank))
    return list(pads[:rank]), list(pads[rank:])


def _spatial(fns: Sequence[Callable], x: Tensor) -> Callable:
    rank = x.dim() - 2
    if not 1 <= rank <= len(fns):
        raise _Unsupported(f"{rank}-d spatial input")
    return fns[rank - 1]


# ---------------------------------------------------------------------------------------------
# Linear layers and normalization


def _conv(step: _Step, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    rank = x.dim() - 2
    strides = step.get("strides", [1] * rank)
    begins, ends = _window_pads(step, x.shape[2:], w.shape[2:], strides)
    padding: Any = begins
    if begins != ends:
        x, padding = F.pad(x, _torch_pad(begins, ends)), 0
    conv = _spatial((F.conv1d, F.conv2d, F.conv3d), x)
    return conv(x, w, b, strides, padding, step.get("dilations", [1] * rank), step.get("group", 1))


def _conv_transpose(step: _Step, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    if "output_shape" in step.attrs or step.get("auto_pad", "NOTSET") != "NOTSET":
        raise _Unsupported("output_shape/auto_pad")
    rank = x.dim() - 2
    conv = _spatial((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), x)
    y = conv(
        x,
        w,
        b,
        step.get("strides", [1] * rank),
        0,
        step.get("output_padding", [0] * rank),
        step.get("group", 1),
        step.get("dilations", [1] * rank),
    )
    pads = step.get("pads", [0] * (2 * rank))
    crop = [slice(None), slice(None)]
    crop += [slice(pads[i], y.shape[2 + i] - pads[rank + i]) for i in range(rank)]
    return y[tuple(crop)]


def _gemm(step: _Step, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.t() if step.get("transA", 0) else a
    b = b.t() if step.get("transB", 0) else b
    y = step.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + step.get("beta", 1.0) * c


def _batch_norm(step: _Step, x, scale, bias, mean, var) -> Tensor:
    if step.get("training_mode", 0):
        raise _Unsupported("training_mode=1")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, step.get("epsilon", 1e-5))


def _layer_norm(step: _Step, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    axis = step.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    variance = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(variance + step.get("epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


def _instance_norm(step: _Step, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=step.get("epsilon", 1e-5))


# ---------------------------------------------------------------------------------------------
# Element-wise


def _div(step: _Step, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _clip(step: _Step, x: Tensor, low: Tensor | None = None, high: Tensor | None = None):
    if step.opset < 11:
        low, high = step.get("min"), step.get("max")
    return torch.clamp(x, low, high)


def _hard_sigmoid(step: _Step, x: Tensor) -> Tensor:
    return torch.clamp(step.get("alpha", 0.2) * x + step.get("beta", 0.5), 0.0, 1.0)


def _gelu(step: _Step, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=step.get("approximate", "none"))


def _softmax_like(fn: Callable) -> Callable:
    def run(step: _Step, x: Tensor) -> Tensor:
        if step.opset >= 13:
            return fn(x, dim=step.get("axis", -1))
        axis = step.get("axis", 1) % x.dim()  # before opset 13: over the axes from ``axis`` on
        return fn(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)

    return run


def _unary(fn: Callable) -> Callable:
    return lambda step, x: fn(x)


def _binary(fn: Callable) -> Callable:
    return lambda step, a, b: fn(a, b)


def _variadic(fn: Callable) -> Callable:
    def run(step: _Step, *inputs: Tensor) -> Tensor:
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return result

    return run


# ---------------------------------------------------------------------------------------------
# Reductions and pooling


def _axes(step: _Step, given: Tensor | None) -> list[int] | None:
    """Axes from the optional input (newer opsets) or the attribute (older ones)."""
    if given is not None:
        return [int(a) for a in given.tolist()]
    return step.get("axes")


def _reduce(fn: Callable) -> Callable:
    def run(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = _axes(step, axes)
        if not dims:
            if step.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=tuple(dims), keepdim=bool(step.get("keepdims", 1)))

    return run


def _global_average_pool(step: _Step, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _ceil_mode_crop(
    step: _Step, y: Tensor, sizes: Sequence[int], begins: Sequence[int], ends: Sequence[int]
) -> Tensor:
    """Drop a last ceil-mode window that would start in the end padding, as onnxruntime does
    (torch cannot tell the padding we added from the input)."""
    kernel = step.get("kernel_shape")
    strides = step.get("strides", [1] * len(kernel))
    dilations = step.get("dilations", [1] * len(kernel))
    crop = [slice(None), slice(None)]
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begins, ends, strict=True):
        count = math.ceil((size + b + e - (k - 1) * d - 1) / s) + 1
        crop.append(slice(0, count - 1 if (count - 1) * s >= size + b else count))
    return y[tuple(crop)]


def _max_pool(step: _Step, x: Tensor) -> Tensor:
    kernel = step.get("kernel_shape")
    strides = step.get("strides", [1] * len(kernel))
    sizes = x.shape[2:]
    begins, ends = _window_pads(step, sizes, kernel, strides)
    padding: Any = begins
    if begins != ends or any(2 * p > k for p, k in zip(begins, kernel, strict=True)):
        x, padding = F.pad(x, _torch_pad(begins, ends), value=-math.inf), 0
    pool = _spatial((F.max_pool1d, F.max_pool2d, F.max_pool3d), x)
    dilations = step.get("dilations", [1] * len(kernel))
    ceil_mode = bool(step.get("ceil_mode", 0))
    y = pool(x, kernel, strides, padding, dilations, ceil_mode)
    return _ceil_mode_crop(step, y, sizes, begins, ends) if ceil_mode else y


def _average_pool(step: _Step, x: Tensor) -> Tensor:
    kernel = step.get("kernel_shape")
    strides = step.get("strides", [1] * len(kernel))
    begins, ends = _window_pads(step, x.shape[2:], kernel, strides)
    pool = _spatial((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), x)
    ceil_mode = bool(step.get("ceil_mode", 0))
    padding = _torch_pad(begins, ends)
    total = pool(F.pad(x, padding), kernel, strides, 0, ceil_mode, True)
    if not step.get("count_include_pad", 0) and any(padding):
        inside = F.pad(torch.ones_like(x[:1, :1]), padding)
        total = total / pool(inside, kernel, strides, 0, ceil_mode, True)
    return _ceil_mode_crop(step, total, x.shape[2:], begins, ends) if ceil_mode else total


# ---------------------------------------------------------------------------------------------
# Shapes and indexing


def _ints(tensor: Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _flatten(step: _Step, x: Tensor) -> Tensor:
    axis = step.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(step: _Step, x: Tensor, shape: Tensor) -> Tensor:
    dims = _ints(shape)
    if not step.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _transpose(step: _Step, x: Tensor) -> Tensor:
    return x.permute(step.get("perm", list(reversed(range(x.dim())))))


def _squeeze(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _axes(step, axes)
    if dims is None:
        return x.squeeze()
    return x.squeeze(tuple(d % x.dim() for d in dims)) if dims else x


def _unsqueeze(step: _Step, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _axes(step, axes)
    rank = x.dim() + len(dims)
    for axis in sorted(d % rank for d in dims):
        x = x.unsqueeze(axis)
    return x


def _concat(step: _Step, *inputs: Tensor) -> Tensor:
    return torch.cat(inputs, dim=step.get("axis"))


def _split(step: _Step, x: Tensor, split: Tensor | None = None) -> list[Tensor]:
    axis = step.get("axis", 0)
    sizes = _ints(split) if split is not None else step.get("split")
    if not sizes:
        parts = step.get("num_outputs", len(step.node.outputs))
        sizes = math.ceil(x.shape[axis] / parts)
    return list(torch.split(x, sizes, dim=axis))


def _slice(step: _Step, x: Tensor, *bounds: Tensor | None) -> Tensor:
    if step.opset < 10:
        starts, ends, axes, steps = step.get("starts"), step.get("ends"), step.get("axes"), None
    else:
        given = [*bounds, None, None][:4]
        starts, ends, axes, steps = (None if b is None else _ints(b) for b in given)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, stride in zip(starts, ends, axes, steps, strict=True):
        size = x.shape[axis]
        start, end = (v + size if v < 0 else v for v in (start, end))
        if stride > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        index = torch.arange(start, end, stride, device=x.device)
        x = x.index_select(axis % x.dim(), index)
    return x


def _gather(step: _Step, x: Tensor, indices: Tensor) -> Tensor:
    axis = step.get("axis", 0) % x.dim()
    index = indices.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1 :]))


def _shape(step: _Step, x: Tensor) -> Tensor:
    dims = list(x.shape)[step.get("start", 0) : step.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(step: _Step, x: Tensor) -> Tensor:
    target = ir.DataType(step.get("to"))
    if target not in _TORCH_DTYPES:
        raise _Unsupported(f"cast to {target.name}")
    return x.to(_TORCH_DTYPES[target])


def _constant(step: _Step) -> Tensor:
    for name, attr in step.attrs.items():
        if name == "value":
            return attr
        if name in ("value_float", "value_floats"):
            return torch.tensor(attr, dtype=torch.float32)
        if name in ("value_int", "value_ints"):
            return torch.tensor(attr, dtype=torch.int64)
    raise _Unsupported(f"Constant with attributes {sorted(step.attrs)}")


def _constant_of_shape(step: _Step, shape: Tensor) -> Tensor:
    fill = step.get("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype)


def _expand(step: _Step, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _where(step: _Step, condition: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(condition.bool(), a, b)


def _identity(step: _Step, x: Tensor, *rest: Tensor | None) -> Tensor:
    return x


def _range(step: _Step, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _resize(step: _Step, x: Tensor, *rest: Tensor | None) -> Tensor:
    scales, sizes = (rest[0], None) if step.opset < 11 else ((list(rest) + [None] * 3)[1:3])
    if "axes" in step.attrs or step.get("antialias", 0):
        raise _Unsupported("axes/antialias")
    if sizes is not None and sizes.numel():
        target: dict[str, Any] = {"size": _ints(sizes)[2:]}
        leading = _ints(sizes)[:2]
    else:
        factors = [float(s) for s in scales.reshape(-1).tolist()]
        target = {"scale_factor": factors[2:], "recompute_scale_factor": False}
        leading = [round(d * f) for d, f in zip(x.shape[:2], factors[:2], strict=True)]
    if leading != list(x.shape[:2]):
        raise _Unsupported("resizing the batch or channel axis")
    mode = step.get("mode", "nearest")
    transform = step.get("coordinate_transformation_mode", "half_pixel")
    rounding = step.get("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and (transform, rounding) == ("asymmetric", "floor"):
        return F.interpolate(x, mode="nearest", **target)
    if mode == "nearest" and (transform, rounding) == ("half_pixel", "round_prefer_ceil"):
        return F.interpolate(x, mode="nearest-exact", **target)
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        name = ("linear", "bilinear", "trilinear")[x.dim() - 3]
        return F.interpolate(x, mode=name, align_corners=transform == "align_corners", **target)
    raise _Unsupported(f"mode {mode} with {transform}/{rounding}")


def _pad(step: _Step, x: Tensor, *rest: Tensor | None) -> Tensor:
    mode = step.get("mode", "constant")
    if step.opset < 11:
        pads, fill, axes = step.get("pads"), step.get("value", 0.0), None
    else:
        pads_t, fill_t, axes_t = (list(rest) + [None] * 3)[:3]
        pads = _ints(pads_t)
        fill = fill_t.item() if fill_t is not None and fill_t.numel() else 0.0
        axes = _ints(axes_t) if axes_t is not None else None
    axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[len(axes) + i]
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    if mode not in modes:
        raise _Unsupported(f"mode {mode}")
    if mode != "constant":  # torch pads only the spatial axes in these modes
        if any(begins[:2] + ends[:2]):
            raise _Unsupported(f"{mode} padding of the batch or channel axis")
        return F.pad(x, _torch_pad(begins[2:], ends[2:]), mode=modes[mode])
    padding = _torch_pad(begins, ends)
    return F.pad(x, padding, value=fill)


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Softplus": _unary(F.softplus),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Not": _unary(torch.logical_not),
    "LeakyRelu": lambda step, x: F.leaky_relu(x, step.get("alpha", 0.01)),
    "Elu": lambda step, x: F.elu(x, step.get("alpha", 1.0)),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "GlobalAveragePool": _global_average_pool,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Where": _where,
    "Identity": _identity,
    "Dropout": _identity,
    "Range": _range,
    "Resize": _resize,
    "Pad": _pad,
}
# Ops whose extra outputs (masks, indices, saved statistics) the evaluator does not compute.
_GRAPH_ATTRIBUTES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
_FIRST_OUTPUT_ONLY = {"Dropout", "MaxPool", "BatchNormalization", "LayerNormalization"}


def unsupported_nodes(graph: ir.Graph) -> list[tuple[ir.Node, str]]:
    """Nodes the evaluator cannot run, each with the reason, before anything is computed."""
    problems = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            problems.append((node, f"op {node.domain or 'ai.onnx'}::{node.op_type}"))
        elif any(a.type in _GRAPH_ATTRIBUTES for a in node.attributes.values()):
            problems.append((node, f"{node.op_type} with a subgraph"))
        elif node.op_type in _FIRST_OUTPUT_ONLY and any(o.uses() for o in node.outputs[1:]):
            problems.append((node, f"{node.op_type} with its extra outputs used"))
    return problems


def trainable_value(value: ir.Value) -> bool:
    """A float32 initializer that is neither a graph input nor a graph output."""
    return (
        value.is_initializer()
        and value.dtype == ir.DataType.FLOAT
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def _last_uses(graph: ir.Graph, steps: Sequence[_Step]) -> dict[int, list[ir.Value]]:
    """The values each step reads for the last time (graph outputs are never freed)."""
    last: dict[ir.Value, int] = {}
    for index, step in enumerate(steps):
        for value in step.node.inputs:
            if value is not None:
                last[value] = index
    outputs = set(graph.outputs)
    freed: dict[int, list[ir.Value]] = {}
    for value, index in last.items():
        if value not in outputs:
            freed.setdefault(index, []).append(value)
    return freed


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


class TorchGraph:
    """The main graph of ``model`` as a differentiable torch function of its inputs.

    ``trainable`` names float32 initializers to train (as ``torch.nn.Parameter``\\ s in
    :attr:`parameters`, keyed by name); the other initializers are constants.
    """

    def __init__(self, model: ir.Model, trainable: Collection[str] = ()) -> None:
        self.model = model
        graph = model.graph
        problems = unsupported_nodes(graph)
        if problems:
            node, reason = problems[0]
            raise EvaluationError(f"node {node.name!r}: {reason} is not supported")
        opset = _opset(model)
        self._steps = [_Step(node, opset) for node in graph]
        self._last_uses = _last_uses(graph, self._steps)
        self._constants: dict[ir.Value, Tensor] = {}
        self.parameters: dict[str, torch.nn.Parameter] = {}
        self._trained_values: dict[str, ir.Value] = {}
        for name, value in graph.initializers.items():
            array = constant_array(value)
            if array is None:
                continue
            if name in trainable and trainable_value(value):
                self.parameters[name] = torch.nn.Parameter(torch.tensor(array))
                self._trained_values[name] = value
            else:
                self._constants[value] = torch.tensor(array)
        self._originals = {name: value.const_value for name, value in self._trained_values.items()}
        self._defaults = {  # inputs with an initializer as default value
            value.name: torch.tensor(value.const_value.numpy())
            for value in graph.inputs
            if value.const_value is not None
        }

    def __call__(self, feeds: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        """The graph outputs (by name) for ``feeds`` (arrays or tensors by input name)."""
        graph = self.model.graph
        env: dict[ir.Value, Tensor] = dict(self._constants)
        env.update((self._trained_values[name], p) for name, p in self.parameters.items())
        for value in graph.inputs:
            given = feeds.get(value.name, self._defaults.get(value.name))
            env[value] = given if isinstance(given, Tensor) else torch.from_numpy(np.asarray(given))
        for index, step in enumerate(self._steps):
            node = step.node
            args = [None if v is None else env[v] for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            try:
                results = OPS[node.op_type](step, *args)
            except Exception as error:  # a torch error or a limit of an op, named by node
                raise EvaluationError(
                    f"node {node.name!r} ({node.op_type}): {error}".splitlines()[0]
                ) from error
            if isinstance(results, Tensor):
                results = [results]
            env.update(zip(node.outputs, results, strict=False))
            if not torch.is_grad_enabled():  # evaluation only: free what no later node reads
                for value in self._last_uses.get(index, ()):
                    env.pop(value, None)
        return {value.name: env[value] for value in graph.outputs}

    def write_back(self, names: UniqueNames) -> list[ir.Value]:
        """Put the trained parameters into the model as new tensors; return the values changed.

        An initializer used by one node goes through ``set_input_constant``; one shared by several
        nodes gets its new tensor on the value itself, so that the nodes keep sharing it. Graph
        inputs and outputs are never trainable (see :func:`trainable_value`), so the values stay.
        """
        graph = self.model.graph
        for name, parameter in self.parameters.items():
            value = self._trained_values[name]
            array = parameter.detach().numpy().astype(np.float32)
            uses = list(value.uses())
            if len(uses) == 1:
                node, index = uses[0].node, uses[0].idx
                set_input_constant(node, index, array, ir.DataType.FLOAT, name, graph, names)
            else:
                value.const_value = ir.tensor(array, dtype=ir.DataType.FLOAT, name=name)
        return list(self._trained_values.values())

    def relative_changes(self) -> dict[str, float]:
        """|trained - original| / |original| of each parameter (the originals are kept)."""
        changes = {}
        for name, parameter in self.parameters.items():
            original = torch.tensor(self._originals[name].numpy())
            difference = torch.linalg.vector_norm(parameter.detach() - original)
            changes[name] = float(difference / torch.linalg.vector_norm(original).clamp_min(1e-30))
        return changes

    def restore(self) -> None:
        """Give the trained initializers their tensors from before :meth:`write_back` again."""
        for name, value in self._trained_values.items():
            value.const_value = self._originals[name]
