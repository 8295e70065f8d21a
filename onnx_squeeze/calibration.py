"""Calibration data sources and streaming statistics of the tensors a model computes.

A calibration source yields feed dicts (``{input name: array}``) one batch at a time and can be
iterated again: each iteration starts from the first batch. Sources are ``.npz``/``.npy`` files
(:class:`NpzSource`), a folder of images with a named preprocessing (:class:`ImageFolderSource`),
random data from the model's input spec for smoke tests (:class:`RandomSource`), or any object
with onnxruntime's ``get_next()`` protocol (:class:`ReaderSource`); :func:`open_source` picks one.

:class:`StatisticsCollector` runs onnxruntime on a copy of the model whose outputs are the
requested tensors and feeds each batch into streaming accumulators (:class:`MinMax`,
:class:`Histogram`, :class:`ChannelStatistics`). Their memory is fixed once the first batch has
been seen, whatever the number of samples. NaN values show in min/max and per-channel results
(so broken activations are not hidden); histograms count non-finite values apart.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from onnx_squeeze import stat_graph
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.progress import track
from onnx_squeeze.runtime import InputSpec, create_session, input_specs, random_feed

Feed = dict[str, np.ndarray]

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@runtime_checkable
class CalibrationSource(Protocol):
    """Feed dicts batch by batch; iterating again restarts from the first batch."""

    label: str  # human-readable, shown in reports
    is_random: bool  # True only for random data: results on it are smoke tests

    def __iter__(self) -> Iterator[Feed]: ...


def _static(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0


def _batch_size(
    specs: Sequence[InputSpec],
    requested: int | None,
    overrides: Mapping[str, Sequence[int]] | None = None,
) -> tuple[int, bool]:
    """The batch size (first axis of every input) and whether the model fixes it.

    When it is fixed, a partial last batch cannot run, so sources drop it.
    """
    fixed = {}
    for spec in specs:
        shape = tuple(overrides[spec.name]) if overrides and spec.name in overrides else spec.shape
        if shape and _static(shape[0]):
            fixed[spec.name] = int(shape[0])
    if len(set(fixed.values())) > 1:
        sizes = ", ".join(f"{name}: {size}" for name, size in fixed.items())
        raise SettingsError(
            f"the model inputs have different fixed first dimensions ({sizes}); "
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


def _batches_in(samples: int, batch: int, fixed: bool) -> int:
    return samples // batch if fixed else math.ceil(samples / batch)


# ---------------------------------------------------------------------------------------------
# .npz / .npy


def _read_header(stream: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape), dtype


def _read_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in a .npy/.npz file, read without loading the data."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as stream:
                return {"": _read_header(stream)}
        headers = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as stream:
                        headers[member[: -len(".npy")]] = _read_header(stream)
        return headers
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read calibration file {path}: {error}") from None


def feeds_in_memory(
    source: Any,
    specs: Sequence[InputSpec],
    samples: int,
    *,
    seed: int,
    batch_size: int,
    purpose: str,
    notes: list[str],
    shapes: Callable[[], Mapping[str, Sequence[int]]] | None = None,
) -> list[Feed]:
    """Up to ``samples`` samples of ``source`` held as feeds, for a pass that runs over them
    several times (recovery, fine-tuning); random inputs from ``specs`` when there is no source,
    shaped by ``shapes()`` (the run's input shapes). ``purpose`` names the job in the warnings
    added to ``notes``."""
    if source is None:
        overrides = shapes() if shapes else None
        source = RandomSource(
            specs, count=samples, seed=seed, overrides=overrides, batch_size=batch_size
        )
        notes.append(
            f"WARNING: no calibration data given; {purpose} used RANDOM inputs, which rarely "
            "helps on real data: pass calibration data (--calib)"
        )
    elif getattr(source, "is_random", False):
        notes.append(f"WARNING: the calibration data is random: {purpose} is a smoke test")
    feeds, count = [], 0
    for feed in source:
        feeds.append(dict(feed))
        count += len(next(iter(feed.values())))
        if count >= samples:
            break
    if not feeds:
        raise SettingsError(f"{purpose}: the calibration data yielded no batches")
    label = getattr(source, "label", type(source).__name__)
    notes.append(f"calibration: {count} samples in {len(feeds)} batches from {label}")
    return feeds


class _StoredArray:
    """An array of an uncompressed .npz read a few samples at a time (``np.savez`` stores its
    members uncompressed): only the batch being fed is ever in memory, as with a memory-mapped
    .npy, and no file pages are mapped into the process."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        row = math.prod(self.shape[1:])
        count = max(stop - start, 0) * row
        data = np.fromfile(
            self.path, self.dtype, count, offset=self.offset + start * row * self.dtype.itemsize
        )
        return data.reshape(-1, *self.shape[1:])


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local header; name, extra follow


def _stored_arrays(path: Path, names: Sequence[str]) -> dict[str, _StoredArray] | None:
    """Readers of the named members of an .npz when they are stored uncompressed in C order
    (None when one is not: the caller loads the file instead)."""
    found = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as stream:
        for name in names:
            info = archive.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            stream.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(stream.read(_LOCAL_HEADER.size))
            stream.seek(fields[10] + fields[11], os.SEEK_CUR)  # name and extra lengths
            if np.lib.format.read_magic(stream) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            if fortran or not shape or dtype.hasobject:
                return None
            found[name] = _StoredArray(path, stream.tell(), tuple(shape), dtype)
    return found


class NpzSource:
    """Arrays from a ``.npz`` (one array per input name), a ``.npy`` (single-input models), or a
    folder of such files (sorted by name).

    The first axis of every array holds the samples; arrays are split along it into batches of
    ``batch_size`` (default: the model's fixed batch dimension, else 1). Batches do not span
    files. Files are checked against the model's inputs when the source is made (names, ranks,
    fixed dimensions, dtypes that cast within their kind, e.g. float64 to float32), reading only
    their headers. Arrays not named after a model input are ignored, unless a pass asks for
    them by name (:meth:`carrying`, e.g. ``labels`` for fine-tuning). ``.npy`` files are memory
    mapped and uncompressed ``.npz`` files read batch by batch, so memory does not grow with the
    data; a compressed ``.npz`` is loaded one file at a time. ``limit`` caps the number of
    samples.
    """

    is_random = False

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[InputSpec],
        *,
        batch_size: int | None = None,
        limit: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"calibration data not found: {os.fspath(path)}")
        self._specs = list(specs)
        self.batch_size, self._fixed = _batch_size(self._specs, batch_size)
        if self.path.is_dir():
            files = sorted(
                p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES
            )
            if not files:
                raise InputError(f"{os.fspath(path)}: no .npz or .npy files in this folder")
        else:
            files = [self.path]
        self._files = [(file, self._check(file)) for file in files]
        self._carried: tuple[str, ...] = ()
        self._limit = limit
        self.samples = sum(stop - start for _, start, stop in self._plan())
        available = sum(samples for _, samples in self._files)
        unused = f", {available - self.samples} unused" if available > self.samples else ""
        where = f"{len(files)} files, " if self.path.is_dir() else ""
        self.label = f"npz:{os.fspath(path)} ({where}{self.samples} samples{unused})"

    def _check(self, file: Path) -> int:
        """Validate one file against the input specs; return its number of samples."""
        headers = _read_headers(file)
        if file.suffix.lower() == ".npy":
            if len(self._specs) != 1:
                names = ", ".join(spec.name for spec in self._specs)
                raise InputError(
                    f"{file}: a .npy file holds one array but the model has {len(self._specs)} "
                    f"inputs ({names}): save an .npz with one array per input name"
                )
            headers = {self._specs[0].name: headers[""]}
        missing = [spec.name for spec in self._specs if spec.name not in headers]
        if missing:
            raise InputError(
                f"{file}: no array for model input {', '.join(map(repr, missing))}; "
                f"the file has {', '.join(map(repr, sorted(headers))) or 'no arrays'}"
            )
        samples = set()
        for spec in self._specs:
            shape, dtype = headers[spec.name]
            if len(shape) != len(spec.shape) or any(
                _static(want) and got != want
                for got, want in zip(shape[1:], spec.shape[1:], strict=True)
            ):
                raise InputError(
                    f"{file}: array {spec.name!r} has shape {shape}, the model input needs "
                    f"{spec.shape} (the first axis holds the samples)"
                )
            if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
                raise InputError(
                    f"{file}: array {spec.name!r} is {dtype}, the model input is {spec.dtype}: "
                    f"save it with .astype(np.{spec.dtype})"
                )
            if shape:
                samples.add(shape[0])
        if len(samples) > 1:
            raise InputError(
                f"{file}: the arrays hold different numbers of samples on their first axis "
                f"({', '.join(map(str, sorted(samples)))})"
            )
        return samples.pop() if samples else 1

    def carrying(self, names: Sequence[str]) -> NpzSource:
        """This source with the named arrays (not model inputs, e.g. labels) added to every
        feed, batched alike; each file must hold them, one entry per sample."""
        for file, samples in self._files:
            headers = _read_headers(file)
            for name in names:
                shape = headers.get(name, ((), None))[0]
                if not shape or shape[0] != samples:
                    found = f"shape {shape}" if name in headers else "none"
                    raise InputError(
                        f"{file}: array {name!r} needs one entry per sample ({samples}), "
                        f"found {found}"
                    )
        carried = copy.copy(self)
        carried._carried = tuple(names)
        return carried

    def _plan(self) -> Iterator[tuple[Path, int, int]]:
        """(file, first sample, end sample) of every batch, in order."""
        left = self._limit if self._limit is not None else math.inf
        for file, samples in self._files:
            take = int(min(samples, left))
            for index in range(_batches_in(take, self.batch_size, self._fixed)):
                start = index * self.batch_size
                yield file, start, min(start + self.batch_size, take)
            left -= take
            if left <= 0:
                return

    def __len__(self) -> int:
        return sum(1 for _ in self._plan())

    def _load(self, file: Path) -> dict[str, np.ndarray]:
        if file.suffix.lower() == ".npy":
            return {self._specs[0].name: np.load(file, mmap_mode="r")}
        names = [spec.name for spec in self._specs] + list(self._carried)
        stored = _stored_arrays(file, names)
        if stored is not None:
            return stored
        with np.load(file) as arrays:
            return {name: arrays[name] for name in names}

    def __iter__(self) -> Iterator[Feed]:
        loaded: Path | None = None
        for file, start, stop in self._plan():
            if file != loaded:
                arrays, loaded = self._load(file), file
            feed = {
                spec.name: np.ascontiguousarray(
                    arrays[spec.name][start:stop] if arrays[spec.name].ndim else arrays[spec.name],
                    dtype=spec.dtype,
                )
                for spec in self._specs
            }
            feed.update((name, np.asarray(arrays[name][start:stop])) for name in self._carried)
            yield feed


# ---------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input: geometry, then ``(pixel / 255 - mean) / std`` (RGB).

    geometry: "crop" resizes so the short side is ``size / 0.875`` and crops the center (224
    from 256); "letterbox" fits the image inside and pads with gray 114; "stretch" resizes to
    the size, ignoring the aspect ratio. ``default_size`` is used when the model's input size
    is symbolic and no shape override gives it.
    """

    geometry: str
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    default_size: int = 224


PRESETS = {
    "imagenet": Preprocessing("crop", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": Preprocessing("crop", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), default_size=299),
    "yolo": Preprocessing("letterbox", default_size=640),
    "raw01": Preprocessing("stretch"),
}

_CROP_FRACTION = 0.875
_LETTERBOX_GRAY = (114, 114, 114)


def _pillow() -> Any:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise InputError(
            "reading calibration images needs Pillow: pip install onnx-squeeze[images]"
        ) from None
    return Image, ImageOps


def _image_files(folder: Path) -> list[Path]:
    """The images under ``folder``, sorted by path within each subfolder, the subfolders taken
    in turn (the first image of each, then the second ...): any first part of the list, be it a
    ``limit`` or calibration that stops once its ranges settle, spans every class folder."""
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            by_folder.setdefault(path.parent, []).append(path)
    rounds = itertools.zip_longest(*by_folder.values())
    return [path for round_ in rounds for path in round_ if path is not None]


class ImageFolderSource:
    """Images under a folder (jpg/png/bmp/webp, recursive; subfolders in turn, see
    :func:`_image_files`) for a one-input model.

    ``preset`` names a :data:`PRESETS` entry. The layout is NCHW or NHWC, found from which axis
    of the input has 3 channels (NCHW when neither is fixed); the height and width come from the
    input shape (or ``overrides``) when static, else from the preset. ``limit`` caps the number
    of images. Images are decoded with Pillow, EXIF rotation applied, converted to RGB.
    """

    is_random = False

    def __init__(
        self,
        folder: str | os.PathLike,
        spec: InputSpec,
        preset: str = "imagenet",
        *,
        overrides: Mapping[str, Sequence[int]] | None = None,
        batch_size: int | None = None,
        limit: int | None = None,
    ) -> None:
        self._image, self._image_ops = _pillow()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"calibration data not found: {os.fspath(folder)}")
        if preset not in PRESETS:
            raise SettingsError(f"unknown image preset {preset!r}: use one of {', '.join(PRESETS)}")
        self.preprocessing = PRESETS[preset]
        self.spec = spec
        shape = tuple(overrides[spec.name]) if overrides and spec.name in overrides else spec.shape
        if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
            raise InputError(
                f"input {spec.name!r} ({spec.dtype}, shape {shape}) is not a float image batch "
                "(N, C, H, W) or (N, H, W, C): save preprocessed arrays as .npz instead"
            )
        layouts = [name for name, axis in (("NCHW", 1), ("NHWC", 3)) if shape[axis] == 3]
        layouts = layouts or [
            name for name, axis in (("NCHW", 1), ("NHWC", 3)) if not _static(shape[axis])
        ]
        if not layouts:
            raise InputError(
                f"input {spec.name!r} has shape {shape} with no 3-channel axis; image presets "
                "make RGB: save preprocessed arrays as .npz instead"
            )
        self.layout = layouts[0]
        spatial = shape[2:] if self.layout == "NCHW" else shape[1:3]
        default = self.preprocessing.default_size
        self.size = tuple(int(d) if _static(d) else default for d in spatial)
        self.batch_size, self._fixed = _batch_size([spec], batch_size, overrides)
        self.files = _image_files(self.folder)[:limit]
        if not self.files:
            raise InputError(f"{os.fspath(folder)}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        height, width = self.size
        self.label = (
            f"images:{os.fspath(folder)} ({len(self.files)} images, {preset} "
            f"{height}x{width} {self.layout})"
        )

    def __len__(self) -> int:
        return _batches_in(len(self.files), self.batch_size, self._fixed)

    def __iter__(self) -> Iterator[Feed]:
        for index in range(len(self)):
            chunk = self.files[index * self.batch_size : (index + 1) * self.batch_size]
            batch = np.stack([self._load(path) for path in chunk])  # N, H, W, C
            if self.layout == "NCHW":
                batch = batch.transpose(0, 3, 1, 2)
            yield {self.spec.name: np.ascontiguousarray(batch, dtype=self.spec.dtype)}

    def _load(self, path: Path) -> np.ndarray:
        """One image as float32 (H, W, 3), preprocessed."""
        height, width = self.size
        bilinear = self._image.Resampling.BILINEAR
        try:
            with self._image.open(path) as opened:
                image = self._image_ops.exif_transpose(opened).convert("RGB")
        except OSError as error:
            raise InputError(f"cannot read image {path}: {error}") from None
        geometry = self.preprocessing.geometry
        if geometry == "crop":
            scale = max(height / image.height, width / image.width) / _CROP_FRACTION
            resized = (
                max(width, round(image.width * scale)),
                max(height, round(image.height * scale)),
            )
            image = image.resize(resized, bilinear)
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        elif geometry == "letterbox":
            scale = min(height / image.height, width / image.width)
            resized = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            canvas = self._image.new("RGB", (width, height), _LETTERBOX_GRAY)
            canvas.paste(
                image.resize(resized, bilinear),
                ((width - resized[0]) // 2, (height - resized[1]) // 2),
            )
            image = canvas
        else:
            image = image.resize((width, height), bilinear)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(self.preprocessing.mean, dtype=np.float32)
        std = np.asarray(self.preprocessing.std, dtype=np.float32)
        return (pixels - mean) / std


# ---------------------------------------------------------------------------------------------
# Random data and readers


class RandomSource:
    """Random data shaped by the input specs (normal floats, small integers): smoke tests only.

    Deterministic: every iteration, and every source with the same seed, yields the same data.
    Each input takes its shape from ``overrides`` when given there (a symbolic first dimension
    still takes ``batch_size`` when that is given); otherwise a symbolic first dimension takes
    ``batch_size`` and other symbolic dimensions 1, while fixed ones stay.
    ``batch_size`` defaults to the first fixed (or overridden) first dimension, else 1; ``count``
    samples are rounded up to whole batches.
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
        batched = [
            spec.name
            for spec in self._specs
            if spec.shape
            and not _static(spec.shape[0])
            and (batch_size is not None or spec.name not in (overrides or {}))
        ]
        fixed = [shape[0] for name, shape in self._shapes.items() if shape and name not in batched]
        self.batch_size = batch_size or (fixed[0] if fixed else 1)
        for name in batched:
            self._shapes[name] = (self.batch_size, *self._shapes[name][1:])
        self._batches = math.ceil(count / self.batch_size)
        self.label = f"random ({self._batches * self.batch_size} samples, seed {seed})"

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self._batches):
            yield random_feed(self._specs, rng, self._shapes)


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


HOLDOUT_EVERY = 5  # every 5th batch (20 %) of the calibration data is kept for evaluation


class BatchSubset:
    """Every ``every``-th batch of a source (``held=True``) or all the others: a deterministic
    split of one data set into a calibration part and a held-out evaluation part, so that
    fidelity is measured on data the passes did not see."""

    def __init__(self, source: CalibrationSource, every: int, *, held: bool) -> None:
        self.source, self.every, self.held = source, every, held
        self.is_random = getattr(source, "is_random", False)
        part = (
            f"every {every}th batch, held out from calibration"
            if held
            else f"{every - 1} of every {every} batches; every {every}th is held out for evaluation"
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
        return BatchSubset(self.source.carrying(names), self.every, held=self.held)


def split_for_evaluation(
    source: CalibrationSource, every: int = HOLDOUT_EVERY
) -> tuple[CalibrationSource, CalibrationSource | None]:
    """Calibration and held-out evaluation parts of ``source`` (every ``every``-th batch held
    out); ``(source, None)`` when it has fewer than ``every`` batches to spare one."""
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if total is not None and total < every:
        return source, None
    return BatchSubset(source, every, held=False), BatchSubset(source, every, held=True)


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
) -> CalibrationSource:
    """The calibration source that ``spec`` names, for ``model``.

    ``spec``: None or "random" (random data, ``count`` samples from ``seed``); a ``.npz``/``.npy``
    file or a folder of them; a folder of images (``preset`` preprocessing, one-input models);
    a reader with ``get_next()``; or a source already made. ``shapes`` (from
    :func:`onnx_squeeze.runtime.parse_shape_overrides`) sets symbolic dimensions for random data
    and image sizes; ``batch_size`` defaults to the model's fixed batch dimension, else 1;
    ``limit`` caps the samples read from files or images. Random data takes its shapes from
    :func:`analysis.concrete_input_shapes` (a :class:`ShapeUnknownError` when nothing gives a
    dimension and no ``default_dim`` is asked for).
    """
    if spec is None or (isinstance(spec, str) and spec == "random"):
        from onnx_squeeze.analysis import concrete_input_shapes

        shapes = concrete_input_shapes(model, shapes, batch=batch_size, default_dim=default_dim)
        return RandomSource(input_specs(model), count, seed, shapes)
    if isinstance(spec, CalibrationSource):
        return spec
    if hasattr(spec, "get_next"):
        return ReaderSource(spec)
    if not isinstance(spec, str | os.PathLike):
        raise SettingsError(
            f"calibration data must be 'random', a path or a reader with get_next(); got a "
            f"{type(spec).__name__}"
        )
    path = Path(spec)
    if not path.exists():
        raise InputError(f"calibration data not found: {os.fspath(spec)}")
    specs = input_specs(model)
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
        return NpzSource(path, specs, batch_size=batch_size, limit=limit)
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
        return NpzSource(path, specs, batch_size=batch_size, limit=limit)
    if not has_images:
        raise InputError(f"{os.fspath(spec)}: no .npz/.npy files or images in this folder")
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise InputError(
            f"image calibration needs a model with one input; this one has {len(specs)} "
            f"({names}): save the feeds as .npz instead"
        )
    return ImageFolderSource(
        path, specs[0], preset, overrides=shapes, batch_size=batch_size, limit=limit
    )


# ---------------------------------------------------------------------------------------------
# Streaming accumulators


class MinMax:
    """Smallest and largest value and the number of values seen (NaN propagates)."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, array: np.ndarray, extremes: tuple[float, float] | None = None) -> None:
        """Take in ``array``; ``extremes`` is its (min, max) when already known."""
        array = np.asarray(array)
        if array.size:
            self.add(*(extremes or _extremes(array)), array.size)

    def merge(self, other: MinMax) -> None:
        if other.count:
            self.add(other.min, other.max, other.count)

    def add(self, low: float, high: float, count: int) -> None:
        """Take in the extremes of ``count`` values."""
        self.min = float(np.minimum(self.min, low))
        self.max = float(np.maximum(self.max, high))
        self.count += count

    @property
    def nbytes(self) -> int:
        return 24  # three 8-byte numbers


def _floating(array: np.ndarray) -> np.ndarray:
    """``array`` as the narrowest float type that holds it exactly (float32 for float16 and
    small integers, float64 for 32/64-bit integers), without a copy when it already is one."""
    array = np.asarray(array)
    return array.astype(np.result_type(array.dtype, np.float32), copy=False)


def _extremes(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty array as Python floats (NaN when it holds a NaN)."""
    return float(array.min()), float(array.max())


def _invert(xs: np.ndarray, ys: np.ndarray, target: float) -> float:
    """The smallest x where the non-decreasing piecewise-linear curve (xs, ys) reaches target."""
    k = int(np.searchsorted(ys, target, side="left"))
    if k == 0:  # at or below the start: where the curve first rises
        k = int(np.searchsorted(ys, ys[0], side="right"))
        return float(xs[min(k, len(xs)) - 1])
    if k == len(ys):
        return float(xs[-1])
    fraction = (target - ys[k - 1]) / (ys[k] - ys[k - 1])
    return float(xs[k - 1] + fraction * (xs[k] - xs[k - 1]))


class Histogram:
    """Counts of the (signed) finite values in ``bins`` equal bins from ``low`` to ``high``.

    The number of bins is fixed, so memory is too. The first values set the range; when later
    values fall outside it, the range widens by a whole factor ``m`` with the new edges chosen
    among the old ones, so every new bin is exactly ``m`` old bins merged: re-binning is exact
    (onnxruntime's HistogramCalibrater adds bins instead, which grows without bound). While all
    values seen are equal, ``width`` is 0 and bin 0 holds them. Non-finite values are counted in
    ``nonfinite`` only. Quantiles assume values spread evenly within a bin (error at most one bin
    width). ``counts`` and :attr:`edges` are there for entropy or MSE range searches.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 1:
            raise SettingsError(f"a histogram needs at least 1 bin, got {bins}")
        self.counts = np.zeros(bins, dtype=np.int64)
        self.low = 0.0
        self.width = 0.0
        self.nonfinite = 0

    @property
    def bins(self) -> int:
        return self.counts.size

    @property
    def high(self) -> float:
        return self.low + self.width * self.bins

    @property
    def edges(self) -> np.ndarray:
        return self.low + self.width * np.arange(self.bins + 1)

    @property
    def total(self) -> int:
        """Number of finite values counted."""
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + 24

    def _bin(self, values: np.ndarray) -> np.ndarray:
        index = np.floor((values - self.low) / self.width)
        return np.clip(index, 0, self.bins - 1).astype(np.intp)

    def _add_point(self, value: float, count: int) -> None:
        self.counts[0 if self.width == 0 else self._bin(np.array([value]))[0]] += count

    def _cover(self, low: float, high: float) -> None:
        """Widen the range so that it holds [low, high], merging bins exactly."""
        if self.total == 0:
            self.low, self.width = low, (high - low) / self.bins
            return
        if self.width == 0:  # every value so far equals self.low
            if low == high == self.low:
                return
            point, count = self.low, int(self.counts[0])
            self.counts[0] = 0
            self.low = min(low, point)
            self.width = (max(high, point) - self.low) / self.bins
            self._add_point(point, count)
            return
        if low >= self.low and high <= self.high:
            return
        # Old bin i spans [low + i*width, ...); the new edges are old edges first + j*factor.
        first = min(0, math.floor((low - self.low) / self.width))
        last = max(self.bins, math.ceil((high - self.low) / self.width))
        factor = math.ceil((last - first) / self.bins)
        slack = first + factor * self.bins - last
        if first < 0:  # spare room goes to the side(s) that grew, keeping e.g. ReLU's 0 an edge
            first -= slack if last == self.bins else slack // 2
        merged = np.zeros_like(self.counts)
        np.add.at(merged, (np.arange(self.bins) - first) // factor, self.counts)
        self.counts = merged
        self.low += first * self.width
        self.width *= factor

    def update(self, array: np.ndarray, extremes: tuple[float, float] | None = None) -> None:
        """Count the values of ``array``; ``extremes`` is its (min, max) when already known.

        Binning runs in the array's own float type (float32 stays float32, no float64 copy),
        so a value within float32 rounding of an edge may land in the neighbouring bin.
        """
        values = _floating(array).ravel()
        if values.size == 0:
            return
        low, high = extremes if extremes is not None else _extremes(values)
        if not (math.isfinite(low) and math.isfinite(high)):
            finite = np.isfinite(values)
            self.nonfinite += int(values.size - np.count_nonzero(finite))
            values = values[finite]
            if values.size == 0:
                return
            low, high = _extremes(values)
        self._cover(low, high)
        if self.width == 0:
            self.counts[0] += values.size
            return
        index = values - values.dtype.type(self.low)
        index *= values.dtype.type(1 / self.width)
        # values >= low, so only the top edge needs clamping (into the last bin); a rounding
        # just below 0 truncates to bin 0
        np.minimum(index, self.bins - 1, out=index)
        self.counts += np.bincount(index.astype(np.intp), minlength=self.bins)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts; exact when the bins line up, else split evenly."""
        self.nonfinite += other.nonfinite
        if other.total == 0:
            return
        self._cover(other.low, other.high)
        if other.width == 0:
            self._add_point(other.low, int(other.counts[0]))
            return
        positions = np.clip((self.edges - other.low) / other.width, 0, other.bins)
        cumulative = np.concatenate([[0], np.cumsum(other.counts)])
        spread = np.interp(positions, np.arange(other.bins + 1), cumulative)
        self.counts += np.diff(np.rint(spread)).astype(np.int64)

    def quantile(self, q: float) -> float:
        """The smallest value with a fraction ``q`` (0 to 1) of the values at or below it
        (numpy's "inverted_cdf" quantile), to within one bin width."""
        if not 0 <= q <= 1 or self.total == 0:
            raise ValueError(f"quantile {q} of a histogram with {self.total} values")
        cumulative = np.concatenate([[0], np.cumsum(self.counts)])
        return _invert(self.edges, cumulative, q * self.total)

    def percentile_range(
        self, percentile: float, *, symmetric: bool = False
    ) -> tuple[float, float]:
        """The range holding ``percentile`` % of the values.

        Asymmetric: the central range, cutting equal tails on both sides. Symmetric: (-t, t) with
        t the percentile of the absolute values (what onnxruntime's percentile calibration uses).
        """
        tail = 1 - percentile / 100
        if not symmetric:
            return self.quantile(tail / 2), self.quantile(1 - tail / 2)
        if self.width == 0:
            threshold = abs(self.quantile(0))
            return -threshold, threshold
        edges = self.edges
        cumulative = np.concatenate([[0], np.cumsum(self.counts)])
        points = np.unique(np.abs(np.concatenate([[0.0], edges])))
        inside = np.interp(points, edges, cumulative) - np.interp(-points, edges, cumulative)
        threshold = _invert(points, inside, (1 - tail) * self.total)
        return -threshold, threshold


class ChannelStatistics:
    """Per channel along ``axis``: count, mean, variance, mean absolute value, zero fraction, min
    and max.

    Means and variances are combined with Chan's parallel formula (count, mean, sum of squared
    deviations) rather than raw sums of squares, which lose all precision when the mean is large
    against the spread. Arrays are allocated at the first update, one value per channel.
    """

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.count = 0  # values per channel
        empty = np.zeros(0)
        self.mean = self.min = self.max = self._squares = self._abs_sum = empty
        self._zeros = np.zeros(0, dtype=np.int64)

    @property
    def channels(self) -> int:
        return self.mean.size

    @property
    def var(self) -> np.ndarray:
        """Population variance per channel."""
        return self._squares / self.count

    @property
    def abs_mean(self) -> np.ndarray:
        return self._abs_sum / self.count

    @property
    def zero_fraction(self) -> np.ndarray:
        return self._zeros / self.count

    @property
    def nbytes(self) -> int:
        arrays = (self.mean, self.min, self.max, self._squares, self._abs_sum, self._zeros)
        return 8 + sum(array.nbytes for array in arrays)

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if not -array.ndim <= self.axis < array.ndim:
            raise InputError(f"channel axis {self.axis} is out of range for rank {array.ndim}")
        if array.size == 0:
            return
        axis = self.axis % array.ndim
        others = tuple(i for i in range(array.ndim) if i != axis)  # reduced in place: no transpose
        count = array.size // array.shape[axis]
        values = _floating(array)
        # One float64 copy, reused for the deviations: float32 sums would lose the precision
        # that Chan's formula keeps.
        deviations = values.astype(np.float64)
        mean = deviations.sum(axis=others) / count
        deviations -= np.expand_dims(mean, others)
        np.square(deviations, out=deviations)
        self._combine(
            count,
            mean,
            deviations.sum(axis=others),
            np.abs(values).sum(axis=others, dtype=np.float64),
            np.count_nonzero(values == 0, axis=others),
            values.min(axis=others).astype(np.float64),
            values.max(axis=others).astype(np.float64),
        )

    def merge(self, other: ChannelStatistics) -> None:
        if other.count:
            self._combine(
                other.count,
                other.mean,
                other._squares,
                other._abs_sum,
                other._zeros,
                other.min,
                other.max,
            )

    def _combine(
        self,
        count: int,
        mean: np.ndarray,
        squares: np.ndarray,
        abs_sum: np.ndarray,
        zeros: np.ndarray,
        low: np.ndarray,
        high: np.ndarray,
    ) -> None:
        if self.count == 0:
            self.count, self.mean, self._squares = count, mean.copy(), squares.copy()
            self._abs_sum, self._zeros = abs_sum.copy(), zeros.astype(np.int64)
            self.min, self.max = low.copy(), high.copy()
            return
        if mean.size != self.channels:
            raise InputError(
                f"channel axis {self.axis} has {mean.size} entries here but {self.channels} before"
            )
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self._squares = self._squares + squares + np.square(delta) * (self.count * count / total)
        self._abs_sum = self._abs_sum + abs_sum
        self._zeros = self._zeros + zeros
        self.min = np.minimum(self.min, low)
        self.max = np.maximum(self.max, high)
        self.count = total


class ChannelMeans:
    """Mean of each channel along ``axis``: all that bias correction needs, and cheap enough to
    compute inside the graph (see :mod:`onnx_squeeze.stat_graph`)."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.count = 0  # values per channel
        self.mean = np.zeros(0)

    @property
    def nbytes(self) -> int:
        return 8 + self.mean.nbytes

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if not -array.ndim <= self.axis < array.ndim:
            raise InputError(f"channel axis {self.axis} is out of range for rank {array.ndim}")
        if array.size:
            others = tuple(i for i in range(array.ndim) if i != self.axis % array.ndim)
            count = array.size // array.shape[self.axis]
            self.add(_floating(array).mean(axis=others, dtype=np.float64), count)

    def add(self, mean: np.ndarray, count: int) -> None:
        """Take in the means of ``count`` values per channel."""
        mean = np.asarray(mean, dtype=np.float64).ravel()
        if self.count == 0:
            self.mean, self.count = mean.copy(), count
            return
        if mean.size != self.mean.size:
            raise InputError(
                f"channel axis {self.axis} has {mean.size} entries here but {self.mean.size} before"
            )
        self.count += count
        self.mean = self.mean + (mean - self.mean) * (count / self.count)

    def merge(self, other: ChannelMeans) -> None:
        if other.count:
            self.add(other.mean, other.count)


@dataclasses.dataclass
class TensorStatistics:
    """The accumulators kept for one tensor (None for kinds not asked for)."""

    name: str
    minmax: MinMax | None = None
    histogram: Histogram | None = None
    channels: ChannelStatistics | None = None
    means: ChannelMeans | None = None

    def _accumulators(self) -> list[Any]:
        return [self.minmax, self.histogram, self.channels, self.means]

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        extremes = None
        if array.size and (self.minmax is not None or self.histogram is not None):
            extremes = _extremes(array)  # one pass shared by both
        try:
            if self.minmax is not None:
                self.minmax.update(array, extremes)
            if self.histogram is not None:
                self.histogram.update(array, extremes)
            if self.channels is not None:
                self.channels.update(array)
            if self.means is not None:
                self.means.update(array)
        except InputError as error:
            raise InputError(f"tensor {self.name!r}: {error}") from None

    def update_reduced(
        self,
        extremes: tuple[float, float],
        count: int,
        sample: np.ndarray | None,
        means: np.ndarray | None,
    ) -> None:
        """Take in one run's statistics as reduced in the graph: the extremes of its ``count``
        values, a strided sample of them (the histogram counts the sample) and the channel
        means."""
        if count == 0:
            return
        if self.minmax is not None:
            self.minmax.add(*extremes, count)
        if self.histogram is not None and sample is not None:
            self.histogram.update(sample, extremes)
        if self.means is not None and means is not None:
            try:
                self.means.add(means, count // max(1, np.size(means)))
            except InputError as error:
                raise InputError(f"tensor {self.name!r}: {error}") from None

    def merge(self, other: TensorStatistics) -> None:
        for mine, theirs in zip(self._accumulators(), other._accumulators(), strict=True):
            if (mine is None) != (theirs is None):
                raise ValueError(f"statistics of {self.name!r} keep different kinds; cannot merge")
            if mine is not None:
                mine.merge(theirs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._accumulators() if a is not None)


# ---------------------------------------------------------------------------------------------
# Collection

KINDS = ("minmax", "histogram", "channels", "means")


def expose(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model | None, list[str]]:
    """A copy of ``model`` whose outputs are the requested tensors that are not graph inputs
    (None when there are none), and the requested graph inputs (read from the feeds)."""
    copy = model.clone()  # initializer tensors are shared, not copied
    graph = copy.graph
    constants = [name for name in names if name in graph.initializers]
    if constants:
        raise SettingsError(
            f"{', '.join(map(repr, constants))}: initializers are constant; read their values "
            "from the model instead of collecting statistics"
        )
    inputs = {value.name: value for value in graph.inputs}
    values = dict(inputs)
    values.update((value.name, value) for node in graph for value in node.outputs if value.name)
    missing = [name for name in names if name not in values]
    if missing:
        raise SettingsError(
            f"no tensor named {', '.join(map(repr, missing))} in the model's main graph "
            "(tensors inside If/Loop/Scan bodies cannot be collected)"
        )
    if any(values[name].dtype is None for name in names):
        ShapeInferencePass(strict_mode=False)(copy)
    untyped = [name for name in names if values[name].dtype is None]
    if untyped:
        raise InputError(
            f"the element type of {', '.join(map(repr, untyped))} is unknown and shape inference "
            "cannot find it: re-export the model with value types"
        )
    for name in names:
        dtype = values[name].dtype
        if not (dtype.is_floating_point() or dtype.is_integer() or dtype == ir.DataType.BOOL):
            raise SettingsError(f"tensor {name!r} is {dtype.name}: statistics need numbers")
    outputs = [values[name] for name in names if name not in inputs]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    return (copy if outputs else None), [name for name in names if name in inputs]


def _batch_total(source: Iterable[Feed], limit: int | None) -> int | None:
    try:
        total = len(source)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # onnxruntime's readers raise NotImplementedError
        return limit
    return total if limit is None else min(total, limit)


# Concatenated feeds run together while their outputs stay under this size: fewer, larger runs
# are faster in onnxruntime, and one run's outputs are all the collector holds at once.
RUN_BYTES = 16 * 2**20
_MAX_RUN_SAMPLES = 16  # beyond this a run gains little, and stop checks come later


def _samples(feed: Feed) -> int:
    return int(np.shape(next(iter(feed.values())))[0])


def _mergeable(first: Feed, second: Feed) -> bool:
    return first.keys() == second.keys() and all(
        np.shape(first[name])[1:] == np.shape(second[name])[1:]
        and np.asarray(first[name]).dtype == np.asarray(second[name]).dtype
        for name in first
    )


class _Runs:
    """Consecutive feeds joined along the batch axis into runs of at most ``samples`` samples
    (set by the collector once it knows the output size of one sample); yields (index of the
    first feed, joined feed). Feeds are joined only when ``batched`` (every input's first
    dimension is symbolic) and their other dimensions and types match."""

    def __init__(self, feeds: Iterable[Feed], batched: bool) -> None:
        self._feeds = feeds
        self._batched = batched
        self.samples = 1
        self.feeds_yielded = 0  # source feeds in the runs yielded so far

    def _run(self, pending: list[Feed]) -> Feed:
        self.feeds_yielded += len(pending)
        return _join(pending)

    def __iter__(self) -> Iterator[tuple[int, Feed]]:
        pending: list[Feed] = []
        first = 0
        for index, feed in enumerate(self._feeds):
            joinable = self._batched and all(np.ndim(a) for a in feed.values())
            if pending and not (
                joinable
                and _mergeable(pending[0], feed)
                and sum(map(_samples, pending)) + _samples(feed) <= self.samples
            ):
                yield first, self._run(pending)
                pending = []
            if not pending:
                first = index
            pending.append(feed)
            if not joinable:
                yield first, self._run(pending)
                pending = []
        if pending:
            yield first, self._run(pending)


def free_batch(model: ir.Model) -> bool:
    """Whether every input of ``model`` has a symbolic first (batch) dimension."""
    return all(
        value.shape is not None and len(value.shape) > 0 and not _static(value.shape[0])
        for value in model.graph.inputs
    )


def joined(feeds: Iterable[Feed], samples: int, model: ir.Model) -> list[Feed]:
    """Consecutive feeds of one shape joined into batches of at most ``samples`` samples when
    ``model``'s batch dimension is free: a pass that runs over the feeds many times then pays
    onnxruntime's per-run cost once per batch (recovery of a ResNet-18 on 16 single-sample
    feeds: 940 runs)."""
    runs = _Runs(feeds, free_batch(model))
    runs.samples = samples
    return [feed for _, feed in runs]


def _run_samples(nbytes: int, samples: int) -> int:
    """How many samples one run may hold, given that ``samples`` samples made ``nbytes`` bytes
    of collected tensors."""
    per_sample = max(1.0, nbytes / max(1, samples))
    return int(min(_MAX_RUN_SAMPLES, max(1, RUN_BYTES // per_sample)))


def _run(session: Any, outputs: list[str], feed: Feed, where: str) -> list[np.ndarray]:
    """One onnxruntime run; a feed it rejects is the data's fault, reported with ``where``."""
    try:
        return session.run(outputs, feed)
    except (InvalidArgument, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"{where}: {first_line}") from None


def _join(feeds: list[Feed]) -> Feed:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


class StatisticsCollector:
    """Streaming statistics of chosen tensors (intermediate ones, graph inputs or outputs) over
    calibration batches.

    The model is cloned (initializer tensors shared, not copied) and the clone's outputs are
    replaced by the requested tensors, so the caller's model is never modified and onnxruntime
    computes only what they need; one session runs every batch. ``keep`` picks the accumulators
    (``minmax``, ``histogram``, ``channels``). ``channel_axis`` is an axis for every tensor
    (tensors of lower rank then get no channel statistics), a mapping per tensor (tensors left
    out get none), or None. Memory is that of the accumulators plus one batch.

    With ``sample_values`` > 0, float tensors without ``channels`` statistics are reduced in
    the graph after the first run (which measures them): exact min/max, per-channel means, and
    for the histogram a strided sample of about ``sample_values`` values per sample, which
    estimates the distribution without copying whole tensors out of onnxruntime.

    ``join`` lets consecutive feeds run together while the collected tensors of a run stay
    under ``RUN_BYTES``. That bounds onnxruntime's own activations only when the collected
    tensors are most of them; collecting a few small tensors (a model's outputs) wants
    ``join=False``, or a run of 64 samples holds 64 samples' activations.
    """

    def __init__(
        self,
        model: ir.Model,
        tensors: Sequence[str],
        *,
        histogram_bins: int = 2048,
        channel_axis: int | Mapping[str, int] | None = 1,
        provider: str = "cpu",
        keep: Sequence[str] = KINDS,
        sample_values: int = 0,
        join: bool = True,
    ) -> None:
        self.names = list(dict.fromkeys(tensors))
        if not self.names:
            raise SettingsError("no tensors given to collect statistics for")
        unknown = sorted(set(keep) - set(KINDS))
        if unknown:
            raise SettingsError(f"unknown statistics {unknown}: keep any of {', '.join(KINDS)}")
        if "histogram" in keep and histogram_bins < 1:
            raise SettingsError(f"histogram_bins must be at least 1, got {histogram_bins}")
        if isinstance(channel_axis, Mapping):
            stray = sorted(set(channel_axis) - set(self.names))
            if stray:
                raise SettingsError(f"channel_axis names tensors not collected: {stray}")
        if sample_values < 0:
            raise SettingsError(f"sample_values must be 0 (off) or more, got {sample_values}")
        self.keep = frozenset(keep)
        self.sample_values = sample_values
        self.histogram_bins = histogram_bins
        self.channel_axis = channel_axis
        self.provider = provider
        self._model, self._fed = expose(model, self.names)
        self._outputs = (
            [v.name for v in self._model.graph.outputs] if self._model is not None else []
        )
        self._batched = join and free_batch(self._model or model)

    def _session(self, model: ir.Model) -> Any:
        """A session on an exposed or reduced copy, loaded from a file with external data:
        onnxruntime then maps the weights instead of copying them out of a serialized model.
        Level "extended": the NCHWc layout of "all" copies every Conv weight, which peaked a
        ResNet-50's calibration at 433 instead of 343 MiB, and every tensor that is reduced
        or exposed has to be reordered back, so that whole calibrations ran at most 8 % faster
        with it (ResNet-18, MobileNetV2; YOLO and ResNet-50 not at all). Eager order: each
        tensor is reduced, and freed, as soon as it is made."""
        with tempfile.TemporaryDirectory(
            prefix="onnx-squeeze-", ignore_cleanup_errors=True
        ) as folder:
            path = os.path.join(folder, "exposed.onnx")
            ir.save(model, path, external_data="exposed.onnx.data")
            return create_session(path, self.provider, optimization="extended", eager=True)

    def _static_shapes(self, feed: Feed) -> dict[str, tuple[int, ...]] | None:
        """The shape each exposed tensor takes in a run of ``feed``, read from the graph: a
        symbolic dimension named like one of an input's takes its size in the feed, and any
        other first one is taken for the batch; None when any shape is not known so."""
        sizes: dict[str, int] = {}
        for value in self._model.graph.inputs:
            if value.shape is not None and value.name in feed:
                for dim, size in zip(value.shape, np.shape(feed[value.name]), strict=False):
                    if not isinstance(dim, int) and dim.value is not None:
                        sizes[dim.value] = int(size)
        samples = _samples(feed)
        shapes = {}
        for value in self._model.graph.outputs:
            if value.shape is None:
                return None
            dims = []
            for index, dim in enumerate(value.shape):
                if isinstance(dim, int):
                    dims.append(dim)
                elif dim.value in sizes:
                    dims.append(sizes[dim.value])
                elif index == 0:  # the batch, or counted as one (sizes only set sampling)
                    dims.append(samples)
                else:
                    return None
            shapes[value.name] = tuple(dims)
        return shapes

    def _reducible(
        self,
        statistics: Mapping[str, TensorStatistics],
        shapes: Mapping[str, tuple[int, ...]],
        samples: int,
    ) -> dict[str, stat_graph.Wanted]:
        """What each collected tensor that can be reduced in the graph (see ``sample_values``)
        is reduced to, given its accumulators and its shape in a run of ``samples`` samples."""
        wanted = {}
        for value in self._model.graph.outputs:
            name, shape, kept = value.name, shapes[value.name], statistics[value.name]
            if value.dtype not in stat_graph.REDUCIBLE or kept.channels is not None:
                continue
            size = max(1, math.prod(shape) // max(1, samples))
            wanted[name] = stat_graph.Wanted(
                rank=len(shape),
                step=None
                if kept.histogram is None
                else stat_graph.stride(size, self.sample_values),
                channel_axis=kept.means.axis if kept.means is not None else None,
            )
        return wanted

    def _first_run(
        self, feed: Feed, where: str, runs: _Runs, statistics: dict[str, TensorStatistics]
    ) -> tuple[Any, list[str], dict, dict, dict[str, np.ndarray] | None]:
        """Set up collection on the first feed: the accumulators, the run size, and the
        session; (session, its outputs, reductions, derived statistics, the first feed's arrays
        if that already ran).

        When the graph gives every exposed tensor's shape, the reduced copy is the only session
        made: a run with every tensor whole (250 MiB on a 640x640 YOLO) is then never needed.
        Otherwise the whole-tensor session runs once to learn them."""
        samples = _samples(feed)
        shapes = {name: np.shape(feed[name]) for name in self._fed}
        dtypes = {name: np.asarray(feed[name]).dtype for name in self._fed}
        session, outputs, arrays = None, self._outputs, None
        if self._model is not None:
            graph_shapes = self._static_shapes(feed)
            if graph_shapes is None:
                session = self._session(self._model)
                arrays = dict(zip(outputs, _run(session, outputs, feed, where), strict=True))
                graph_shapes = {name: np.shape(array) for name, array in arrays.items()}
                dtypes.update((name, array.dtype) for name, array in arrays.items())
            else:
                dtypes.update((v.name, v.dtype.numpy()) for v in self._model.graph.outputs)
            shapes.update(graph_shapes)
        if self._batched:
            nbytes = sum(math.prod(shapes[n]) * np.dtype(dtypes[n]).itemsize for n in shapes)
            runs.samples = _run_samples(nbytes, samples)
        for name in self.names:
            statistics[name] = self._new_statistics(name, len(shapes[name]))
        wanted = {}
        if self.sample_values and self._model is not None:
            wanted = self._reducible(statistics, shapes, samples)
        if wanted:  # every run, this one too, counts from the reductions
            session = arrays = None  # one session at a time: each holds its own weight copies
            session, outputs, reductions, derived = self._reduced(wanted)
            return session, outputs, reductions, derived, None
        if session is None and self._model is not None:
            session = self._session(self._model)
        return session, outputs, {}, {}, arrays

    def _reduced(
        self, wanted: Mapping[str, stat_graph.Wanted]
    ) -> tuple[Any, list[str], dict[str, stat_graph.Reduction], dict[str, stat_graph.Derived]]:
        """A session on the reduced copy, its output names, the reductions and the tensors
        whose statistics derive from them."""
        derived = stat_graph.derived(self._model, wanted)
        reduced = {name: want for name, want in wanted.items() if name not in derived}
        model, reductions = stat_graph.reduced_model(self._model, reduced, leave_out=derived)
        outputs = [value.name for value in model.graph.outputs]
        return self._session(model), outputs, reductions, derived

    def _count(
        self,
        statistics: TensorStatistics,
        results: Mapping[str, np.ndarray],
        reduction: stat_graph.Reduction,
        function: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Take in one run's reductions of a tensor, or of the source it derives from through
        the non-decreasing ``function``."""
        low, high = float(results[reduction.low]), float(results[reduction.high])
        sample = results[reduction.sample] if reduction.sample else None
        means = results[reduction.means] if reduction.means else None
        if function is not None:
            low, high = float(function(low)), float(function(high))
            sample = None if sample is None else np.asarray(function(sample), np.float32)
            means = None
        statistics.update_reduced((low, high), int(results[reduction.count]), sample, means)

    def _new_statistics(self, name: str, rank: int) -> TensorStatistics:
        statistics = TensorStatistics(name)
        if "minmax" in self.keep:
            statistics.minmax = MinMax()
        if "histogram" in self.keep:
            statistics.histogram = Histogram(self.histogram_bins)
        per_tensor = self.channel_axis
        axis = per_tensor.get(name) if isinstance(per_tensor, Mapping) else per_tensor
        wants_channels = ("channels" in self.keep or "means" in self.keep) and axis is not None
        if wants_channels and -rank <= axis < rank:
            if "channels" in self.keep:
                statistics.channels = ChannelStatistics(axis)
            if "means" in self.keep:
                statistics.means = ChannelMeans(axis)
        elif wants_channels and isinstance(per_tensor, Mapping):  # asked for by name
            raise SettingsError(f"channel_axis {axis} is out of range for {name!r} (rank {rank})")
        return statistics

    def collect(
        self,
        source: Iterable[Feed],
        *,
        limit: int | None = None,
        progress: bool = True,
        stop: Callable[[int, Mapping[str, TensorStatistics]], bool] | None = None,
    ) -> dict[str, TensorStatistics]:
        """Statistics of every requested tensor over the batches of ``source`` (at most
        ``limit`` batches), fresh for each call. After each run, ``stop`` gets the number of
        batches counted so far and the statistics; when it says True, the rest is not read."""
        if limit is not None and limit < 1:
            raise SettingsError(f"limit must be at least 1 batch, got {limit}")
        label = getattr(source, "label", type(source).__name__)
        batches: Iterable[Feed] = source if limit is None else itertools.islice(source, limit)
        if progress:
            batches = track(batches, f"statistics ({label})", total=_batch_total(source, limit))
        session, outputs, reductions, derived, first = None, self._outputs, {}, {}, None
        runs = _Runs(batches, self._batched)
        statistics: dict[str, TensorStatistics] = {}
        for index, feed in runs:
            absent = [name for name in self._fed if name not in feed]
            if absent:
                raise InputError(f"batch {index} of {label} has no array for input {absent}")
            where = f"batch {index} of {label}"
            if not statistics:
                session, outputs, reductions, derived, first = self._first_run(
                    feed, where, runs, statistics
                )
            arrays = {name: feed[name] for name in self._fed}
            if first is not None:
                arrays.update(first)
                first = None
            elif session is not None:
                arrays.update(zip(outputs, _run(session, outputs, feed, where), strict=True))
            for name in self.names:
                if name in reductions:
                    self._count(statistics[name], arrays, reductions[name])
                elif name in derived:
                    origin, function = derived[name].source, derived[name].function
                    self._count(statistics[name], arrays, reductions[origin], function)
                else:
                    statistics[name].update(arrays.pop(name))  # released once it is counted
            if stop is not None and stop(runs.feeds_yielded, statistics):
                break
        if not statistics:
            raise InputError(f"calibration data {label} yielded no batches")
        return statistics
