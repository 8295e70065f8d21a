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


def test_subnormal_weights_become_zero_and_the_outputs_stay_the_same():
    """Subnormal weights (recovery's refits, batch-norm folding) slow CPUs many times; set to
    0 they change no output beyond float32's resolution, and normal values are untouched."""
    import onnx_squeeze as sq

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    spots = rng.choice(64, 23, replace=False)  # a few among normal weights, as refits leave them
    weight.flat[spots] = np.float32(1e-40) * rng.standard_normal(23).astype(np.float32)
    weight.flat[np.setdiff1d(np.arange(64), spots)[0]] = np.finfo(np.float32).tiny  # stays
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        dense (float[N, 8] x) => (float[N, 8] y) { y = MatMul(x, w) }"""
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    result = sq.compress(ir.from_proto(proto), sq.Recipe.from_cli([]), runs=0)
    kept = result.model.graph.initializers["w"].const_value.numpy()
    subnormal = (weight != 0) & (np.abs(weight) < np.finfo(np.float32).tiny)
    assert subnormal.sum() == 23 and not kept[subnormal].any()
    np.testing.assert_array_equal(kept[~subnormal], weight[~subnormal])
    assert any("23 subnormal weight values set to 0" in n for n in result.reports[0].notes)
    feed = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    expected = run(ir.from_proto(proto), feed)[0]
    np.testing.assert_allclose(run(result.model, feed)[0], expected, rtol=1e-6, atol=1e-30)
    check(result.model)
