"""Reference models built in code, with seeded weights, for tests, the demo and benchmarks.

The graphs mirror what ``torch.onnx.export`` (opset 17, eval mode) writes for well-known
architectures: BatchNormalization kept as its own node after bias-free Convs, Linear layers as
``Gemm(transB=1)`` (or ``MatMul`` + ``Add`` on 3-D inputs), ReLU6 as ``Clip``, SiLU as
``Sigmoid`` + ``Mul``, GELU as ``Div``/``Erf``/``Add``/``Mul``/``Mul``. Node names follow the
PyTorch module path (``layer1.0.conv1``; helper nodes of a module get ``/OpType``), parameters
are named like a ``state_dict`` (``layer1.0.conv1.weight``, ``layer1.0.bn1.running_var``).

Weights are meant to behave like trained ones where compression cares:

- conv and linear weights have He-normal scale but a decaying singular-value spectrum (as
  trained layers have), so low-rank factorization has something to find;
- BatchNormalization statistics are measured, not made up: while the graph is built, every op
  also runs in numpy on a batch of standard-normal images, and each BN takes its running
  mean/variance from the channels it actually receives, so post-BN activations are close to
  zero-mean and ``gamma``-scaled on inputs like ``runtime.random_feed`` makes;
- BN ``|gamma|`` is log-normal (some channels matter far less than others, which is what
  BN-scale pruning criteria look for), ``beta`` is small, and the last BN of each residual
  branch is scaled down so activations stay bounded through depth;
- classifier heads are centred on the calibration batch, so different inputs get different
  top-1 classes instead of one class winning for every input.
"""

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

__all__ = [
    "EXPORTED",
    "NAMES",
    "build",
    "mlp",
    "mobilenetv2",
    "resnet18",
    "resnet50",
    "small",
    "transformer",
    "yolo",
    "yolo_detect",
]

NAMES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenetv2", "yolo", "transformer", "mlp")
# Models as exporters ship them (decoding inside the graph), kept out of ``NAMES`` because tests
# parametrized over every name would get slow; ``build``, ``small`` and ``zoo:NAME`` accept them.
EXPORTED: tuple[str, ...] = ("yolo_detect",)

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnx-squeeze.zoo"

# Spread of log|gamma| for BatchNormalization / LayerNormalization scales.
_GAMMA_LOG_STD = 0.6
# Scale of the last normalization in a residual branch ("zero-init residual", softened).
_RESIDUAL_GAMMA = 0.3
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


def _float(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class _Builder:
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
        return _float(gamma * sign)

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
            inputs.append(self.const(f"{name}.bias", _float(bias_value)))
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
            self.const(f"{name}.bias", _float(self.rng.normal(0.0, 0.1, channels))),
            self.const(f"{name}.running_mean", _float(mean)),
            self.const(f"{name}.running_var", _float(var)),
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
        b = _float(self.rng.normal(0.0, 0.01, out_features))
        if center and id(x) in self._data:
            logits = _matmul(self.data(x), w.T)
            spread = float((logits - logits.mean(axis=0)).std())
            w *= _LOGIT_STD / max(spread, 1e-6)
            b = _float(-_matmul(self.data(x), w.T).mean(axis=0))
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
        bias = self.const(f"{name}.bias", _float(self.rng.normal(0.0, 0.02, out_features)))
        y = self.op("MatMul", name, [x, weight])
        return self.op("Add", f"{name}/Add", [y, bias])

    def layer_norm(
        self, name: str, x: ir.Value, *, epsilon: float = 1e-12, output: str | None = None
    ) -> ir.Value:
        width = self.channels(x)
        scale = self.const(f"{name}.weight", self.norm_scale(width))
        bias = self.const(f"{name}.bias", _float(self.rng.normal(0.0, 0.05, width)))
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


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled channel counts: nearest multiple, at least ``divisor``,
    never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _repeats(count: int, depth: float) -> int:
    return max(1, int(count * depth + 0.5))


def _check_common(
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


def _check_classes(name: str, num_classes: int) -> None:
    if num_classes < 1:
        raise SettingsError(f"zoo.{name}: num_classes must be at least 1")


def _image_batch(
    b: _Builder, name: str, batch: Batch, image_size: int, *, samples: int = 256
) -> ir.Value:
    """The graph's image input, calibrated on standard-normal images (``random_feed``'s).

    Enough images (4 to 64) that the last, stride-32 feature map still gives about
    ``samples`` values per channel for the BatchNormalization statistics.
    """
    final = max(1, image_size // 32)
    count = min(64, max(4, math.ceil(samples / final**2)))
    sample = b.rng.standard_normal((count, 3, image_size, image_size), dtype=np.float32)
    return b.input(name, ir.DataType.FLOAT, [batch, 3, image_size, image_size], sample)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


def _basic_block(b: _Builder, prefix: str, x: ir.Value, planes: int, stride: int) -> ir.Value:
    out = b.conv(f"{prefix}.conv1", x, planes, 3, stride)
    out = b.batch_norm(f"{prefix}.bn1", out)
    out = b.op("Relu", f"{prefix}.relu", [out])
    out = b.conv(f"{prefix}.conv2", out, planes, 3)
    out = b.batch_norm(f"{prefix}.bn2", out, scale=_RESIDUAL_GAMMA)
    identity = _shortcut(b, prefix, x, planes, stride)
    out = b.op("Add", f"{prefix}/Add", [out, identity])
    out = b.op("Relu", f"{prefix}.relu_1", [out])
    b.keep(out)
    return out


def _bottleneck(b: _Builder, prefix: str, x: ir.Value, planes: int, stride: int) -> ir.Value:
    out = b.conv(f"{prefix}.conv1", x, planes, 1)
    out = b.batch_norm(f"{prefix}.bn1", out)
    out = b.op("Relu", f"{prefix}.relu", [out])
    out = b.conv(f"{prefix}.conv2", out, planes, 3, stride)  # stride on the 3x3 (ResNet v1.5)
    out = b.batch_norm(f"{prefix}.bn2", out)
    out = b.op("Relu", f"{prefix}.relu_1", [out])
    out = b.conv(f"{prefix}.conv3", out, planes * 4, 1)
    out = b.batch_norm(f"{prefix}.bn3", out, scale=_RESIDUAL_GAMMA)
    identity = _shortcut(b, prefix, x, planes * 4, stride)
    out = b.op("Add", f"{prefix}/Add", [out, identity])
    out = b.op("Relu", f"{prefix}.relu_2", [out])
    b.keep(out)
    return out


def _shortcut(b: _Builder, prefix: str, x: ir.Value, channels: int, stride: int) -> ir.Value:
    if stride == 1 and b.channels(x) == channels:
        return x
    down = b.conv(f"{prefix}.downsample.0", x, channels, 1, stride)
    return b.batch_norm(f"{prefix}.downsample.1", down)


def _resnet(
    name: str,
    block: Callable[[_Builder, str, ir.Value, int, int], ir.Value],
    layers: Sequence[int],
    *,
    width: float,
    depth: float,
    seed: int,
    image_size: int,
    num_classes: int,
    batch: Batch,
) -> ir.Model:
    _check_common(name, width, depth, batch, image_size)
    _check_classes(name, num_classes)
    b = _Builder(seed)
    x = _image_batch(b, "input", batch, image_size)
    x = b.conv("conv1", x, _make_divisible(64 * width), 7, 2)
    x = b.batch_norm("bn1", x)
    x = b.op("Relu", "relu", [x])
    pool = {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [3, 3]}
    x = b.op("MaxPool", "maxpool", [x], {**pool, "pads": [1, 1, 1, 1], "strides": [2, 2]})
    for stage, (count, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
        for index in range(_repeats(count, depth)):
            stride = 2 if stage > 0 and index == 0 else 1
            x = block(b, f"layer{stage + 1}.{index}", x, _make_divisible(planes * width), stride)
    x = b.op("GlobalAveragePool", "avgpool", [x])
    x = b.op("Flatten", "flatten", [x], {"axis": 1})
    logits = b.linear("fc", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name=name, settings=settings)


def resnet18(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision ResNet-18 (BasicBlock, [2, 2, 2, 2]): the common CNN baseline, 11.7M params.

    Input ``input`` float [batch, 3, image_size, image_size], output ``logits``.
    """
    return _resnet(
        "resnet18",
        _basic_block,
        (2, 2, 2, 2),
        width=width,
        depth=depth,
        seed=seed,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
    )


def resnet50(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision ResNet-50 (Bottleneck v1.5, [3, 4, 6, 3]): 1x1-3x3-1x1 blocks, 25.6M params.

    Input ``input`` float [batch, 3, image_size, image_size], output ``logits``.
    """
    return _resnet(
        "resnet50",
        _bottleneck,
        (3, 4, 6, 3),
        width=width,
        depth=depth,
        seed=seed,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
    )


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------

# expansion t, channels c, repeats n, first stride s (torchvision's table)
_MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _inverted_residual(
    b: _Builder, prefix: str, x: ir.Value, out_channels: int, stride: int, expansion: int
) -> ir.Value:
    in_channels = b.channels(x)
    hidden = in_channels * expansion
    residual = stride == 1 and in_channels == out_channels
    out, layer = x, 0
    if expansion != 1:
        out = b.conv(f"{prefix}.conv.0.0", out, hidden, 1)
        out = b.batch_norm(f"{prefix}.conv.0.1", out)
        out = b.relu6(f"{prefix}.conv.0.2", out)
        layer = 1
    out = b.conv(f"{prefix}.conv.{layer}.0", out, hidden, 3, stride, group=hidden)
    out = b.batch_norm(f"{prefix}.conv.{layer}.1", out)
    out = b.relu6(f"{prefix}.conv.{layer}.2", out)
    out = b.conv(f"{prefix}.conv.{layer + 1}", out, out_channels, 1)
    scale = _RESIDUAL_GAMMA if residual else 1.0
    out = b.batch_norm(f"{prefix}.conv.{layer + 2}", out, scale=scale)
    if residual:
        out = b.op("Add", f"{prefix}/Add", [x, out])
    b.keep(out)
    return out


def mobilenetv2(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision MobileNetV2: inverted residuals with depthwise convs and ReLU6 (``Clip``),
    the case where depthwise groups and linear bottlenecks matter. 3.5M params.

    ``width`` also scales the final 1x1 conv (1280 channels at width 1).
    """
    _check_common("mobilenetv2", width, depth, batch, image_size)
    _check_classes("mobilenetv2", num_classes)
    b = _Builder(seed)
    x = _image_batch(b, "input", batch, image_size)
    x = b.conv("features.0.0", x, _make_divisible(32 * width), 3, 2)
    x = b.batch_norm("features.0.1", x)
    x = b.relu6("features.0.2", x)
    index = 1
    for expansion, channels, count, first_stride in _MOBILENETV2_SETTINGS:
        for repeat in range(_repeats(count, depth)):
            stride = first_stride if repeat == 0 else 1
            out_channels = _make_divisible(channels * width)
            x = _inverted_residual(b, f"features.{index}", x, out_channels, stride, expansion)
            index += 1
    x = b.conv(f"features.{index}.0", x, _make_divisible(1280 * width), 1)
    x = b.batch_norm(f"features.{index}.1", x)
    x = b.relu6(f"features.{index}.2", x)
    x = b.op("GlobalAveragePool", "avgpool", [x])
    x = b.op("Flatten", "flatten", [x], {"axis": 1})
    logits = b.linear("classifier.1", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name="mobilenetv2", settings=settings)


# --------------------------------------------------------------------------------------------
# YOLOv8
# --------------------------------------------------------------------------------------------

_YOLO_BN = {"epsilon": 1e-3, "momentum": 0.97}  # ultralytics: eps 1e-3, momentum 0.03


def _yolo_conv(
    b: _Builder,
    prefix: str,
    x: ir.Value,
    channels: int,
    kernel: int,
    stride: int = 1,
    *,
    scale: float = 1.0,
) -> ir.Value:
    """ultralytics ``Conv``: Conv (no bias) -> BatchNormalization -> SiLU."""
    x = b.conv(f"{prefix}.conv", x, channels, kernel, stride)
    x = b.batch_norm(f"{prefix}.bn", x, scale=scale, **_YOLO_BN)
    return b.silu(f"{prefix}.act", x)


def _c2f(b: _Builder, prefix: str, x: ir.Value, channels: int, count: int, shortcut: bool):
    """ultralytics ``C2f``: 1x1 conv, Split in halves, bottlenecks on the last piece, Concat."""
    hidden = channels // 2
    y = _yolo_conv(b, f"{prefix}.cv1", x, 2 * hidden, 1)
    split = b.const(f"{prefix}.split", np.array([hidden, hidden], dtype=np.int64))
    pieces = list(b.op_multi("Split", f"{prefix}/Split", [y, split], {"axis": 1}, num_outputs=2))
    for index in range(count):
        inner = f"{prefix}.m.{index}"
        z = _yolo_conv(b, f"{inner}.cv1", pieces[-1], hidden, 3)
        z = _yolo_conv(b, f"{inner}.cv2", z, hidden, 3, scale=_RESIDUAL_GAMMA if shortcut else 1)
        if shortcut:
            z = b.op("Add", f"{inner}/Add", [pieces[-1], z])
        pieces.append(z)
    y = b.op("Concat", f"{prefix}/Concat", pieces, {"axis": 1})
    return _yolo_conv(b, f"{prefix}.cv2", y, channels, 1)


def _sppf(b: _Builder, prefix: str, x: ir.Value, channels: int) -> ir.Value:
    """ultralytics ``SPPF``: 1x1 conv, MaxPool k5 three times in a chain, Concat, 1x1 conv."""
    hidden = b.channels(x) // 2
    pieces = [_yolo_conv(b, f"{prefix}.cv1", x, hidden, 1)]
    pool = {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [5, 5]}
    pool |= {"pads": [2, 2, 2, 2], "strides": [1, 1]}
    for index in range(3):
        suffix = "" if index == 0 else f"_{index}"
        pieces.append(b.op("MaxPool", f"{prefix}.m{suffix}", [pieces[-1]], pool))
    y = b.op("Concat", f"{prefix}/Concat", pieces, {"axis": 1})
    return _yolo_conv(b, f"{prefix}.cv2", y, channels, 1)


def _upsample(b: _Builder, prefix: str, x: ir.Value) -> ir.Value:
    scales = b.const(f"{prefix}.scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    attrs = {
        "coordinate_transformation_mode": "asymmetric",
        "cubic_coeff_a": -0.75,
        "mode": "nearest",
        "nearest_mode": "floor",
    }
    return b.op("Resize", prefix, [x, None, scales], attrs)


_REG_MAX = 16  # ultralytics' DFL bins per box side
_YOLO_STRIDES = (8, 16, 32)
# yolo_detect's class conv is calibrated so that, on standard-normal images, this fraction of
# each level's anchors has a best class score above 0.5 (about 84 of 8400 anchors at 640: a few
# objects, each covered by several anchors, as a trained detector gives before NMS), and on
# small maps at least this fraction of images has one such anchor per level ...
_DETECT_FRACTION = 0.01
_DETECT_IMAGES = 0.25
# ... with class logits spread by this standard deviation around each class's mean, so that
# most scores stay near zero and the confident ones stand out.
_DETECT_LOGIT_STD = 3.0
# yolo_detect's box conv biases fall by this much per DFL bin, so that the expected distance
# per side is about 1.5 cells (boxes of roughly 25, 60 and 90 px at 640 on strides 8, 16, 32)
# rather than the 7.5 cells of flat bins (boxes 15 strides wide, far larger than small images).
_DFL_DECAY = 0.5


def _yolo_network(
    b: _Builder,
    *,
    width: float,
    depth: float,
    image_size: int,
    num_classes: int,
    batch: Batch,
    head_names: Sequence[str] | None = None,
    decoded: bool = False,
) -> list[ir.Value]:
    """YOLOv8 backbone, neck and Detect head convs, shared by ``yolo`` and ``yolo_detect``.

    Returns the raw head per level (strides 8, 16, 32), [batch, 64 + num_classes, H, W],
    named ``head_names`` if given. ``decoded`` (for ``yolo_detect``) gives the final box convs
    the ``_DFL_DECAY`` prior and calibrates the final class convs by ``_calibrate_class_conv``;
    neither changes the random draws, so all other weights are those of ``yolo``.
    """
    c1, c2, c3, c4, c5 = (_make_divisible(c * width) for c in (16, 32, 64, 128, 256))
    n_small, n_large = _repeats(1, depth), _repeats(2, depth)
    x = _image_batch(b, "images", batch, image_size)
    x = _yolo_conv(b, "model.0", x, c1, 3, 2)
    x = _yolo_conv(b, "model.1", x, c2, 3, 2)
    x = _c2f(b, "model.2", x, c2, n_small, True)
    x = _yolo_conv(b, "model.3", x, c3, 3, 2)
    p3 = _c2f(b, "model.4", x, c3, n_large, True)
    b.keep(p3)
    x = _yolo_conv(b, "model.5", p3, c4, 3, 2)
    p4 = _c2f(b, "model.6", x, c4, n_large, True)
    b.keep(p3, p4)
    x = _yolo_conv(b, "model.7", p4, c5, 3, 2)
    x = _c2f(b, "model.8", x, c5, n_small, True)
    p5 = _sppf(b, "model.9", x, c5)
    b.keep(p3, p4, p5)
    # neck: top-down then bottom-up
    x = _upsample(b, "model.10", p5)
    x = b.op("Concat", "model.11", [x, p4], {"axis": 1})
    n4 = _c2f(b, "model.12", x, c4, n_small, False)
    b.keep(p3, n4, p5)
    x = _upsample(b, "model.13", n4)
    x = b.op("Concat", "model.14", [x, p3], {"axis": 1})
    out3 = _c2f(b, "model.15", x, c3, n_small, False)
    b.keep(out3, n4, p5)
    x = _yolo_conv(b, "model.16", out3, c3, 3, 2)
    x = b.op("Concat", "model.17", [x, n4], {"axis": 1})
    out4 = _c2f(b, "model.18", x, c4, n_small, False)
    b.keep(out3, out4, p5)
    x = _yolo_conv(b, "model.19", out4, c4, 3, 2)
    x = b.op("Concat", "model.20", [x, p5], {"axis": 1})
    out5 = _c2f(b, "model.21", x, c5, n_small, False)
    b.keep(out3, out4, out5)
    # Detect head, one per level: box branch (cv2) and class branch (cv3)
    box_channels = max(16, c3 // 4, _REG_MAX * 4)
    cls_channels = max(c3, min(num_classes, 100))
    box_bias = np.ones(4 * _REG_MAX)
    if decoded:
        box_bias = np.tile(-_DFL_DECAY * np.arange(_REG_MAX), 4)
    heads: list[ir.Value] = []
    for level, (feature, stride) in enumerate(zip((out3, out4, out5), _YOLO_STRIDES, strict=True)):
        box = _yolo_conv(b, f"model.22.cv2.{level}.0", feature, box_channels, 3)
        box = _yolo_conv(b, f"model.22.cv2.{level}.1", box, box_channels, 3)
        box = b.conv(f"model.22.cv2.{level}.2", box, 4 * _REG_MAX, 1, bias_value=box_bias)
        cls = _yolo_conv(b, f"model.22.cv3.{level}.0", feature, cls_channels, 3)
        cls = _yolo_conv(b, f"model.22.cv3.{level}.1", cls, cls_channels, 3)
        # ultralytics' prior: about 5 objects per 640x640 image
        prior = math.log(5 / num_classes / (640 / stride) ** 2)
        cls_bias = np.full(num_classes, prior)
        cls = b.conv(f"model.22.cv3.{level}.2", cls, num_classes, 1, bias_value=cls_bias)
        if decoded:
            _calibrate_class_conv(b, cls)
        outputs = [head_names[level]] if head_names else None
        concat = f"model.22/Concat_{level}"
        heads.append(b.op("Concat", concat, [box, cls], {"axis": 1}, outputs=outputs))
        b.keep(out3, out4, out5, *heads)
    return heads


def _calibrate_class_conv(b: _Builder, logits: ir.Value) -> None:
    """Rescale and re-bias the final class conv that produced ``logits`` (in place, numpy
    calibration data included) so that its logits are spread by ``_DETECT_LOGIT_STD`` around
    each class's calibration mean, and ``_DETECT_FRACTION`` of the anchors (and at least one
    anchor in ``_DETECT_IMAGES`` of the images) have a best class logit above 0: a few
    confident detections per image, the rest background.
    """
    conv = logits.producer()
    assert conv is not None and conv.op_type == "Conv" and len(conv.inputs) == 3
    weight, bias = conv.inputs[1], conv.inputs[2]
    assert weight is not None and bias is not None
    old_bias = b.data(bias)
    raw = b.data(logits) - old_bias[None, :, None, None]  # the conv without its bias
    mean = raw.mean(axis=(0, 2, 3))
    centred = raw - mean[None, :, None, None]
    gain = _DETECT_LOGIT_STD / max(float(centred.std()), 1e-6)
    best = (gain * centred).max(axis=1)  # [images, H, W]: each anchor's best class
    shift = float(np.quantile(best, 1 - _DETECT_FRACTION))
    # on small maps (a few anchors per image) that could leave most images without any
    # detection: lower the threshold until a quarter of the images have one on this level
    shift = min(shift, float(np.quantile(best.max(axis=(1, 2)), 1 - _DETECT_IMAGES)))
    new_bias = _float(-gain * mean - shift)
    weight.const_value = ir.Tensor(_float(gain * b.data(weight)), name=weight.name)
    bias.const_value = ir.Tensor(new_bias, name=bias.name)
    b.set_data(logits, _float(gain * raw + new_bias[None, :, None, None]))


def _anchor_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """ultralytics ``make_anchors`` (cell centres, offset 0.5) as exported: points [2, A] (x
    then y, row-major over each level's cells) and strides [1, A]."""
    points, strides = [], []
    for stride in _YOLO_STRIDES:
        cells = np.arange(image_size // stride) + 0.5
        y, x = np.meshgrid(cells, cells, indexing="ij")
        points.append(np.stack([x.ravel(), y.ravel()]))
        strides.append(np.full(x.size, stride))
    return _float(np.concatenate(points, axis=1)), _float(np.concatenate(strides)[None])


def _yolo_decode(
    b: _Builder, heads: Sequence[ir.Value], image_size: int, num_classes: int
) -> ir.Value:
    """ultralytics ``Detect._inference`` as exported: the levels flattened and concatenated,
    DFL (softmax over 16 bins, expectation by a fixed 1x1 conv), ``dist2bbox`` to centre xywh
    in grid units, times the strides (pixels), class scores by Sigmoid. Returns ``output0``,
    [batch, 4 + num_classes, anchors]."""
    channels = 4 * _REG_MAX + num_classes
    flat_shape = b.const("model.22.flat_shape", np.array([0, channels, -1], dtype=np.int64))
    flat = [
        b.op("Reshape", f"model.22/Reshape_{level}", [head, flat_shape])
        for level, head in enumerate(heads)
    ]
    x = b.op("Concat", "model.22/Concat_3", flat, {"axis": 2})
    sizes = b.const("model.22.split", np.array([4 * _REG_MAX, num_classes], dtype=np.int64))
    box, cls = b.op_multi("Split", "model.22/Split", [x, sizes], {"axis": 1}, num_outputs=2)
    # DFL: [N, 64, A] -> [N, 4, 16, A] -> [N, 16, 4, A], softmax over the bins, expectation
    bins_shape = b.const("model.22.dfl.shape", np.array([0, 4, _REG_MAX, -1], dtype=np.int64))
    y = b.op("Reshape", "model.22.dfl/Reshape", [box, bins_shape])
    y = b.op("Transpose", "model.22.dfl/Transpose", [y], {"perm": [0, 2, 1, 3]})
    y = b.op("Softmax", "model.22.dfl/Softmax", [y], {"axis": 1})
    bins = np.arange(_REG_MAX, dtype=np.float32).reshape(1, _REG_MAX, 1, 1)
    conv = {"dilations": [1, 1], "group": 1, "kernel_shape": [1, 1]}
    conv |= {"pads": [0, 0, 0, 0], "strides": [1, 1]}
    y = b.op("Conv", "model.22.dfl.conv", [y, b.const("model.22.dfl.conv.weight", bins)], conv)
    sides_shape = b.const("model.22.dfl.out_shape", np.array([0, 4, -1], dtype=np.int64))
    distance = b.op("Reshape", "model.22.dfl/Reshape_1", [y, sides_shape])
    # dist2bbox(xywh=True, dim=1): left-top and right-bottom distances around the anchor points
    points, strides = _anchor_grid(image_size)
    anchors = b.const("model.22.anchors", points)
    halves = b.const("model.22.chunk", np.array([2, 2], dtype=np.int64))
    lt, rb = b.op_multi("Split", "model.22/Split_1", [distance, halves], {"axis": 1}, num_outputs=2)
    x1y1 = b.op("Sub", "model.22/Sub", [anchors, lt])
    x2y2 = b.op("Add", "model.22/Add", [anchors, rb])
    centre = b.op("Add", "model.22/Add_1", [x1y1, x2y2])
    two = b.const("model.22.two", np.array(2.0, dtype=np.float32))
    centre = b.op("Div", "model.22/Div", [centre, two])
    size = b.op("Sub", "model.22/Sub_1", [x2y2, x1y1])
    boxes = b.op("Concat", "model.22/Concat_4", [centre, size], {"axis": 1})
    boxes = b.op("Mul", "model.22/Mul", [boxes, b.const("model.22.strides", strides)])
    scores = b.op("Sigmoid", "model.22/Sigmoid", [cls])
    return b.op("Concat", "model.22/Concat_5", [boxes, scores], {"axis": 1}, outputs=["output0"])


def yolo(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 640,
    num_classes: int = 80,
    batch: Batch = "N",
) -> ir.Model:
    """YOLOv8 detector (width=depth=1 is YOLOv8n, 3.2M params; width=2 matches YOLOv8s):
    branching with Split/Concat, residual Adds, SPPF, nearest Resize and three heads.

    Input ``images`` float [batch, 3, image_size, image_size]. Outputs ``p3``, ``p4``, ``p5``
    (strides 8, 16, 32): the raw Detect head per level, [batch, 64 + num_classes, H, W]
    (64 = 4 box sides x 16 distribution bins, then class logits), before DFL decoding.
    """
    _check_common("yolo", width, depth, batch, image_size)
    _check_classes("yolo", num_classes)
    b = _Builder(seed)
    names = ("p3", "p4", "p5")
    heads = _yolo_network(
        b,
        width=width,
        depth=depth,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
        head_names=names,
    )
    channels = 4 * _REG_MAX + num_classes
    outputs = [
        (head, [batch, channels, image_size // stride, image_size // stride])
        for head, stride in zip(heads, _YOLO_STRIDES, strict=True)
    ]
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model(outputs, name="yolo", settings=settings)


def yolo_detect(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 640,
    num_classes: int = 80,
    batch: Batch = "N",
) -> ir.Model:
    """YOLOv8 detector as ultralytics exports it: ``yolo``'s network followed by the decode
    in the graph (DFL softmax and fixed 1x1 conv, anchor points, ``dist2bbox``, strides,
    Sigmoid), so the one output mixes pixel boxes with [0, 1] scores.

    Input ``images`` float [batch, 3, image_size, image_size]. Output ``output0``
    [batch, 4 + num_classes, anchors] (anchors = 8400 at 640): rows 0-3 are box centre x, y,
    width, height in pixels, the rest class scores.

    Unlike ``yolo``, two things are set to look like a trained detector's output (all other
    weights equal ``yolo``'s). The final class convs (``model.22.cv3.*.2``) are calibrated on
    the standard-normal build images: weights rescaled so logits spread by 3 around each
    class's mean, biases set so that about 1% of each level's anchors (on tiny maps: at least
    one in a quarter of the images) score above 0.5 and most scores are near zero (seeded
    random weights with ultralytics' prior bias alone score every anchor near zero). The final
    box convs' biases (``model.22.cv2.*.2.bias``) fall by 0.5 per DFL bin, so boxes are a few
    strides wide, on the scale of the image, instead of 15.
    """
    _check_common("yolo_detect", width, depth, batch, image_size)
    _check_classes("yolo_detect", num_classes)
    b = _Builder(seed)
    heads = _yolo_network(
        b,
        width=width,
        depth=depth,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
        decoded=True,
    )
    output = _yolo_decode(b, heads, image_size, num_classes)
    anchors = sum((image_size // stride) ** 2 for stride in _YOLO_STRIDES)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    outputs = [(output, [batch, 4 + num_classes, anchors])]
    return b.model(outputs, name="yolo_detect", settings=settings)


# --------------------------------------------------------------------------------------------
# Transformer encoder
# --------------------------------------------------------------------------------------------


def _attention(b: _Builder, prefix: str, x: ir.Value, heads: int, head_dim: int) -> ir.Value:
    hidden = heads * head_dim
    split_shape = np.array([0, -1, heads, head_dim], dtype=np.int64)
    projected = {}
    for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
        name = f"{prefix}.attention.self.{part}"
        y = b.linear_3d(name, x, hidden)
        y = b.op("Reshape", f"{name}/Reshape", [y, b.const(f"{name}.heads_shape", split_shape)])
        projected[part] = b.op("Transpose", f"{name}/Transpose", [y], {"perm": perm})
    attn = f"{prefix}.attention.self"
    scores = b.op("MatMul", f"{attn}/MatMul", [projected["query"], projected["key"]])
    scale = b.const(f"{attn}.scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    scores = b.op("Div", f"{attn}/Div", [scores, scale])
    probs = b.op("Softmax", f"{attn}/Softmax", [scores], {"axis": -1})
    context = b.op("MatMul", f"{attn}/MatMul_1", [probs, projected["value"]])
    context = b.op("Transpose", f"{attn}/Transpose", [context], {"perm": [0, 2, 1, 3]})
    merge_shape = b.const(f"{attn}.merge_shape", np.array([0, -1, hidden], dtype=np.int64))
    context = b.op("Reshape", f"{attn}/Reshape", [context, merge_shape])
    out = b.linear_3d(f"{prefix}.attention.output.dense", context, hidden)
    out = b.op("Add", f"{prefix}.attention.output/Add", [out, x])
    return b.layer_norm(f"{prefix}.attention.output.LayerNorm", out)


def _feed_forward(
    b: _Builder, prefix: str, x: ir.Value, intermediate: int, output: str | None
) -> ir.Value:
    name = f"{prefix}.intermediate.dense"
    y = b.linear_3d(name, x, intermediate, gain=2.0)
    # GELU(y) = y * 0.5 * (1 + erf(y / sqrt(2))), in the node order torch exports it
    act = f"{prefix}.intermediate.intermediate_act_fn"
    z = b.op("Div", f"{act}/Div", [y, b.const(f"{act}.sqrt2", np.array(math.sqrt(2), "f4"))])
    z = b.op("Erf", f"{act}/Erf", [z])
    z = b.op("Add", f"{act}/Add", [z, b.const(f"{act}.one", np.array(1.0, "f4"))])
    z = b.op("Mul", f"{act}/Mul", [y, z])
    z = b.op("Mul", f"{act}/Mul_1", [z, b.const(f"{act}.half", np.array(0.5, "f4"))])
    out = b.linear_3d(f"{prefix}.output.dense", z, b.channels(x), gain=1.0)
    out = b.op("Add", f"{prefix}.output/Add", [out, x])
    return b.layer_norm(f"{prefix}.output.LayerNorm", out, output=output)


def transformer(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    num_classes: int = 10,
    vocab_size: int = 1000,
    max_length: int = 128,
    num_heads: int = 6,
    batch: Batch = "N",
    sequence: Batch = "sequence",
) -> ir.Model:
    """BERT-style post-LayerNorm encoder (hidden 384 = 6 heads x 64, 6 layers, MLP 4x) with a
    pooler and classifier on token 0: the MatMul/attention/GELU/LayerNorm case. 11.7M params.

    ``width`` scales the head size (hidden = num_heads x round8(64 x width)), ``depth`` the
    layer count. Input ``input_ids`` int64 [batch, sequence] (sequence <= max_length).
    Outputs ``logits`` [batch, num_classes] and ``last_hidden_state`` [batch, sequence, hidden].
    """
    _check_common("transformer", width, depth, batch)
    _check_classes("transformer", num_classes)
    if num_heads < 1 or vocab_size < 8 or max_length < 1:
        raise SettingsError(
            "zoo.transformer: need num_heads >= 1, vocab_size >= 8 (random feeds use ids "
            "0..7) and max_length >= 1"
        )
    b = _Builder(seed)
    head_dim = _make_divisible(64 * width)
    hidden = num_heads * head_dim
    # Calibration tokens: half drawn like runtime.random_feed (ids 0..7), half from the vocab.
    length = min(16, max_length)
    ids = np.concatenate(
        [b.rng.integers(0, 8, (16, length)), b.rng.integers(0, vocab_size, (16, length))]
    ).astype(np.int64)
    input_ids = b.input("input_ids", ir.DataType.INT64, [batch, sequence], ids)
    # embeddings (token, then position sliced to the dynamic sequence length)
    word_table = b.weight((vocab_size, hidden), fan=1, gain=1.0)
    words = b.const("embeddings.word_embeddings.weight", word_table)
    x = b.op("Gather", "embeddings.word_embeddings", [words, input_ids], {"axis": 0})
    shape = b.op("Shape", "embeddings/Shape", [input_ids])
    seq_axis = b.const("embeddings.seq_axis", np.array(1, dtype=np.int64))
    seq_len = b.op("Gather", "embeddings/Gather", [shape, seq_axis], {"axis": 0})
    axes0 = b.const("embeddings.unsqueeze_axes", np.array([0], dtype=np.int64))
    seq_len = b.op("Unsqueeze", "embeddings/Unsqueeze", [seq_len, axes0])
    position_ids = b.const("embeddings.position_ids", np.arange(max_length)[None].astype("i8"))
    starts = b.const("embeddings.slice_starts", np.array([0], dtype=np.int64))
    axes1 = b.const("embeddings.slice_axes", np.array([1], dtype=np.int64))
    position_ids = b.op("Slice", "embeddings/Slice", [position_ids, starts, seq_len, axes1])
    position_table = b.weight((max_length, hidden), fan=1, gain=0.25)
    positions = b.const("embeddings.position_embeddings.weight", position_table)
    pos = b.op("Gather", "embeddings.position_embeddings", [positions, position_ids], {"axis": 0})
    x = b.op("Add", "embeddings/Add", [x, pos])
    x = b.layer_norm("embeddings.LayerNorm", x)
    layers = _repeats(6, depth)
    for index in range(layers):
        prefix = f"encoder.layer.{index}"
        x = _attention(b, prefix, x, num_heads, head_dim)
        last = "last_hidden_state" if index == layers - 1 else None
        x = _feed_forward(b, prefix, x, 4 * hidden, last)
        b.keep(x)
    first_token = b.const("pooler.first_token", np.array(0, dtype=np.int64))
    first = b.op("Gather", "pooler/Gather", [x, first_token], {"axis": 1})
    pooled = b.linear("pooler.dense", first, hidden)
    pooled = b.op("Tanh", "pooler.activation", [pooled])
    logits = b.linear("classifier", pooled, num_classes, output="logits", center=True)
    settings = dict(
        width=width,
        depth=depth,
        seed=seed,
        num_classes=num_classes,
        vocab_size=vocab_size,
        max_length=max_length,
        num_heads=num_heads,
    )
    outputs = [(logits, [batch, num_classes]), (x, [batch, sequence, hidden])]
    return b.model(outputs, name="transformer", settings=settings)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


def mlp(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    in_features: int = 64,
    num_classes: int = 10,
    batch: Batch = "N",
) -> ir.Model:
    """A Gemm-only classifier for 8x8 digits (64 -> 256 -> 128 -> 64 -> 10 at width 1):
    the smallest model that still has every linear-layer case.

    ``depth`` scales the number of hidden layers (3 at depth 1; later ones keep the last width).
    Input ``input`` float [batch, in_features], output ``logits``.
    """
    _check_common("mlp", width, depth, batch)
    _check_classes("mlp", num_classes)
    if in_features < 1:
        raise SettingsError("zoo.mlp: in_features must be at least 1")
    b = _Builder(seed)
    sample = b.rng.standard_normal((256, in_features), dtype=np.float32)
    x = b.input("input", ir.DataType.FLOAT, [batch, in_features], sample)
    sizes = (256, 128, 64)
    for index in range(_repeats(3, depth)):
        features = _make_divisible(sizes[min(index, len(sizes) - 1)] * width)
        x = b.linear(f"fc{index + 1}", x, features, gain=2.0)
        x = b.op("Relu", f"relu{index + 1}", [x])
    logits = b.linear("classifier", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, in_features=in_features, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name="mlp", settings=settings)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., ir.Model]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "yolo": yolo,
    "yolo_detect": yolo_detect,
    "transformer": transformer,
    "mlp": mlp,
}

# Settings of ``small``: each builds in well under 0.5 s and runs in a few milliseconds.
_SMALL: dict[str, dict[str, Any]] = {
    "resnet18": dict(width=0.25, depth=0.5, image_size=32, num_classes=10),
    "resnet50": dict(width=0.25, depth=0.25, image_size=32, num_classes=10),
    "mobilenetv2": dict(width=0.25, depth=0.34, image_size=32, num_classes=10),
    "yolo": dict(width=0.5, depth=0.5, image_size=64, num_classes=4),
    "yolo_detect": dict(width=0.5, depth=0.5, image_size=64, num_classes=4),
    "transformer": dict(
        width=0.25, depth=0.34, num_heads=2, vocab_size=64, max_length=32, num_classes=10
    ),
    "mlp": dict(width=0.5, depth=1.0, num_classes=10),
}


def build(
    name: str, *, width: float = 1.0, depth: float = 1.0, seed: int = 0, **kwargs
) -> ir.Model:
    """Build a zoo model by name (one of ``NAMES`` or ``EXPORTED``); ``kwargs`` go to its
    function."""
    if name not in _BUILDERS:
        raise SettingsError(_unknown(name))
    try:
        return _BUILDERS[name](width=width, depth=depth, seed=seed, **kwargs)
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        raise SettingsError(f"zoo.{name}: {error}") from None


def small(name: str, seed: int = 0) -> ir.Model:
    """A tiny version of a zoo model with the same structure, for fast tests."""
    if name not in _SMALL:
        raise SettingsError(_unknown(name))
    return build(name, seed=seed, **_SMALL[name])


def _unknown(name: str) -> str:
    return f"unknown zoo model {name!r}: use one of {', '.join(NAMES + EXPORTED)}"
