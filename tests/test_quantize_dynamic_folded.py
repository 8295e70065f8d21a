"""Weights an exporter rebuilds inside If bodies (silero_vad: each LSTM's W and R are Slice/Concat
of the PyTorch weight, gates reordered, in each of two sibling branches): prepare folds them
into one constant that both branches read, so dynamic INT8 stores each once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import fidelity
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.pipeline import finalize
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.records import PassContext
from tests.helpers import check, run

RNG = np.random.default_rng(3)
NO_SIM = PrepareSettings(simplify=False)
SILERO = "/root/.cache/onnx-squeeze/real-models/models/silero_vad.onnx"


def _rebuilt(name: str) -> str:
    """``name``'s two halves swapped and a direction axis added: the weight as LSTM reads it."""
    return f"""
                    lo_{name} = Slice({name}, zero, half)
                    hi_{name} = Slice({name}, half, end)
                    swapped_{name} = Concat<axis = 0>(hi_{name}, lo_{name})
                    onnx_{name} = Unsqueeze(swapped_{name}, zero)"""


def _branch(name: str, source: str, output: str) -> str:
    return f"""{name} () => (float[N, 32] {output}) {{
                    zero = Constant<value = int64[1] {{0}}>()
                    half = Constant<value = int64[1] {{64}}>()
                    end = Constant<value = int64[1] {{128}}>()
                    {_rebuilt("w_ih")}
                    {_rebuilt("w_hh")}
                    s_{output}, h_{output} = LSTM<hidden_size = 32>({source}, onnx_w_ih, onnx_w_hh)
                    {output} = Squeeze(h_{output}, zero)
                }}"""


def _nested_model() -> ir.Model:
    """If(c): the then branch holds the PyTorch weights and an If(d) whose two branches rebuild
    them for an LSTM each; the else branch passes ``z`` through."""
    proto = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        nested (bool c, bool d, float[5, N, 16] x, float[N, 32] z) => (float[N, 32] y) {{
            y = If(c) <
                then_branch = outer () => (float[N, 32] t) {{
                    t = If(d) <
                        then_branch = {_branch("first", "x", "a")},
                        else_branch = {_branch("second", "negated", "b")}
                    >
                }},
                else_branch = passthrough () => (float[N, 32] e) {{ e = Identity(z) }}
            >
        }}""".replace("{source}", "x")
    )
    outer = proto.graph.node[0].attribute[0].g
    outer.node.insert(0, onnx.helper.make_node("Neg", ["x"], ["negated"]))
    outer.initializer.extend(
        onnx.numpy_helper.from_array((RNG.standard_normal(shape) / 4).astype(np.float32), name)
        for name, shape in (("w_ih", (128, 16)), ("w_hh", (128, 32)))
    )
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _feeds() -> list[dict[str, np.ndarray]]:
    x = RNG.standard_normal((5, 32, 16)).astype(np.float32)
    z = RNG.standard_normal((32, 32)).astype(np.float32)
    return [
        {"c": np.array(c), "d": np.array(d), "x": x, "z": z}
        for c, d in ((True, True), (True, False), (False, True))
    ]


def _lstm_weights(model: ir.Model) -> list[ir.Value]:
    return [
        node.inputs[i]
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type.endswith("LSTM")
        for i in (1, 2)
    ]


def test_prepare_folds_body_weights_into_one_shared_constant():
    model = _nested_model()
    prepared, report = prepare(model.clone(), NO_SIM)
    check(prepared)
    w, r, w_again, r_again = _lstm_weights(prepared)
    assert (w, r) == (w_again, r_again)  # both branches read one copy of each
    assert constant_array(w).shape == (1, 128, 16) and constant_array(r).shape == (1, 128, 32)
    bodies = [g for g in prepared.graphs() if g is not prepared.graph]
    # w_ih, w_hh and the halves are gone; each branch keeps the Squeeze axes it reads
    assert [list(g.initializers) for g in bodies] == [[], ["zero"], ["zero"], []]
    assert any("constant folding" in note for note in report.notes)
    for feed in _feeds():
        for a, b in zip(run(model, feed), run(prepared, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


# every layer quantized: the rewrite is under test (tests/test_weight_control.py: the control)
UNCHECKED = {"accuracy_control": False}


def test_dynamic_int8_reaches_the_folded_lstm_weights():
    model = _nested_model()
    prepared, _ = prepare(model.clone(), NO_SIM)
    student = prepared.clone()
    report = make_pass("quantize_dynamic", UNCHECKED)(student, PassContext())
    finalize(student)
    assert len(report.changed) == 2 and not report.notes
    assert {v.dtype for v in _lstm_weights(student)} == {ir.DataType.INT8}
    assert len(set(_lstm_weights(student))) == 2  # W and R, stored once each
    for feed in _feeds():
        (measured,) = fidelity.measure(
            [{"y": run(model, feed)[0]}], [{"y": run(student, feed)[0]}]
        ).values()
        assert measured.worst_channel_sqnr_db > 25


@pytest.mark.real_models
def test_silero_vad_lstms_become_dynamic_quantize_lstm_after_prepare():
    """silero_vad's 4 LSTMs (two per sample-rate branch, in sibling If bodies) read one INT8 W
    and R per branch; its Convs stay float (dynamic INT8 has no Conv); the speech probability
    stays within the dynamic INT8 error at both sample rates."""
    try:
        model = ir.load(SILERO)
    except FileNotFoundError:
        pytest.skip("silero_vad not in the real-model cache: run benchmarks/real_models.py fetch")
    prepared, _ = prepare(model.clone())
    student = prepared.clone()
    report = make_pass("quantize_dynamic", UNCHECKED)(student, PassContext())
    finalize(student)
    assert [r.op_type for r in report.changed] == ["LSTM"] * 4
    assert len(set(_lstm_weights(student))) == 4
    size = len(ir.to_proto(student).SerializeToString())
    assert size < 0.7 * len(ir.to_proto(model).SerializeToString())
    for rate, samples in ((16000, 512), (8000, 256)):
        feed = {
            "input": RNG.standard_normal((1, samples)).astype(np.float32) / 10,
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(rate, np.int64),
        }
        expected, got = run(model, feed)[0], run(student, feed)[0]
        np.testing.assert_allclose(got, expected, atol=0.02)
