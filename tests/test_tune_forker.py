"""Trials die with the tool (issue 23, must-have 4): a SIGKILLed search takes its trial launcher
and the running trial with it, and the trial's temporary folder goes; a SIGKILLed launcher
takes its trial (the kernel's parent-death signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onnx_squeeze import scratch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# The launcher, with a trial that makes a temporary folder, says where, and sleeps.
LAUNCHER = textwrap.dedent(
    """
    import time
    import onnx_squeeze.tune.trial as trial
    from onnx_squeeze import scratch
    from onnx_squeeze.tune import forker

    def sleepy(argv):
        folder = scratch.folder("trial")
        print("folder", folder.name, flush=True)
        time.sleep(120)

    trial.main = sleepy
    forker.serve()
    """
)

# The search: starts the launcher, asks for one trial, says the pids, then waits to be killed.
SEARCH = textwrap.dedent(
    """
    import json, subprocess, sys, time
    launcher = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    launcher.stdin.write(sys.argv[2] + "\\n")
    launcher.stdin.flush()
    trial = int(launcher.stdout.readline().split()[1])
    print(launcher.pid, trial, flush=True)
    time.sleep(120)
    """
)


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_for(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _start(tmp_path: Path) -> tuple[subprocess.Popen, int, int, Path]:
    """The search, launcher and trial pids, and the trial's temporary folder."""
    log = tmp_path / "trial.log"
    message = {"job": str(tmp_path / "job.json"), "env": dict(os.environ), "log": str(log)}
    search = subprocess.Popen(
        [sys.executable, "-c", SEARCH, LAUNCHER, json.dumps(message)],
        stdout=subprocess.PIPE,
        text=True,
    )
    launcher, trial = map(int, search.stdout.readline().split())
    assert _wait_for(lambda: log.is_file() and "folder" in log.read_text())
    folder = Path(log.read_text().split()[1])
    assert folder.is_dir() and f"pid{trial}." in folder.name
    return search, launcher, trial, folder


def test_a_killed_search_ends_its_trial_and_removes_its_temporaries(tmp_path):
    search, launcher, trial, folder = _start(tmp_path)
    search.kill()
    search.wait()
    assert _wait_for(lambda: _gone(trial)), "the trial outlived the search"
    assert _wait_for(lambda: _gone(launcher)), "the launcher outlived the search"
    assert _wait_for(lambda: not folder.exists()), "the trial's temporary folder was left"


def test_a_killed_launcher_ends_its_trial(tmp_path):
    search, launcher, trial, folder = _start(tmp_path)
    try:
        os.kill(launcher, signal.SIGKILL)
        assert _wait_for(lambda: _gone(trial)), "the trial outlived its launcher"
    finally:
        search.kill()
        search.wait()

    def swept() -> bool:  # the next run's sweep removes what a SIGKILLed launcher could not
        scratch.sweep()
        return not folder.exists()

    assert _wait_for(swept)
