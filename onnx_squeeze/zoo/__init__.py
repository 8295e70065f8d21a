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

from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.zoo.convnets import mobilenetv2, resnet18, resnet50
from onnx_squeeze.zoo.transformer import mlp, transformer
from onnx_squeeze.zoo.yolo import yolo, yolo_detect

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
