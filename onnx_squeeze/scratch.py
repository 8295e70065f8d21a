"""Temporary folders that do not outlive the tool, even when it is killed.

A folder is removed when its ``with`` block ends, on any exit path Python sees. A SIGKILL
(or an out-of-memory kill) skips that, and left a 205 MB copy of a model behind; so every
folder's name carries the process id, and :func:`sweep` (run when the CLI starts) removes the
folders of processes that no longer exist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

# The mark in every name made here: onnx-squeeze.pid<N>. (distinct from names users choose)
_MARK = "onnx-squeeze.pid"
_OWNER = re.compile(r"(?:^|\.)onnx-squeeze\.pid(\d+)\.")


def folder(kind: str = "", parent: str | os.PathLike | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder for this process (``with scratch.folder("sim") as path: ...``)."""
    return tempfile.TemporaryDirectory(
        prefix=f"{_MARK}{os.getpid()}.{kind}{'.' if kind else ''}",
        dir=parent,
        ignore_cleanup_errors=True,
    )


def staging(target: Path) -> Path:
    """A folder beside ``target`` to write it in before the rename that commits it."""
    parent = target.parent if str(target.parent) else Path(".")
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{_MARK}{os.getpid()}.", dir=parent))


def sweep(parent: str | os.PathLike | None = None) -> None:
    """Remove folders left in ``parent`` (the temp folder) by processes that are gone."""
    root = Path(parent or tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = _owner(entry.name)
        if pid is not None and pid != os.getpid() and not _alive(pid) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _owner(name: str) -> int | None:
    """The process id in a folder name made here, or None for anything else."""
    found = _OWNER.search(name)
    return int(found[1]) if found else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
