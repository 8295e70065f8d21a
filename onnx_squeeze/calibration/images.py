"""Calibration images: a folder of pictures decoded, resized and normalised by a preset into
the feeds of a one-input model."""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnx_squeeze.calibration.feeds import Feed, batch_size_for, batches_in
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import InputSpec
from onnx_squeeze.shapes import is_fixed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
            name for name, axis in (("NCHW", 1), ("NHWC", 3)) if not is_fixed(shape[axis])
        ]
        if not layouts:
            raise InputError(
                f"input {spec.name!r} has shape {shape} with no 3-channel axis; image presets "
                "make RGB: save preprocessed arrays as .npz instead"
            )
        self.layout = layouts[0]
        spatial = shape[2:] if self.layout == "NCHW" else shape[1:3]
        default = self.preprocessing.default_size
        self.size = tuple(int(d) if is_fixed(d) else default for d in spatial)
        self.batch_size, self._fixed = batch_size_for([spec], batch_size, overrides)
        self.files = _image_files(self.folder)[:limit]
        if not self.files:
            raise InputError(f"{os.fspath(folder)}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        height, width = self.size
        self.label = (
            f"images:{os.fspath(folder)} ({len(self.files)} images, {preset} "
            f"{height}x{width} {self.layout})"
        )

    def __len__(self) -> int:
        return batches_in(len(self.files), self.batch_size, self._fixed)

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
