"""The input shapes a run uses: from the options, else the data, else the model; never guessed.

Each input's batch axis (:func:`batch_axis`, the one rule every reader of data follows) takes
``batch`` when it is symbolic; any other dimension nothing gives stops the run with a
:class:`ShapeUnknownError` that names it and the ``--shape`` to pass, unless ``default_dim`` is
asked for explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.errors import SettingsError, ShapeUnknownError

Shape = tuple[int, ...]


def display_dims(shape: ir.Shape | None) -> tuple[int | str, ...]:
    """Dimensions as people read them: sizes, symbolic names, ``?`` for unknown ones."""
    if shape is None:
        return ()
    dims: list[int | str] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        else:
            text = str(dim.value) if getattr(dim, "value", None) is not None else "?"
            dims.append(text)
    return tuple(dims)


def is_fixed(dim: Any) -> bool:
    """Whether a dimension is a size (a positive int), not symbolic or unknown."""
    return isinstance(dim, int) and dim > 0


def batch_axis(dims: Sequence[int | str | None], data: Sequence[int] | None = None) -> int | None:
    """The axis of an input that holds its samples: None for a scalar (rank 0: the same value
    goes with every sample); axis 0 when it is symbolic, fixed at 1 (a fixed batch of one) or
    when no dimension is symbolic; otherwise (axis 0 fixed at n > 1 before a symbolic one, as in
    a recurrent state ``[2, batch, 128]``) the first symbolic dimension. ``data``, the shape of
    an array given for the input, settles that last case: an axis 0 other than n holds samples.

    ``dims`` are the model's dimensions (ints; strings, None or non-positive ints for
    symbolic ones). Sources, shapes, held-out splits and resized feeds all ask this function,
    so the data is cut the same way everywhere.
    """
    if not dims or (data is not None and len(data) == 0):
        return None
    if not is_fixed(dims[0]) or dims[0] == 1:
        return 0
    symbolic = next((axis for axis, dim in enumerate(dims) if not is_fixed(dim)), None)
    if symbolic is None or (data is not None and data[0] != dims[0]):
        return 0
    return symbolic


def batch_axes(model: ir.Model) -> dict[str, int | None]:
    """:func:`batch_axis` of every input the model is fed."""
    return {value.name: batch_axis(display_dims(value.shape)) for value in _feedable_inputs(model)}


def samples_in(feed: Mapping[str, Any], axes: Mapping[str, int | None]) -> int:
    """The number of samples in a feed: the size of the first batch axis it holds (axis 0 for
    an input ``axes`` does not name; 1 when every input is a scalar)."""
    for name, array in feed.items():
        axis = axes.get(name, 0)
        if axis is not None and np.ndim(array) > axis:
            return int(np.shape(array)[axis])
    return 1


def _feedable_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


@dataclasses.dataclass
class InputShapes:
    """The input shapes a run uses, and the dimensions nothing gave (None in ``shapes``).

    Sources, in order: the caller's overrides (``--shape``, or the data's first feed), a named
    symbolic dimension learnt from another input, the model's fixed dimensions, ``batch`` for a
    symbolic batch axis (:func:`batch_axis`), and ``default_dim`` (only when asked for) for any
    other.
    """

    shapes: dict[str, tuple[int | None, ...]]
    declared: dict[str, tuple[int | str, ...] | None]

    @property
    def missing(self) -> list[str]:
        """``name[axis]`` of every dimension nothing gave, and inputs with no shape at all."""
        found = []
        for name, shape in self.shapes.items():
            if self.declared[name] is None:
                found.append(f"{name} (no shape in the model)")
            found.extend(f"{name}[{axis}]" for axis, d in enumerate(shape) if d is None)
        return found

    def hint(self) -> str:
        """One line: which dimensions are unknown and the ``--shape`` that would give them."""
        flags = []
        for name, shape in self.shapes.items():
            declared = self.declared[name]
            if declared is None:
                flags.append(f"--shape {name}:<its dims, e.g. 1x3x224x224>")
            elif None in shape:
                dims = [
                    str(d) if d is not None else str(declared[axis]).upper().replace("?", "N")
                    for axis, d in enumerate(shape)
                ]
                flags.append(f"--shape {name}:{'x'.join(dims)}")
        return (
            f"input dimensions {', '.join(self.missing)} are not given by the model, the data "
            f"or the options, and are never guessed: pass {' '.join(flags)} (or give data)"
        )

    def concrete(self) -> dict[str, Shape]:
        """The shapes, all known; a :class:`ShapeUnknownError` with the hint otherwise."""
        if self.missing:
            raise ShapeUnknownError(self.hint())
        return {name: tuple(int(d) for d in shape) for name, shape in self.shapes.items()}  # type: ignore[arg-type]


def resolve_input_shapes(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    batch: int | None = None,
    default_dim: int | None = None,
) -> InputShapes:
    """The input shapes from ``shapes`` (whole inputs), the model, ``batch`` (a symbolic batch
    axis, default 1) and ``default_dim`` (any other symbolic dimension, only when given);
    what none of them gives stays None (see :class:`InputShapes`)."""
    inputs = _feedable_inputs(model)
    shapes = dict(shapes or {})
    names = [value.name for value in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise SettingsError(
            f"--shape names {', '.join(map(repr, unknown))}, which the model does not take; "
            f"its inputs are {', '.join(map(repr, names)) or 'none'}"
        )
    dim_values: dict[str, int] = {}
    result: dict[str, tuple[int | None, ...]] = {}
    declared: dict[str, tuple[int | str, ...] | None] = {
        value.name: display_dims(value.shape) if value.shape is not None else None
        for value in inputs
    }
    for value in inputs:
        if value.name not in shapes:
            continue
        dims = declared[value.name]
        override = tuple(int(d) for d in shapes[value.name])
        if dims is not None and len(override) != len(dims):
            raise SettingsError(
                f"--shape {value.name}: got {len(override)} dims, the model input has {len(dims)}"
            )
        if any(d <= 0 for d in override):
            raise SettingsError(
                f"--shape {value.name}: dimensions must be positive, got {override}"
            )
        for dim, size in zip(dims or (), override, strict=False):
            if isinstance(dim, str) and dim != "?":
                dim_values.setdefault(dim, size)
        result[value.name] = override
        declared[value.name] = dims if dims is not None else override
    for value in inputs:
        if value.name in result:
            continue
        found: list[int | None] = []
        dims = declared[value.name] or ()
        batched = batch_axis(dims)
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                found.append(dim)
            elif isinstance(dim, str) and dim in dim_values:
                found.append(dim_values[dim])
            elif axis == batched:
                size = batch or 1
                if isinstance(dim, str) and dim != "?":
                    dim_values[dim] = size
                found.append(size)
            else:
                found.append(default_dim)
        result[value.name] = tuple(found)
    return InputShapes(result, declared)


def concrete_input_shapes(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    batch: int | None = None,
    default_dim: int | None = None,
) -> dict[str, Shape]:
    """Concrete shapes for the graph inputs (:func:`resolve_input_shapes`); a
    :class:`ShapeUnknownError` naming the dimensions nothing gave, with the ``--shape`` hint."""
    return resolve_input_shapes(model, shapes, batch=batch, default_dim=default_dim).concrete()


def feed_shapes(feed: Mapping[str, Any]) -> dict[str, Shape]:
    """The shapes of a feed's arrays: the data's own shapes."""
    return {name: tuple(int(d) for d in np.shape(array)) for name, array in feed.items()}
