"""Static INT8 that does not slow a model down: the default timing against the float model (and
the speed check it falls back on), decided here with injected timings; and placement that adds
no Q/DQ pair where an integer op saves nothing (MobileNetV3's HardSwish)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from onnx_squeeze import latency_search
from onnx_squeeze.passes.quantize import speed_check
from tests.helpers import assert_same_outputs, check, random_feeds
from tests.test_quantize_int8 import cosine, narrow_then_wide_model, ops, parse, quantize


class FakeSlowdown:
    """Stands in for :class:`speed_check.Slowdown`: every candidate runs at ``ratio``."""

    ratio = 1.0
    calls: ClassVar[list[int]] = []

    def __init__(self, model, context, *, batch) -> None:
        pass

    def __call__(self, candidate) -> float:
        FakeSlowdown.calls.append(ops(candidate)["QuantizeLinear"])
        return FakeSlowdown.ratio


@pytest.fixture
def timed(monkeypatch):
    """Set the quantized model's latency ratio to the float one; the speed check's search times
    the splits in ``fastest`` (k smallest layers in float) fastest, the others at twice their
    time; both record what they timed."""
    searched: list[int] = []

    def set_timing(ratio: float, fastest: tuple[int, ...] = ()) -> list[int]:
        FakeSlowdown.ratio, FakeSlowdown.calls = ratio, []

        def timings(build, splits, feed):
            for k in splits:
                check(build(k))
                searched.append(k)
            return [latency_search.SplitTiming(k, 1.0 if k in fastest else 2.0) for k in splits]

        monkeypatch.setattr(speed_check, "Slowdown", FakeSlowdown)
        monkeypatch.setattr(latency_search, "_timings", timings)
        return searched

    return set_timing


def test_int8_slower_than_float_leaves_the_model_float_and_warns(timed):
    """The ppocr_cls case: INT8 timed at 1.85x the float model, and no mix of float and INT8
    layers faster than float: every layer stays float, and the report says why."""
    model = narrow_then_wide_model()
    searched = timed(1.85, fastest=(3,))
    result, report = quantize(model, speed_check=None)  # the default
    check(result)
    assert ops(result)["QuantizeLinear"] == 0
    assert_same_outputs(model, result, random_feeds(model, 2))
    assert len(FakeSlowdown.calls) == 1 and FakeSlowdown.calls[0] > 0  # all layers, timed once
    assert 3 in searched
    warning = [n for n in report.notes if n.startswith("WARNING: INT8 runs slower than float")]
    assert len(warning) == 1 and "1.85x" in warning[0] and "all 3 layers left float" in warning[0]
    assert {r.node for r in report.skipped} == {"a", "b", "y"}
    assert not any("accuracy control" in n for n in report.notes)  # nothing left to control


def test_int8_slower_than_float_keeps_the_layers_that_pay(timed):
    """Slower at first, but faster with the smallest layer in float: that one stays float."""
    model = narrow_then_wide_model()
    timed(1.3, fastest=(1,))
    result, report = quantize(model, speed_check=None)
    check(result)
    assert [r.node for r in report.skipped] == ["b"]
    assert not any(n.startswith("WARNING: INT8") for n in report.notes)
    assert any("1.3x" in n and "1 of 3 layers left float" in n for n in report.notes)
    assert cosine(model, result, random_feeds(model, 2)) > 0.99


def test_a_mix_no_faster_than_float_is_kept_for_its_size_and_warned_about(timed):
    """The smallest layer in float ties with the float model: the rest stays INT8 (smaller),
    and the report says that it buys no speed."""
    model = narrow_then_wide_model()
    timed(1.85, fastest=(1, 3))
    result, report = quantize(model, speed_check=None)
    check(result)
    assert [r.node for r in report.skipped] == ["b"]
    assert ops(result)["QuantizeLinear"] > 0
    warning = [n for n in report.notes if n.startswith("WARNING: INT8 runs slower than float")]
    assert len(warning) == 1 and "no faster than float (1x)" in warning[0]


def test_int8_that_pays_is_timed_once_and_kept_whole(timed):
    model = narrow_then_wide_model()
    searched = timed(0.6)
    result, report = quantize(model, speed_check=None)
    check(result)
    assert len(FakeSlowdown.calls) == 1 and not searched
    assert [r.node for r in report.changed] == ["a", "b", "y"]
    assert any(n.startswith("speed check: the quantized model runs faster") for n in report.notes)


def test_speed_check_false_never_times_and_true_always_searches(timed):
    model = narrow_then_wide_model()
    searched = timed(1.85, fastest=(3,))
    _, report = quantize(model, speed_check=False)  # placement by the plan alone
    assert not FakeSlowdown.calls and not searched
    assert [r.node for r in report.changed] == ["a", "b", "y"]
    timed(0.6, fastest=(1,))
    _, report = quantize(model, speed_check=True)  # the search, whatever one timing says
    assert not FakeSlowdown.calls and searched
    assert [r.node for r in report.skipped] == ["b"]


# ---------------------------------------------------------------------------------------------
# Placement


def hardswish_model():
    """Paddle's HardSwish (``x * Clip(x + 3, 0, 6) / 6``) between two Convs, and the same
    product read by a Conv directly (a squeeze-excite scale)."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 8, 8, 8] z) {
            three = Constant <value = float {3.0}> ()
            zero = Constant <value = float {0.0}> ()
            six = Constant <value = float {6.0}> ()
            a = Conv <pads = [1, 1, 1, 1]> (x, w1)
            shifted = Add (a, three)
            clipped = Clip (shifted, zero, six)
            m = Mul (a, clipped)
            h = Div (m, six)
            y = Conv <pads = [1, 1, 1, 1]> (h, w2)
            shifted2 = Add (a, three)
            clipped2 = Clip (shifted2, zero, six)
            e = Mul (a, clipped2)
            z = Conv (e, w3)
        }"""
    return parse(text, seed=3, w1=(8, 4, 3, 3), w2=(8, 8, 3, 3), w3=(8, 8, 1, 1))


def test_product_read_only_in_float_stays_float():
    """A Mul whose one input comes from float ops and whose output only a float Div reads stays
    float: an integer Mul would add a Q/DQ pair on each for nothing (ppocr_cls, every layer
    INT8: 1.77-1.88x the float model's latency with it integer, 1.67-1.74x without). The Mul
    that a Conv reads stays integer."""
    model = hardswish_model()
    result, _ = quantize(model, speed_check=False, accuracy_control=False)
    check(result)
    nodes = {n.name: n for n in result.graph}
    assert nodes["m"].inputs[1].producer().op_type == "Clip"
    assert [use.node.name for use in nodes["m"].outputs[0].uses()] == ["h"]
    assert nodes["e"].inputs[1].producer().op_type == "DequantizeLinear"
    assert {use.node.op_type for use in nodes["e"].outputs[0].uses()} == {"QuantizeLinear"}
    quantized = {n.inputs[0].name for n in result.graph if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "a", "h", "clipped2", "e"}
    assert cosine(model, result, random_feeds(model, 2)) > 0.99
