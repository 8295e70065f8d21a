"""How the package tells a user things outside the report: Python ``logging`` (the
``onnx_squeeze`` logger) and, for run warnings, Python ``warnings`` with :class:`SqueezeWarning`.

A library user gets warnings as warnings (filter them by category) and may route the logger
anywhere; the CLI sends the logger to stderr at the level ``-q``/``-v``/``--log-level`` chose.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

logger = logging.getLogger("onnx_squeeze")

# A log record carrying this attribute repeats a warning the report also shows: the CLI, which
# prints the report, leaves it out of its log.
IN_REPORT = "onnx_squeeze_in_report"


class SqueezeWarning(UserWarning):
    """A run warning (random data, a weak output channel, a slower result, a pass that changed
    nothing): the same text as the report's ``warnings``."""


def warn(message: str, *, stacklevel: int = 3) -> None:
    """Issue a run warning through ``warnings`` and the ``onnx_squeeze`` logger."""
    warnings.warn(message, SqueezeWarning, stacklevel=stacklevel)
    logger.warning(message, extra={IN_REPORT: True})


class _NotInReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, IN_REPORT, False)


class _Format(logging.Formatter):
    """Information as plain lines; anything else prefixed by its level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes (not the one it was made
    with: a caller that swaps stderr, as test runners do, gets the lines)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(level: int | str) -> logging.Handler:
    """Send the ``onnx_squeeze`` logger to stderr at ``level`` (the CLI's handler, replacing a
    previous one); returns the handler."""
    for handler in list(logger.handlers):
        if isinstance(handler, _Stderr):
            logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Format("%(message)s"))
    handler.addFilter(_NotInReport())
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
