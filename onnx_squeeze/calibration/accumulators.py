"""Streaming accumulators whose memory is fixed once the first batch has been seen: min/max,
histograms, per-channel statistics and means. NaN shows in min/max and per-channel results;
histograms count non-finite values apart."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from onnx_squeeze.errors import InputError, SettingsError

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


def _spread_below(first: int, last: int, factor: int, bins: int) -> int:
    """Where a histogram that grew below (old bins ``first`` to ``last`` must fit in ``bins``
    bins of ``factor`` old ones) starts: the spare room goes to the sides in proportion to their
    growth (a side that kept its edge counts one bin), so that a SiLU's minimum moving by a
    rounding does not get most of it and its bins lie over values never seen (nudenet: a
    [-0.28, 48] tensor's histogram reached -78); the old lowest edge stays an edge where the
    new bins allow it."""
    slack = first + factor * bins - last
    target = first - slack * -first // (max(last - bins, 1) - first)
    fewest, most = math.ceil(-first / factor), (factor * bins - last) // factor
    if fewest > most:
        return target
    return -factor * min(max(round(-target / factor), fewest), most)


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
        if first < 0:
            first = _spread_below(first, last, factor, self.bins)
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
    compute inside the graph (see :mod:`onnx_squeeze.calibration.stat_graph`)."""

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
