"""The calibration service a pass gets on its context: one source, its first batches, one cache.

Every pass reads data from here, never from a source of its own: with no data given, the
service draws random data once (marked random, from the run's seed and input shapes) and every
pass sees the same draws. Statistics are cached under one key scheme, the model's fingerprint
(structure and weights) and the source's identity, so a pass that changes the model never
reads statistics measured on the model before it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.random_data import random_source
from onnx_squeeze.calibration.sources import CalibrationSource, Feed
from onnx_squeeze.errors import InputError
from onnx_squeeze.runtime import input_specs
from onnx_squeeze.shapes import batch_axes, batch_axis, samples_in

# Random samples drawn when no data is given (the CLI's --calib-count default).
RANDOM_SAMPLES = 32


class Calibration:
    """The run's calibration data for passes.

    ``source`` is what the user gave (``supplied``), or None: then random data is drawn on first
    use (see :meth:`draw_random_for`). Iterating the service iterates the source.
    """

    def __init__(self, source: CalibrationSource | None = None) -> None:
        self.supplied = source is not None
        self._source = source
        self._random: Callable[[], CalibrationSource] | None = None
        self.used = False  # whether a pass read the data (random data is drawn only then)
        self._store: dict[Hashable, dict[Any, Any]] = {}
        self.axes: dict[str, int | None] = {}  # each input's batch axis (axis 0 when unknown)

    def draw_random_for(
        self,
        model: ir.Model,
        shapes: Callable[[ir.Model], dict[str, tuple[int, ...]]],
        *,
        seed: int = 0,
        count: int = RANDOM_SAMPLES,
        constants: Mapping[str, Any] | None = None,
    ) -> None:
        """Without data given, draw random data for ``model`` when a pass first needs it
        (``shapes`` is asked then, so a run that needs no data needs no shapes), with the
        ``constants`` (``--set``) filled in; it refuses to invent integer and scalar inputs
        (:func:`random_data.random_source`). The first call decides, later ones change nothing.
        The samples of a feed are counted on ``model``'s batch axes."""
        self.axes = self.axes or batch_axes(model)
        if self._source is None and self._random is None:
            self._random = lambda: random_source(
                model, count=count, seed=seed, shapes=shapes(model), constants=constants
            )

    @property
    def source(self) -> CalibrationSource:
        self.used = True
        if self._source is None:
            if self._random is None:
                raise InputError("this pass needs calibration data: pass --calib DATA")
            self._source = self._random()
        return self._source

    @property
    def is_random(self) -> bool:
        """Whether the data is random (given as such, or drawn for want of data)."""
        return not self.supplied or bool(getattr(self._source, "is_random", False))

    @property
    def label(self) -> str:
        return str(getattr(self.source, "label", type(self.source).__name__))

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def batches(self, count: int | None = None) -> Iterator[Feed]:
        """The first ``count`` batches one at a time (all when None)."""
        return iter(self.source) if count is None else itertools.islice(self.source, count)

    def first_batches(self, count: int | None = None) -> list[Feed]:
        """The first ``count`` batches held in memory (all when None); an error when there are
        none, naming the data."""
        feeds = list(self.batches(count))
        if not feeds:
            raise InputError(f"calibration data {self.label} yielded no batches")
        return feeds

    def first_samples(
        self, samples: int, purpose: str, notes: list[str], source: Iterable[Feed] | None = None
    ) -> list[Feed]:
        """Whole batches until ``samples`` samples, held in memory for a pass that runs over
        them many times (recovery's waves, fine-tuning's steps); ``source`` is the same data
        read another way (with labels). ``purpose`` names the job in ``notes``, which say how
        much was read and warn when the data is random."""
        if self.is_random and not self.supplied:
            notes.append(
                f"WARNING: no calibration data given; {purpose} used RANDOM inputs, which rarely "
                "helps on real data: pass calibration data (--calib)"
            )
        elif self.is_random:
            notes.append(f"WARNING: the calibration data is random: {purpose} is a smoke test")
        feeds: list[Feed] = []
        count = 0
        for feed in self if source is None else source:
            feeds.append(dict(feed))
            count += samples_in(feed, self.axes)
            if count >= samples:
                break
        if not feeds:
            raise InputError(f"{purpose}: the calibration data {self.label} yielded no batches")
        notes.append(f"calibration: {count} samples in {len(feeds)} batches from {self.label}")
        return feeds

    def feed_at(self, index: int = 0) -> Feed:
        """Batch ``index`` (the first by default)."""
        for feed in self.batches(index + 1):
            if index == 0:
                return feed
            index -= 1
        raise InputError(f"calibration data {self.label} has no batch {index}")

    @property
    def identity(self) -> str:
        """What the cache keys the data by: its label and the object (two sources with one
        label, such as two files both named calib.npz, are kept apart)."""
        return f"{self.label}@{id(self.source):x}"

    def store(self, model: ir.Model, *kind: Hashable) -> dict[Any, Any]:
        """The cache for statistics of ``kind`` measured on ``model`` over this data: a dict a
        pass fills and reads, the same for the same model (structure and weights) and data."""
        return self._store.setdefault((fingerprint(model), self.identity, kind), {})


def fingerprint(model: ir.Model) -> str:
    """A digest of the graph's structure and weights (shapes and a sample of values), so that
    statistics are reused only for the model they were measured on."""
    digest = hashlib.sha1()
    for node in model.graph:
        digest.update(f"{node.op_type}|{node.name}|".encode())
        digest.update("|".join(v.name if v else "" for v in node.inputs).encode())
    for name, value in sorted(model.graph.initializers.items()):  # shape inference reorders
        digest.update(name.encode())
        if value.const_value is not None:
            array = value.const_value.numpy()
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array.ravel()[:4096]).tobytes())
    return digest.hexdigest()


def resized(feed: Feed, model: ir.Model, batch: int) -> Feed:
    """``feed`` cut or repeated along each input's batch axis (:func:`shapes.batch_axis`) to
    ``batch`` samples where the model leaves that axis free (timing at a chosen batch); inputs
    with a fixed batch dimension, and scalars, stay as they are."""
    free = {}
    for spec in input_specs(model):
        axis = batch_axis(spec.shape)
        if axis is not None and not (isinstance(spec.shape[axis], int) and spec.shape[axis] > 0):
            free[spec.name] = axis
    return {
        name: np.take(array, np.arange(batch) % np.shape(array)[free[name]], axis=free[name])
        if name in free and np.ndim(array) > free[name]
        else array
        for name, array in feed.items()
    }
