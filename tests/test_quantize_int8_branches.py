"""Static INT8 inside If branches (quantize/branches.py): each branch that holds weight layers is
quantized as a model of its own, on the values it reads, captured where the data takes it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import fidelity
from onnx_squeeze.calibration.sources import FeedsSource
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize.branches import quantize_branches
from onnx_squeeze.passes.quantize.plan import ANCHOR_OPS
from onnx_squeeze.pipeline import finalize
from onnx_squeeze.prepare import prepare
from onnx_squeeze.records import PassContext, PassReport
from tests.helpers import check, run

RNG = np.random.default_rng(5)
SILERO = "/root/.cache/onnx-squeeze/real-models/models/silero_vad.onnx"
SILERO_DATA = "/root/.cache/onnx-squeeze/real-models/data/silero_vad.npz"
FIXED = {"accuracy_control": False, "speed_check": False}  # every layer, whatever it measures


def _conv_branch(name: str, output: str, kernel: int) -> str:
    return f"""{name} () => (float[N, 16, 12, 12] {output}) {{
                    a_{output} = Conv<pads = [1, 1, 1, 1]>(features, {name}_w1, {name}_b1)
                    r_{output} = Relu(a_{output})
                    {output} = Conv<pads = [{kernel // 2}, {kernel // 2}, {kernel // 2}, {kernel // 2}]>(r_{output}, {name}_w2)
                }}"""


def _if_model() -> ir.Model:
    """silero_vad's layout: the main graph computes ``features`` and an If on a scalar input
    picks one of two Conv stacks that read it, each with weights of its own body. The main
    graph also holds ``features_scale``, the name the branches' QDQ writer wants for the scale
    of ``features``."""
    proto = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        branchy (bool c, float[N, 8, 12, 12] x) => (float[N, 16, 12, 12] y) {{
            features_scale = Relu(x)
            features = Identity(features_scale)
            y = If(c) <
                then_branch = {_conv_branch("first", "t", 3)},
                else_branch = {_conv_branch("second", "e", 1)}
            >
        }}"""
    )
    for attribute, kernel in zip(proto.graph.node[2].attribute, (3, 1), strict=True):
        name = attribute.g.name
        attribute.g.initializer.extend(
            onnx.numpy_helper.from_array((RNG.standard_normal(shape) / 6).astype(np.float32), n)
            for n, shape in (
                (f"{name}_w1", (24, 8, 3, 3)),
                (f"{name}_b1", (24,)),
                (f"{name}_w2", (16, 24, kernel, kernel)),
            )
        )
    for graph in [proto.graph, *(a.g for a in proto.graph.node[2].attribute)]:
        for index, node in enumerate(graph.node):
            node.name = f"{graph.name}/{node.op_type}_{index}"
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _feeds(conditions: tuple[bool, ...], batches: int = 4) -> list[dict[str, np.ndarray]]:
    return [
        {"c": np.array(c), "x": RNG.standard_normal((4, 8, 12, 12)).astype(np.float32)}
        for c in conditions
        for _ in range(batches)
    ]


def _quantize(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> tuple[ir.Model, PassReport]:
    student = model.clone()
    report = PassReport("quantize_int8")
    int8 = make_pass("quantize_int8", FIXED)
    quantize_branches(
        student, PassContext(FeedsSource(feeds)), report, int8.apply, tuple(ANCHOR_OPS)
    )
    finalize(student)
    return student, report


def _body_ops(model: ir.Model, attribute: str) -> list[str]:
    return [node.op_type for node in model.graph.node(2).attributes[attribute].value]


def _worst_channel_db(model: ir.Model, student: ir.Model, condition: bool) -> float:
    feeds = _feeds((condition,), batches=2)
    (measured,) = fidelity.measure(
        [{"y": run(model, f)[0]} for f in feeds], [{"y": run(student, f)[0]} for f in feeds]
    ).values()
    return measured.worst_channel_sqnr_db


def test_both_branches_are_quantized_on_the_data_that_reaches_each():
    model = _if_model()
    student, report = _quantize(model, _feeds((True, False)))
    check(student)
    assert [r.op_type for r in report.changed] == ["Conv"] * 4
    for attribute in ("then_branch", "else_branch"):
        ops = _body_ops(student, attribute)
        assert ops.count("Conv") == 2 and ops.count("DequantizeLinear") >= 4
        body = student.graph.node(2).attributes[attribute].value
        weights = [v for v in body.initializers.values() if v.const_value.size > 24]
        assert weights and {v.dtype for v in weights} == {ir.DataType.INT8}
        # the scale of ``features`` is renamed: ONNX names in a body may not hide outer ones
        assert "features_scale" not in body.initializers
        assert any(name.startswith("features_scale_") for name in body.initializers)
    for condition in (True, False):
        assert _worst_channel_db(model, student, condition) > 25


def test_a_branch_the_data_never_takes_stays_float_with_a_warning():
    model = _if_model()
    student, report = _quantize(model, _feeds((True,)))
    check(student)
    assert "DequantizeLinear" in _body_ops(student, "then_branch")
    assert _body_ops(student, "else_branch") == _body_ops(model, "else_branch")
    (warning,) = [n for n in report.notes if n.startswith("WARNING:")]
    assert "else_branch of If" in warning and "never takes it" in warning
    for f in _feeds((False,), batches=1):
        np.testing.assert_array_equal(run(model, f)[0], run(student, f)[0])


def test_layers_in_a_loop_body_are_named_in_a_warning():
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        looped (float[N, 32] x) => (float[N, 32] y) {
            trips = Constant<value = int64 {3}>()
            go = Constant<value = bool {1}>()
            y = Loop(trips, go, x) <
                body = step (int64 i, bool keep, float[N, 32] h) => (bool k, float[N, 32] o) {
                    k = Identity(keep)
                    m = MatMul(h, w)
                    o = Tanh(m)
                }
            >
        }"""
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(RNG.standard_normal((32, 32)).astype(np.float32), "w")
    )
    model = ir.from_proto(proto)
    _, report = _quantize(model, [{"x": np.ones((2, 32), np.float32)}])
    assert not report.changed
    assert report.notes == [
        "WARNING: 1 weight layers sit inside Loop/Scan bodies, which quantize_int8 does not "
        "reach: they are left as they were"
    ]


def test_branches_sharing_a_main_graph_weight_stay_float_with_a_warning():
    """Both branches read the main graph's ``w``: quantized in one, its INT8 copy would sit
    beside the float one that the other reads."""
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        shared (bool c, float[N, 32] x) => (float[N, 32] y) {
            y = If(c) <
                then_branch = g1 () => (float[N, 32] t) { t = MatMul(x, w) },
                else_branch = g2 () => (float[N, 32] e) { h = Relu(x)  e = MatMul(h, w) }
            >
        }"""
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(RNG.standard_normal((32, 32)).astype(np.float32), "w")
    )
    model = ir.from_proto(proto)
    feeds = [{"c": np.array(c), "x": np.ones((2, 32), np.float32)} for c in (True, False)]
    student, report = _quantize(model, feeds)
    assert not report.changed
    assert [n.split(": it reads")[0] for n in report.notes] == [
        "WARNING: then_branch of If '' stays float",
        "WARNING: else_branch of If '' stays float",
    ]
    assert "weight 'w', which nodes outside it read too" in report.notes[0]
    assert ir.to_proto(student).SerializeToString() == ir.to_proto(model).SerializeToString()


@pytest.mark.real_models
def test_silero_vad_16_khz_branch_is_quantized_on_16_khz_data():
    """silero_vad's model sits in an If on the sample rate; its data is at 16 kHz: that branch's
    Convs get INT8 (its STFT Conv over one channel stays float, as in a main graph), calibrated
    on 24 chunks, the 8 kHz branch stays float with a WARNING and gives the very same outputs."""
    try:
        model = ir.load(SILERO)
        data = dict(np.load(SILERO_DATA))
    except FileNotFoundError:
        pytest.skip("silero_vad not in the real-model cache: run benchmarks/real_models.py fetch")
    prepared, _ = prepare(model)
    feeds = [
        {"input": data["input"][i : i + 1], "state": data["state"][:, i : i + 1], "sr": data["sr"]}
        for i in range(24)
    ]
    student, report = _quantize(prepared, feeds)
    check(student)
    assert [r.op_type for r in report.changed] == ["Conv"] * 5
    assert any(n.startswith("WARNING: else_branch of If") for n in report.notes)
    for i in range(24, 32):  # held out (the speech probability moved 0.011 at most, 32 chunks)
        feed = {"input": data["input"][i : i + 1], "state": data["state"][:, i : i + 1]}
        at_16k = {**feed, "sr": np.array(16000, np.int64)}
        np.testing.assert_allclose(run(student, at_16k)[0], run(prepared, at_16k)[0], atol=0.05)
        at_8k = {"input": feed["input"][:, :288], "state": feed["state"], "sr": np.array(8000)}
        np.testing.assert_array_equal(run(student, at_8k)[0], run(prepared, at_8k)[0])
