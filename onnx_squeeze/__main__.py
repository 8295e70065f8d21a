"""``python -m onnx_squeeze`` is the ``onnx-squeeze`` command."""

from onnx_squeeze.cli import main

main()
