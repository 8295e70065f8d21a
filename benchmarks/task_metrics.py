"""The real-model corpus's task judges as ``tune --metric benchmarks.task_metrics:NAME`` user
metrics (``function(model_path, eval_data) -> float``), and its data as tune's calibration and
evaluation files.

Each metric is the judge of :mod:`benchmarks.real_models` that the corpus reads the model's task
with (``JUDGES[model.judge]``: the share of decoded CTC strings, or of top classes, equal to the
original's), on the samples of ``eval_data`` (an .npz stacked on the inputs' batch axes), against
the corpus's original model: a trial's value is the task agreement, 1.0 for the original.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import real_models as rm

_ORIGINAL: dict[tuple[str, str], list[np.ndarray]] = {}  # (model, samples' hash) -> outputs


def agreement(name: str, result: str | os.PathLike | onnx.ModelProto, eval_data: Any) -> float:
    """The task judge's value (share of samples whose decision is the original's) for the model
    at ``result`` (or in memory, as NNCF's ``validation_fn`` gets it) on ``eval_data`` (an .npz,
    or the feeds themselves)."""
    model = rm.MODELS[name]
    samples = eval_data if isinstance(eval_data, list) else rm.samples(model, eval_data)
    digest = hashlib.sha1()  # the original's outputs, once per set of samples
    for feed in samples:
        for key in sorted(feed):
            digest.update(np.ascontiguousarray(feed[key]).tobytes())
    if (name, digest.hexdigest()) not in _ORIGINAL:
        _ORIGINAL[name, digest.hexdigest()] = rm.first_outputs(model.path, samples, model.read)
    original = _ORIGINAL[name, digest.hexdigest()]
    if isinstance(result, onnx.ModelProto):
        with tempfile.TemporaryDirectory(prefix="task-metric-") as folder:
            path = Path(folder) / "model.onnx"
            onnx.save(result, path)
            outputs = rm.first_outputs(path, samples, model.read)
    else:
        outputs = rm.first_outputs(Path(result), samples, model.read)
    judged = rm.JUDGES[str(model.judge)](model, samples, original, outputs)
    return float(judged["value"])


def metric(name: str) -> Callable[[Any, Any], float]:
    """``function(model_path, eval_data)`` for tune's ``--metric module:function``."""

    def judged(result: Any, eval_data: Any) -> float:
        return agreement(name, result, eval_data)

    judged.__name__ = name
    judged.__doc__ = f"{name}: {rm.MODELS[name].task}; share of task decisions kept"
    return judged


ppocr_rec = metric("ppocr_rec")  # decoded CTC strings equal to the original's
magika = metric("magika")  # top-1 file type equal to the original's


def write_data(name: str, folder: Path, generated: int) -> tuple[Path, Path, str]:
    """Calibration: the corpus's samples that compress calibrates on; evaluation: those it holds
    out, then ``generated`` fresh ones from the model's own feed maker (the seed the corpus's
    judge reads its fresh samples with). Returns both paths and a line that says so."""
    model = rm.MODELS[name]
    calib, held = folder / f"{name}_calib.npz", folder / f"{name}_eval.npz"
    calibrated, kept = rm.calibrated_on(model), rm.held_out(model)
    if not calib.exists():
        np.savez(calib, **rm.stack(model, calibrated))
    if not held.exists():
        fresh = model.make(model, generated, np.random.default_rng(rm.SEED + 1))
        np.savez(held, **rm.stack(model, kept + fresh))
    line = (
        f"{model.task}; data {model.origin}: {len(calibrated)} corpus samples for calibration, "
        f"{len(kept)} held out + {generated} more from the model's feed maker (seed "
        f"{rm.SEED + 1}) for evaluation"
    )
    return calib, held, line
