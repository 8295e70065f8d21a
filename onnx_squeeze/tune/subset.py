"""The part of the evaluation data candidates are ranked on (successive halving): how many
samples, and, for a user metric, a file that holds only those. A trial's own measurements read
the first samples of ``--eval`` (``eval_limit``); a user's ``function(model_path, eval_data)``
reads the data itself, and given the whole file it would make the subset stage cost as much as
the full one and rank nothing cheaper."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.arrays import ARRAY_SUFFIXES
from onnx_squeeze.runtime import input_specs
from onnx_squeeze.shapes import batch_axis
from onnx_squeeze.tune.trial import opener

SUBSET_NAME = "evaluation-subset"


# Metrics that count samples (the share whose top class is right, or the original's), or reads
# of which a sample holds one or more: a subset of n resolves 1/n of them at worst.
COUNTED = ("top1", "top1_agreement", "agreement")
# Samples the budget must let flip on the subset: with none, a subset ranks every candidate
# that loses one sample below the floor (ppocr_cls: a quarter of 256 lines resolves 1.6 points
# of top-1, more than its 1-point budget), and the full data takes back those it ranked first.
FLIPS = 2


def least_samples(metric: str, drop: float) -> int:
    """The fewest samples a subset ranking on ``metric`` needs, for a budget of ``drop`` (its
    units) to hold ``FLIPS`` samples; 2 for a metric that does not count samples."""
    if metric not in COUNTED or drop <= 0:
        return 2
    return max(2, math.ceil(FLIPS / drop - 1e-9))


def subset_samples(
    job: dict[str, Any], original: ir.Model, evaluation: Any, share: float, least: int = 2
) -> tuple[int, int] | None:
    """Samples of the evaluation data candidates are ranked on, and all there are: ``share``
    of them, at least ``least`` (:func:`least_samples`), as many as the trials' data reader
    reads at that limit (whole batches where the model fixes the batch); None: rank on all of
    it (no separate evaluation file, too little data to split, or a subset that would hold half
    of it or more, and cost about as much)."""
    if evaluation is None or not 0 < share < 1 or not isinstance(evaluation, str):
        return None
    total = getattr(opener(job, None)(evaluation, original), "samples", None)
    if not total or total * share < 2:
        return None
    limit = max(2, least, int(total * share))
    if 2 * limit > total:
        return None
    read = getattr(opener(job, limit)(evaluation, original), "samples", None)
    return (read, total) if read else None


def subset_slack(limit: int, total: int) -> float:
    """How far below the floor, in units of the budget's drop, a candidate measured on ``limit``
    of ``total`` samples may read and still be worth judging on all of them: a mean over n of N
    samples spreads sqrt(N/n) times as wide, so the drop it reads may be that many budgets (1
    for a quarter). magika's INT8 read 37 of 38 files right on a subset (0.974, floor 0.98)
    and 0.987 on all 153: without the slack the search went on for 8 more trials."""
    return math.sqrt(total / limit) - 1


def write_subset(evaluation: str, model: ir.Model, count: int, folder: Path) -> Path | None:
    """The first ``count`` samples of the .npz/.npy file ``evaluation`` as a file of the same
    kind in ``folder``: each of the model's inputs cut on its batch axis (as the data readers
    cut it), every other array with one entry per sample (``labels``) on its first axis, the
    rest (class names, a 0-d value) whole. None when ``evaluation`` is no single array file (a
    folder): there is no file of the same kind to give."""
    path = Path(evaluation)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in ARRAY_SUFFIXES:
        return None
    specs = {spec.name: spec for spec in input_specs(model)}
    if suffix == ".npy":
        arrays = {next(iter(specs)): np.load(path, mmap_mode="r")}
    else:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    axes = {
        name: batch_axis(specs[name].shape, array.shape) if name in specs else None
        for name, array in arrays.items()
    }
    total = next(
        (arrays[name].shape[axis] for name, axis in axes.items() if axis is not None), None
    )
    if total is None:
        return None
    cut = {}
    for name, array in arrays.items():
        axis = axes[name]
        if axis is None and name not in specs and array.ndim and array.shape[0] == total:
            axis = 0  # labels and the like: one entry per sample
        cut[name] = array if axis is None else np.take(array, range(count), axis=axis)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (SUBSET_NAME + suffix)
    staging = folder / (SUBSET_NAME + ".part" + suffix)
    if suffix == ".npy":
        np.save(staging, next(iter(cut.values())))
    else:
        np.savez(staging, **cut)
    os.replace(staging, target)  # whole or absent, like the trials' results
    return target
