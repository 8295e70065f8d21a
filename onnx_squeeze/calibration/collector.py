"""Statistics of chosen tensors over calibration batches: a copy of the model exposes them,
one session runs every batch, and accumulators keep what is needed."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import stat_graph
from onnx_squeeze.calibration.accumulators import (
    ChannelMeans,
    ChannelStatistics,
    Histogram,
    MinMax,
    TensorStatistics,
)
from onnx_squeeze.calibration.feeds import Feed
from onnx_squeeze.calibration.runner import expose, exposed_session, run_checked
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.progress import track
from onnx_squeeze.shapes import is_fixed as is_static

# ---------------------------------------------------------------------------------------------
# Collection

KINDS = ("minmax", "histogram", "channels", "means")


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
        value.shape is not None and len(value.shape) > 0 and not is_static(value.shape[0])
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
                session = exposed_session(self._model, self.provider)
                arrays = dict(zip(outputs, run_checked(session, outputs, feed, where), strict=True))
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
            session = exposed_session(self._model, self.provider)
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
        return exposed_session(model, self.provider), outputs, reductions, derived

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
                arrays.update(zip(outputs, run_checked(session, outputs, feed, where), strict=True))
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
