"""onnx-squeeze: make exported ONNX models smaller and faster, and prove what it cost."""

__version__ = "0.1.0"
