"""Calibration data sources: feed dicts one batch at a time, from arrays, images, random draws
(labelled as such) or onnxruntime readers; each iteration starts from the first batch.
:func:`open_source` picks the source a spec names; the file readers live in :mod:`.arrays` and
:mod:`.images`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnx_squeeze.calibration.arrays import ARRAY_SUFFIXES, GivenArrays, NpzSource
from onnx_squeeze.calibration.constants import ConstantInputs, typed_constants, with_constants
from onnx_squeeze.calibration.feeds import CalibrationSource, Feed
from onnx_squeeze.calibration.images import IMAGE_SUFFIXES, ImageFolderSource
from onnx_squeeze.calibration.random_data import random_source
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import input_specs


class ReaderSource:
    """Wraps an object with onnxruntime's ``CalibrationDataReader`` protocol.

    ``get_next()`` returns a feed dict, or None at the end. When the reader has ``rewind()``,
    each iteration calls it first. Without it, a reader can only be read once, so the feeds are
    cached as they are read while they total at most ``cache_limit_bytes``; later iterations replay
    the cache (and continue reading if the first pass stopped early). A reader with more data
    than that is read once, and iterating again raises :class:`InputError` asking for a
    ``rewind()`` method or an ``.npz`` file: holding everything would break the memory bound.
    """

    is_random = False

    def __init__(self, reader: Any, *, cache_limit_bytes: int = 256 * 2**20) -> None:
        self._reader = reader
        self._rewind = getattr(reader, "rewind", None)
        self._cache: list[Feed] | None = []
        self._cache_limit = cache_limit_bytes
        self._cached_bytes = 0
        self._complete = False
        self.label = f"reader:{type(reader).__name__}"

    def _read(self) -> Iterator[Feed]:
        while (feed := self._reader.get_next()) is not None:
            if not isinstance(feed, Mapping):
                raise InputError(
                    f"{self.label}: get_next() returned a {type(feed).__name__}; it must return "
                    "a dict {input name: array}, or None after the last batch"
                )
            yield dict(feed)

    def __iter__(self) -> Iterator[Feed]:
        if callable(self._rewind):
            self._rewind()
            yield from self._read()
            return
        if self._cache is None:
            raise InputError(
                f"{self.label} has no rewind() and its data (over {self._cache_limit // 2**20} MiB) "
                "was read once already: add a rewind() method or save the feeds as .npz"
            )
        yield from list(self._cache)
        if self._complete:
            return
        for feed in self._read():
            if self._cache is not None:
                self._cached_bytes += sum(getattr(value, "nbytes", 0) for value in feed.values())
                if self._cached_bytes <= self._cache_limit:
                    self._cache.append(feed)
                else:
                    self._cache = None
            yield feed
        self._complete = True


class FeedsSource:
    """Feed dicts given as a list (iterated again at will) or any other iterable (a generator:
    read once, through :class:`ReaderSource`'s bounded cache)."""

    is_random = False

    def __init__(self, feeds: Iterable[Mapping[str, Any]]) -> None:
        if isinstance(feeds, Sequence):
            self._feeds: Any = feeds
            self.label = f"feeds ({len(feeds)} batches)"
        else:
            self._feeds = ReaderSource(_Reader(iter(feeds)))
            self.label = "feeds (an iterable)"

    def __len__(self) -> int:
        if isinstance(self._feeds, Sequence):
            return len(self._feeds)
        raise TypeError("an iterable of feeds has no length")

    def __iter__(self) -> Iterator[Feed]:
        for feed in self._feeds:
            if not isinstance(feed, Mapping):
                raise InputError(
                    f"{self.label}: an item is a {type(feed).__name__}; each must be a dict "
                    "{input name: array}"
                )
            yield dict(feed)


class _Reader:
    """``get_next()`` over an iterator."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items

    def get_next(self) -> Any:
        return next(self._items, None)


HOLDOUT_EVERY = 5  # every 5th batch (20 %) of the calibration data is kept for evaluation


class BatchSubset:
    """Every ``every``-th batch of a source (``held=True``) or all the others: a deterministic
    split of one data set into a calibration part and a held-out evaluation part, so that
    fidelity is measured on data the passes did not see."""

    def __init__(
        self, source: CalibrationSource, every: int, *, held: bool, purpose: str = "evaluation"
    ) -> None:
        self.source, self.every, self.held, self.purpose = source, every, held, purpose
        self.is_random = getattr(source, "is_random", False)
        part = (
            f"every {every}th batch, held out for {purpose}"
            if held
            else f"{every - 1} of every {every} batches; every {every}th is held out for {purpose}"
        )
        self.label = f"{source.label} ({part})"

    def __len__(self) -> int:
        total = len(self.source)  # type: ignore[arg-type]
        held = total // self.every
        return held if self.held else total - held

    def __iter__(self) -> Iterator[Feed]:
        for index, feed in enumerate(self.source):
            if (index % self.every == self.every - 1) == self.held:
                yield feed

    def carrying(self, names: Sequence[str]) -> BatchSubset:
        """The same split of the source with more arrays per feed (see NpzSource.carrying)."""
        if not hasattr(self.source, "carrying"):
            raise InputError(f"{self.source.label} carries no arrays besides the model's inputs")
        return BatchSubset(
            self.source.carrying(names), self.every, held=self.held, purpose=self.purpose
        )


def split_for_evaluation(
    source: CalibrationSource, every: int = HOLDOUT_EVERY, purpose: str = "evaluation"
) -> tuple[CalibrationSource, CalibrationSource | None]:
    """Calibration and held-out evaluation parts of ``source`` (every ``every``-th batch held
    out for ``purpose``, which the labels name); ``(source, None)`` when it has fewer than
    ``every`` batches to spare one."""
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if total is not None and total < every:
        return source, None
    return (
        BatchSubset(source, every, held=False, purpose=purpose),
        BatchSubset(source, every, held=True, purpose=purpose),
    )


def open_source(
    spec: Any,
    model: ir.Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    count: int = 32,
    seed: int = 0,
    preset: str = "imagenet",
    batch_size: int | None = None,
    limit: int | None = None,
    default_dim: int | None = None,
    constants: Mapping[str, Any] | None = None,
) -> CalibrationSource:
    """The calibration source that ``spec`` names, for ``model``, every feed with the
    ``constants`` (input name -> one value or an array, ``--set``) added.

    ``spec``: None or "random" (random data, ``count`` samples from ``seed``); a ``.npz``/``.npy``
    file or a folder of them; a dict {input name: samples stacked on the batch axis}, read as
    such a file; a folder of images (``preset`` preprocessing, one-input models); a reader with
    ``get_next()`` (onnxruntime's ``CalibrationDataReader``); feed dicts (a list, or any
    iterable: read once and replayed as :class:`ReaderSource` does); or a source already made. ``shapes`` (from
    :func:`onnx_squeeze.runtime.parse_shape_overrides`) sets symbolic dimensions for random data
    and image sizes; ``batch_size`` defaults to the model's fixed batch dimension, else 1;
    ``limit`` caps the samples read from files or images. Random data is
    :func:`random_source`'s (it refuses to invent integer and scalar inputs).
    """
    if spec is None or (isinstance(spec, str) and spec == "random"):
        return random_source(
            model,
            count=count,
            seed=seed,
            shapes=shapes,
            batch_size=batch_size,
            default_dim=default_dim,
            constants=constants,
        )
    if isinstance(spec, Mapping):
        spec = GivenArrays(spec)
    elif not isinstance(spec, str | os.PathLike | CalibrationSource | GivenArrays):
        if hasattr(spec, "get_next"):
            spec = ReaderSource(spec)
        elif isinstance(spec, Iterable):
            spec = FeedsSource(spec)
        else:
            raise SettingsError(
                "calibration data must be 'random', a path, a dict {input name: samples}, "
                "feed dicts or a reader with get_next(); got a "
                f"{type(spec).__name__}"
            )
    if isinstance(spec, CalibrationSource):
        if not constants:
            return spec  # a made source or a reader needs no model
        every = input_specs(model)
        return ConstantInputs(spec, typed_constants(every, constants), every)
    every = input_specs(model)
    values = typed_constants(every, constants)
    specs = [item for item in every if item.name not in values]  # what the files must give
    if isinstance(spec, GivenArrays):
        return with_constants(
            NpzSource(spec, specs, batch_size=batch_size, limit=limit), values, every
        )
    path = Path(spec)
    if not path.exists():
        raise InputError(f"calibration data not found: {os.fspath(spec)}")
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
        return with_constants(
            NpzSource(path, specs, batch_size=batch_size, limit=limit), values, every
        )
    if path.is_file():
        raise InputError(
            f"calibration data {os.fspath(spec)}: unsupported file type; use a .npz or .npy file, "
            "a folder of them, or a folder of images"
        )
    has_arrays = any(p.suffix.lower() in ARRAY_SUFFIXES for p in path.iterdir() if p.is_file())
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
    if has_arrays and has_images:
        raise InputError(
            f"{os.fspath(spec)} holds both arrays (.npz/.npy) and images: point at a folder of one kind"
        )
    if has_arrays:
        return with_constants(
            NpzSource(path, specs, batch_size=batch_size, limit=limit), values, every
        )
    if not has_images:
        raise InputError(f"{os.fspath(spec)}: no .npz/.npy files or images in this folder")
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise InputError(
            f"image calibration needs a model with one input besides those given by --set; "
            f"this one has {len(specs)} ({names}): save the feeds as .npz instead"
        )
    images = ImageFolderSource(
        path, specs[0], preset, overrides=shapes, batch_size=batch_size, limit=limit
    )
    return with_constants(images, values, every)
