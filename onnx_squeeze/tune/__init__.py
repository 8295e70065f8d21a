"""``onnx-squeeze tune``: search recipes (pruning, factorization, quantization) for one that
reaches a latency, size or MACs target within an accuracy budget.

``onnx_squeeze.tune(model, output, targets=["latency=0.5"], max_drop=0.01, calibration=...)``
runs the search (:func:`onnx_squeeze.tune.search.tune`): this package is callable, because a
function of the same name beside it in ``onnx_squeeze`` would be replaced by the package the
first time any of its modules is imported.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from onnx_squeeze.tune.targets import Budget, Target, parse_budget, parse_targets

__all__ = ["Budget", "Target", "TuneResult", "parse_budget", "parse_targets", "tune"]


def __getattr__(name: str) -> Any:
    """``tune`` and ``TuneResult`` on first use: the search imports Optuna (about a second),
    which the CLI's other commands need not wait for."""
    if name == "tune":
        from onnx_squeeze.tune.search import tune

        return tune
    if name == "TuneResult":
        from onnx_squeeze.tune.results import TuneResult

        return TuneResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Callable(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from onnx_squeeze.tune.search import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
