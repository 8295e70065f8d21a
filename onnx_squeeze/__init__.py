"""onnx-squeeze: make exported ONNX models smaller and faster, and prove what it cost.

The Python API mirrors the CLI::

    import onnx_squeeze as sq
    result = sq.compress("model.onnx", sq.Recipe.load("recipe.yaml"))
    comparison = sq.compare(result.original, result.model)
    sq.save(result.model, "model.squeezed.onnx")
"""

__version__ = "0.1.0"

from onnx_squeeze.comparison import compare
from onnx_squeeze.model_io import load, save
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

__all__ = ["Recipe", "__version__", "compare", "compress", "load", "save"]
