"""onnx-squeeze: make exported ONNX models smaller and faster, and prove what it cost.

The Python API mirrors the CLI::

    import onnx_squeeze as sq
    calib = sq.open_source("calib.npz", sq.load("model.onnx"))
    result = sq.compress("model.onnx", sq.Recipe.load("recipe.yaml"), calibration=calib)
    comparison = sq.compare(result.original, result.model, feeds=result.evaluation)
    sq.save(result.model, "model.squeezed.onnx")
"""

__version__ = "0.1.0"

from onnx_squeeze.calibration import open_source
from onnx_squeeze.comparison import compare
from onnx_squeeze.model_io import load, save
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

__all__ = ["Recipe", "__version__", "compare", "compress", "load", "open_source", "save"]
