"""Random inputs for a model, for smoke tests only (labelled random): floats drawn where the
model takes floats, never values the model does not bound itself.

A sample rate, a flag or a mask drawn at random would run the model on inputs it never sees,
or crash it; :func:`random_source` refuses those with one line that says how to give them
(``--set NAME=VALUE`` or the data). Token ids into a constant table are drawn within it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.constants import typed_constants, with_constants
from onnx_squeeze.calibration.feeds import Feed
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import InputSpec, input_specs, random_feed
from onnx_squeeze.shapes import batch_axis, concrete_input_shapes, display_dims, is_fixed


class RandomSource:
    """Random data shaped by the input specs (normal floats, small integers): smoke tests only.

    Deterministic: every iteration, and every source with the same seed, yields the same data.
    Each input takes its shape from ``overrides`` when given there (a symbolic batch axis,
    :func:`shapes.batch_axis`, still takes ``batch_size`` when that is given); otherwise a
    symbolic batch axis takes ``batch_size`` and other symbolic dimensions 1, while fixed ones
    stay. ``batch_size`` defaults to the first fixed (or overridden) batch dimension, else 1;
    ``count`` samples are rounded up to whole batches. It draws whatever the specs ask for:
    :func:`random_source` is what refuses to invent integer and scalar inputs.
    """

    is_random = True

    def __init__(
        self,
        specs: Sequence[InputSpec],
        count: int = 32,
        seed: int = 0,
        overrides: Mapping[str, Sequence[int]] | None = None,
        batch_size: int | None = None,
    ) -> None:
        if count < 1:
            raise SettingsError(f"random calibration needs at least 1 sample, got {count}")
        if batch_size is not None and batch_size < 1:
            raise SettingsError(f"batch size must be at least 1, got {batch_size}")
        self._specs = list(specs)
        self.seed = seed
        self._shapes = {spec.name: spec.concrete_shape(overrides) for spec in self._specs}
        axes = {spec.name: batch_axis(spec.shape) for spec in self._specs}
        batched = [
            spec.name
            for spec in self._specs
            if axes[spec.name] is not None
            and not is_fixed(spec.shape[axes[spec.name]])
            and (batch_size is not None or spec.name not in (overrides or {}))
        ]
        fixed = [
            shape[axes[name]]  # type: ignore[index]
            for name, shape in self._shapes.items()
            if axes[name] is not None and name not in batched
        ]
        self.batch_size = batch_size or (fixed[0] if fixed else 1)
        for name in batched:
            shape = list(self._shapes[name])
            shape[axes[name]] = self.batch_size  # type: ignore[index]
            self._shapes[name] = tuple(shape)
        self._batches = math.ceil(count / self.batch_size)
        self.label = f"random ({self._batches * self.batch_size} samples, seed {seed})"

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self._batches):
            yield random_feed(self._specs, rng, self._shapes)


# Random integers are 0..7 (runtime.random_feed): valid ids for a table of at least this many rows.
_RANDOM_IDS = 8


def _reads_only_ids(value: ir.Value) -> bool:
    """Whether the graph reads an integer input only for its shape or as the indices of a
    Gather from a constant table of at least 8 rows (token ids into an embedding): random ids
    0..7 are then values the model itself bounds, not invented ones."""
    for node, index in value.uses():
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            continue
        table = node.inputs[0] if node.op_type == "Gather" and index == 1 else None
        axis = node.attributes.get("axis")
        constant = table is not None and (
            table.const_value is not None
            or (table.producer() is not None and table.producer().op_type == "Constant")
        )
        rows = table.shape[0] if constant and table.shape is not None and len(table.shape) else None
        if not (
            constant
            and (axis is None or axis.value == 0)
            and isinstance(rows, int)
            and rows >= _RANDOM_IDS
        ):
            return False
    return True


def _article(dtype: np.dtype) -> str:
    return "an" if str(dtype)[0] in "aeiou" else "a"


def invented_inputs(model: ir.Model, given: Sequence[str] = ()) -> list[str]:
    """Why random data for ``model`` would invent values: one line per input that is a scalar,
    or an integer/bool tensor whose values the graph reads (other than as token ids, see
    :func:`_reads_only_ids`), and that ``given`` (constant inputs) does not name."""
    values = {value.name: value for value in model.graph.inputs}
    problems = []
    for spec in input_specs(model):
        if spec.name in given:
            continue
        how = f"--set {spec.name}=VALUE or in the data"
        if not spec.shape:
            problems.append(
                f"input {spec.name!r} is {_article(spec.dtype)} {spec.dtype} scalar: random values would be "
                f"invented; give it with {how}"
            )
        elif not np.issubdtype(spec.dtype, np.floating) and not _reads_only_ids(values[spec.name]):
            readers = sorted({node.op_type for node, _ in values[spec.name].uses()})
            problems.append(
                f"input {spec.name!r} is {spec.dtype} {list(display_dims(values[spec.name].shape))}"
                f" read as values ({', '.join(readers)}): random values would be invented; give "
                f"it with {how}"
            )
    return problems


def random_source(
    model: ir.Model,
    *,
    count: int = 32,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int | None = None,
    default_dim: int | None = None,
    constants: Mapping[str, Any] | None = None,
    batches: int | None = None,
) -> Any:
    """Random data for ``model`` (:class:`RandomSource`, ``count`` samples or ``batches``
    batches), with the constant inputs filled in; an :class:`InputError` naming the input when
    random values would be invented (:func:`invented_inputs`). Shapes come from
    :func:`shapes.concrete_input_shapes` (a :class:`ShapeUnknownError` when nothing gives a
    dimension and no ``default_dim`` is asked for)."""
    specs = input_specs(model)
    values = typed_constants(specs, constants)
    problems = invented_inputs(model, list(values))
    if problems:
        raise InputError(problems[0])
    shapes = concrete_input_shapes(model, shapes, batch=batch_size, default_dim=default_dim)
    drawn = [spec for spec in specs if spec.name not in values]
    source = RandomSource(drawn, count, seed, shapes)
    if batches is not None:
        source = RandomSource(drawn, batches * source.batch_size, seed, shapes)
    return with_constants(source, values, specs)
