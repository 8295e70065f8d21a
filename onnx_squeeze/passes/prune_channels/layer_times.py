"""The profiler reader moved to :mod:`onnx_squeeze.layer_times` (the comparison times layers
too); these names stay here for the pass's imports until they read them from there."""

from onnx_squeeze.layer_times import LayerTimes, _owned_times, _owner, measure

__all__ = ["LayerTimes", "_owned_times", "_owner", "measure"]
