"""The gate check the default searches judge candidates by: each set of batches is read as far
as its agreement gates need to be decided, and an agreement that every read holds on fewer reads
than that does not pass (a search keeps its most aggressive candidate among several, and a few
reads all agree by luck). Judged numerically in onnxruntime against the reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnx_squeeze import gates
from onnx_squeeze.gate_check import GateCheck

GATE = "argmax_agreement>=0.98"


def _classifier(weight: np.ndarray, bias: np.ndarray | None = None) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    bias = np.zeros(10) if bias is None else bias
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(a.astype("f4"), n) for n, a in (("w", weight), ("b", bias))],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 16)).astype("f4")} for _ in range(count)]


WEIGHT = np.random.default_rng(0).standard_normal((16, 10))


def test_reads_that_decide_a_gate():
    assert gates.reads_to_decide(gates.parse_gate("argmax_agreement>=0.98")) == 50
    assert gates.reads_to_decide(gates.parse_gate("score_agreement>=0.875")) == 7
    assert gates.reads_to_decide(gates.parse_gate("top1>=0.5")) == 1
    assert gates.reads_to_decide(gates.parse_gate("max_abs_error<=0.1")) == 0


def test_a_set_reads_as_many_batches_as_its_agreement_needs():
    """One row per batch: from 8 batches at least, the set goes on to the 50 reads a 0.98 gate
    needs, and no further."""
    model = _classifier(WEIGHT)
    check = GateCheck(model, {"search": _feeds(200)}, GATE, "cpu", least=8)
    assert len(check.feeds["search"]) == check.batches_to_decide("search") == 50
    assert check.reads["search"] == {GATE: (50, 50)}
    passed, said = check(_classifier(WEIGHT), "search")
    assert passed and "argmax_agreement = 1 >= 0.98" in said


def test_every_read_agreeing_on_too_few_reads_does_not_pass():
    model = _classifier(WEIGHT)
    check = GateCheck(model, {"held": _feeds(20)}, GATE, "cpu")
    assert len(check.feeds["held"]) == 20
    assert check.reads["held"] == {GATE: (20, 50)}
    passed, said = check(_classifier(WEIGHT), "held")
    assert not passed and "argmax_agreement = 1" in said
    assert "of 20 reads: too few to decide argmax_agreement>=0.98, which needs 50" in said


def test_a_candidate_that_moves_decisions_fails_on_the_reads_that_decide():
    """Every class's logit but one scaled down: most rows change their top class."""
    model = _classifier(WEIGHT)
    check = GateCheck(model, {"search": _feeds(200)}, GATE, "cpu", least=8)
    moved = WEIGHT.copy()
    moved[:, 1:] *= 0.2
    passed, said = check(_classifier(moved), "search")
    assert not passed and "which is not >= 0.98" in said


def test_one_disagreement_is_judged_at_the_lower_bound():
    """Class 0 raised just past the smallest margin of the rows it does not top: one row of 51
    changes its top class. The count (0.980) meets a 0.98 gate, as accuracy control would let
    it decide; the search's check holds it to the bound (0.949 on its 50 independent reads)
    and it does not pass."""
    feeds = _feeds(51)
    logits = np.concatenate([feed["x"] for feed in feeds]) @ WEIGHT
    margins = np.sort((logits.max(axis=1) - logits[:, 0])[logits.argmax(axis=1) != 0])
    bias = np.zeros(10)
    bias[0] = (margins[0] + margins[1]) / 2
    check = GateCheck(_classifier(WEIGHT), {"held": feeds}, GATE, "cpu")
    passed, said = check(_classifier(WEIGHT, bias), "held")
    assert gates.decided(gates.parse_gate(GATE), 50 / 51, 51)
    assert not passed and "argmax_agreement = 0.980392 >= 0.98" in said
    assert "of 50 reads: 0.9494 at its lower bound" in said
