"""Errors a user can cause. Each carries a one-line message that names the file or node and the fix.

Anything else that escapes is an internal bug and stays loud (exit code 2 in the CLI).
"""

from __future__ import annotations


class SqueezeError(Exception):
    """Base class for errors caused by the user's input or settings (CLI exit code 1)."""


class InputError(SqueezeError):
    """The model file, calibration data or another input cannot be used as given."""


class ShapeUnknownError(InputError):
    """An input dimension is given by nothing (options, data, model): it is never guessed."""


class UnsupportedModelError(SqueezeError):
    """The model uses something this tool cannot handle (old opset, unknown op domain, ...)."""


class RunLimitError(SqueezeError):
    """A model run went past its time limit (a Loop of 2**40 trips, a runaway shape)."""


class SettingsError(SqueezeError):
    """A pass, recipe or command-line setting is invalid."""


class GateFailedError(SqueezeError):
    """An accuracy gate (``--check``) failed (CLI exit code 3)."""
