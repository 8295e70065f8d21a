"""``onnx-squeeze tune``: search recipes (pruning, factorization, quantization) for one that
reaches a latency, size or MACs target within an accuracy budget."""

from onnx_squeeze.tune.results import TuneResult
from onnx_squeeze.tune.search import tune
from onnx_squeeze.tune.targets import Budget, Target, parse_budget, parse_targets

__all__ = ["Budget", "Target", "TuneResult", "parse_budget", "parse_targets", "tune"]
