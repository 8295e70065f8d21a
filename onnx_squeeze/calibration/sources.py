"""Calibration data sources: feed dicts one batch at a time, from arrays, images, random draws
(labelled as such) or onnxruntime readers; each iteration starts from the first batch."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.constants import ConstantInputs, fill, typed_constants, with_constants
from onnx_squeeze.calibration.random_data import random_source
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import InputSpec, input_specs
from onnx_squeeze.shapes import batch_axis, is_fixed

Feed = dict[str, np.ndarray]


ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@runtime_checkable
class CalibrationSource(Protocol):
    """Feed dicts batch by batch; iterating again restarts from the first batch."""

    label: str  # human-readable, shown in reports
    is_random: bool  # True only for random data: results on it are smoke tests

    def __iter__(self) -> Iterator[Feed]: ...


is_static = is_fixed  # the name the collector knows it by


def _batch_size(
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
        if axis is not None and axis < len(shape) and is_static(shape[axis]):
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


class GivenArrays:
    """Arrays given in memory (input name -> samples on its batch axis), read as an .npz file
    holding them would be: :class:`NpzSource` takes one where it takes a path."""

    suffix = ".npz"

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        self.arrays = {str(name): np.asarray(value) for name, value in arrays.items()}

    def __str__(self) -> str:
        return "the given arrays"


def _read_headers(path: Path | GivenArrays) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in a .npy/.npz file, read without loading the data."""
    if isinstance(path, GivenArrays):
        return {name: (array.shape, array.dtype) for name, array in path.arrays.items()}
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as stream:
                headers = {"": _read_header(stream)}
        else:
            headers = {}
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".npy"):
                        with archive.open(member) as stream:
                            headers[member[: -len(".npy")]] = _read_header(stream)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read calibration file {path}: {error}") from None
    for name, (_, dtype) in headers.items():
        if dtype.hasobject:  # numpy would need allow_pickle, which runs the file's code
            array = f"array {name!r}" if name else "its array"
            raise InputError(
                f"{path}: {array} holds Python objects (a pickle, which could run code): "
                "never loaded; save plain numeric or string arrays"
            )
    return headers


class _StoredArray:
    """An array of an uncompressed .npz read a few samples at a time (``np.savez`` stores its
    members uncompressed): only the batch being fed is ever in memory, as with a memory-mapped
    .npy, and no file pages are mapped into the process."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)

    def take(self, start: int, stop: int, axis: int) -> np.ndarray:
        """Samples ``start:stop`` along ``axis``: one read per index of the axes before it."""
        stop = min(stop, self.shape[axis])
        size = self.shape[axis]
        inner = math.prod(self.shape[axis + 1 :])
        parts = [
            np.fromfile(
                self.path,
                self.dtype,
                max(stop - start, 0) * inner,
                offset=self.offset + (outer * size + start) * inner * self.dtype.itemsize,
            )
            for outer in range(math.prod(self.shape[:axis]))
        ]
        shape = (*self.shape[:axis], max(stop - start, 0), *self.shape[axis + 1 :])
        return np.concatenate(parts).reshape(shape)


def _samples_of(array: Any, axis: int | None, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of an array along its batch axis (all of it when it has none)."""
    if axis is None or np.ndim(array) == 0:
        return array
    if isinstance(array, _StoredArray):
        return array.take(start, stop, axis)
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def _contiguous(array: Any, dtype: np.dtype) -> np.ndarray:
    """``array`` in C order at ``dtype``, copied only when needed; a 0-d array stays 0-d
    (``np.ascontiguousarray`` makes it 1-d)."""
    result = np.asarray(array, dtype=dtype)
    return result if result.flags.c_contiguous else result.copy(order="C")


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local header; name, extra follow


def _stored_arrays(path: Path, names: Sequence[str]) -> dict[str, Any] | None:
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
            if fortran or dtype.hasobject:
                return None
            if not shape:  # a 0-d array (one value for every sample): read it now
                found[name] = np.frombuffer(stream.read(dtype.itemsize), dtype).reshape(())
                continue
            found[name] = _StoredArray(path, stream.tell(), tuple(shape), dtype)
    return found


def _array_files(path: Path) -> list[Path]:
    """The .npz/.npy file at ``path``, or those in the folder, sorted by name."""
    if not path.exists():
        raise InputError(f"calibration data not found: {os.fspath(path)}")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)
    if not files:
        raise InputError(f"{os.fspath(path)}: no .npz or .npy files in this folder")
    return files


def _check_finite(feed: Feed, label: str, start: int) -> None:
    """NaN or Inf in float data would turn into ranges, Grams and errors that crash or lie."""
    for name, array in feed.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(
                f"calibration data {label}: input {name!r} holds NaN or Inf values (in the "
                f"batch from sample {start}); clean the data or leave those samples out"
            )


class NpzSource:
    """Arrays from a ``.npz`` (one array per input name), a ``.npy`` (single-input models), or a
    folder of such files (sorted by name).

    Every array holds its samples on the input's batch axis (:func:`shapes.batch_axis`: axis 0,
    or the first symbolic one after a fixed axis 0, as in a recurrent state ``[2, batch, 128]``);
    a 0-d array is one value for every sample (a sample rate). Arrays are split along their
    batch axes into batches of ``batch_size`` (default: the model's fixed batch dimension,
    else 1), and must hold as many samples each. Batches do not span files. Files are checked
    against the model's inputs when the source is made (names, ranks, fixed dimensions, dtypes
    that cast within their kind, e.g. float64 to float32), reading only their headers. Arrays
    not named after a model input are ignored, unless a pass asks for them by name
    (:meth:`carrying`, e.g. ``labels`` for fine-tuning). ``.npy`` files are memory mapped and
    uncompressed ``.npz`` files read batch by batch, so memory does not grow with the data; a
    compressed ``.npz`` is loaded one file at a time. ``limit`` caps the number of samples.
    """

    is_random = False

    def __init__(
        self,
        path: str | os.PathLike | GivenArrays,
        specs: Sequence[InputSpec],
        *,
        batch_size: int | None = None,
        limit: int | None = None,
    ) -> None:
        self._specs = list(specs)
        self.path = None if isinstance(path, GivenArrays) else Path(path)
        files = [path] if isinstance(path, GivenArrays) else _array_files(self.path)
        self._files = [(file, *self._check(file)) for file in files]
        self.batch_size, self._fixed = _batch_size(self._specs, batch_size, axes=self._files[0][2])
        self._carried: tuple[str, ...] = ()
        self._limit = limit
        self.samples = sum(stop - start for _, _, start, stop in self._plan())
        available = sum(samples for _, samples, _ in self._files)
        unused = f", {available - self.samples} unused" if available > self.samples else ""
        where = f"{len(files)} files, " if self.path and self.path.is_dir() else ""
        name = f"npz:{os.fspath(path)}" if self.path else "arrays"
        self.label = f"{name} ({where}{self.samples} samples{unused})"

    def _check(self, file: Path) -> tuple[int, dict[str, int | None]]:
        """Validate one file against the input specs; return its number of samples and the
        batch axis of each input's array."""
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
                f"the file has {', '.join(map(repr, sorted(headers))) or 'no arrays'} (a value "
                "for every sample can be given with --set NAME=VALUE)"
            )
        samples: dict[str, tuple[int, int]] = {}  # input -> (samples, axis)
        axes: dict[str, int | None] = {}
        for spec in self._specs:
            shape, dtype = headers[spec.name]
            axes[spec.name] = axis = batch_axis(spec.shape, shape)
            if shape and (
                len(shape) != len(spec.shape)
                or any(
                    is_static(want) and got != want
                    for index, (got, want) in enumerate(zip(shape, spec.shape, strict=True))
                    if index != axis
                )
            ):
                where = f"axis {axis}" if axis is not None else "no axis (a scalar input)"
                raise InputError(
                    f"{file}: array {spec.name!r} has shape {shape}, the model input needs "
                    f"{spec.shape} (samples on {where}; a 0-d array is one value for "
                    "every sample)"
                )
            if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
                raise InputError(
                    f"{file}: array {spec.name!r} is {dtype}, the model input is {spec.dtype}: "
                    f"save it with .astype(np.{spec.dtype})"
                )
            if shape and axis is not None:
                samples[spec.name] = (shape[axis], axis)
        if len({count for count, _ in samples.values()}) > 1:
            found = ", ".join(f"{name}: {n} on axis {axis}" for name, (n, axis) in samples.items())
            raise InputError(
                f"{file}: the arrays hold different numbers of samples on their batch axes "
                f"({found}); an input's batch axis is axis 0, or its first symbolic dimension "
                "when axis 0 is fixed above 1 (a state [2, batch, 128]): save every array with "
                "its samples there"
            )
        return next(iter(samples.values()), (1, None))[0], axes

    def carrying(self, names: Sequence[str]) -> NpzSource:
        """This source with the named arrays (not model inputs, e.g. labels) added to every
        feed, batched alike on their first axis; each file must hold them, one entry per
        sample."""
        for file, samples, _ in self._files:
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

    def _plan(self) -> Iterator[tuple[Path, dict[str, int | None], int, int]]:
        """(file, its batch axes, first sample, end sample) of every batch, in order."""
        left = self._limit if self._limit is not None else math.inf
        for file, samples, axes in self._files:
            take = int(min(samples, left))
            for index in range(_batches_in(take, self.batch_size, self._fixed)):
                start = index * self.batch_size
                yield file, axes, start, min(start + self.batch_size, take)
            left -= take
            if left <= 0:
                return

    def __len__(self) -> int:
        return sum(1 for _ in self._plan())

    def _load(self, file: Path | GivenArrays) -> dict[str, Any]:
        if isinstance(file, GivenArrays):
            return file.arrays
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
        empty = True
        for file, axes, start, stop in self._plan():
            if file != loaded:
                arrays, loaded = self._load(file), file
            feed = {
                spec.name: _contiguous(
                    _samples_of(arrays[spec.name], axes[spec.name], start, stop), spec.dtype
                )
                for spec in self._specs
            }
            _check_finite(feed, self.label, start)
            empty = False
            values = {  # 0-d arrays for inputs of higher rank: one value, filled per feed
                spec.name: feed.pop(spec.name)
                for spec in self._specs
                if spec.shape and feed[spec.name].ndim == 0
            }
            feed = fill(feed, values, self._specs)
            feed.update(
                (name, np.asarray(_samples_of(arrays[name], 0, start, stop)))
                for name in self._carried
            )
            yield feed
        if empty:
            raise InputError(f"calibration data {self.label}: holds no samples")


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

# The most pixels an image may have; its header is read before any pixel is decoded. A PNG of
# a few KB can claim 2**32 pixels (a decompression bomb); 64 MP is over a 8K frame's 33 MP.
# ONNX_SQUEEZE_MAX_IMAGE_PIXELS sets it.
MAX_IMAGE_PIXELS = int(os.environ.get("ONNX_SQUEEZE_MAX_IMAGE_PIXELS", 64_000_000))
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
            name for name, axis in (("NCHW", 1), ("NHWC", 3)) if not is_static(shape[axis])
        ]
        if not layouts:
            raise InputError(
                f"input {spec.name!r} has shape {shape} with no 3-channel axis; image presets "
                "make RGB: save preprocessed arrays as .npz instead"
            )
        self.layout = layouts[0]
        spatial = shape[2:] if self.layout == "NCHW" else shape[1:3]
        default = self.preprocessing.default_size
        self.size = tuple(int(d) if is_static(d) else default for d in spatial)
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
            with warnings.catch_warnings():
                # Pillow warns past its own limit; ours below is checked first and said once
                warnings.simplefilter("ignore", self._image.DecompressionBombWarning)
                with self._image.open(path) as opened:
                    pixels = opened.width * opened.height
                    if pixels > MAX_IMAGE_PIXELS:
                        raise InputError(
                            f"image {path} is {opened.width}x{opened.height} ({pixels / 1e6:.0f} M "
                            f"pixels), above the {MAX_IMAGE_PIXELS / 1e6:.0f} M pixels an image "
                            "may have; resize it, or set ONNX_SQUEEZE_MAX_IMAGE_PIXELS"
                        )
                    image = self._image_ops.exif_transpose(opened).convert("RGB")
        except (OSError, self._image.DecompressionBombError) as error:
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
# Readers


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
