"""Calibration: the data passes learn from and the statistics they take of it.

- :mod:`.feeds`: what every source yields (``Feed``, :class:`CalibrationSource`) and the
  batch-size rule; files are cut on each input's batch axis (:func:`onnx_squeeze.shapes.batch_axis`).
- :mod:`.sources`: onnxruntime readers, feed lists, the held-out split; :func:`open_source`
  picks the source a spec names: :mod:`.arrays` (``.npz``/``.npy``), :mod:`.images` (image
  folders, preset preprocessing), :mod:`.random_data` or a reader.
- :mod:`.constants`: inputs given one value for every feed (``--set sr=16000``).
- :mod:`.random_data`: random inputs (smoke tests), never invented integers or scalars.
- :mod:`.accumulators`: streaming min/max, histograms, per-channel statistics, fixed memory.
- :mod:`.runner`: the one way to run a copy of a model that exposes intermediate tensors.
- :mod:`.collector` and :mod:`.stat_graph`: statistics of chosen tensors, reduced in the graph.
- :mod:`.grams`: input Gram matrices of weight layers.
- :mod:`.service`: what a pass gets on its context: the data, its first batches, one cache.
"""

from onnx_squeeze.calibration.accumulators import (
    ChannelMeans,
    ChannelStatistics,
    Histogram,
    MinMax,
    TensorStatistics,
)
from onnx_squeeze.calibration.arrays import NpzSource
from onnx_squeeze.calibration.collector import StatisticsCollector, joined
from onnx_squeeze.calibration.feeds import CalibrationSource, Feed
from onnx_squeeze.calibration.images import ImageFolderSource
from onnx_squeeze.calibration.random_data import RandomSource, random_source
from onnx_squeeze.calibration.runner import expose
from onnx_squeeze.calibration.sources import (
    HOLDOUT_EVERY,
    ReaderSource,
    open_source,
    split_for_evaluation,
)

__all__ = [
    "HOLDOUT_EVERY",
    "CalibrationSource",
    "ChannelMeans",
    "ChannelStatistics",
    "Feed",
    "Histogram",
    "ImageFolderSource",
    "MinMax",
    "NpzSource",
    "RandomSource",
    "ReaderSource",
    "StatisticsCollector",
    "TensorStatistics",
    "expose",
    "joined",
    "open_source",
    "random_source",
    "split_for_evaluation",
]
