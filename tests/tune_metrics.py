"""User metric functions for tests/test_tune.py (``--metric tests.tune_metrics:NAME``): run in the
trial processes, so they must be importable by module path."""

from __future__ import annotations

import os
import time

import onnx
import onnx.numpy_helper


def _weights(model_path: str) -> int:
    model = onnx.load(model_path)
    return sum(onnx.numpy_helper.to_array(t).size for t in model.graph.initializer)


def abort_when_pruned(model_path: str, data: str) -> float:
    """1.0, but the process aborts (as onnxruntime does on a fatal error) for a model with
    fewer weights than ORIGINAL_WEIGHTS in the environment."""
    if _weights(model_path) < int(os.environ["TUNE_TEST_ORIGINAL_WEIGHTS"]):
        os.abort()
    return 1.0


def slow_when_pruned(model_path: str, data: str) -> float:
    """1.0, after a minute for a model with fewer weights than ORIGINAL_WEIGHTS (a trial the
    search's time budget has to stop)."""
    if _weights(model_path) < int(os.environ["TUNE_TEST_ORIGINAL_WEIGHTS"]):
        time.sleep(60)
    return 1.0
