"""Element types for values that come without one (constants folded after the model's shape
inference, bodies that exporters leave without value_info): FP16 must know every float value."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


def infer_missing(model: ir.Model) -> int:
    """Give untyped node outputs the element type onnx's inference finds (on a clone, so that
    no type object shared with the teacher changes); returns how many got one."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    if all(v.dtype is not None for node in nodes for v in node.outputs):
        return 0
    inferred = model.clone()
    ShapeInferencePass(strict_mode=False)(inferred)  # leaves the clone as it was on failure
    typed = 0
    for node, twin in zip(nodes, ir.traversal.RecursiveGraphIterator(inferred.graph), strict=True):
        for value, twin_value in zip(node.outputs, twin.outputs, strict=True):
            if value.dtype is None and twin_value.dtype is not None:
                value.type = ir.TensorType(twin_value.dtype)
                typed += 1
    return typed
