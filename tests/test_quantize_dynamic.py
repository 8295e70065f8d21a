"""Dynamic INT8 where exported models keep their weights: inside If/Loop bodies (outer-scope
weights read in a body, initializers of the body itself), and a clear warning where the model's
layers are ones dynamic INT8 does not handle."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnx_squeeze as sq
from onnx_squeeze import fidelity
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.pipeline import finalize
from onnx_squeeze.records import PassContext
from tests.helpers import check, run

RNG = np.random.default_rng(0)
SILERO = "/root/.cache/onnx-squeeze/real-models/models/silero_vad.onnx"


def _parse(text: str, **initializers: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(array.astype(np.float32), name)
        for name, array in initializers.items()
    )
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _body(model: ir.Model, attribute: str, node: int = 0) -> ir.Graph:
    return model.graph.node(node).attributes[attribute].value


def _add_initializer(graph: ir.Graph, name: str, array: np.ndarray, reader: int, index: int):
    """An initializer of ``graph`` itself (a body), read by its ``reader``-th node."""
    value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
    graph.register_initializer(value)
    graph.node(reader).replace_input_with(index, value)


def _quantize(model: ir.Model, name: str = "quantize_dynamic"):
    return _quantize_with(model, name)


def _quantize_with(model: ir.Model, name: str = "quantize_dynamic", **settings):
    """``model`` through the pass on random data, every layer quantized (accuracy control off:
    the rewrite is under test; tests/test_weight_control.py covers the control)."""
    settings.setdefault("accuracy_control", False)
    student = model.clone()
    report = make_pass(name, settings)(student, PassContext())
    finalize(student)
    return student, report


def _sqnr_db(reference: np.ndarray, result: np.ndarray) -> float:
    (measured,) = fidelity.measure([{"y": reference}], [{"y": result}]).values()
    return measured.worst_channel_sqnr_db


def _branch_model() -> ir.Model:
    """An If whose branches read one outer weight ``w`` and hold a weight each: a MatMul in
    the then branch, a Gemm with bias in the else branch."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        branchy (bool c, float[N, 64] x) => (float[N, 32] y) {
            y = If(c) <
                then_branch = g1 () => (float[N, 32] t) {
                    h1 = MatMul(x, w)
                    r1 = Relu(h1)
                    t = MatMul(r1, placeholder1)
                },
                else_branch = g2 () => (float[N, 32] e) {
                    h2 = MatMul(x, w)
                    r2 = Relu(h2)
                    e = Gemm<transB=1>(r2, placeholder2, bias)
                }
            >
        }""",
        w=RNG.standard_normal((64, 48)) / 8,
        placeholder1=np.zeros((48, 32)),
        placeholder2=np.zeros((32, 48)),
        bias=RNG.standard_normal(32),
    )
    _add_initializer(_body(model, "then_branch"), "inner1", RNG.standard_normal((48, 32)) / 7, 2, 1)
    _add_initializer(_body(model, "else_branch"), "inner2", RNG.standard_normal((32, 48)) / 7, 2, 1)
    finalize(model, check=False)  # the placeholders go
    return model


def test_if_branches_are_quantized_with_each_weight_once():
    model = _branch_model()
    student, report = _quantize(model)
    check(student)
    assert len(report.changed) == 4 and not report.skipped and not report.notes
    outer = {
        v.name: v.dtype for v in student.graph.initializers.values() if v.const_value.size > 64
    }
    assert outer == {"w.weight_quantized": ir.DataType.INT8}  # ``w`` once, for both branches
    for branch, name in (("then_branch", "t"), ("else_branch", "e")):
        body = _body(student, branch)
        assert f"inner{1 if name == 't' else 2}" not in body.initializers
        assert [n.op_type for n in body].count("MatMulInteger") == 2
        assert {v.dtype for v in body.initializers.values() if v.const_value.size > 64} == {
            ir.DataType.INT8
        }
    x = RNG.standard_normal((8, 64)).astype(np.float32)
    for condition in (True, False):
        feed = {"c": np.array(condition), "x": x}
        assert _sqnr_db(run(model, feed)[0], run(student, feed)[0]) > 25


class _Reader:
    """onnxruntime's calibration reader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def test_if_model_through_the_pipeline_runs_and_passes_the_checker(tmp_path):
    model = _branch_model()
    feeds = [{"c": np.array(True), "x": RNG.standard_normal((4, 64)).astype(np.float32)}] * 2
    result = sq.compress(
        ir.to_proto(model),
        sq.Recipe.from_cli(["quantize_dynamic"]),
        calibration=_Reader(feeds),
        output=tmp_path / "out.onnx",
        compare=False,
    )
    saved = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(saved, full_check=True)
    session = ort.InferenceSession(saved.SerializeToString(), providers=["CPUExecutionProvider"])
    for condition in (True, False):
        feed = {"c": np.array(condition), "x": feeds[0]["x"]}
        expected = run(model, feed)[0]
        assert _sqnr_db(expected, session.run(None, feed)[0]) > 25
    assert sum(not r.skipped for p in result.reports for r in p.records) == 4


def test_loop_body_reads_the_outer_weight_quantized_once():
    """A Loop applying one outer weight at every iteration: its body reads the one INT8 copy."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        looped (float[N, 32] x) => (float[N, 32] y) {
            trips = Constant<value = int64 {4}>()
            go = Constant<value = bool {1}>()
            y = Loop(trips, go, x) <
                body = step (int64 i, bool keep, float[N, 32] h) => (bool k, float[N, 32] out) {
                    k = Identity(keep)
                    m = MatMul(h, w)
                    out = Tanh(m)
                }
            >
        }""",
        w=RNG.standard_normal((32, 32)) / 6,
    )
    student, report = _quantize(model)
    check(student)
    assert len(report.changed) == 1 and report.changed[0].op_type == "MatMul"
    assert [v.dtype for v in student.graph.initializers.values() if v.const_value.size > 64] == [
        ir.DataType.INT8
    ]
    feed = {"x": RNG.standard_normal((8, 32)).astype(np.float32)}
    assert _sqnr_db(run(model, feed)[0], run(student, feed)[0]) > 25


def test_a_weight_also_read_in_float_is_left_alone_with_the_reason():
    """Quantizing ``w`` for the MatMul while the Add keeps reading it would store it twice."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 32] x) => (float[N, 32] y) {
            m = MatMul(x, w)
            d = ReduceSum<keepdims=0>(w)
            y = Add(m, d)
        }""",
        w=RNG.standard_normal((32, 32)),
    )
    student, report = _quantize(model)
    assert not report.changed
    assert "would grow the file" in report.skipped[0].detail
    assert [n.op_type for n in student.graph] == ["MatMul", "ReduceSum", "Add"]


def test_compute_dynamic_int8_cannot_reach_is_a_warning():
    """A model whose layers are Conv inside an If: nothing changes, and a WARNING says why."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        convs (bool c, float[1, 4, 8] x) => (float[1, 4, 8] y) {
            y = If(c) <
                then_branch = g1 () => (float[1, 4, 8] t) { t = Conv<pads = [1, 1]>(x, w) },
                else_branch = g2 () => (float[1, 4, 8] e) { e = Identity(x) }
            >
        }""",
        w=RNG.standard_normal((4, 4, 3)),
    )
    for name in ("quantize_dynamic", "quantize_weights"):
        _, report = _quantize(model, name)
        assert not report.changed
        (note,) = report.notes
        assert note.startswith("WARNING:") and "1 Conv (1 inside If/Loop/Scan bodies)" in note


def test_a_pass_that_reaches_little_of_the_weights_says_so():
    """A Conv of 36864 weights before a 64x10 classifier, as a ResNet's: dynamic INT8 and INT4
    quantize the classifier alone (1.71 % of the weights), and a WARNING says what is left."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        net (float[1, 64, 8, 8] x) => (float[1, 10] y) {
            c = Conv<pads = [1, 1, 1, 1]>(x, w)
            p = GlobalAveragePool(c)
            f = Flatten(p)
            y = MatMul(f, fc)
        }""",
        w=np.random.default_rng(1).standard_normal((64, 64, 3, 3)),
        fc=np.random.default_rng(2).standard_normal((64, 10)),
    )
    model.graph.node(0).name, model.graph.node(3).name = "conv", "fc"
    for name in ("quantize_dynamic", "quantize_weights"):
        student, report = _quantize(model, name)
        assert [r.node for r in report.changed] == ["fc"]
        (note,) = [n for n in report.notes if n.startswith("WARNING:")]
        assert f"{name} changed layers holding 1.71% of the model's weights" in note
        assert "the rest sit in 1 Conv" in note and "static INT8 (--int8) quantizes Conv" in note
        check(student)


@pytest.mark.real_models
def test_silero_vad_says_its_layers_are_out_of_reach():
    """silero_vad keeps its model in If branches (Conv encoder, LSTM): dynamic INT8 and int4
    (MatMul/Gemm only) change nothing and say so in a warning; the result still runs."""
    try:
        model = ir.load(SILERO)
    except FileNotFoundError:
        pytest.skip("silero_vad not in the real-model cache: run benchmarks/real_models.py fetch")
    feed = {
        "input": RNG.standard_normal((1, 576)).astype(np.float32) / 10,
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    for name in ("quantize_dynamic", "quantize_weights"):
        student, report = _quantize(model, name)
        assert not report.changed
        assert any(n.startswith("WARNING:") and "If/Loop/Scan" in n for n in report.notes)
        for a, b in zip(run(model, feed), run(student, feed), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_table_tied_to_the_output_projection_is_stored_in_int8_only():
    """Token embedding tied to the logits (Gather rows, Gemm transB=1 over the same table):
    both readers are quantized, rows and columns each once, and no float copy stays."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        tied (int64[N] ids) => (float[N, 300] logits) {
            emb = Gather(table, ids)
            h = Tanh(emb)
            logits = Gemm<transB=1>(h, table)
        }""",
        table=RNG.standard_normal((300, 64)),
    )
    student, report = _quantize(model)
    check(student)
    assert sorted(r.op_type for r in report.changed) == ["Gather", "Gemm"]
    stored = {
        v.name: v.dtype for v in student.graph.initializers.values() if v.const_value.size > 1000
    }
    assert sorted(stored.values()) == [ir.DataType.INT8, ir.DataType.INT8]
    feed = {"ids": RNG.integers(0, 300, 16).astype(np.int64)}
    assert _sqnr_db(run(model, feed)[0], run(student, feed)[0]) > 25


def test_a_table_also_picked_by_constant_indices_stays_float():
    """A Gather of constant indices is not an embedding lookup and stays float: quantizing the
    table for the other reader would keep both copies."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] ids) => (float[N, 16] y) {
            emb = Gather(table, ids)
            two = Constant<value = int64 {2}>()
            first = Gather(table, two)
            y = Add(emb, first)
        }""",
        table=RNG.standard_normal((40, 16)),
    )
    student, report = _quantize(model)
    assert not report.changed and "would grow the file" in report.skipped[0].detail
    assert student.graph.initializers["table"].dtype == ir.DataType.FLOAT


def _lstm_model(recurrent_input: bool = False) -> ir.Model:
    """A bidirectional LSTM (hidden 32) with bias, as exporters write nn.LSTM; with
    ``recurrent_input`` its R comes from the graph inputs (not constant)."""
    model = _parse(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        rnn (float[7, N, 24] x{", float[2, 128, 32] R" if recurrent_input else ""})
            => (float[7, 2, N, 32] y, float[2, N, 32] h) {{
            y, h = LSTM<hidden_size = 32, direction = "bidirectional">(x, W, R, B)
        }}""",
        W=RNG.standard_normal((2, 128, 24)) / 5,
        B=RNG.standard_normal((2, 256)) / 5,
        **({} if recurrent_input else {"R": RNG.standard_normal((2, 128, 32)) / 5}),
    )
    return model


@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_becomes_dynamic_quantize_lstm(per_channel):
    """W and R stored once as INT8 in DynamicQuantizeLSTM's layout, no float copy left, both
    outputs within the dynamic INT8 error (worst channel 27 to 37 dB on this cell)."""
    model = _lstm_model()
    student, report = _quantize_with(model, per_channel=per_channel)
    check(student)
    assert [(n.domain, n.op_type) for n in student.graph] == [
        ("com.microsoft", "DynamicQuantizeLSTM")
    ]
    assert len(report.changed) == 1 and "DynamicQuantizeLSTM" in report.changed[0].detail
    stored = {(tuple(v.const_value.shape), v.dtype) for v in student.graph.initializers.values()}
    int8, scales = ir.DataType.INT8, ((2, 128) if per_channel else (2,), ir.DataType.FLOAT)
    assert {((2, 24, 128), int8), ((2, 32, 128), int8), scales} <= stored  # [D, in, 4H]
    assert not {((2, 128, 24), ir.DataType.FLOAT), ((2, 128, 32), ir.DataType.FLOAT)} & stored
    assert len(ir.to_proto(student).SerializeToString()) < 0.35 * len(
        ir.to_proto(model).SerializeToString()
    )
    feed = {"x": RNG.standard_normal((7, 3, 24)).astype(np.float32)}
    for expected, got in zip(run(model, feed), run(student, feed), strict=True):
        assert _sqnr_db(expected, got) > 25


def test_lstm_with_a_recurrent_weight_from_the_inputs_is_left_alone():
    model = _lstm_model(recurrent_input=True)
    student, report = _quantize(model)
    assert not report.changed
    assert report.skipped[0].detail == "R is not a constant 3-D float32 tensor"
    assert [n.op_type for n in student.graph] == ["LSTM"]


def test_lstm_weights_bound_u8s8_pairs_without_vnni(monkeypatch):
    """Without VNNI, x86 kernels add the products of weights 2i and 2i+1 along the input axis
    in 16 bits with saturation: every same-sign pair of W and R stays within 128 steps."""
    monkeypatch.setattr(quant_params, "cpu_has_vnni", lambda: False)
    model = _lstm_model()
    student, report = _quantize(model)
    assert "pair-bounded" in report.changed[0].detail
    for value in student.graph.initializers.values():
        q = value.const_value.numpy()
        if value.dtype != ir.DataType.INT8 or q.ndim != 3:
            continue
        q = q.astype(np.int64)  # [D, in, 4H]: pairs along axis 1
        first, second = q[:, 0::2], q[:, 1::2]
        pairs = np.where(first * second > 0, np.abs(first) + np.abs(second), 0)
        assert pairs.max() <= 128 and np.abs(q).max() >= 64
    feed = {"x": RNG.standard_normal((7, 3, 24)).astype(np.float32)}
    for expected, got in zip(run(model, feed), run(student, feed), strict=True):
        assert _sqnr_db(expected, got) > 25


def _lstm_branches() -> ir.Model:
    """silero_vad's layout once its weights are constants: an If whose branches each run an
    LSTM over one outer W and R (stored once for both), each with a bias of its own body."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        branchy (bool c, float[5, N, 16] x) => (float[N, 32] y) {
            y = If(c) <
                then_branch = g1 () => (float[N, 32] t) {
                    s1, h1 = LSTM<hidden_size = 32>(x, W, R, placeholder)
                    axis1 = Constant<value = int64[1] {0}>()
                    t = Squeeze(h1, axis1)
                },
                else_branch = g2 () => (float[N, 32] e) {
                    n2 = Neg(x)
                    s2, h2 = LSTM<hidden_size = 32>(n2, W, R, placeholder)
                    axis2 = Constant<value = int64[1] {0}>()
                    e = Squeeze(h2, axis2)
                }
            >
        }""",
        W=RNG.standard_normal((1, 128, 16)) / 4,
        R=RNG.standard_normal((1, 128, 32)) / 5,
        placeholder=np.zeros((1, 256)),
    )
    for branch, name in (("then_branch", "bias1"), ("else_branch", "bias2")):
        body = _body(model, branch)
        lstm = next(n for n in body if n.op_type == "LSTM")
        _add_initializer(body, name, RNG.standard_normal((1, 256)) / 5, body.index(lstm), 3)
    finalize(model, check=False)  # the placeholder goes
    return model


def test_lstms_in_if_branches_read_one_int8_copy_of_their_outer_weights():
    model = _lstm_branches()
    student, report = _quantize(model)
    check(student)
    assert len(report.changed) == 2 and not report.skipped and not report.notes
    for branch in ("then_branch", "else_branch"):
        ops = [(n.domain, n.op_type) for n in _body(student, branch)]
        assert ("com.microsoft", "DynamicQuantizeLSTM") in ops and ("", "LSTM") not in ops
    stored = {
        (tuple(v.const_value.shape), v.dtype)
        for v in student.graph.initializers.values()
        if v.const_value.size > 256
    }
    assert stored == {((1, 16, 128), ir.DataType.INT8), ((1, 32, 128), ir.DataType.INT8)}
    x = RNG.standard_normal((5, 32, 16)).astype(np.float32)  # 32 reads per channel
    for condition in (True, False):
        feed = {"c": np.array(condition), "x": x}
        assert _sqnr_db(run(model, feed)[0], run(student, feed)[0]) > 25


def test_scan_body_weights_are_quantized_in_the_body():
    """An RNN cell written as a Scan: the body's own input and recurrent matrices become
    MatMulInteger there, and the body keeps no float copy."""
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 17]>
        scanned (float[N, 32] h0, float[6, N, 24] xs) => (float[N, 32] h, float[6, N, 32] ys) {
            h, ys = Scan(h0, xs) <
                num_scan_inputs = 1,
                body = cell (float[N, 32] state, float[N, 24] x) => (float[N, 32] n, float[N, 32] o) {
                    a = MatMul(x, placeholder_x)
                    b = MatMul(state, placeholder_h)
                    s = Add(a, b)
                    n = Tanh(s)
                    o = Identity(n)
                }
            >
        }""",
        placeholder_x=np.zeros((24, 32)),
        placeholder_h=np.zeros((32, 32)),
    )
    body = _body(model, "body")
    _add_initializer(body, "wx", RNG.standard_normal((24, 32)) / 5, 0, 1)
    _add_initializer(body, "wh", RNG.standard_normal((32, 32)) / 6, 1, 1)
    finalize(model, check=False)
    student, report = _quantize(model)
    check(student)
    assert len(report.changed) == 2
    body = _body(student, "body")
    assert [n.op_type for n in body].count("MatMulInteger") == 2
    assert {v.dtype for v in body.initializers.values() if v.const_value.size > 64} == {
        ir.DataType.INT8
    }
    feed = {
        "h0": np.zeros((32, 32), np.float32),
        "xs": RNG.standard_normal((6, 32, 24)).astype(np.float32),
    }
    for expected, got in zip(run(model, feed), run(student, feed), strict=True):
        assert _sqnr_db(expected.reshape(-1, 32), got.reshape(-1, 32)) > 25
