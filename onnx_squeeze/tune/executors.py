"""Where trials run: a process per trial on this machine (the default), or Ray tasks on a
cluster. Either way a trial that dies (an onnxruntime abort, out of memory) comes back as a
failed result and the search goes on; an interrupt (Ctrl-C) stops the search."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.tune.trial import MODEL_FILE, RESULT_FILE

JOB_FILE, LOG_FILE = "job.json", "trial.log"


class Executor(Protocol):
    where: str  # said in the report: latency is measured there

    def run(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...


def _failure(error: str) -> dict[str, Any]:
    return {"status": "failed", "error": error}


def _child(job_path: str, environment: dict[str, str], log: str) -> None:
    """A trial process: the search's environment (the fork server keeps the one it started
    with), its error output into the trial's log, the trial."""
    os.environ.clear()
    os.environ.update(environment)
    stream = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(stream, 2)
    from onnx_squeeze.tune.trial import main

    main([job_path])


class LocalExecutor:
    """Each trial in a process of its own, ``jobs`` at once (1 by default: trials running side
    by side slow each other's latency measurements). Processes are forked from a server that
    imported onnx-squeeze once (``forkserver``; ``spawn`` where there is none)."""

    where = "this machine"

    def __init__(self, jobs: int = 1, timeout: float | None = None) -> None:
        self.jobs = max(1, jobs)
        self.timeout = timeout
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context(
            "forkserver" if "forkserver" in methods else "spawn"
        )
        if "forkserver" in methods:
            self._context.set_forkserver_preload(
                ["onnx_squeeze.tune.trial", "onnx_squeeze.pipeline"]
            )

    def _one(self, job: dict[str, Any]) -> dict[str, Any]:
        folder = Path(job["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILE).unlink(missing_ok=True)
        (folder / JOB_FILE).write_text(json.dumps(job, default=str))
        log = folder / LOG_FILE
        process = self._context.Process(
            target=_child, args=(str(folder / JOB_FILE), dict(os.environ), str(log))
        )
        process.start()
        process.join(self.timeout)
        if process.is_alive():
            process.kill()
            process.join()
            return _failure(f"the trial ran past its limit of {self.timeout:g} s")
        if process.exitcode == -signal.SIGINT:
            raise KeyboardInterrupt
        result_path = folder / RESULT_FILE
        if result_path.is_file():
            return json.loads(result_path.read_text())
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        code = process.exitcode or 0
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = f": {lines[-1][:300]}" if lines else ""
        return _failure(f"the trial process died ({how}){last}; its log: {log}")

    def run(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.jobs == 1 or len(jobs) == 1:
            return [self._one(job) for job in jobs]
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(self._one, jobs))


def _ray_trial(job: dict[str, Any], shared: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """A Ray task: the job's files from the object store into a local folder, the trial, and
    the model's bytes back (the workers need not share a disk with the search)."""
    import ray

    from onnx_squeeze.tune.trial import run_trial

    with tempfile.TemporaryDirectory(prefix="onnx-squeeze-tune-") as scratch:
        local = dict(job, folder=os.path.join(scratch, "trial"))
        for key, (name, ref) in shared.items():
            path = Path(scratch) / key / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ray.get(ref))
            local[key] = str(path)
        result = run_trial(local)
        model = Path(local["folder"]) / MODEL_FILE
        return result, model.read_bytes() if model.is_file() else None


class RayExecutor:
    """Trials as Ray tasks on the cluster at ``address`` (None: a local Ray instance). Files
    named by the jobs (model, data) go through the object store once; a data folder must be
    on a disk every worker sees at the same path. Latency is measured on the worker that ran
    the trial, so the workers should be the hardware the model will run on."""

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1.0) -> None:
        try:
            import ray
        except ImportError:
            raise SettingsError(
                "--executor ray needs Ray: pip install 'onnx-squeeze[ray]'"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(_ray_trial)
        self._refs: dict[str, Any] = {}
        self.where = f"Ray workers ({address or 'local instance'})"

    def _shared(self, job: dict[str, Any]) -> dict[str, Any]:
        shared = {}
        for key in ("model", "calibration", "evaluation"):
            spec = job.get(key)
            if isinstance(spec, str) and Path(spec).is_file():
                if spec not in self._refs:
                    self._refs[spec] = self._ray.put(Path(spec).read_bytes())
                shared[key] = (Path(spec).name, self._refs[spec])
        return shared

    def run(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        futures = [self._task.remote(job, self._shared(job)) for job in jobs]
        results = []
        for job, future in zip(jobs, futures, strict=True):
            try:
                result, model = self._ray.get(future)
            except self._ray.exceptions.RayError as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                results.append(
                    _failure(f"the Ray task died ({type(error).__name__}): {first[:300]}")
                )
                continue
            folder = Path(job["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            if model is not None:
                (folder / MODEL_FILE).write_bytes(model)
            results.append(result)
        return results


def make_executor(
    name: str, *, jobs: int = 1, address: str | None = None, timeout: float | None = None
) -> Executor:
    if name == "local":
        return LocalExecutor(jobs, timeout)
    if name == "ray":
        return RayExecutor(address)
    raise SettingsError(f"unknown --executor {name!r}: use local or ray")
