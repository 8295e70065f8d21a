"""Where trials run: a process per trial on this machine (the default), or Ray tasks on a
cluster. Either way a trial that dies (an onnxruntime abort, out of memory) comes back as a
failed result and the search goes on; an interrupt (Ctrl-C) stops the search."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.tune.trial import MODEL_FILE, RESULT_FILE

JOB_FILE, LOG_FILE = "job.json", "trial.log"
_GRACE_S = 5.0  # a cancelled Ray task's time to end in Python before it is killed


class Executor(Protocol):
    where: str  # said in the report: latency is measured there

    def run(self, jobs: Sequence[dict[str, Any]], end: float | None = None) -> list[dict[str, Any]]:
        """Each job's result; ``end``: the ``time.monotonic()`` at which trials must end (the
        search's time budget, less its reserve; None: none; past: nothing starts), after which
        a trial still running is stopped and its result marked ``stopped`` (the search does
        not store it: it runs again on --resume)."""
        ...

    def close(self) -> None: ...


def _failure(error: str, timed_out: bool = False) -> dict[str, Any]:
    return {"status": "failed", "error": error, **({"timed_out": True} if timed_out else {})}


def _limit(timeout: float | None, end: float | None) -> tuple[float | None, bool]:
    """A trial starting now: its limit in seconds, and whether it is the time budget's (which
    runs out at ``end``) rather than its own."""
    left = None if end is None else end - time.monotonic()
    if left is None or (timeout is not None and timeout <= left):
        return timeout, False
    return max(left, 0.0), True


def _late(limit: float | None, budgeted: bool) -> dict[str, Any]:
    """The result of a trial stopped at ``limit``: the time budget's, or its own timeout's;
    one the budget left no time to start says so (``started``: not counted as run)."""
    if budgeted:
        why = "stopped: the search's time budget ran out (it runs again on --resume)"
        return {**_failure(why, timed_out=True), "stopped": True, "started": limit != 0}
    return _failure(f"the trial ran past its limit of {limit:g} s", timed_out=True)


class _Launcher:
    """One :mod:`onnx_squeeze.tune.forker` process (started on first use, again if it died)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None

    def run(self, job_path: Path, log: Path, timeout: float | None) -> int | None:
        """The trial's exit code (negative: a signal), None when it ran past ``timeout``, which
        counts from now: a launcher started again (imports, seconds) spends the trial's time
        (one that takes longer than that is waited for, and its trial stopped at once)."""
        start = time.monotonic()
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "onnx_squeeze.tune.forker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                # the search's import path, so a --metric module:function found here is found there
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        assert self._process.stdin is not None and self._process.stdout is not None
        message = {"job": str(job_path), "env": dict(os.environ), "log": str(log)}
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()
        pid = int(self._process.stdout.readline().split()[1])
        left = None if timeout is None else max(0.0, start + timeout - time.monotonic())
        ready, _, _ = select.select([self._process.stdout], [], [], left)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            self._process.stdout.readline()
            return None
        return int(self._process.stdout.readline().split()[1])

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()  # type: ignore[union-attr]
            self._process.wait()


class LocalExecutor:
    """Each trial in a process of its own, ``jobs`` at once (1 by default: trials running side
    by side slow each other's latency measurements), forked by launchers that imported
    onnx-squeeze once (:mod:`onnx_squeeze.tune.forker`)."""

    where = "this machine"

    def __init__(self, jobs: int = 1, timeout: float | None = None) -> None:
        self.jobs = max(1, jobs)
        self.timeout = timeout
        self._idle = [_Launcher() for _ in range(self.jobs)]

    def _one(self, job: dict[str, Any], end: float | None = None) -> dict[str, Any]:
        limit, budgeted = _limit(self.timeout, end)
        if budgeted and limit == 0:
            return _late(limit, budgeted)
        folder = Path(job["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILE).unlink(missing_ok=True)
        (folder / JOB_FILE).write_text(json.dumps(job, default=str))
        log = folder / LOG_FILE
        launcher = self._idle.pop()
        try:
            code = launcher.run(folder / JOB_FILE, log, limit)
        finally:
            self._idle.append(launcher)
        if code is None:
            return _late(limit, budgeted)
        if code == -signal.SIGINT:
            raise KeyboardInterrupt
        result_path = folder / RESULT_FILE
        if result_path.is_file():
            return json.loads(result_path.read_text())
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = f": {lines[-1][:300]}" if lines else ""
        return _failure(f"the trial process died ({how}){last}; its log: {log}")

    def run(self, jobs: Sequence[dict[str, Any]], end: float | None = None) -> list[dict[str, Any]]:
        if self.jobs == 1 or len(jobs) == 1:
            return [self._one(job, end) for job in jobs]
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(lambda job: self._one(job, end), jobs))

    def close(self) -> None:
        for launcher in self._idle:
            launcher.close()


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
    the trial, so the workers should be the hardware the model will run on. Trials go to the
    cluster as many at a time as its free CPUs run at once, so that ``timeout`` counts from a
    trial's start; one past it is cancelled."""

    def __init__(
        self, address: str | None = None, cpus_per_trial: float = 1.0, timeout: float | None = None
    ) -> None:
        self.timeout, self._cpus = timeout, cpus_per_trial
        try:
            import ray
        except ImportError:
            raise SettingsError(
                "--executor ray needs Ray: pip install 'onnx-squeeze[ray]'"
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as error:  # Ray raises ConnectionError, ValueError, RuntimeError...
                lines = str(error).strip().splitlines() or [type(error).__name__]
                raise SettingsError(
                    f"--executor ray: cannot start or reach Ray at {address or 'a local instance'}"
                    f": {lines[0]}"
                ) from None
        self._task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(_ray_trial)
        self._refs: dict[str, Any] = {}
        self.where = f"Ray workers ({address or 'local instance'})"

    def _shared(self, job: dict[str, Any]) -> dict[str, Any]:
        shared = {}
        for key in ("model", "calibration", "evaluation", "evaluation_subset", "model_from"):
            spec = job.get(key)
            if isinstance(spec, str) and Path(spec).is_file():
                if spec not in self._refs:
                    self._refs[spec] = self._ray.put(Path(spec).read_bytes())
                shared[key] = (Path(spec).name, self._refs[spec])
        return shared

    def run(self, jobs: Sequence[dict[str, Any]], end: float | None = None) -> list[dict[str, Any]]:
        # as many at once as the cluster's CPUs free now run (read once: Ray frees a finished
        # wave's CPUs some time after its results are in)
        room = max(1, int(self._ray.available_resources().get("CPU", 0) // self._cpus))
        results: list[dict[str, Any]] = []
        for first in range(0, len(jobs), room):
            results += self._wave(jobs[first : first + room], end)
        return results

    def _wave(self, jobs: Sequence[dict[str, Any]], end: float | None) -> list[dict[str, Any]]:
        """Tasks that all start at once, so that each one's limit counts from its start."""
        limit, budgeted = _limit(self.timeout, end)
        if budgeted and limit == 0:
            return [_late(limit, budgeted) for _ in jobs]
        futures = [self._task.remote(job, self._shared(job)) for job in jobs]
        _, late = self._ray.wait(futures, num_returns=len(futures), timeout=limit)
        for future in late:  # in Python first, so the task removes its temporary folder
            self._ray.cancel(future)
        if late:
            _, stuck = self._ray.wait(late, num_returns=len(late), timeout=_GRACE_S)
            for future in stuck:  # in onnxruntime's code, which a KeyboardInterrupt waits for
                self._ray.cancel(future, force=True)
        results = []
        for job, future in zip(jobs, futures, strict=True):
            try:
                result, model = self._ray.get(future)
            except self._ray.exceptions.RayError as error:
                if future in late:  # cancelled (one that finished meanwhile kept its result)
                    results.append(_late(limit, budgeted))
                    continue
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

    def close(self) -> None:
        if self._started:  # a connection (or local instance) this executor made
            self._ray.shutdown()


def make_executor(
    name: str, *, jobs: int = 1, address: str | None = None, timeout: float | None = None
) -> Executor:
    if name == "local":
        return LocalExecutor(jobs, timeout)
    if name == "ray":
        return RayExecutor(address, timeout=timeout)
    raise SettingsError(f"unknown --executor {name!r}: use local or ray")
