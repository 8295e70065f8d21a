"""A trial launcher: a process that imports onnx-squeeze once and forks one child per trial, so a
trial neither pays for the imports (seconds) nor shares a process with the search (a trial that
aborts takes only its child down).

multiprocessing's ``forkserver`` would do the same but imports the caller's ``__main__`` in the
server, which reruns a script that calls ``tune()`` without a ``__name__`` guard. The protocol is
a line of JSON in (``{"job": PATH, "env": {...}, "log": PATH}``), ``pid N`` and ``exit CODE`` out
(CODE negative: the signal that ended the child).

Both die with the tool: the launcher watches its input while a trial runs, and when the search
is gone (its end of the pipe closed, even by a SIGKILL) it kills the trial, removes the trial's
temporary folders and exits; a trial is killed by the kernel when its launcher dies
(``PR_SET_PDEATHSIG``). A SIGKILLed search left its trial running to the end before.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` (the launcher) dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _child(message: dict, parent: int) -> None:
    _die_with(parent)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the search's messages are the launcher's
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends a trial without a traceback
    os.environ.clear()
    os.environ.update(message["env"])
    stream = os.open(message["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(stream, 1)
    os.dup2(stream, 2)
    from onnx_squeeze.tune.trial import main

    main([message["job"]])


class _Input:
    """The search's messages, read from fd 0 unbuffered, so that its end can be watched while
    a trial runs (the search writes nothing then: a readable pipe means it is gone)."""

    def __init__(self) -> None:
        self._pending = b""
        self.closed = False

    def _read(self) -> None:
        data = os.read(0, 1 << 16)
        self.closed = not data
        self._pending += data

    def lines(self) -> Iterator[str]:
        while True:
            while b"\n" not in self._pending and not self.closed:
                self._read()
            if b"\n" not in self._pending:
                return
            line, self._pending = self._pending.split(b"\n", 1)
            yield line.decode()

    def wait(self, pid: int) -> int | None:
        """The trial's exit code (negative: its signal), or None when the search went away."""
        trial = os.pidfd_open(pid)
        try:
            while not self.closed:
                ready, _, _ = select.select([trial, 0], [], [])
                if trial in ready:
                    _, status = os.waitpid(pid, 0)
                    return (
                        -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                    )
                self._read()
            return None
        finally:
            os.close(trial)


def serve() -> None:
    import onnx_squeeze.pipeline
    import onnx_squeeze.tune.trial  # noqa: F401
    from onnx_squeeze import analysis

    # what most trials load, once (0.35 s; without sympy the trials do without it)
    with contextlib.suppress(ImportError):
        analysis.symbolic_shape_inference()
    from onnx_squeeze import scratch

    # Ctrl-C reaches the whole process group: the trial ends, the search stops and closes
    # this launcher's input, which ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    messages = _Input()
    for line in messages.lines():
        message = json.loads(line)
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _child(message, launcher)
                code = 0
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        code = messages.wait(pid)
        if code is None:  # the search was killed: so is its trial, and its temporaries go
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            scratch.sweep()
            return
        if code < 0:  # killed (a timeout, an abort): what it had in the temp folder goes
            scratch.sweep()
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    serve()
    # no interpreter teardown (0.4 s of onnxruntime's and torch's modules): the search waits
    # for this exit when it closes, and a time budget counts it
    os._exit(0)
