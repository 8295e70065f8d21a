"""Smoke test of the accuracy benchmark: its recipes are valid and its training pipeline works.

Skipped without the benchmark-only extras (PyTorch, scikit-learn).
"""

from __future__ import annotations

import pytest

from onnx_squeeze.passes import load_all
from onnx_squeeze.passes.base import PASS_REGISTRY, make_pass

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from benchmarks import bench_distill


def test_every_installed_pass_accepts_the_benchmark_settings():
    """A misspelt setting would only show as a row left out of the table."""
    load_all()
    steps = [s for _, row in bench_distill.ROWS if isinstance(row, list) for s in row]
    checked = 0
    for step in steps:
        ((name, settings),) = step.items()
        if name in PASS_REGISTRY:
            make_pass(name, settings)
            checked += 1
    assert checked >= len(steps) - 1  # at most one pass (finetune) may not have landed


def test_trained_mlp_exports_with_dynamic_batch_and_beats_chance():
    train_x, train_y, test_x, test_y = bench_distill.load_digits(8)
    model = bench_distill.train("mlp", train_x[:300], train_y[:300], epochs=3)
    assert not isinstance(model.graph.inputs[0].shape[0], int)  # dynamic batch
    assert bench_distill.accuracy(model, test_x, test_y) > 0.5


def test_digits_are_upsampled_for_the_cnn():
    train_x, _, test_x, _ = bench_distill.load_digits(bench_distill.IMAGE_SIZE)
    size = bench_distill.IMAGE_SIZE
    assert train_x.shape[1:] == test_x.shape[1:] == (1, size, size)
    assert train_x.min() > -0.6 and train_x.max() < 0.6
