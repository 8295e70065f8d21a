"""Where Q/DQ pairs go: the placement rules of static QDQ.

The plan picks *anchors* (Conv, ConvTranspose, Gemm, MatMul: they get quantized weights and
quantized inputs) and *followers* (ops onnxruntime runs in integer form when their input is
already quantized: Add/Mul, Concat, pooling, Sigmoid, Softmax, and the data-movement ops that
must keep their input's scale: MaxPool, Reshape, Transpose, Resize, ...). Tensors that must
share parameters are joined into classes; every class gets one range.

Placement follows onnxruntime's QDQ selectors (``qdq_selector_action_transformer.cc``): Conv
needs a quantized output to become QLinearConv; Gemm/MatMul become QGemm/QLinearMatMul with a
quantized output and QGemm/MatMulIntegerToFloat without one, so their output is quantized only
when a consumer wants it. With UINT8 activations a Relu (or Clip from 0) after a Conv is left
to onnxruntime's Relu/Clip-QuantizeLinear fusion (zero point 0 makes the clamp free); with
symmetric INT8 activations it keeps its input's parameters. Graph outputs stay float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.layers import WEIGHT_OPS
from onnx_squeeze.passes.quantize.eligibility import already_quantized, is_activation

ANCHOR_OPS = WEIGHT_OPS  # the weight layers (Conv, ConvTranspose, Gemm, MatMul)


# Followers whose output keeps the parameters of input 0 (onnxruntime drops their Q/DQ).
SHARING_OPS = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Slice",
        "Expand",
        "Tile",
        "Gather",
        "Split",
    }
)


# Followers with their own output parameters (com.microsoft QLinear* kernels on CPU).
UNARY_OPS = frozenset({"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax"})


BINARY_OPS = frozenset({"Add", "Mul"})


CLAMP_OPS = frozenset({"Relu", "Clip"})


class Classes:
    """Union-find over tensor names: tensors in one class share quantization parameters."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent.setdefault(name, name)

    def find(self, name: str) -> str:
        self.add(name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, names: Sequence[str]) -> None:
        roots = [self.find(n) for n in names]
        for root in roots[1:]:
            self.parent[root] = roots[0]

    def members(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name in self.parent:
            groups.setdefault(self.find(name), []).append(name)
        return groups


@dataclasses.dataclass
class Plan:
    """What to quantize: anchor nodes, follower nodes and the activation tensors (in classes)."""

    anchors: list[ir.Node]
    followers: list[ir.Node]
    tensors: dict[str, ir.Value]
    classes: Classes


def _fused_clamp(value: ir.Value, symmetric: bool) -> ir.Node | None:
    """The Relu/Clip(0, ...) that is the only consumer of ``value`` and that onnxruntime folds
    into the QuantizeLinear after it (UINT8 activations only)."""
    uses = list(value.uses())
    if symmetric or len(uses) != 1 or value.is_graph_output():
        return None
    consumer = uses[0].node
    if consumer.op_type == "Relu":
        return consumer
    if consumer.op_type == "Clip":
        low = constant_array(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
        if low is not None and low.size == 1 and float(low) == 0.0:
            return consumer
    return None


def _quantizable(value: ir.Value | None) -> bool:
    """A float activation that may get Q/DQ (graph outputs stay float)."""
    return value is not None and is_activation(value) and not value.is_graph_output()


def make_plan(model: ir.Model, anchors: Sequence[ir.Node], symmetric: bool) -> Plan:
    """Decide which tensors get Q/DQ and which share parameters, for the given anchors."""
    tensors: dict[str, ir.Value] = {}
    classes = Classes()

    def want(values: Sequence[ir.Value | None]) -> bool:
        """Plan all ``values`` if every one can be quantized; whether they were."""
        if not all(_quantizable(v) for v in values):
            return False
        for value in values:
            tensors[value.name] = value
            classes.add(value.name)
        return True

    for node in anchors:
        want([node.inputs[0]])
        if node.op_type == "MatMul" and constant_array(node.inputs[1]) is None:
            want([node.inputs[1]])
        if node.op_type == "Conv":  # QLinearConv needs a quantized output
            clamp = _fused_clamp(node.outputs[0], symmetric)
            want([clamp.outputs[0] if clamp is not None else node.outputs[0]])
    anchor_set = {id(n) for n in anchors}
    followers = []
    for node in model.graph:  # topological order: a follower sees its inputs' decisions
        if id(node) in anchor_set or already_quantized(node):
            continue
        if _plan_follower(node, tensors, classes, want, symmetric):
            followers.append(node)
    return Plan(list(anchors), followers, tensors, classes)


def _reads_quantized(node: ir.Node, tensors: dict[str, ir.Value]) -> bool:
    """Whether the input that makes ``node`` a follower (any input of Add/Mul, else input 0)
    is already planned quantized."""
    inputs = node.inputs if node.op_type in BINARY_OPS else node.inputs[:1]
    return any(v is not None and v.name in tensors for v in inputs)


def _plan_follower(
    node: ir.Node,
    tensors: dict[str, ir.Value],
    classes: Classes,
    want: Callable[[Sequence[ir.Value | None]], bool],
    symmetric: bool,
) -> bool:
    """Plan ``node`` as a follower if its input is quantized; whether it was."""
    if not _reads_quantized(node, tensors):
        return False
    op = node.op_type
    outputs = list(node.outputs)
    if op in BINARY_OPS:  # a Relu after an Add folds into its QuantizeLinear, as after a Conv
        clamp = _fused_clamp(outputs[0], symmetric) if op == "Add" else None
        planned = [clamp.outputs[0]] if clamp is not None else outputs
        return len(node.inputs) == 2 and want([*node.inputs, *planned])
    if op == "Concat":
        members = [*node.inputs, *outputs]
        planned = want(members)
        if planned:
            classes.join([v.name for v in members])
        return planned
    sharing = op in SHARING_OPS or op in CLAMP_OPS
    if not (sharing or op in UNARY_OPS) or not want(outputs):
        return False
    if sharing:  # with UINT8, a Relu not folded into a Conv also keeps its input's scale
        classes.join([node.inputs[0].name, *(v.name for v in outputs)])
    return True


# onnxruntime's CPU rewrites of Relu -> QuantizeLinear and Clip -> QuantizeLinear (when the
# QuantizeLinear is the activation's only consumer) assume integer types: with a float8 zero
# point ReluQuantRewrite drops the Relu (wrong results) and ClipQuantFusion throws at load. The
# FP8 Q/DQ pair goes before such a Relu/Clip instead: the same values, as E4M3 rounding is
# symmetric and Relu(0) = 0.
FLOAT_CLAMPS = frozenset({"Relu", "Clip"})


def point_before_clamp(node: ir.Node, targets: set[ir.Node]) -> ir.Value:
    """Where the FP8 Q/DQ pair that feeds ``node``'s activation input goes: the input itself,
    or the input of a Relu/Clip whose consumers are all quantized (see FLOAT_CLAMPS)."""
    source = node.inputs[0]
    assert source is not None
    producer = source.producer()
    if (
        producer is not None
        and producer.op_type in FLOAT_CLAMPS
        and all(user in targets and index == 0 for user, index in source.uses())
        and not source.is_graph_output()
        and producer.inputs[0] is not None
    ):
        return producer.inputs[0]
    return source
