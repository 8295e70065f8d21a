"""Run reports: one JSON-able dict (versioned schema) rendered as terminal tables or an HTML page.

The dict is the single source: the terminal, the JSON file and the HTML page all show it.
Its schema is ``onnx_squeeze/report/schema.json``; bump ``SCHEMA_VERSION`` on breaking changes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import onnx_squeeze
from onnx_squeeze.records import PassReport
from onnx_squeeze.report.html import to_html
from onnx_squeeze.report.terminal import (
    print_bench,
    print_comparison,
    print_groups,
    print_passes,
    print_report,
    print_summary,
)

__all__ = [
    "SCHEMA",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "build_report",
    "print_bench",
    "print_comparison",
    "print_groups",
    "print_passes",
    "print_report",
    "print_summary",
    "to_html",
    "to_json",
    "write",
    "write_text_atomic",
]

SCHEMA = "onnx-squeeze/report"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema.json")


def build_report(
    *,
    command: str,
    input_path: str | None,
    output_path: str | None,
    reports: Sequence[PassReport] = (),
    notes: Sequence[str] = (),
    comparison: dict[str, Any] | None = None,
    gates: Sequence[dict[str, Any]] = (),
    warnings: Sequence[str] = (),
    calibration: str | None = None,
    evaluation: str | None = None,
    recipe: dict[str, Any] | None = None,
    seconds: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    command_line: str | None = None,
) -> dict[str, Any]:
    """Assemble the report dict of a run. ``passed``: every gate passed (the default gate, applied
    when no ``--check`` was given, counts here; it fails the exit code only under --strict).
    What makes it reproducible is recorded too: the ``command_line`` (the CLI sets it), the
    versions, the machine, the input shapes (``input_shapes``, else the comparison's) and the
    data (``calibration``, ``evaluation``: labels that name the file or say random)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool": {
            "onnx_squeeze": onnx_squeeze.__version__,
            "onnx": onnx.__version__,
            "onnx_ir": ir.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": machine(),
        "command_line": command_line,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "input": input_path,
        "output": output_path,
        "warnings": list(warnings),
        "calibration": calibration,
        "evaluation": evaluation,
        "input_shapes": {
            name: list(shape)
            for name, shape in (
                input_shapes or (comparison or {}).get("input_shapes") or {}
            ).items()
        },
        "recipe": recipe,
        "passes": [r.to_dict() for r in reports],
        "notes": list(notes),
        "comparison": comparison,
        "gates": list(gates),
        "passed": all(g["passed"] for g in gates),
        "seconds": seconds,
    }


def machine() -> dict[str, Any]:
    """Where the figures were measured: OS, CPU, cores, onnxruntime's providers."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "providers": list(ort.get_available_providers()),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become None (strict parsers reject them)."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_finite_or_none(report), indent=2, default=_jsonable)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename, with the permissions a plain
    ``open()`` would give (mkstemp makes its file 0600: a report nobody else could read)."""
    target = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as JSON, or as HTML when the path ends in .html/.htm."""
    text = to_html(report) if str(path).lower().endswith((".html", ".htm")) else to_json(report)
    write_text_atomic(path, text)
