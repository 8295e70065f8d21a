"""One candidate of a search: ``compress()`` with its recipe, then its measurements (latency,
size and MACs against the original on this machine, the metric).

A trial is a JSON-able job run in its own process (forked by the local executor, ``python -m
onnx_squeeze.tune.trial JOB.json`` by hand, or a Ray task), so that a trial that brings its
process down (an onnxruntime abort, memory) costs that trial only; it writes ``model.onnx`` and ``result.json`` to the
job's folder. At one thread on the CPU the latency is timed again in CPU time
(:mod:`onnx_squeeze.clocks`), which other jobs on the machine do not move.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from onnx_squeeze import clocks, model_io
from onnx_squeeze.calibration import open_source
from onnx_squeeze.errors import SqueezeError
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.tune import metrics

MODEL_FILE = "model.onnx"
# CPU seconds of interleaved rounds a trial's timing runs at least (up to 10x --runs): the
# digits CNN (0.13 ms a run) read 0.35x and 0.32x in two trials' 10 rounds, 0.27x in 100
# rounds, beside other jobs; ResNet-50's 10 rounds take longer than this already
TIMING_S = 1.0
RESULT_FILE = "result.json"


def opener(job: dict[str, Any], limit: int | None) -> Any:
    """``open(spec, model)``: data opened as compress opens it, the first ``limit`` samples."""
    run = job["run"]

    def open_data(spec: Any, model: Any) -> Any:
        return open_source(
            spec,
            model,
            shapes=run.get("shapes"),
            count=run.get("samples", 8),
            seed=run.get("seed", 0),
            preset=run.get("preset", "imagenet"),
            batch_size=run.get("batch"),
            limit=limit,
            default_dim=run.get("default_dim"),
            constants=run.get("constants"),
        )

    return open_data


def _compress(
    job: dict[str, Any], judged: Any, output: Path
) -> tuple[dict[str, Any], list[str], float]:
    """The recipe run on the job's model: the comparison's metrics, the run's warnings, and the
    seconds its steps (prepare and passes) took to make the model."""
    from onnx_squeeze.pipeline import compress  # the heavy import, in the worker only

    run = job["run"]
    recipe = Recipe.from_dict(job["recipe"])
    if job.get("prepared"):  # the search's reference prepared the model (onnxsim) once
        recipe.prepare.setdefault("simplify", False)
    result = compress(
        job["model"],
        recipe,
        calibration=job.get("calibration"),
        evaluation=judged,
        constants=run.get("constants"),
        output=output,
        shapes=run.get("shapes"),
        default_dim=run.get("default_dim"),
        batch=run.get("batch"),
        preset=run.get("preset", "imagenet"),
        calibration_samples=run.get("calibration_samples", 32),
        samples=run.get("samples", 8),
        providers=tuple(run.get("providers", ("cpu",))),
        threads=tuple(run.get("threads", (1,))),
        runs=run.get("runs", 10),
        seed=run.get("seed", 0),
        force=True,
        write_on_fail=True,
    )
    assert result.comparison is not None
    made = sum(report.seconds for report in result.reports)
    return dict(result.comparison["metrics"]), list(result.warnings), made


def _judge_again(
    job: dict[str, Any], original: Any, judged: Any, output: Path
) -> tuple[dict[str, Any], list[str]]:
    """A model an earlier trial made with the same recipe and calibration data (the passes never
    read the evaluation data), compared with the original again on other evaluation data."""
    from onnx_squeeze.pipeline import judge

    run = job["run"]
    shutil.copyfile(job["model_from"], output)
    comparison = judge(
        original,
        model_io.load(output),
        judged,
        names=("original", "compressed"),
        paths=(job["model"], os.fspath(output)),
        providers=tuple(run.get("providers", ("cpu",))),
        threads=tuple(run.get("threads", (1,))),
        batch=run.get("batch"),
        runs=run.get("runs", 10),
        shapes=run.get("shapes"),
        default_dim=run.get("default_dim"),
    )
    return dict(comparison["metrics"]), []


def _timed_in_cpu(
    job: dict[str, Any], measured: dict[str, Any], output: Path, data: Any
) -> dict[str, Any]:
    """The latency ratio and speed-up in CPU time against the job's model (the search's
    prepared reference; for the reference itself, the original file), on the first sample
    (:mod:`onnx_squeeze.clocks`); the comparison's wall-clock ratio is kept beside them."""
    feed = next(iter(data))
    reference, model = clocks.cpu_ms(
        [job["model"], output], feed, job["run"].get("runs", 10), seconds=TIMING_S
    )
    return {
        **measured,
        "wall_latency_ratio": measured.get("latency_ratio"),
        "latency_ratio": model / reference,
        "speedup": reference / model,
    }


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Compress, measure and judge one recipe (or judge again the model of a trial ranked on
    part of the evaluation data, ``model_from``); the result as a dict (``status`` ok or
    failed, with the reason for a failure the tool explains, e.g. a pass refusing the model)."""
    start = time.perf_counter()
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    limit = job.get("eval_limit")
    open_data = opener(job, limit)
    original = model_io.load(job["model"])
    evaluation = job.get("evaluation")
    output = folder / MODEL_FILE
    try:
        made = 0.0
        if job.get("model_from"):
            measured, warnings = _judge_again(
                job, original, open_data(evaluation, original), output
            )
        else:
            judged = (
                open_data(evaluation, original) if evaluation is not None and limit else evaluation
            )
            measured, warnings, made = _compress(job, judged, output)
        data = evaluation if evaluation is not None else job.get("calibration")
        # the reference too: the original competes as the closest trial, and on a loaded
        # machine its wall-clock ratio read 0.80x and 1.77x (ppocr_cls)
        if job["run"].get("clock") == "cpu":
            measured = _timed_in_cpu(job, measured, output, open_data(data, original))
        scored = job["model"] if job.get("reference") else os.fspath(output)
        given = job.get("evaluation_subset") or data  # a user metric reads only the subset
        value = metrics.value(job["metric"], scored, given, measured, open_data)
    except SqueezeError as error:
        return {"status": "failed", "error": str(error), "seconds": time.perf_counter() - start}
    return {
        "status": "ok",
        "metrics": measured,
        "value": value,
        "warnings": warnings,
        "seconds": time.perf_counter() - start,
        "made_seconds": made,  # of those, making the model; the rest judged it
    }


def main(argv: list[str]) -> int:
    """Run the job in ``argv[0]``; write its result beside the model."""
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_trial(job)
    except Exception as error:  # an internal error in a trial is that trial's failure
        result = {
            "status": "failed",
            "error": f"internal error: {type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
    staging = Path(job["folder"]) / (RESULT_FILE + ".part")
    staging.write_text(json.dumps(result, default=str))
    staging.replace(staging.with_name(RESULT_FILE))  # a result is whole or absent
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
