"""The flow in Python: compress() prepares, runs the passes, compares, gates, saves and reports,
as the CLI does (the CLI only parses options into it and prints what it returns)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnx_squeeze as sq
from onnx_squeeze import model_io, zoo
from onnx_squeeze.errors import SettingsError


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "mlp.onnx"
    model_io.save(zoo.small("mlp"), path)
    return path


def _pruned(source, out, ratio: float, check: str, **options) -> sq.pipeline.CompressResult:
    """``prune_weights`` at ``ratio`` through the whole flow, judged by ``check``."""
    recipe = sq.Recipe.from_cli([f"prune_weights:ratio={ratio}"])
    return sq.compress(str(source), recipe, output=out, checks=[check], runs=2, **options)


def test_compress_returns_the_comparison_the_gates_the_warnings_and_the_report(mlp_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _pruned(mlp_path, out, 0.3, "cosine>=0.5")
    assert result.passed and result.output == str(out) and out.is_file()
    metrics = result.comparison["metrics"]
    assert 0.5 <= metrics["cosine"] < 1.0  # weights were pruned, so not identical
    assert [g["expr"] for g in result.gates] == ["cosine>=0.5"] and result.gates[0]["passed"]
    # No data was given: judged on random draws, and the first warning says so.
    assert "RANDOM" in result.warnings[0]
    assert result.report["output"] == str(out) and result.report["input"] == str(mlp_path)
    assert json.loads(json.dumps(result.report, default=str))["comparison"]["names"] == [
        "original",
        "compressed",
    ]
    # The result on disk is the model compared: same outputs in onnxruntime.
    feed = next(iter(result.evaluation))
    a = sq.compare(result.model, sq.load(out), feeds=[feed], runs=1).fidelity[0]
    assert a.max_abs == 0.0


def test_a_failed_gate_blocks_and_writes_nothing(mlp_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _pruned(mlp_path, out, 0.9, "cosine>=0.99999")
    assert not result.passed and "cosine>=0.99999" in result.blocking
    assert result.output is None and not out.exists()
    written = _pruned(mlp_path, out, 0.9, "cosine>=0.99999", write_on_fail=True)
    assert written.output == str(out) and out.is_file()


def test_calibration_data_gives_the_shapes_and_a_held_out_fifth(tmp_path):
    """A model with a symbolic sequence length is compared at the data's shapes (never at an
    invented 1), on the batches the passes did not see."""
    model = zoo.build("transformer", width=0.25, depth=0.25)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 100, (10, 7)).astype(np.int64))
    result = sq.compress(
        model,
        sq.Recipe.from_cli(["quantize_dynamic"]),
        calibration=str(tmp_path / "calib.npz"),
        runs=2,
    )
    assert result.comparison["input_shapes"] == {"input_ids": [1, 7]}
    assert "every 5th batch, held out" in result.comparison["inputs_label"]
    assert not any("RANDOM" in w for w in result.warnings)


def test_options_that_need_the_comparison_are_refused_without_it(mlp_path):
    with pytest.raises(SettingsError, match="comparison"):
        sq.compress(str(mlp_path), checks=["cosine>=0.9"], compare=False)
    with pytest.raises(SettingsError, match="overwrite"):
        sq.compress(str(mlp_path), output=mlp_path)
