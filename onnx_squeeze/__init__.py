"""onnx-squeeze: make exported ONNX models smaller and faster, and prove what it cost.

The Python API is the CLI's flow (``compress`` prepares, runs the passes, compares on held-out
data, gates, saves and reports, and returns all of it)::

    import onnx_squeeze as sq
    result = sq.compress("model.onnx", sq.Recipe.load("int8"), calibration="calib.npz",
                         output="model.int8.onnx")
    print(result.warnings, result.comparison["metrics"], result.passed)
    sq.report.write(result.report, "report.html")
"""

__version__ = "0.1.0"

from onnx_squeeze import report
from onnx_squeeze.calibration import open_source
from onnx_squeeze.comparison import compare
from onnx_squeeze.model_io import load, save
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

__all__ = [
    "Recipe",
    "__version__",
    "compare",
    "compress",
    "load",
    "open_source",
    "report",
    "save",
]
