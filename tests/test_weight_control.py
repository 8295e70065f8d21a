"""Accuracy control for the passes that quantize weights without calibrated activations (dynamic
INT8, INT4/INT8 blocks): the layers that harm the outputs most go back to float until the
default gate holds, a shared weight stays float with every reader, and a gate the control
cannot hold leaves the model float with a warning (``if_missed``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnx_squeeze import runtime
from onnx_squeeze.calibration import NpzSource
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import accuracy_control
from onnx_squeeze.records import PassContext, PassReport
from tests.helpers import check
from tests.test_quantize_int8_control import _HARD, chain_data, chain_model, measured
from tests.test_shared_weights import _model


def _quantize(model: ir.Model, folder, **settings) -> tuple[ir.Model, PassReport, list]:
    """``model`` through dynamic INT8 on the chain's calibration data: (result, report, the
    data's feeds)."""
    data = chain_data(str(folder))
    specs = runtime.input_specs(model)
    feeds = [{"x": f["x"]} for f in NpzSource(data, specs, batch_size=4)]
    result = model.clone()
    context = PassContext(calibration=NpzSource(data, specs, batch_size=4))
    report = make_pass("quantize_dynamic", settings)(result, context)
    check(result)
    return result, report, feeds


def test_dynamic_int8_returns_the_harmful_layer_to_float_until_the_gate_holds(tmp_path):
    """Layer ``_HARD``'s input has one channel 1000x the others: one scale per tensor, computed
    at run time, rounds the others to zero. Unchecked, the outputs break; the control returns
    that MatMul to float and the default gate holds with every other layer INT8."""
    model = chain_model()
    plain, _, feeds = _quantize(model, tmp_path, accuracy_control=False)
    assert measured(model, plain, feeds).worst_channel_sqnr_db < 12
    result, report, _ = _quantize(model, tmp_path, control_float_macs=0.25)
    floated = [r.node for r in report.skipped if "accuracy control" in r.detail]
    assert floated == [f"m{_HARD}"]
    assert {r.node for r in report.changed} == {f"m{i}" for i in range(8)} - {f"m{_HARD}"}
    after = measured(model, result, feeds)
    assert after.worst_channel_sqnr_db >= 12 and after.argmax_agreement >= 0.98


@pytest.mark.parametrize("if_missed", ["float", "quantize"])
def test_a_gate_dynamic_int8_cannot_hold_leaves_the_model_float(tmp_path, if_missed):
    """No MAC share to spend and no timing: the gate cannot hold. By default every layer stays
    float and the warning says why and how to quantize anyway; ``if_missed=quantize`` writes
    every layer INT8."""
    model = chain_model()
    result, report, feeds = _quantize(
        model, tmp_path, control_float_macs=0.0, control_latency_ratio=0, if_missed=if_missed
    )
    warning = [n for n in report.notes if n.startswith("WARNING: every layer left float")]
    if if_missed == "float":
        assert not report.changed and measured(model, result, feeds).worst_channel_sqnr_db > 100
        assert "quantize_dynamic:if_missed=quantize" in warning[0]
        assert "argmax_agreement>=0.98" in warning[0]
    else:
        assert len(report.changed) == 8 and not warning
        assert measured(model, result, feeds).worst_channel_sqnr_db < 12


def test_a_shared_weight_stays_float_with_every_reader(monkeypatch):
    """Where the control returns one reader of a shared weight to float, the others stay float
    with it (one weight, stored once, in float) and say why."""
    model = _model("repeated_layer")  # one weight read by every MatMul

    def one_floated(model, anchors, quantized_copy, context, report, settings, **_):
        copy = quantized_copy(anchors[1:])  # what the control measures: the weight all float
        assert not any(node.op_type == "MatMulNBits" for node in copy.graph)
        return anchors[1:]

    monkeypatch.setattr(accuracy_control, "controlled", one_floated)
    result = model.clone()
    report = make_pass("quantize_weights", {})(result, PassContext())
    assert not report.changed
    shared = [r for r in report.skipped if "shares its weight with matmul_0" in r.detail]
    assert len(shared) == len([n for n in model.graph if n.op_type == "MatMul"]) - 1
    assert [n.op_type for n in result.graph].count("MatMul") == len(shared) + 1
    np.testing.assert_array_equal(
        result.graph.initializers["w"].const_value.numpy(),
        model.graph.initializers["w"].const_value.numpy(),
    )
