"""The value of a trial's metric: read from the comparison with the original (``agreement``, the
default gate's decisions: :data:`.targets.AGREEMENTS`; ``top1_agreement``, ``cosine``,
``worst_channel_sqnr_db``), top-1 accuracy on labelled evaluation data, or a user's
``module:function(model_path, eval_data) -> float`` (mAP, WER...).

A user function is given the model's path and the evaluation data as given to tune (``--eval``,
else ``--calib``): all of it for the reference and at the full stage, and at the subset stage,
where candidates are ranked on part of the data, a file of the same kind (.npz or .npy) in the
tune work folder holding only that part: the first samples, every array with one entry per
sample (``labels`` too) cut alike (:mod:`onnx_squeeze.tune.subset`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnx_squeeze import model_io, runtime
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.tune.targets import FIDELITY_METRICS, agreement

LABELS = "labels"


def is_user(metric: str) -> bool:
    """Whether ``metric`` names a user function (``module:function``)."""
    return ":" in metric


def user_function(spec: str) -> Callable[[str, Any], float]:
    """``module:function`` imported (a SettingsError names what is missing)."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise SettingsError(
            f"--metric {spec!r}: cannot import it ({error}); give module:function importable "
            "from here (PYTHONPATH)"
        ) from None
    if not callable(function):
        raise SettingsError(f"--metric {spec!r}: {name} is not a function")
    return function


def top1(model_path: str, data: Any, open_data: Callable[..., Any]) -> float:
    """Share of samples whose argmax over the first output's last axis is the label (the
    ``labels`` array of the data, one per sample)."""
    model = model_io.load(model_path)
    try:
        source = open_data(data, model).carrying([LABELS])
    except AttributeError:
        raise InputError(f"--metric top1 needs a .npz with a {LABELS!r} array: {data}") from None
    session = runtime.create_session(model_path)
    names = {spec.name for spec in runtime.input_specs(model)}
    right = total = 0
    for feed in source:
        labels = np.asarray(feed[LABELS]).reshape(-1)
        scores = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
        predicted = np.asarray(scores).reshape(len(labels), -1).argmax(axis=-1)
        right += int((predicted == labels).sum())
        total += len(labels)
    if not total:
        raise InputError(f"--metric top1: no labelled samples in {data}")
    return right / total


def value(
    metric: str,
    model_path: str,
    data: Any,
    comparison: Mapping[str, float],
    open_data: Callable[..., Any],
) -> float:
    """The metric of the model at ``model_path`` (``comparison``: its metrics against the
    original; ``open_data(spec, model)`` opens the evaluation data for it; ``data``: what a
    user function is given)."""
    if metric == "agreement":
        measured = agreement(comparison)
        if measured is None:
            raise InputError(
                "the default gate reads nothing in this model's outputs (no classes, CTC "
                "strings, score decisions, embeddings or values) for --metric agreement: give "
                "your task's metric (--metric module:function) or --metric "
                "worst_channel_sqnr_db --min-metric 20"
            )
        return measured
    if metric in FIDELITY_METRICS:
        measured = comparison.get(metric)
        if measured is None:
            raise InputError(
                f"the comparison measures no {metric} for this model (top1_agreement needs "
                "[N, classes] outputs): choose another --metric, e.g. agreement"
            )
        return float(measured)
    if metric == "top1":
        return top1(model_path, data, open_data)
    return float(user_function(metric)(model_path, data))
