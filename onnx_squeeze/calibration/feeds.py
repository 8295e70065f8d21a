"""What every calibration source yields and how files are cut into batches: the ``Feed``, the
:class:`CalibrationSource` protocol, and the batch-size rule the file readers share."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.runtime import InputSpec
from onnx_squeeze.shapes import batch_axis, is_fixed

Feed = dict[str, np.ndarray]


@runtime_checkable
class CalibrationSource(Protocol):
    """Feed dicts batch by batch; iterating again restarts from the first batch."""

    label: str  # human-readable, shown in reports
    is_random: bool  # True only for random data: results on it are smoke tests

    def __iter__(self) -> Iterator[Feed]: ...


def batch_size_for(
    specs: Sequence[InputSpec],
    requested: int | None,
    overrides: Mapping[str, Sequence[int]] | None = None,
    axes: Mapping[str, int | None] | None = None,
) -> tuple[int, bool]:
    """The batch size (the size of every input's batch axis, :func:`shapes.batch_axis`, or
    ``axes`` where the data settled it) and whether the model fixes it.

    When it is fixed, a partial last batch cannot run, so sources drop it.
    """
    fixed = {}
    for spec in specs:
        shape = tuple(overrides[spec.name]) if overrides and spec.name in overrides else spec.shape
        axis = axes[spec.name] if axes and spec.name in axes else batch_axis(spec.shape)
        if axis is not None and axis < len(shape) and is_fixed(shape[axis]):
            fixed[spec.name] = int(shape[axis])
    if len(set(fixed.values())) > 1:
        sizes = ", ".join(f"{name}: {size}" for name, size in fixed.items())
        raise SettingsError(
            f"the model inputs have different fixed batch dimensions ({sizes}); "
            "batches split from files cannot feed them all: pass a reader object (get_next()) "
            "that builds whole feeds"
        )
    size = requested if requested is not None else next(iter(fixed.values()), 1)
    if size < 1:
        raise SettingsError(f"batch size must be at least 1, got {size}")
    for name, dim in fixed.items():
        if dim != size:
            raise SettingsError(
                f"batch size {size} does not match input {name!r}, whose first dimension is "
                f"fixed at {dim}: use batch size {dim}"
            )
    return size, bool(fixed)


def batches_in(samples: int, batch: int, fixed: bool) -> int:
    """How many batches ``samples`` make: whole ones only when the model fixes the batch size."""
    return samples // batch if fixed else math.ceil(samples / batch)
