"""Calibration arrays from ``.npz``/``.npy`` files (or arrays given in memory), read batch by
batch along each input's batch axis without loading whole files where the format allows."""

from __future__ import annotations

import copy
import math
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_squeeze.calibration.constants import fill
from onnx_squeeze.calibration.feeds import Feed, batch_size_for, batches_in
from onnx_squeeze.errors import InputError
from onnx_squeeze.runtime import InputSpec
from onnx_squeeze.shapes import batch_axis, is_fixed

ARRAY_SUFFIXES = (".npz", ".npy")


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
        self.batch_size, self._fixed = batch_size_for(
            self._specs, batch_size, axes=self._files[0][2]
        )
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
                    is_fixed(want) and got != want
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
            for index in range(batches_in(take, self.batch_size, self._fixed)):
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
