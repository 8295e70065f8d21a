"""Constant-valued inputs: a value given once (``--set sr=16000``, ``constants={"sr": 16000}``
or a 0-d array in an ``.npz``) that goes with every sample of every feed.

Stateful and multi-input models take inputs that are no samples: a sample rate, a flag, a
threshold. Files of samples cannot hold them batch by batch and random draws would invent them,
so they are given as one value, typed by the model's input (dtype and rank) and checked here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import InputSpec
from onnx_squeeze.shapes import batch_axis, samples_in

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_settings(items: Sequence[str] | None) -> dict[str, str]:
    """``NAME=VALUE`` strings (the CLI's ``--set``) into a mapping; values stay text until
    :func:`typed_constants` reads them at the input's type."""
    settings: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SettingsError(f"bad --set {item!r}: write it as NAME=VALUE, e.g. sr=16000")
        settings[name.strip()] = value.strip()
    return settings


def _from_text(text: str, spec: InputSpec) -> bool | int | float:
    """One value written on the command line, read at the input's dtype."""
    dtype = spec.dtype
    try:
        if dtype == np.bool_:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if np.issubdtype(dtype, np.integer):
            return int(text)
        return float(text)
    except ValueError:
        kind = "true or false" if dtype == np.bool_ else f"a number of type {dtype}"
        raise SettingsError(f"--set {spec.name}={text}: input {spec.name!r} takes {kind}") from None


def _typed(value: Any, spec: InputSpec) -> np.ndarray:
    """``value`` as an array of the input's dtype; an error naming the input when it does not
    fit (a fraction or an out-of-range number for an integer input, a wrong shape)."""
    value = _from_text(value, spec) if isinstance(value, str) else value
    where = f"the value given for input {spec.name!r}"
    limits = np.iinfo(spec.dtype) if np.issubdtype(spec.dtype, np.integer) else None
    if isinstance(value, int) and limits and not limits.min <= value <= limits.max:
        raise SettingsError(f"{where} ({value}) does not fit in {spec.dtype}")  # before numpy
    array = np.asarray(value)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise SettingsError(f"{where} is not a number ({array.dtype})")
    if limits:
        if not np.all(np.isfinite(array)) or not np.all(np.round(array) == array):
            raise SettingsError(
                f"{where} ({array}) is not a whole number; the input is {spec.dtype}"
            )
        if np.any(array < limits.min) or np.any(array > limits.max):
            raise SettingsError(f"{where} ({array}) does not fit in {spec.dtype}")
    if array.ndim not in (0, len(spec.shape)) or any(
        isinstance(want, int) and want > 0 and got != want
        for got, want in zip(array.shape, spec.shape, strict=False)
    ):
        raise SettingsError(
            f"{where} has shape {array.shape}; the input has shape {list(spec.shape)}: give one "
            "value (it fills the input) or an array of that shape"
        )
    return np.asarray(array, dtype=spec.dtype)


def typed_constants(
    specs: Sequence[InputSpec], values: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """The constant inputs checked against the model's inputs and typed by them: one value
    (filled into the input's shape per feed) or an array of the input's shape."""
    by_name = {spec.name: spec for spec in specs}
    unknown = [name for name in values or {} if name not in by_name]
    if unknown:
        raise SettingsError(
            f"--set names {', '.join(map(repr, unknown))}, which the model does not take; its "
            f"inputs are {', '.join(map(repr, by_name)) or 'none'}"
        )
    return {name: _typed(value, by_name[name]) for name, value in (values or {}).items()}


def describe(constants: Mapping[str, np.ndarray]) -> str:
    """How the constants read in a data label: ``sr=16000``."""
    return ", ".join(
        f"{name}={value.item() if value.ndim == 0 else list(value.shape)}"
        for name, value in constants.items()
    )


def fill(
    feed: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> dict[str, np.ndarray]:
    """``feed`` with every constant input added: a scalar input takes its value as it is, an
    input of higher rank the value repeated to its shape in this feed (its fixed dimensions,
    the feed's samples on its batch axis, a named dimension from another input of the feed)."""
    if not constants:
        return dict(feed)
    by_name = {spec.name: spec for spec in specs}
    axes = {spec.name: batch_axis(spec.shape) for spec in specs}
    filled = dict(feed)
    for name, value in constants.items():
        spec = by_name[name]
        if value.ndim or not spec.shape:
            filled[name] = value
            continue
        filled[name] = np.full(_shape_in(spec, feed, by_name, axes), value, dtype=spec.dtype)
    return filled


def _shape_in(
    spec: InputSpec,
    feed: Mapping[str, np.ndarray],
    specs: Mapping[str, InputSpec],
    axes: Mapping[str, int | None],
) -> tuple[int, ...]:
    """The shape one value fills for ``spec`` in this feed; an error naming the dimension that
    nothing in the feed gives."""
    named: dict[str, int] = {}
    for other, array in feed.items():
        for dim, size in zip(
            specs[other].shape if other in specs else (), np.shape(array), strict=False
        ):
            if isinstance(dim, str) and dim != "?":
                named.setdefault(dim, int(size))
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in named:
            shape.append(named[dim])
        elif axis == axes[spec.name]:
            shape.append(samples_in(feed, axes))
        else:
            raise InputError(
                f"input {spec.name!r} (shape {list(spec.shape)}) was given one value, but no "
                f"other input gives its dimension {axis} ({dim}): give the whole array in the "
                "data instead"
            )
    return tuple(shape)


class ConstantInputs:
    """A source whose every feed gets the constant inputs (:mod:`.constants`, ``--set``)
    added, filled to each feed's shape; a value given this way replaces the source's own."""

    def __init__(
        self,
        source: Any,
        constants: Mapping[str, np.ndarray],
        specs: Sequence[InputSpec],
    ) -> None:
        self.source, self.constants, self._specs = source, dict(constants), list(specs)
        self.is_random = getattr(source, "is_random", False)
        self.label = f"{source.label} with {describe(self.constants)} set"

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for feed in self.source:
            yield fill(feed, self.constants, self._specs)

    def carrying(self, names: Sequence[str]) -> ConstantInputs:
        """The source carrying more arrays per feed (see NpzSource.carrying), constants alike."""
        if not hasattr(self.source, "carrying"):
            raise InputError(f"{self.source.label} carries no arrays besides the model's inputs")
        return ConstantInputs(self.source.carrying(names), self.constants, self._specs)


def with_constants(
    source: Any, constants: Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> Any:
    """``source`` with the constants added to its feeds (itself when there are none)."""
    return ConstantInputs(source, constants, specs) if constants else source
