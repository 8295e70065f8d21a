"""onnx-squeeze: make exported ONNX models smaller and faster, and prove what it cost.

The Python API is the CLI's flow (``compress`` prepares, runs the passes, compares on held-out
data, gates, saves and reports, and returns all of it)::

    import onnx_squeeze as sq
    result = sq.compress("model.onnx", sq.Recipe.load("int8"), calibration="calib.npz")
    print(result.warnings, result.comparison["metrics"], result.passed)
    result.save("model.int8.onnx")          # or result.model_proto()
    sq.report.write(result.report, "report.html")

A model is a path, ``zoo:NAME``, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. Calibration
data is a path (.npz/.npy, a folder of them or of images), ``"random"``, a dict {input name:
samples}, a list or iterable of feed dicts, or an onnxruntime ``CalibrationDataReader``. Run
warnings are also issued as :class:`SqueezeWarning` and logged to the ``onnx_squeeze`` logger.
"""

__version__ = "0.1.0"

from onnx_squeeze import report, tune
from onnx_squeeze.calibration import open_source
from onnx_squeeze.comparison import compare
from onnx_squeeze.log import SqueezeWarning
from onnx_squeeze.model_io import load, save
from onnx_squeeze.pipeline import CompressResult, compress
from onnx_squeeze.recipe import Recipe

__all__ = [
    "CompressResult",
    "Recipe",
    "SqueezeWarning",
    "__version__",
    "compare",
    "compress",
    "load",
    "open_source",
    "report",
    "save",
    "tune",
]
