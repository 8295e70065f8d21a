"""Graph helpers: unused initializers of If/Loop/Scan bodies, which onnx-ir's
RemoveUnusedNodesPass leaves behind."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_squeeze.graph_utils import remove_unused_initializers
from tests.helpers import check, run


def _if_model() -> ir.Model:
    """Each branch adds a constant of its own to ``x``; each body also holds a stale copy of it,
    and the main graph an unused one (which is the main graph's sweep's, not this helper's)."""
    model = ir.from_proto(
        onnx.parser.parse_model(
            """<ir_version: 8, opset_import: ["" : 17]>
            branchy (bool c, float[4] x) => (float[4] y) {
                y = If(c) <
                    then_branch = g1 () => (float[4] t) { t = Add(x, one) },
                    else_branch = g2 () => (float[4] e) { e = Sub(x, one) }
                >
            }"""
        )
    )

    def constant(graph: ir.Graph, name: str, value: float) -> ir.Value:
        array = np.full(4, value, np.float32)
        initializer = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(initializer)
        return initializer

    constant(model.graph, "main_unused", 3.0)
    for branch, value in (("then_branch", 1.0), ("else_branch", 2.0)):
        body = model.graph.node(0).attributes[branch].value
        body.node(0).replace_input_with(1, constant(body, f"{branch}_used", value))
        constant(body, f"{branch}_stale", 9.0)
    return model


def test_unused_body_initializers_go_and_read_ones_stay():
    model = _if_model()
    feed = {"x": np.arange(4, dtype=np.float32)}
    before = [run(model, {**feed, "c": np.array(c)})[0] for c in (True, False)]
    assert remove_unused_initializers(model) == 2
    check(model)
    for branch in ("then_branch", "else_branch"):
        assert list(model.graph.node(0).attributes[branch].value.initializers) == [f"{branch}_used"]
    assert "main_unused" in model.graph.initializers
    for condition, expected in zip((True, False), before, strict=True):
        np.testing.assert_array_equal(run(model, {**feed, "c": np.array(condition)})[0], expected)
    assert remove_unused_initializers(model) == 0
