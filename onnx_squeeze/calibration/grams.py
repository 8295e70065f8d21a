"""Streaming input Gram matrices (``XᵀX``) of Conv/Gemm/MatMul layers over calibration data.

Data-aware factorization (whitening), GPTQ (input Hessians), reconstruction-driven channel
selection and layer-wise reconstruction all need the second moment of what a layer's weight
multiplies: rows of a Gemm/MatMul input, im2col patches of a Conv input. :func:`collect_grams`
runs onnxruntime once per group of requested tensors on a copy of the model that exposes them
(:class:`TensorRunner`), and adds each batch to a :class:`~onnx_squeeze.least_squares.GramAccumulator`,
so memory is that of the matrices plus one batch, whatever the number of batches. Requests are
split into groups whose matrices fit a byte budget, one calibration pass per group. Given keys
with several specs each, it sums their inputs into one matrix per key: a weight read by many
nodes (an LSTM unrolled over 20 steps: 40 Gemms over two 4096-wide weights in captcha_crnn)
needs the sum, and one 134 MB matrix per weight instead of one per node takes one calibration
pass instead of fourteen.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.service import Calibration
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import InputError
from onnx_squeeze.least_squares import GramAccumulator, conv_pads, im2col
from onnx_squeeze.progress import track

# Gram matrices (float64) held at once while collecting; more requests take more passes.
BUDGET_BYTES = 512 * 2**20
# Input vectors per batch and request added to a Gram matrix (an even subsample beyond).
MAX_ROWS_PER_BATCH = 8192


@dataclasses.dataclass(frozen=True)
class GramSpec:
    """Which input vectors of a layer ``Σ x xᵀ`` is taken over.

    layout "last": features on the last axis (MatMul X·W, Gemm); "first": on the first axis
    (Gemm with transA); "columns": on axis -2 (MatMul W·X); "patches": im2col patches of an
    NC... tensor under a Conv geometry (ONNX ``pads``), ordered (channel, kernel tap) like
    ``W.reshape(O, -1)``.
    """

    tensor: str
    layout: str
    features: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def nbytes(self) -> int:
        return self.features**2 * 8


@dataclasses.dataclass
class Moments:
    """``Σ x xᵀ`` over ``rows`` input vectors."""

    gram: np.ndarray
    rows: int


def input_vectors(array: np.ndarray, spec: GramSpec) -> np.ndarray:
    """The input vectors (rows) that the layer's weight multiplies, for one batch."""
    if spec.layout == "last":
        return array.reshape(-1, array.shape[-1])
    if spec.layout == "first":
        return array.reshape(array.shape[0], -1).T
    if spec.layout == "columns":
        return np.moveaxis(array, -2, -1).reshape(-1, array.shape[-2])
    pads = conv_pads(
        array.shape[2:], spec.kernel, spec.strides, spec.dilations, spec.pads, spec.auto_pad
    )
    patches = im2col(array, spec.kernel, spec.strides, spec.dilations, pads)
    return patches.reshape(-1, patches.shape[-1])


def budget_groups(specs: Iterable[GramSpec], budget: int) -> list[list[GramSpec]]:
    """Specs in groups whose matrices together stay within ``budget`` bytes (one spec larger
    than the budget gets a group of its own)."""
    groups: list[list[GramSpec]] = [[]]
    for spec in sorted(dict.fromkeys(specs), key=lambda s: s.tensor):
        if groups[-1] and sum(s.nbytes for s in groups[-1]) + spec.nbytes > budget:
            groups.append([])
        groups[-1].append(spec)
    return [group for group in groups if group]


def collect_grams(
    model: ir.Model,
    specs: Iterable[GramSpec] | Mapping[Hashable, Sequence[GramSpec]],
    source: Iterable[Feed],
    *,
    provider: str = "cpu",
    batches: int | None = None,
    max_rows: int | None = MAX_ROWS_PER_BATCH,
    budget: int = BUDGET_BYTES,
    label: str = "input Gram matrices",
    keep: bool = True,
) -> dict[Any, Moments]:
    """``Σ x xᵀ`` (float64) over the first ``batches`` batches of ``source`` (all when None)
    for every spec, by spec; or, given a mapping of keys to specs (of one width), over the
    input vectors of all of a key's specs, by key (keys with the same specs share one matrix).
    ``max_rows`` evenly subsamples the rows of one batch (None: all rows). When ``source`` is
    the calibration service (a pass's ``context.data``) and ``keep`` is set, results are kept
    in its statistics store and reused while the model and the data are the same
    (``keep=False``: a pass that frees each Gram once used)."""
    sums = specs if isinstance(specs, Mapping) else {spec: [spec] for spec in specs}

    def stored_as(specs: Sequence[GramSpec]) -> Hashable:
        return specs[0] if len(specs) == 1 else tuple(specs)

    store: dict[Hashable, Moments] = (
        source.store(model, "grams", batches, max_rows)
        if keep and isinstance(source, Calibration)
        else {}
    )
    wanted = {stored_as(specs): specs for specs in sums.values()}
    missing = [key for key in wanted if key not in store]
    while missing:
        group, held = [], 0
        for key in list(missing):
            size = wanted[key][0].nbytes
            if group and held + size > budget:
                continue
            group.append(key)
            held += size
            missing.remove(key)
        found = {k: wanted[k] for k in group}
        store.update(_collect_group(model, found, source, provider, batches, max_rows, label))
    return {key: store[stored_as(specs)] for key, specs in sums.items()}


def _collect_group(
    model: ir.Model,
    sums: Mapping[Hashable, Sequence[GramSpec]],
    source: Iterable[Feed],
    provider: str,
    batches: int | None,
    max_rows: int | None,
    label: str,
) -> dict[Hashable, Moments]:
    tensors = list(dict.fromkeys(spec.tensor for specs in sums.values() for spec in specs))
    runner = TensorRunner(model, tensors, provider)
    accumulators = {
        key: GramAccumulator(1, specs[0].features, 0, intercept=False)
        for key, specs in sums.items()
    }
    feeds = source if batches is None else itertools.islice(source, batches)
    for feed in track(feeds, label, total=batches):
        arrays = runner(feed)
        for key, accumulator in accumulators.items():
            parts = [input_vectors(np.asarray(arrays[spec.tensor]), spec) for spec in sums[key]]
            if max_rows is not None:
                parts = [
                    r[:: math.ceil(len(r) / max_rows)] if len(r) > max_rows else r for r in parts
                ]
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]  # one update: one XᵀX
            accumulator.update(rows[None], np.empty((1, len(rows), 0)))
    if not next(iter(accumulators.values())).rows:
        name = getattr(source, "label", type(source).__name__)
        raise InputError(f"calibration data {name} yielded no batches")
    return {key: Moments(acc.xtx[0], acc.rows) for key, acc in accumulators.items()}
