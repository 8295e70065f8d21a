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

An Add/Mul with a float input (its producer runs in float) is integer only when what reads it
can be too: otherwise the integer op costs a QuantizeLinear on that input and a
DequantizeLinear on its output, and saves nothing. MobileNetV3's HardSwish (Paddle's export:
``x * Clip(x + 3, 0, 6) / 6``) is the case: ppocr_cls with every layer quantized ran 1.77-1.88x
the float model's latency with those Muls integer, 1.67-1.74x with them float (CPU time, one
thread, three interleaved rounds).

Two rules keep outputs intact (a detector's decode head is the case they are for):

- The *tail*, the ops from which no quantized weight layer can be reached, stays float: after
  the last weight layer an integer op saves nothing (no integer kernel follows) and only adds a
  rounding. It holds a detector's decode (Split, Sigmoid, box arithmetic, the Concat of boxes
  and scores) and a classifier's Softmax.
- A Concat whose inputs' calibrated ranges differ by more than ``concat_range_ratio`` stays
  float, its inputs dequantized: one shared scale would cost the narrow input
  ``20·log10(ratio)`` dB, crushing scores beside pixel coordinates (unless a weight layer
  reads the Concat directly: its quantized input is one scale anyway). The ranges are known
  only after calibration, so the plan is made twice: without them (which tensors to
  calibrate), then with them (what to quantize).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

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


# The ops that may run in integer form after a quantized tensor (the anchors aside).
FOLLOWER_OPS = SHARING_OPS | UNARY_OPS | BINARY_OPS | CLAMP_OPS | {"Concat"}


# The widest ratio of calibrated range widths that a Concat's inputs may have and still share
# one scale. The narrowest input loses 20·log10(ratio) dB to the shared scale: at 8, 18 dB,
# which leaves a well-calibrated UINT8 tensor (about 40-45 dB on its own range) near 25 dB, the
# level of the noise elsewhere in a network. Measured (mse ranges): the Concats of backbones
# and necks reach 1.8 on the zoo's YOLO, 2.1 on ddddocr_det (YOLOX), 3.2 on ppocr_det's FPN,
# and yolo_detect's head joins of box bins and class logits 4.2; a join of pixel boxes
# (0…640) with probabilities (0…1) is about 600.
CONCAT_RANGE_RATIO = 8.0


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
    # the Concats left float for their inputs' ranges, with the ratio of their widths
    float_concats: list[tuple[ir.Node, float]] = dataclasses.field(default_factory=list)
    # the float ops after the quantized tensors that lead to no anchor
    tail: list[ir.Node] = dataclasses.field(default_factory=list)


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


def make_plan(
    model: ir.Model,
    anchors: Sequence[ir.Node],
    symmetric: bool,
    *,
    widths: Mapping[str, float] | None = None,
    concat_range_ratio: float = CONCAT_RANGE_RATIO,
) -> Plan:
    """Decide which tensors get Q/DQ and which share parameters, for the given anchors.

    ``widths`` are the calibrated range widths of the tensors a plan without them chose; with
    them, a Concat whose inputs differ by more than ``concat_range_ratio`` stays float."""
    tensors: dict[str, ir.Value] = {}
    classes = Classes()
    plan = Plan(list(anchors), [], tensors, classes)

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
    leads = _leading_to(model, anchor_set)
    tail: set[int] = set()  # the values of the float tail
    for node in model.graph:  # topological order: a follower sees its inputs' decisions
        if id(node) in anchor_set or already_quantized(node):
            continue
        after_tail = any(v is not None and id(v) in tail for v in node.inputs)
        if not (after_tail or _reads_quantized(node, tensors)):
            continue
        outputs = [v for v in node.outputs if id(v) in leads]
        if not outputs:
            plan.tail.append(node)
            tail.update(id(v) for v in node.outputs)
            continue
        ratio = _width_ratio(node, widths)
        # (a Concat read by an anchor gets the one scale at that anchor's input anyway)
        if ratio > concat_range_ratio and node.outputs[0].name not in tensors:
            plan.float_concats.append((node, ratio))
            continue
        if _plan_follower(node, outputs, tensors, classes, want, symmetric, anchor_set):
            plan.followers.append(node)
    return plan


def _leading_to(model: ir.Model, anchors: set[int]) -> set[int]:
    """The ids of the values from which one of ``anchors`` (node ids) can be reached."""
    leads: set[int] = set()
    for node in reversed(model.graph):  # consumers before producers
        for value in node.outputs:
            for use in value.uses():
                consumer = use.node
                if id(consumer) in anchors or any(id(v) in leads for v in consumer.outputs):
                    leads.add(id(value))
                    break
    return leads


def _width_ratio(node: ir.Node, widths: Mapping[str, float] | None) -> float:
    """For a Concat, the ratio of its widest input's range width to its narrowest's (1 when
    the widths are not all known)."""
    if node.op_type != "Concat" or widths is None:
        return 1.0
    known = [widths.get(v.name) if v is not None else None for v in node.inputs]
    if len(known) < 2 or any(w is None for w in known):
        return 1.0
    return max(known) / max(min(known), 1e-12)


def _reads_quantized(node: ir.Node, tensors: dict[str, ir.Value]) -> bool:
    """Whether the input that makes ``node`` a follower (any input of Add/Mul, else input 0)
    is already planned quantized."""
    inputs = node.inputs if node.op_type in BINARY_OPS else node.inputs[:1]
    return any(v is not None and v.name in tensors for v in inputs)


def _plan_follower(
    node: ir.Node,
    outputs: list[ir.Value],
    tensors: dict[str, ir.Value],
    classes: Classes,
    want: Callable[[Sequence[ir.Value | None]], bool],
    symmetric: bool,
    anchors: set[int],
) -> bool:
    """Plan ``node`` (whose input is quantized) as a follower with the given ``outputs`` (those
    that lead to an anchor: a Split's piece that only the tail reads stays float); whether it
    was. ``anchors`` are the ids of the plan's anchor nodes."""
    op = node.op_type
    if op in BINARY_OPS:  # a Relu after an Add folds into its QuantizeLinear, as after a Conv
        clamp = _fused_clamp(outputs[0], symmetric) if op == "Add" else None
        planned = [clamp.outputs[0]] if clamp is not None else outputs
        float_input = any(v is not None and v.name not in tensors for v in node.inputs)
        if float_input and not _read_in_integer(planned, anchors):
            return False
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


def _read_in_integer(values: Sequence[ir.Value], anchors: set[int]) -> bool:
    """Whether some consumer of ``values`` may run in integer form: an anchor (by id) or a
    follower op."""
    return any(
        id(use.node) in anchors or use.node.op_type in FOLLOWER_OPS
        for value in values
        for use in value.uses()
    )


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
