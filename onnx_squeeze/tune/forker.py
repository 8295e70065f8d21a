"""A trial launcher: a process that imports onnx-squeeze once and forks one child per trial, so a
trial neither pays for the imports (seconds) nor shares a process with the search (a trial that
aborts takes only its child down).

multiprocessing's ``forkserver`` would do the same but imports the caller's ``__main__`` in the
server, which reruns a script that calls ``tune()`` without a ``__name__`` guard. The protocol is
a line of JSON in (``{"job": PATH, "env": {...}, "log": PATH}``), ``pid N`` and ``exit CODE`` out
(CODE negative: the signal that ended the child).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _child(message: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends a trial without a traceback
    os.environ.clear()
    os.environ.update(message["env"])
    stream = os.open(message["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(stream, 1)
    os.dup2(stream, 2)
    from onnx_squeeze.tune.trial import main

    main([message["job"]])


def serve() -> None:
    import onnx_squeeze.pipeline
    import onnx_squeeze.tune.trial  # noqa: F401

    # Ctrl-C reaches the whole process group: the trial ends, the search stops and closes
    # this launcher's input, which ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        message = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sys.stdin.close()
                _child(message)
                code = 0
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    serve()
