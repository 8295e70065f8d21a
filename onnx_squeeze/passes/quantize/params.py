"""Integer quantization parameters: ranges to scale/zero-point, weight quantization, and the
calibration methods that pick an activation range from a streaming histogram.

Pure numpy, no graph code, so that every quantizing pass (INT8, dynamic INT8, FP8) can
share it. Conventions follow onnxruntime and TensorRT:

- a range always contains 0 (zero must be exactly representable: padding, ReLU);
- symmetric quantization has zero point 0 and uses the restricted range ``[-qmax, qmax]``
  (e.g. -127..127 for INT8), so a negated weight quantizes to the negated integer;
- asymmetric quantization maps ``[low, high]`` onto the full ``[qmin, qmax]``.

Calibration methods (``minmax``, ``percentile``, ``entropy``, ``mse``) read a
:class:`onnx_squeeze.calibration.Histogram`, whose memory is fixed whatever the number of
samples, so switching method never reruns the model.
"""

from __future__ import annotations

import dataclasses
import math
import platform

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import Histogram, TensorStatistics
from onnx_squeeze.errors import SettingsError

__all__ = [
    "FP8_MAX",
    "INT8",
    "INT32",
    "METHODS",
    "UINT8",
    "IntType",
    "calibrated_range",
    "cpu_has_vnni",
    "dequantize",
    "fp8_scale",
    "int_type",
    "largest_magnitude",
    "quantize",
    "quantize_fp8",
    "quantize_weight",
    "scale_zero_point",
    "sqnr_db",
    "sqnr_from_histogram",
    "weight_type",
]

METHODS = ("minmax", "percentile", "entropy", "mse")

# Fraction of the observed range below which entropy/MSE searches do not go.
_MIN_RANGE_FRACTION = 0.05
_SEARCH_STEPS = 96
# Fractions of a weight slice's largest magnitude tried as its clipping bound (1.0 first: ties
# keep the full range).
_CLIP_FRACTIONS = np.linspace(1.0, 0.5, 11)


@dataclasses.dataclass(frozen=True)
class IntType:
    """An integer element type for quantized tensors."""

    name: str
    dtype: ir.DataType
    qmin: int
    qmax: int

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.dtype.numpy())

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


INT8 = IntType("int8", ir.DataType.INT8, -128, 127)
UINT8 = IntType("uint8", ir.DataType.UINT8, 0, 255)
INT32 = IntType("int32", ir.DataType.INT32, -(2**31), 2**31 - 1)
_TYPES = {t.name: t for t in (INT8, UINT8)}


def weight_type(bits: int) -> IntType:
    """Signed weights of ``bits`` (2 to 8) stored as INT8: 7 bits avoid the int16 overflow of
    x86 u8*s8 kernels without VNNI (onnxruntime's ``reduce_range``)."""
    if not 2 <= bits <= 8:
        raise SettingsError(f"weight bits must be 2 to 8, got {bits}")
    if bits == 8:
        return INT8
    return IntType(f"int{bits}", ir.DataType.INT8, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI dot products (or is not x86), so 8-bit weights do not
    saturate onnxruntime's u8s8 kernels."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int_type(name: str) -> IntType:
    """The 8-bit type named ``name`` (``int8`` or ``uint8``)."""
    if name not in _TYPES:
        raise SettingsError(f"unknown integer type {name!r}: use one of {', '.join(_TYPES)}")
    return _TYPES[name]


def scale_zero_point(
    low: np.ndarray | float, high: np.ndarray | float, qtype: IntType, *, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) that map ``[low, high]`` (widened to hold 0)
    onto ``qtype``; elementwise for per-channel ranges. An empty range gets scale 1."""
    low = np.minimum(np.asarray(low, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(high, dtype=np.float64), 0.0)
    if symmetric:
        bound = np.maximum(-low, high)
        half = min(-qtype.qmin, qtype.qmax) if qtype.qmin < 0 else qtype.levels / 2
        scale = bound / half
        zero_point = np.full(scale.shape, 0 if qtype.qmin < 0 else (qtype.qmax + 1) // 2)
    else:
        scale = (high - low) / qtype.levels
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qtype.qmin - low / safe), qtype.qmin, qtype.qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    # A float32 scale that underflows would divide by zero in QuantizeLinear.
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return scale, zero_point.astype(qtype.numpy)


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize(
    array: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qtype: IntType,
    axis: int | None = None,
) -> np.ndarray:
    """``saturate(round_half_even(array / scale) + zero_point)``, as QuantizeLinear computes."""
    scale = _broadcast(np.asarray(scale, dtype=np.float32), axis, array.ndim)
    zero_point = _broadcast(np.asarray(zero_point, dtype=np.int64), axis, array.ndim)
    values = np.rint(array.astype(np.float32) / scale) + zero_point
    return np.clip(values, qtype.qmin, qtype.qmax).astype(qtype.numpy)


def dequantize(
    array: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """``(array - zero_point) * scale`` in float32, as DequantizeLinear computes."""
    scale = _broadcast(np.asarray(scale, dtype=np.float32), axis, array.ndim)
    zero_point = _broadcast(np.asarray(zero_point, dtype=np.int64), axis, array.ndim)
    return ((array.astype(np.int64) - zero_point) * scale).astype(np.float32)


def quantize_weight(
    weight: np.ndarray, axis: int | None, qtype: IntType = INT8, *, search_clip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric quantization of a weight, per slice along ``axis`` (None: per tensor).

    ``search_clip`` picks each slice's range among fractions of its largest magnitude by the
    least squared rounding plus clipping error (fewer bits benefit most: a lone outlier no
    longer coarsens the step of the whole channel). Returns the integer weight, the scales and
    the zero points (all zero for signed types).
    """
    bound = _weight_bound(weight, axis, qtype, search_clip)
    scale, zero_point = scale_zero_point(-bound, bound, qtype, symmetric=True)
    return quantize(weight, scale, zero_point, qtype, axis), scale, zero_point


def pair_bounded_scale(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """INT8 scales for a [K, N] weight (per column when ``axis`` is 1, else one) at which the
    integer weights of rows 2i and 2i+1 of a column, when of one sign, add up to at most 128.

    x86 u8*s8 kernels without VNNI (vpmaddubsw) add those two products in 16 bits with
    saturation, so 255 * (|q1| + |q2|) must stay within 32767. Rounding adds at most one step to
    a pair scaled to 127, and a weight alone never exceeds its pair: the step is never coarser
    than 7 bits (largest / 63.5) and close to 8 where the large weights stand apart.
    """
    rows = weight.astype(np.float32)
    if rows.shape[0] % 2:
        rows = np.vstack([rows, np.zeros((1, rows.shape[1]), np.float32)])
    first, second = rows[0::2], rows[1::2]
    pairs = np.where(
        first * second > 0,
        np.abs(first) + np.abs(second),
        np.maximum(np.abs(first), np.abs(second)),
    )
    bound = pairs.max(axis=0, initial=0.0) if axis == 1 else pairs.max(initial=0.0)
    return np.where(bound > 0, bound / INT8.qmax, 1.0).astype(np.float32)


def largest_magnitude(array: np.ndarray, axis: int | None) -> np.ndarray:
    """The largest absolute value per slice along ``axis`` (a scalar when None; 0 if empty)."""
    others = None if axis is None else tuple(a for a in range(array.ndim) if a != axis % array.ndim)
    return np.abs(array).max(axis=others, initial=0.0)


# FP8 E4M3FN: symmetric, no zero point, scale = range / 448 (the largest finite value).
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def fp8_scale(amax: np.ndarray | float) -> np.ndarray:
    """The E4M3FN scale for a range: ``amax / 448`` (1 where the range is empty)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)


def quantize_fp8(array: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """``array / scale`` saturated to +-448 and rounded to E4M3FN (scale per ``axis``), as
    QuantizeLinear computes."""
    scale = _broadcast(np.asarray(scale, dtype=np.float32), axis, array.ndim)
    return np.clip(array / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def _weight_bound(
    weight: np.ndarray, axis: int | None, qtype: IntType, search_clip: bool
) -> np.ndarray:
    """Largest magnitude per slice, or the clipping bound with the least squared error."""
    slices = (
        weight.reshape(1, -1)
        if axis is None
        else np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    ).astype(np.float32)
    largest = np.abs(slices).max(axis=1, initial=0.0)
    if search_clip:
        half = min(-qtype.qmin, qtype.qmax)
        best_error = np.full(largest.shape, np.inf)
        best = largest.copy()
        rounded = np.empty_like(slices)
        for fraction in _CLIP_FRACTIONS:
            bound = largest * fraction
            step = np.where(bound > 0, bound / half, 1.0).astype(np.float32)[:, None]
            np.divide(slices, step, out=rounded)  # in place: weights can be large
            np.rint(rounded, out=rounded)
            np.clip(rounded, -half, half, out=rounded)
            rounded *= step
            rounded -= slices
            error = np.einsum("ij,ij->i", rounded, rounded)
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best = np.where(better, bound, best)
        largest = best
    return largest.reshape(()) if axis is None else largest


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum(np.square(reference - np.asarray(approximation, dtype=np.float64))))
    signal = float(np.sum(np.square(reference)))
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


# ---------------------------------------------------------------------------------------------
# Calibration: an activation range from streaming statistics


def _centers(histogram: Histogram) -> np.ndarray:
    return histogram.low + histogram.width * (np.arange(histogram.bins) + 0.5)


def _candidates(low: float, high: float) -> np.ndarray:
    """Ranges ``f * [low, high]`` shrinking towards 0, so the zero point stays where it is."""
    fractions = np.linspace(_MIN_RANGE_FRACTION, 1.0, _SEARCH_STEPS)
    return np.stack([fractions * min(low, 0.0), fractions * max(high, 0.0)], axis=1)


def _grids(ranges: np.ndarray, qtype: IntType, symmetric: bool) -> np.ndarray:
    """The grid each range of ``ranges`` ([n, 2]) is quantized to, as ``scale_zero_point`` makes
    it: [n, 3] of (lowest, highest, step). The zero point is an integer, so an asymmetric grid
    is the range shifted by up to half a step: a SiLU's [-0.18, 111] with a 0.44 step becomes
    [0, 111.3], and every negative value is clipped to 0."""
    scale, zero_point = scale_zero_point(ranges[:, 0], ranges[:, 1], qtype, symmetric=symmetric)
    step = scale.astype(np.float64)
    zero_point = zero_point.astype(np.float64)
    return np.stack([(qtype.qmin - zero_point) * step, (qtype.qmax - zero_point) * step, step], 1)


def _expected_errors(
    histogram: Histogram, ranges: np.ndarray, qtype: IntType, symmetric: bool
) -> np.ndarray:
    """Mean squared quantization error of the histogram's values (at their bin centers) for
    each candidate range, on the grid it is quantized to (:func:`_grids`): clipping error
    outside, uniform rounding error (step²/12) inside.

    From running sums of the counts n, n·c and n·c² over the bins: the clipping error of the
    bins above ``high`` is Σn(c - high)² = Σnc² - 2·high·Σnc + high²·Σn, and likewise below
    ``low``, so each candidate costs two binary searches instead of a pass over every bin.
    """
    centers = _centers(histogram)
    counts = histogram.counts.astype(np.float64)
    sums = [np.concatenate([[0.0], np.cumsum(counts * centers**power)]) for power in (0, 1, 2)]
    low, high, step = _grids(np.asarray(ranges, np.float64), qtype, symmetric).T
    below = np.searchsorted(centers, low, side="left")  # bins [0, below) lie under low
    above = np.searchsorted(centers, high, side="right")  # bins [above, end) lie over high

    def part(power: int, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        return sums[power][stop] - sums[power][start]

    ends = np.full_like(above, centers.size)
    starts = np.zeros_like(below)
    clipped_high = (
        part(2, above, ends) - 2 * high * part(1, above, ends) + high**2 * part(0, above, ends)
    )
    clipped_low = (
        part(2, starts, below) - 2 * low * part(1, starts, below) + low**2 * part(0, starts, below)
    )
    inside = part(0, below, above)
    errors = np.maximum(clipped_high, 0) + np.maximum(clipped_low, 0) + inside * step**2 / 12
    return errors / max(counts.sum(), 1.0)


def _mse_range(
    histogram: Histogram, low: float, high: float, qtype: IntType, symmetric: bool
) -> tuple[float, float]:
    """The range, among the candidates, whose grid has the least expected squared error (the
    first of equals): both sides shrunk by one fraction, and, for asymmetric types, the high
    side alone, the low side whole. The minimum of a SiLU, GELU or Hardswish (-0.28, -0.17,
    -0.38) is the function's, not an outlier's; shrunk with the high side, it fell under half a
    step once more data raised the maximum, and the zero point rounded to 0 clipped all of it
    (nudenet's second SiLU: a third of its values, 4.6 dB of its box outputs)."""
    if symmetric:
        ranges = _candidates(low, high)
    else:
        both = _candidates(low, high)
        high_only = np.stack([np.full(len(both), min(low, 0.0)), both[:, 1]], axis=1)
        ranges = np.concatenate([both, high_only])
    best = ranges[[int(np.argmin(_expected_errors(histogram, ranges, qtype, symmetric)))]]
    if not symmetric:  # the grid's own range: scale_zero_point makes that very grid again
        best = _grids(best, qtype, symmetric)[:, :2]
    return float(best[0, 0]), float(best[0, 1])


def _kl_divergence(counts: np.ndarray, first: int, last: int, levels: int) -> float:
    """KL(P || Q) where P is the histogram cut to bins ``[first, last)`` with the outliers piled
    into the edge bins, and Q is the cut histogram *without* the outliers merged into ``levels``
    buckets and spread back evenly over the bins that were not empty (TensorRT's entropy
    calibration: the clipped mass is missing from Q, so clipping is penalized)."""
    sliced = counts[first:last].astype(np.float64)
    reference = sliced.copy()
    reference[0] += counts[:first].sum()
    reference[-1] += counts[last:].sum()
    groups = np.array_split(np.arange(reference.size), levels)
    expanded = np.zeros_like(reference)
    for group in groups:
        nonzero = reference[group] > 0
        if nonzero.any():
            expanded[group[nonzero]] = sliced[group].sum() / nonzero.sum()
    p = reference / reference.sum()
    # a group emptied by the cut still gets a trace of mass, so that its KL is large, not inf
    q = np.maximum(expanded, 1e-6 * max(expanded.max(), 1.0))
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _entropy_range(
    histogram: Histogram, low: float, high: float, qtype: IntType
) -> tuple[float, float]:
    """The candidate range whose ``qtype`` levels (all of them: the histogram is signed, unlike
    TensorRT's 128 levels over ``|x|``) lose the least information (KL)."""
    levels = qtype.levels + 1
    best, best_range = math.inf, (low, high)
    for candidate_low, candidate_high in _candidates(low, high):
        first = int(np.floor((candidate_low - histogram.low) / histogram.width))
        last = int(np.ceil((candidate_high - histogram.low) / histogram.width))
        first, last = max(first, 0), min(last, histogram.bins)
        if last - first < levels:
            continue
        divergence = _kl_divergence(histogram.counts, first, last, levels)
        if divergence < best:
            best, best_range = divergence, (float(candidate_low), float(candidate_high))
    return best_range


def _symmetric(low: float, high: float) -> tuple[float, float]:
    bound = max(abs(low), abs(high))
    return -bound, bound


def calibrated_range(
    statistics: TensorStatistics,
    method: str,
    qtype: IntType,
    *,
    symmetric: bool,
    percentile: float = 99.999,
) -> tuple[float, float]:
    """The range to quantize a tensor to, from its min/max and histogram.

    ``minmax``: the observed range. ``percentile``: the range holding ``percentile`` % of the
    values. ``entropy``: the range whose quantized distribution is closest (KL) to the observed
    one. ``mse``: the range with the least expected squared quantization error. Entropy and MSE
    search ranges ``f * [min, max]`` for ``f`` from 5 % to 100 %.
    """
    if method not in METHODS:
        raise SettingsError(f"unknown calibration method {method!r}: use one of {METHODS}")
    minmax, histogram = statistics.minmax, statistics.histogram
    if minmax is None or minmax.count == 0:
        raise ValueError(f"no statistics for {statistics.name!r}")
    low, high = minmax.min, minmax.max
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tensor {statistics.name!r} has non-finite values (NaN/inf)")
    usable = histogram is not None and histogram.total > 0 and histogram.width > 0
    if method == "minmax" or not usable:
        result = (low, high)
    elif method == "percentile":
        result = histogram.percentile_range(percentile, symmetric=symmetric)
    else:
        if symmetric:
            low, high = _symmetric(low, high)
        if method == "entropy":
            result = _entropy_range(histogram, low, high, qtype)
        else:
            result = _mse_range(histogram, low, high, qtype, symmetric)
    result = (min(result[0], 0.0), max(result[1], 0.0))
    return _symmetric(*result) if symmetric else result


def _signed(qtype: IntType) -> bool:
    """Whether activations of ``qtype`` are quantized symmetrically, as the INT8 pass does
    (int8 symmetric, uint8 asymmetric): for the range checks that get only the type."""
    return qtype.qmin < 0


def noise_loss_db(
    histogram: Histogram | None,
    candidate: tuple[float, float] | None,
    reference: tuple[float, float],
    qtype: IntType,
) -> float:
    """How much more expected quantization noise (dB; negative: less) the histogram's values
    get with range ``candidate`` than with ``reference``: 0 for equal ranges, inf for no
    candidate, or when they differ and the histogram cannot tell by how much."""
    if candidate == reference:
        return 0.0
    if candidate is None or histogram is None or histogram.total == 0 or histogram.width == 0:
        return math.inf
    ranges = np.array([candidate, reference], np.float64)
    errors = _expected_errors(histogram, ranges, qtype, _signed(qtype))
    if errors[1] <= 0:
        return 0.0 if errors[0] <= 0 else math.inf
    if errors[0] <= 0:
        return -math.inf
    return 10 * math.log10(errors[0] / errors[1])


def sqnr_from_histogram(
    histogram: Histogram | None, low: float, high: float, qtype: IntType
) -> float | None:
    """Expected SQNR (dB) of quantizing the histogram's values to ``[low, high]``; None when
    the histogram is empty."""
    if histogram is None or histogram.total == 0 or histogram.width == 0:
        return None
    ranges = np.array([[low, high]], np.float64)
    error = float(_expected_errors(histogram, ranges, qtype, _signed(qtype))[0])
    signal = float(np.sum(np.square(_centers(histogram)) * histogram.counts) / histogram.total)
    if error == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / error)
