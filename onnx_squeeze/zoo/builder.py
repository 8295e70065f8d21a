"""The graph builder the zoo models share: numpy reference ops that run while the graph is
built (so normalization statistics are measured, not made up), weights with trained-like
spectra, and the checks and inputs every family uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from onnx_squeeze.blas import blas_threads
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import typed_attributes

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnx-squeeze.zoo"

# Spread of log|gamma| for BatchNormalization / LayerNormalization scales.
_GAMMA_LOG_STD = 0.6
# Scale of the last normalization in a residual branch ("zero-init residual", softened).
RESIDUAL_GAMMA = 0.3
# How quickly singular values of generated weight matrices decay (e^-k over the rank).
_SPECTRAL_DECAY = 3.0
# Standard deviation of the classifier's logits across calibration inputs.
_LOGIT_STD = 2.0

Batch = str | int


# --------------------------------------------------------------------------------------------
# numpy reference of the ops the zoo uses, so that statistics can be measured while building
# --------------------------------------------------------------------------------------------


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in few BLAS calls, single-threaded unless large: on a busy machine, handing
    a small product to a second BLAS thread costs a scheduler time slice (~10 ms), far more
    than the product itself."""
    if b.ndim == 2 and a.ndim > 2:
        return _matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    if a.ndim == 2 and b.ndim == 3:  # weight @ per-image columns
        out = np.empty((b.shape[0], a.shape[0], b.shape[2]), dtype=np.result_type(a, b))
        threads = None if a.shape[0] * a.shape[1] * b.shape[2] >= 50_000_000 else 1
        with blas_threads(threads):
            for index, item in enumerate(b):
                np.matmul(a, item, out=out[index])
        return out
    large = a.ndim == 2 and b.ndim == 2 and a.shape[0] * a.shape[1] * b.shape[1] >= 50_000_000
    with blas_threads(None if large else 1):
        return np.matmul(a, b)


def _conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    strides: Sequence[int],
    pads: Sequence[int],
    group: int,
) -> np.ndarray:
    n, c, _, _ = x.shape
    co, cg, kh, kw = w.shape
    sh, sw = strides
    top, left, bottom, right = pads
    if top or left or bottom or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    ho, wo = windows.shape[2:4]
    if group == 1:
        # im2col as [n, c*kh*kw, ho*wo]: copies whole rows and needs no transpose afterwards
        cols = windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
        y = _matmul(w.reshape(co, -1), cols).reshape(n, co, ho, wo)
    elif group == c == co and cg == 1:  # depthwise
        y = np.zeros((n, c, ho, wo), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                y += windows[..., i, j] * w[None, :, 0, i, j, None, None]
    else:
        windows = windows.reshape(n, group, c // group, ho, wo, kh, kw)
        wg = w.reshape(group, co // group, cg, kh, kw)
        y = np.einsum("ngchwij,gocij->ngohw", windows, wg).reshape(n, co, ho, wo)
    if b is not None:
        y += b[None, :, None, None]
    return y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives the right 0
        y = np.exp(-x)
    y += 1
    return np.reciprocal(y, out=y)


def _max_pool(
    x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]
) -> np.ndarray:
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=-np.inf)
    windows = sliding_window_view(x, tuple(kernel), axis=(2, 3))
    return np.ascontiguousarray(windows[:, :, :: strides[0], :: strides[1]].max(axis=(-1, -2)))


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): numpy has no erf of its own.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(x.dtype)


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    target = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(target)


def _slice(x: np.ndarray, starts, ends, axes) -> np.ndarray:
    index = [slice(None)] * x.ndim
    for start, end, axis in zip(starts, ends, axes, strict=True):
        index[int(axis)] = slice(int(start), int(end))
    return x[tuple(index)]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, epsilon: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * scale + bias


def _batch_norm(x, scale, bias, mean, var, epsilon: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = (scale / np.sqrt(var + epsilon)).reshape(shape)
    return (x - mean.reshape(shape)) * inv + bias.reshape(shape)


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0) -> np.ndarray:
    y = alpha * _matmul(a.T if transA else a, b.T if transB else b)
    return y if c is None else y + beta * c


def _evaluate(op_type: str, x: list[Any], attrs: dict[str, Any]) -> list[np.ndarray]:
    """Run one op in numpy (only the ops and attribute forms the zoo itself writes)."""
    if op_type == "Conv":
        bias = x[2] if len(x) > 2 else None
        return [_conv(x[0], x[1], bias, attrs["strides"], attrs["pads"], attrs["group"])]
    if op_type == "BatchNormalization":
        return [_batch_norm(*x, attrs["epsilon"])]
    if op_type == "LayerNormalization":
        return [_layer_norm(*x, attrs["epsilon"])]
    if op_type == "MaxPool":
        return [_max_pool(x[0], attrs["kernel_shape"], attrs["strides"], attrs["pads"])]
    if op_type == "GlobalAveragePool":
        return [x[0].mean(axis=(2, 3), keepdims=True)]
    if op_type == "Flatten":
        return [x[0].reshape(math.prod(x[0].shape[: attrs["axis"]]), -1)]
    if op_type == "Gemm":
        return [_gemm(*x, **attrs)]
    if op_type == "Concat":
        return [np.concatenate(x, axis=attrs["axis"])]
    if op_type == "Split":
        return list(np.split(x[0], np.cumsum(x[1])[:-1], axis=attrs["axis"]))
    if op_type == "Resize":
        scales = x[2].astype(int)
        y = x[0]
        for axis, factor in enumerate(scales):
            if factor != 1:
                y = np.repeat(y, factor, axis=axis)
        return [y]
    if op_type == "Reshape":
        return [_reshape(x[0], x[1])]
    if op_type == "Transpose":
        return [np.ascontiguousarray(x[0].transpose(attrs["perm"]))]
    if op_type == "Gather":
        return [np.take(x[0], x[1], axis=attrs.get("axis", 0))]
    if op_type == "Shape":
        return [np.array(x[0].shape, dtype=np.int64)]
    if op_type == "Unsqueeze":
        return [np.expand_dims(x[0], tuple(int(a) for a in x[1]))]
    if op_type == "Slice":
        return [_slice(*x)]
    if op_type == "Softmax":
        return [_softmax(x[0], attrs["axis"])]
    elementwise: dict[str, Callable[..., np.ndarray]] = {
        "Add": np.add,
        "Sub": np.subtract,
        "Mul": np.multiply,
        "Div": np.divide,
        "MatMul": _matmul,
        "Relu": lambda a: np.maximum(a, 0),
        "Clip": np.clip,
        "Sigmoid": _sigmoid,
        "Tanh": np.tanh,
        "Erf": _erf,
    }
    if op_type in elementwise:
        return [np.asarray(elementwise[op_type](*x), dtype=x[0].dtype)]
    raise NotImplementedError(f"zoo numpy reference has no {op_type}")


# --------------------------------------------------------------------------------------------
# graph builder
# --------------------------------------------------------------------------------------------


def as_float(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class Builder:
    """Records nodes and initializers of one graph, running every op in numpy as it is added.

    The numpy run on a calibration batch is what lets BatchNormalization statistics and the
    classifier bias be measured as the graph grows, in one pass. ``keep`` drops the
    calibration activations that later blocks no longer need, so memory stays bounded.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._names: set[str] = set()
        self._data: dict[int, np.ndarray] = {}

    # values ---------------------------------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise AssertionError(f"zoo: name {name!r} used twice")
        self._names.add(name)
        return name

    def data(self, value: ir.Value) -> np.ndarray:
        if value.const_value is not None:
            return value.const_value.numpy()
        return self._data[id(value)]

    def set_data(self, value: ir.Value, array: np.ndarray) -> None:
        """Replace the calibration activation of ``value`` (after its producer was changed)."""
        self._data[id(value)] = array

    def keep(self, *values: ir.Value) -> None:
        """Forget calibration activations except those of ``values`` (still used later)."""
        alive = {id(v) for v in values}
        self._data = {k: v for k, v in self._data.items() if k in alive}

    def input(
        self, name: str, dtype: ir.DataType, shape: Sequence[int | str], sample: np.ndarray
    ) -> ir.Value:
        value = ir.val(self._claim(name), dtype, shape)
        self.inputs.append(value)
        self._data[id(value)] = sample
        return value

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        """An initializer; ``array`` keeps its dtype."""
        tensor = ir.Tensor(np.array(array, order="C"), name=self._claim(name))
        value = ir.val(name, tensor.dtype, tensor.shape.dims, const_value=tensor)
        self.initializers.append(value)
        return value

    # nodes ----------------------------------------------------------------------------------

    def op(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        outputs: Sequence[str] | None = None,
        num_outputs: int = 1,
    ) -> ir.Value:
        """Add a node; returns its first output (``op_multi`` for several)."""
        return self.op_multi(
            op_type, name, inputs, attributes, outputs=outputs, num_outputs=num_outputs
        )[0]

    def op_multi(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        outputs: Sequence[str] | None = None,
        num_outputs: int = 1,
    ) -> Sequence[ir.Value]:
        attributes = attributes or {}
        names = outputs or [f"{name}_output_{i}" for i in range(num_outputs)]
        values = [ir.Value(name=self._claim(n)) for n in names]
        node = ir.Node(
            "",
            op_type,
            inputs,
            typed_attributes(attributes),
            outputs=values,
            name=self._claim(name),
        )
        self.nodes.append(node)
        if all(i is None or i.const_value is not None or id(i) in self._data for i in inputs):
            args = [None if i is None else self.data(i) for i in inputs]
            while args and args[-1] is None:
                args.pop()
            for value, result in zip(values, _evaluate(op_type, args, attributes), strict=True):
                self._data[id(value)] = result
        return values

    # layers ---------------------------------------------------------------------------------

    def weight(self, shape: Sequence[int], fan: int, gain: float = 2.0) -> np.ndarray:
        """He-normal scale (``sqrt(gain / fan)``) with a decaying singular-value spectrum."""
        rows, cols = shape[0], math.prod(shape[1:])
        rank = min(rows, cols)
        if rank >= 8:
            decay = np.exp(-_SPECTRAL_DECAY * np.arange(rank) / rank).astype(np.float32)
            left = self.rng.standard_normal((rows, rank), dtype=np.float32) * decay
            w = _matmul(left, self.rng.standard_normal((rank, cols), dtype=np.float32))
        else:
            w = self.rng.standard_normal((rows, cols), dtype=np.float32)
        w *= math.sqrt(gain / fan) / max(float(w.std()), 1e-12)
        return w.reshape(shape)

    def norm_scale(self, channels: int, scale: float = 1.0) -> np.ndarray:
        """Log-normal ``|gamma|`` with RMS ``scale``; a few channels get a negative sign."""
        gamma = np.exp(self.rng.normal(0.0, _GAMMA_LOG_STD, channels))
        gamma *= scale / math.sqrt(float(np.mean(gamma**2)))
        sign = np.where(self.rng.random(channels) < 0.05, -1.0, 1.0)
        return as_float(gamma * sign)

    def conv(
        self,
        name: str,
        x: ir.Value,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        *,
        group: int = 1,
        bias_value: np.ndarray | None = None,
    ) -> ir.Value:
        """``nn.Conv2d`` with "same" padding; bias-free unless ``bias_value`` is given."""
        in_channels = self.channels(x)
        shape = (out_channels, in_channels // group, kernel, kernel)
        # torchvision / ultralytics use kaiming_normal_(mode="fan_out") for convs.
        w = self.const(f"{name}.weight", self.weight(shape, fan=out_channels // group * kernel**2))
        inputs = [x, w]
        if bias_value is not None:
            inputs.append(self.const(f"{name}.bias", as_float(bias_value)))
        pad = kernel // 2
        attrs = {
            "dilations": [1, 1],
            "group": group,
            "kernel_shape": [kernel, kernel],
            "pads": [pad, pad, pad, pad],
            "strides": [stride, stride],
        }
        return self.op("Conv", name, inputs, attrs)

    def batch_norm(
        self,
        name: str,
        x: ir.Value,
        *,
        scale: float = 1.0,
        epsilon: float = 1e-5,
        momentum: float = 0.9,
    ) -> ir.Value:
        channels = self.channels(x)
        if id(x) in self._data:
            sample = self.data(x)
            mean = sample.mean(axis=(0, 2, 3))
            var = np.maximum(sample.var(axis=(0, 2, 3)), 1e-6)
        else:
            mean, var = np.zeros(channels), np.ones(channels)
        inputs = [
            x,
            self.const(f"{name}.weight", self.norm_scale(channels, scale)),
            self.const(f"{name}.bias", as_float(self.rng.normal(0.0, 0.1, channels))),
            self.const(f"{name}.running_mean", as_float(mean)),
            self.const(f"{name}.running_var", as_float(var)),
        ]
        attrs = {"epsilon": epsilon, "momentum": momentum}
        return self.op("BatchNormalization", name, inputs, attrs)

    def linear(
        self,
        name: str,
        x: ir.Value,
        out_features: int,
        *,
        gain: float = 1.0,
        output: str | None = None,
        center: bool = False,
    ) -> ir.Value:
        """``nn.Linear`` on a 2-D input as torch exports it: ``Gemm(transB=1)``.

        With ``center``, the bias is set so that logits are centred on the calibration batch
        and spread by ``_LOGIT_STD`` (a classifier head that does not favour one class).
        """
        in_features = self.channels(x)
        w = self.weight((out_features, in_features), fan=in_features, gain=gain)
        b = as_float(self.rng.normal(0.0, 0.01, out_features))
        if center and id(x) in self._data:
            logits = _matmul(self.data(x), w.T)
            spread = float((logits - logits.mean(axis=0)).std())
            w *= _LOGIT_STD / max(spread, 1e-6)
            b = as_float(-_matmul(self.data(x), w.T).mean(axis=0))
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)]
        attrs = {"alpha": 1.0, "beta": 1.0, "transB": 1}
        return self.op("Gemm", name, inputs, attrs, outputs=[output] if output else None)

    def linear_3d(
        self, name: str, x: ir.Value, out_features: int, *, gain: float = 1.0
    ) -> ir.Value:
        """``nn.Linear`` on a 3-D input as torch exports it: ``MatMul`` (weight stored
        ``[in, out]``) then ``Add`` of the bias."""
        in_features = self.channels(x)
        w = self.weight((out_features, in_features), fan=in_features, gain=gain)
        weight = self.const(f"{name}.weight", np.ascontiguousarray(w.T))
        bias = self.const(f"{name}.bias", as_float(self.rng.normal(0.0, 0.02, out_features)))
        y = self.op("MatMul", name, [x, weight])
        return self.op("Add", f"{name}/Add", [y, bias])

    def layer_norm(
        self, name: str, x: ir.Value, *, epsilon: float = 1e-12, output: str | None = None
    ) -> ir.Value:
        width = self.channels(x)
        scale = self.const(f"{name}.weight", self.norm_scale(width))
        bias = self.const(f"{name}.bias", as_float(self.rng.normal(0.0, 0.05, width)))
        attrs = {"axis": -1, "epsilon": epsilon}
        outputs = [output] if output else None
        return self.op("LayerNormalization", name, [x, scale, bias], attrs, outputs=outputs)

    def relu6(self, name: str, x: ir.Value) -> ir.Value:
        low = self.const(f"{name}.min", np.array(0.0, dtype=np.float32))
        high = self.const(f"{name}.max", np.array(6.0, dtype=np.float32))
        return self.op("Clip", name, [x, low, high])

    def silu(self, name: str, x: ir.Value) -> ir.Value:
        gate = self.op("Sigmoid", f"{name}/Sigmoid", [x])
        return self.op("Mul", f"{name}/Mul", [x, gate])

    def channels(self, x: ir.Value) -> int:
        """Size of axis 1 (conv channels) or the last axis (features) of a built value."""
        sample = self.data(x)
        return int(sample.shape[1] if sample.ndim == 4 else sample.shape[-1])

    # model ----------------------------------------------------------------------------------

    def model(
        self,
        outputs: Sequence[tuple[ir.Value, Sequence[int | str]]],
        *,
        name: str,
        settings: dict[str, Any],
    ) -> ir.Model:
        """Wrap up: set output types, infer intermediate shapes, add provenance metadata."""
        for value, shape in outputs:
            value.dtype = ir.DataType.FLOAT
            value.shape = ir.Shape(shape)
        graph = ir.Graph(
            self.inputs,
            [value for value, _ in outputs],
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": OPSET},
            name="main_graph",
        )
        described = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        model = ir.Model(
            graph,
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version=_package_version(),
            doc_string=f"onnx_squeeze.zoo.{name}({described})",
            metadata_props={"zoo.name": name, **{f"zoo.{k}": str(v) for k, v in settings.items()}},
        )
        _infer_shapes(model)
        self._data.clear()
        return model


def _infer_shapes(model: ir.Model) -> None:
    """Record types and shapes of intermediate values, as exporters do (``value_info``).

    onnx's inference runs on a copy whose large float weights are declared as inputs, which
    keeps it fast; graph inputs and outputs keep their declared (symbolic) shapes.
    """
    proto = ir.to_proto(model)
    kept = []
    for tensor in proto.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and math.prod(tensor.dims) > 64:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    types = {info.name: info.type.tensor_type for info in inferred.graph.value_info}
    for node in model.graph:
        for value in node.outputs:
            if value in model.graph.outputs:
                continue
            if value.name not in types:
                raise AssertionError(f"zoo: shape inference did not reach {value.name!r}")
            tensor_type = types[value.name]
            value.dtype = ir.DataType(tensor_type.elem_type)
            value.shape = ir.Shape(
                [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in tensor_type.shape.dim
                ]
            )


def _package_version() -> str:
    from onnx_squeeze import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled channel counts: nearest multiple, at least ``divisor``,
    never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def repeats(count: int, depth: float) -> int:
    return max(1, int(count * depth + 0.5))


def check_common(
    name: str, width: float, depth: float, batch: Batch, image_size: int | None = None
) -> None:
    if not width > 0:
        raise SettingsError(f"zoo.{name}: width must be > 0 (1.0 is the standard size)")
    if not depth > 0:
        raise SettingsError(f"zoo.{name}: depth must be > 0 (1.0 is the standard size)")
    if isinstance(batch, bool) or not (
        (isinstance(batch, str) and batch) or (isinstance(batch, int) and batch > 0)
    ):
        raise SettingsError(
            f"zoo.{name}: batch must be a positive int or a symbolic name such as 'N'"
        )
    if image_size is not None and (image_size < 32 or image_size % 32):
        raise SettingsError(
            f"zoo.{name}: image_size must be a multiple of 32 (at least 32), got {image_size}"
        )


def check_classes(name: str, num_classes: int) -> None:
    if num_classes < 1:
        raise SettingsError(f"zoo.{name}: num_classes must be at least 1")


def image_batch(
    b: Builder, name: str, batch: Batch, image_size: int, *, samples: int = 256
) -> ir.Value:
    """The graph's image input, calibrated on standard-normal images (``random_feed``'s).

    Enough images (4 to 64) that the last, stride-32 feature map still gives about
    ``samples`` values per channel for the BatchNormalization statistics.
    """
    final = max(1, image_size // 32)
    count = min(64, max(4, math.ceil(samples / final**2)))
    sample = b.rng.standard_normal((count, 3, image_size, image_size), dtype=np.float32)
    return b.input(name, ir.DataType.FLOAT, [batch, 3, image_size, image_size], sample)
