"""The trial cache: every trial's job, model and measurements in a folder named after a content
hash of what decides them (input model, recipe, data, metric, how it is measured), so that a
rerun or ``--resume`` after a crash or Ctrl-C finds finished trials instead of running them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnx_squeeze.tune.trial import MODEL_FILE, RESULT_FILE

CHUNK = 1 << 20
# the job's files, keyed by their content, not by where they are
DATA_KEYS = ("model", "calibration", "evaluation", "evaluation_subset")


def content_hash(spec: Any) -> str:
    """sha256 of a file's bytes, of a folder's files (names and bytes), or of a spec that is no
    path (``random``, a zoo name) as written."""
    digest = hashlib.sha256()
    path = Path(os.fspath(spec)) if isinstance(spec, str | os.PathLike) else None
    if path is not None and path.is_file():
        files = [path]
    elif path is not None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        digest.update(repr(spec).encode())
        return digest.hexdigest()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class Store:
    """``root/trials/KEY/`` holds ``job.json``, ``model.onnx`` and ``result.json``; a folder
    without a result is a trial that was interrupted and runs again."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._hashes: dict[str, str] = {}

    def data_hash(self, spec: Any) -> str | None:
        if spec is None:
            return None
        key = repr(spec)
        if key not in self._hashes:
            self._hashes[key] = content_hash(spec)
        return self._hashes[key]

    def key(self, job: Mapping[str, Any]) -> str:
        """The hash of everything that decides a trial's outcome (not where it is written)."""
        identity = {
            key: self.data_hash(value) if key in DATA_KEYS else value
            for key, value in job.items()
            if key != "folder"
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def folder(self, key: str) -> Path:
        return self.root / "trials" / key

    def get(self, key: str) -> dict[str, Any] | None:
        """A finished trial's result (failed ones included), or None."""
        path = self.folder(key) / RESULT_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # cut off while written: run it again
            return None

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / (RESULT_FILE + ".part")
        staging.write_text(json.dumps(result, default=str))
        staging.replace(folder / RESULT_FILE)

    def model_path(self, key: str) -> Path:
        return self.folder(key) / MODEL_FILE
