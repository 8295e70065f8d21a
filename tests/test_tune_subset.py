"""tune's subset stage with a user metric (``--metric module:function``): the function reads the
evaluation data itself, so at the subset stage it must be given the subset (a file of the same
kind holding the samples the trial's own measurements read), and all of it at the full stage;
otherwise ranking on the subset costs as much as judging on all the data.

``counted`` below is the user metric: the trial processes import it by module path and it
records, per model, the samples and labels it was given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_squeeze import model_io, zoo
from onnx_squeeze.tune import parse_budget, parse_targets, tune
from onnx_squeeze.tune.space import Param, Space
from onnx_squeeze.tune.subset import write_subset
from tests.helpers import run

SAMPLES = 32
LOG = "TUNE_TEST_SAMPLES_LOG"


def counted(model_path: str, eval_data: str) -> float:
    """Top-1 on the ``labels`` of ``eval_data`` (an .npz), recording how many samples it held."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with np.load(eval_data) as data:
        inputs, labels = data[name], data["labels"]
    predicted = session.run(None, {name: inputs})[0].argmax(-1)
    with open(os.environ[LOG], "a") as log:
        entry = {"model": model_path, "samples": len(inputs), "labels": labels.tolist()}
        log.write(json.dumps(entry) + "\n")
    return float((predicted == labels).mean())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The zoo's tiny MLP; calibration and held-out data (random inputs, named so), the held-out
    labelled with the original's own top-1 (so the original scores 1.0)."""
    folder = tmp_path_factory.mktemp("tune-subset")
    model = zoo.small("mlp")
    path = folder / "mlp.onnx"
    model_io.save(model, path)
    name, width = model.graph.inputs[0].name, model.graph.inputs[0].shape[1]
    data = np.random.default_rng(0).standard_normal((SAMPLES * 2, width)).astype(np.float32)
    held = data[SAMPLES:]
    labels = run(model, {name: held})[0].argmax(-1).astype(np.int64)
    np.savez(folder / "random_calib.npz", **{name: data[:SAMPLES]})
    np.savez(folder / "random_eval.npz", **{name: held, "labels": labels})
    return {
        "model": str(path),
        "calib": str(folder / "random_calib.npz"),
        "eval": str(folder / "random_eval.npz"),
    }


def test_a_user_metric_gets_the_subset_at_the_subset_stage_and_all_at_the_full(
    files, tmp_path, monkeypatch
):
    log = tmp_path / "samples.jsonl"
    monkeypatch.setenv(LOG, str(log))
    found = tune(
        files["model"],
        tmp_path / "out.onnx",
        targets=parse_targets(["macs=0.8"]),
        budget=parse_budget("tests.test_tune_subset:counted", "0.5", None),
        calibration=files["calib"],
        evaluation=files["eval"],
        trials=2,
        subset=0.25,
        bisect_steps=0,
        space=Space("cnn", (Param("prune", low=0.0, high=0.5, step=0.25),)),
        runs=1,
        work_dir=tmp_path / "work",
        echo=lambda line: None,
    )
    given = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        given[entry["model"]] = entry
    labels = np.load(files["eval"])["labels"].tolist()
    stages = {}
    for trial in found.trials:
        assert trial.ok, trial.result
        path = files["model"] if trial.stage == "reference" else trial.model_path
        seen = given[path]
        stages.setdefault(trial.stage, set()).add(seen["samples"])
        # the first samples, labels cut with the inputs
        assert seen["labels"] == labels[: seen["samples"]]
    # a quarter of the 32 held-out samples to rank on; all 32 for the reference and the best
    assert stages == {"reference": {SAMPLES}, "subset": {SAMPLES // 4}, "full": {SAMPLES}}
    # and the value is the metric on those samples
    (first, *_) = [t for t in found.trials if t.stage == "subset"]
    session = ort.InferenceSession(first.model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predicted = session.run(None, {name: np.load(files["eval"])[name][: SAMPLES // 4]})[0]
    assert first.value == pytest.approx(
        float((predicted.argmax(-1) == labels[: SAMPLES // 4]).mean())
    )


def test_a_user_metric_ranks_on_all_of_a_data_folder_and_says_so(files, tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    with np.load(files["eval"]) as data:
        arrays = dict(data)
    for part in range(2):
        np.savez(folder / f"{part}.npz", **{k: v[part::2] for k, v in arrays.items()})
    lines: list[str] = []

    class Executor:
        where = "here"
        jobs: ClassVar[list[dict]] = []

        def run(self, jobs, end=None):
            self.jobs += jobs
            for job in jobs:
                Path(job["folder"]).mkdir(parents=True, exist_ok=True)
                Path(job["folder"], "model.onnx").write_bytes(Path(job["model"]).read_bytes())
            metrics = {"macs_ratio": 1.0, "latency_ratio": 1.0, "size_ratio": 1.0}
            return [{"status": "ok", "metrics": metrics, "value": 1.0} for _ in jobs]

    executor = Executor()
    tune(
        files["model"],
        tmp_path / "out.onnx",
        targets=parse_targets(["macs=1.0"]),
        budget=parse_budget("tests.test_tune_subset:counted", "0.5", None),
        calibration=files["calib"],
        evaluation=str(folder),
        trials=2,
        subset=0.25,
        bisect_steps=0,
        space=Space("cnn", (Param("prune", low=0.0, high=0.5, step=0.25),)),
        executor=executor,
        work_dir=tmp_path / "work",
        echo=lines.append,
    )
    assert not any(job.get("eval_limit") or job.get("evaluation_subset") for job in executor.jobs)
    assert any("ranked on all of" in line for line in lines), lines


def test_the_subset_file_cuts_each_array_on_its_batch_axis(tmp_path):
    """A state input with its samples on axis 1, labels on axis 0, arrays with no entry per
    sample (class names, a 0-d value) kept whole."""
    model = model_io.load(
        onnx.parser.parse_model(
            """<ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 4] x, float[2, N, 3] state) => (float[N, 4] y) { y = Identity(x) }"""
        )
    )
    count = 10
    arrays = {
        "x": np.arange(count * 4, dtype=np.float32).reshape(count, 4),
        "state": np.arange(2 * count * 3, dtype=np.float32).reshape(2, count, 3),
        "labels": np.arange(count),
        "classes": np.array(["a", "b", "c"]),
        "rate": np.array(16000),
    }
    np.savez(tmp_path / "eval.npz", **arrays)
    path = write_subset(str(tmp_path / "eval.npz"), model, 4, tmp_path / "work")
    assert path is not None and path.suffix == ".npz" and path.parent == tmp_path / "work"
    with np.load(path) as subset:
        cut = dict(subset)
    assert sorted(cut) == sorted(arrays)
    np.testing.assert_array_equal(cut["x"], arrays["x"][:4])
    np.testing.assert_array_equal(cut["state"], arrays["state"][:, :4])
    np.testing.assert_array_equal(cut["labels"], arrays["labels"][:4])
    np.testing.assert_array_equal(cut["classes"], arrays["classes"])
    assert cut["rate"] == 16000
    # a .npy (one input) stays a .npy; a folder has no subset file
    np.save(tmp_path / "x.npy", arrays["x"])
    single = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Identity(x) }"""
    )
    npy = write_subset(str(tmp_path / "x.npy"), model_io.load(single), 3, tmp_path / "work")
    assert npy is not None and npy.suffix == ".npy"
    np.testing.assert_array_equal(np.load(npy), arrays["x"][:3])
    assert write_subset(str(tmp_path / "work"), model, 4, tmp_path / "other") is None
