"""The float arithmetic of an already quantized graph, which FP16 leaves alone.

Dynamically quantized exports (onnxruntime's ``quantize_dynamic`` with ConvInteger) compute
scales, quantized biases (bias / scale, Floor, Cast to int32) and dequantized integer
accumulators in float; in FP16 the accumulators (sums of thousands of int8 products) and the
quantized biases overflow 65504, and the Casts to int32 would change type. QDQ graphs put
quantized compute between DequantizeLinear and QuantizeLinear, where FP16 Casts would break
onnxruntime's fusion. Every node that reads or writes one of these values stays FP32.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from onnx_squeeze.graph_utils import constant_array

# Ops whose float inputs and outputs are quantization parameters or quantized activations.
QUANTIZATION_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "QAttention",
        "QGemm",
        "QLinearConv",
        "QLinearMatMul",
    }
)
# Integer compute whose accumulator a Cast turns back into float.
INTEGER_COMPUTE = frozenset({"ConvInteger", "MatMulInteger"})
INTEGER_TYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})
# How far back through integer ops (bias Add, Reshape) a Cast looks for integer compute.
ACCUMULATOR_DEPTH = 4


def quantized_values(nodes: Iterable[ir.Node]) -> set[ir.Value]:
    """The float values of ``nodes`` that belong to quantized arithmetic: quantization
    parameters and everything computed only from them (scale products, quantized biases),
    the float sides of quantization ops, and integer accumulators cast back to float."""
    nodes = list(nodes)
    scales: set[ir.Value] = set()
    marked: set[ir.Value] = set()
    for node in nodes:
        if node.op_type in QUANTIZATION_OPS:
            floats = [v for v in (*node.inputs, *node.outputs) if _is_float(v)]
            marked.update(v for v in floats if constant_array(v) is None)
            if node.op_type == "DynamicQuantizeLinear" and len(node.outputs) > 1:
                scales.add(node.outputs[1])
        elif node.op_type == "Cast" and _is_float(node.outputs[0]) and _accumulator(node):
            marked.add(node.outputs[0])
    changed = True
    while changed:  # pure scale arithmetic: every non-constant float input is a scale
        changed = False
        for node in nodes:
            inputs = [v for v in node.inputs if _is_float(v) and constant_array(v) is None]
            if node.op_type in QUANTIZATION_OPS or not inputs or not set(inputs) <= scales:
                continue
            new = {v for v in node.outputs if _is_float(v)} - scales
            if new:
                scales |= new
                changed = True
    return marked | scales


def _accumulator(cast: ir.Node) -> bool:
    """True when ``cast`` converts the result of integer compute (through a few integer ops)."""
    frontier = [cast.inputs[0]]
    for _ in range(ACCUMULATOR_DEPTH):
        producers = [
            v.producer()
            for v in frontier
            if v is not None and v.dtype in INTEGER_TYPES and v.producer() is not None
        ]
        if any(p.op_type in INTEGER_COMPUTE for p in producers):
            return True
        frontier = [v for p in producers for v in p.inputs]
    return False


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT
