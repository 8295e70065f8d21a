"""Static INT8 on exported models: the decode tail and Concats of unlike ranges stay float
(placement), and accuracy control returns the layers that break the outputs to float."""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import fidelity, gates, runtime, zoo
from onnx_squeeze.calibration import NpzSource, RandomSource
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.gates import parse_gate
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import accuracy_control
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.records import PassContext, PassReport
from tests.helpers import check, random_feeds, run


def quantize(model: ir.Model, source, **settings) -> tuple[ir.Model, PassReport]:
    """``model`` through static INT8 with its plan's placement (no default timing: INT8 runs
    these small models slower than float on this CPU, see tests/test_quantize_int8_speed.py)."""
    settings.setdefault("speed_check", False)
    result = model.clone()
    report = make_pass("quantize_int8", settings)(result, PassContext(calibration=source))
    check(result)
    return result, report


def measured(model: ir.Model, result: ir.Model, feeds) -> fidelity.OutputFidelity:
    """The worst output's per-channel fidelity, probabilities judged as scores."""
    names = [v.name for v in model.graph.outputs]
    reference = [dict(zip(names, run(model, f), strict=True)) for f in feeds]
    outputs = [dict(zip(names, run(result, f), strict=True)) for f in feeds]
    found = fidelity.measure(reference, outputs, kinds=fidelity.OutputKinds.of(model)).values()
    return min(found, key=lambda m: m.worst_channel_sqnr_db)


def optimized_ops(model: ir.Model) -> collections.Counter:
    """Op types of the graph onnxruntime runs (all optimizations on)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        runtime.create_session(model, optimized_model_path=path)
        return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def reads_dequantized(node: ir.Node) -> bool:
    return any(
        v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
        for v in node.inputs
    )


def quantized_outputs(node: ir.Node) -> bool:
    return any(use.node.op_type == "QuantizeLinear" for v in node.outputs for use in v.uses())


def parse(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    for node in proto.graph.node:
        node.name = node.output[0]
    return ir.from_proto(proto)


# ---------------------------------------------------------------------------------------------
# Placement: the decode tail


# A detector head as YOLOX exports it: box regressions (tens of pixels) from one conv, class
# logits from another scored by a Sigmoid (0…1), concatenated, flattened and transposed into
# the one output.
_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[N, 3, 16, 16] x) => (float[N, 256, 6] y) {
    f = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (f)
    box = Conv (r, wr, br)
    logit = Conv (r, wc, bc)
    score = Sigmoid (logit)
    joined = Concat <axis = 1> (box, score)
    flat = Reshape (joined, shape)
    y = Transpose <perm = [0, 2, 1]> (flat)
}
"""


def head_model() -> ir.Model:
    rng = np.random.default_rng(0)
    return parse(
        _HEAD,
        {
            "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
            "b1": np.zeros(8, np.float32),
            "wr": rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 20,
            "br": np.zeros(4, np.float32),
            "wc": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
            "bc": np.full(2, -1.0, np.float32),
            "shape": np.array([0, 6, -1], np.int64),
        },
    )


def test_decode_tail_after_the_last_weight_layer_stays_float():
    model = head_model()
    source = RandomSource(runtime.input_specs(model), 16, seed=0, batch_size=2)
    result, report = quantize(model, source, accuracy_control=False)
    nodes = {node.name: node for node in result.graph}
    assert reads_dequantized(nodes["box"]) and reads_dequantized(nodes["logit"])
    assert not quantized_outputs(nodes["score"])  # the Sigmoid and what follows stay float
    assert nodes["joined"].inputs[1].producer() is nodes["score"]
    for name in ("joined", "flat", "y"):
        assert not quantized_outputs(nodes[name]), name
    assert not reads_dequantized(nodes["flat"]) and not reads_dequantized(nodes["y"])
    fused = optimized_ops(result)
    assert fused["QLinearConv"] == 3
    assert "QLinearSigmoid" not in fused and "QLinearConcat" not in fused
    assert any("stay float" in note and "Sigmoid" in note for note in report.notes)
    # the scores keep their precision beside the pixels (a scale shared with the boxes rounds
    # them in steps of 0.2: about 13 dB)
    feeds = random_feeds(model, 4, seed=7)
    assert measured(model, result, feeds).worst_channel_sqnr_db > 25


def test_zoo_detector_decode_stays_float():
    model = prepare(zoo.small("yolo_detect"), PrepareSettings(simplify=False))[0]
    source = RandomSource(runtime.input_specs(model), 8, seed=0, batch_size=2)
    result, report = quantize(model, source, accuracy_control=False)
    nodes = {node.name: node for node in result.graph}
    # after the DFL conv (the last weight layer): box arithmetic, strides, Sigmoid, the Concat
    # of pixels and scores
    # and the class logits that the Split gives only to the Sigmoid
    for name in ("model.22/Sub", "model.22/Add", "model.22/Mul", "model.22/Sigmoid"):
        assert not reads_dequantized(nodes[name]), name
    assert not reads_dequantized(nodes["model.22/Concat_5"])
    assert reads_dequantized(nodes["model.22.dfl.conv"])  # the DFL conv is a weight layer
    assert any("Concat" in note and "stay float" in note for note in report.notes)


# ---------------------------------------------------------------------------------------------
# Placement: Concats of unlike ranges

_CONCAT = """
<ir_version: 8, opset_import: ["" : 17]>
join (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
    a = Conv (x, wa, ba)
    b = Conv (x, wb, bb)
    c = Concat <axis = 1> (a, b)
    s = Sigmoid (c)
    y = Conv (s, wc, bc)
}
"""


def concat_model(gain: float) -> ir.Model:
    """Two convs joined by a Concat, then a Sigmoid and a conv (the Concat is no tail);
    ``gain`` scales the first one's outputs."""
    rng = np.random.default_rng(1)

    def weight(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.3

    return parse(
        _CONCAT,
        {
            "wa": weight(4, 4, 1, 1) * gain,
            "ba": np.zeros(4, np.float32),
            "wb": weight(4, 4, 1, 1),
            "bb": np.zeros(4, np.float32),
            "wc": weight(4, 8, 1, 1),
            "bc": np.zeros(4, np.float32),
        },
    )


@pytest.mark.parametrize("gain", [1.0, 50.0])
def test_concat_of_unlike_ranges_gets_no_shared_scale(gain):
    model = concat_model(gain)
    source = RandomSource(runtime.input_specs(model), 8, seed=0, batch_size=2)
    result, report = quantize(model, source, accuracy_control=False)
    concat = next(node for node in result.graph if node.op_type == "Concat")
    fused = optimized_ops(result)
    left = [r for r in report.skipped if r.node == "c"]
    if gain == 1.0:  # alike: one scale, run in integer
        assert reads_dequantized(concat) and not left
        scales = {v.producer().inputs[1].const_value.numpy().item() for v in concat.inputs}
        assert len(scales) == 1
        assert fused["QLinearConcat"] == 1
    else:  # 50x apart: float, each input dequantized with its own scale
        assert left and "differ" in left[0].detail and "concat_range_ratio" in left[0].detail
        scales = {v.producer().inputs[1].const_value.numpy().item() for v in concat.inputs}
        assert len(scales) == 2
        assert "QLinearConcat" not in fused
        # and the setting decides: a ratio above 50 shares the scale again
        shared, _ = quantize(model, source, accuracy_control=False, concat_range_ratio=1000)
        assert optimized_ops(shared)["QLinearConcat"] == 1


# ---------------------------------------------------------------------------------------------
# Accuracy control

_LAYERS = 8
_HARD = 3  # the layer whose input carries one channel 1000x the others


def chain_model(last: str = "Identity", offset: np.ndarray | None = None) -> ir.Model:
    """Eight MatMul+Relu layers; layer ``_HARD``'s input has one channel 1000x larger than the
    rest (its producer's column scaled up, its own row scaled down: the same function), so a
    per-tensor activation scale rounds every other channel of that input to zero. ``offset``
    (per channel) is taken from the last layer's output before ``last``."""
    rng = np.random.default_rng(2)
    weights = []
    for i in range(_LAYERS):
        w = rng.standard_normal((16, 16)).astype(np.float32) / 4
        if i == _HARD - 1:
            w[:, 0] *= 1000
        if i == _HARD:
            w[0, :] /= 1000
        weights.append(w)
    return _relu_chain(weights, last, offset)


def _relu_chain(
    weights: list[np.ndarray], last: str = "Identity", offset: np.ndarray | None = None
) -> ir.Model:
    """MatMul layers on ``weights`` (16x16 each), a Relu after every one but the last, whose
    output less ``offset`` goes through ``last`` (Sigmoid: 16 score channels)."""
    lines, x = [], "x"
    for i in range(len(weights)):
        y = "y" if i == len(weights) - 1 else f"r{i}"
        lines.append(f"m{i} = MatMul ({x}, w{i})")
        if y != "y":
            lines.append(f"{y} = Relu (m{i})")
        elif offset is not None:
            lines += [f"s = Sub (m{i}, offset)", f"y = {last} (s)"]
        else:
            lines.append(f"y = {last} (m{i})")
        x = y
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "chain (float[N, 16] x) => (float[N, 16] y) {\n" + "\n".join(lines) + "\n}\n"
    )
    constants = {f"w{i}": w for i, w in enumerate(weights)}
    if offset is not None:
        constants["offset"] = np.asarray(offset, dtype=np.float32)
    return parse(text, constants)


def chain_data(folder: str, count: int = 32) -> str:
    path = os.path.join(folder, "calib.npz")
    rng = np.random.default_rng(4)
    np.savez(path, x=np.abs(rng.standard_normal((count, 16))).astype(np.float32))
    return path


def _without_and_with_control(model: ir.Model, folder, count: int = 32, **settings):
    """The chain's ``count`` feeds, ``model`` quantized without accuracy control, and with it
    (the result and its report) under ``settings``."""
    data = chain_data(str(folder), count)
    specs = runtime.input_specs(model)
    feeds = [{"x": f["x"]} for f in NpzSource(data, specs, batch_size=4)]
    plain, _ = quantize(model, NpzSource(data, specs, batch_size=4), accuracy_control=False)
    result, report = quantize(model, NpzSource(data, specs, batch_size=4), **settings)
    return feeds, plain, result, report


def test_accuracy_control_returns_the_harmful_layer_to_float_until_the_gate_holds(tmp_path):
    model = chain_model()
    feeds, plain, result, report = _without_and_with_control(
        model, tmp_path, control_float_macs=0.25
    )
    assert measured(model, plain, feeds).worst_channel_sqnr_db < 10  # broken without control
    kept = [r for r in report.skipped if "accuracy control" in r.detail]
    assert [r.node for r in kept] == [f"m{_HARD}"]
    # The default gate's conditions in turn: 16 value channels with an argmax each (the argmax
    # condition floats the harmful layer), then the value SQNR (which then holds).
    assert "argmax_agreement>=0.98" in kept[0].detail
    notes = [n for n in report.notes if n.startswith("accuracy control")]
    assert "holds with 1 of 8 layers in float" in notes[0] and "RANDOM" not in notes[0]
    assert "worst_value_channel_sqnr_db>=12 holds with 1 layers in float" in notes[1]
    assert {r.node for r in report.changed} == {f"m{i}" for i in range(_LAYERS) if i != _HARD}
    after = measured(model, result, feeds)
    assert after.worst_channel_sqnr_db >= 12 and after.argmax_agreement >= 0.98


def spread_model(layers: int = 12, spread: int = 5, ratio: float = 40.0) -> ir.Model:
    """MatMul+Relu layers whose first ``spread`` inputs after the first each carry one channel
    ``ratio`` times the others (as ``chain_model``, milder and in five places): the error of a
    CNN's early high-resolution layers in ppocr_rec, where no one layer in float helps."""
    rng = np.random.default_rng(2)
    weights = []
    for i in range(layers):
        w = (rng.standard_normal((16, 16)) / 4 + np.eye(16) * 0.8).astype(np.float32)
        if i < spread:
            w[:, 0] *= ratio
        if 0 < i <= spread:
            w[0, :] /= ratio
        weights.append(w)
    return _relu_chain(weights)


def test_accuracy_control_returns_a_group_when_no_one_layer_holds_the_error(tmp_path):
    """Five layers share the error: one at a time, the search ran out of runs with two in
    float (15.9 dB); the group its bisection passed through holds the gate."""
    model = spread_model()
    feeds, plain, result, report = _without_and_with_control(
        model, tmp_path, target="worst_channel_sqnr_db>=18", control_float_macs=0.6
    )
    assert measured(model, plain, feeds).worst_channel_sqnr_db < 12
    note = next(n for n in report.notes if "accuracy control" in n)
    assert not note.startswith("WARNING") and "holds with 6 of 12 layers in float" in note
    floated = {r.node for r in report.skipped if "returned together" in r.detail}
    assert floated == {f"m{i}" for i in range(6)}
    assert measured(model, result, feeds).worst_channel_sqnr_db >= 18


def test_accuracy_control_respects_its_speed_bound_and_says_so(tmp_path):
    model = chain_model()
    data = chain_data(str(tmp_path))
    source = NpzSource(data, runtime.input_specs(model), batch_size=4)
    # less than one layer, and no timing beyond it
    _, report = quantize(
        model, source, control_float_macs=0.1, control_latency_ratio=0, if_missed="quantize"
    )
    assert not [r for r in report.skipped if "accuracy control" in r.detail]
    note = next(n for n in report.notes if n.startswith("WARNING: accuracy control"))
    assert "NOT met with 0 of 8 layers" in note and "within 10% of the MACs" in note


@pytest.mark.parametrize("teacher_misses", [False, True])
def test_accuracy_control_judges_against_the_original(tmp_path, teacher_misses):
    """In a pipeline the gate judges the result against the original (the teacher), so the
    control does too: the passes before quantization err as well. Where the model before
    quantization already misses the gate against it (a pruning the user asked for), no layer
    in float could hold it, and the layers are held to the error they add instead."""
    model = chain_model()
    teacher = model.clone()
    if teacher_misses:  # the last layer's output channels permuted: every top class moves
        weight = teacher.graph.initializers[f"w{_LAYERS - 1}"]
        weight.const_value = ir.tensor(weight.const_value.numpy()[:, ::-1].copy())
    data = chain_data(str(tmp_path))
    source = NpzSource(data, runtime.input_specs(model), batch_size=4)
    result = model.clone()
    settings = {"speed_check": False, "control_float_macs": 0.25}
    report = make_pass("quantize_int8", settings)(
        result, PassContext(calibration=source, teacher=teacher)
    )
    before = [n for n in report.notes if "before quantization already misses" in n]
    assert bool(before) is teacher_misses
    floated = [r.node for r in report.skipped if "accuracy control" in r.detail]
    assert floated == [f"m{_HARD}"]  # against its own error, as without a teacher
    assert not any(n.startswith("WARNING: every layer left float") for n in report.notes)


def test_a_missed_gate_leaves_the_model_float_and_says_why(tmp_path):
    """By default, an INT8 model that misses the gate is not written: every layer stays float
    and the warning names the gate, what was measured and how to quantize anyway."""
    model = chain_model()
    data = chain_data(str(tmp_path))
    source = NpzSource(data, runtime.input_specs(model), batch_size=4)
    result, report = quantize(model, source, control_float_macs=0.1, control_latency_ratio=0)
    assert not report.changed
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in result.graph)
    feeds = [{"x": f["x"]} for f in NpzSource(data, runtime.input_specs(model), batch_size=4)]
    assert measured(model, result, feeds).worst_channel_sqnr_db > 100  # float as it was
    note = next(n for n in report.notes if n.startswith("WARNING: every layer left float"))
    assert "could not hold argmax_agreement>=0.98 (argmax_agreement = " in note
    assert "reads" in note and "if_missed=quantize" in note


def test_accuracy_control_is_skipped_on_random_data():
    """A gate measured on random data says nothing about the task, and the layers it returned
    to float varied with the noise: every layer is quantized, and the warning says to pass
    real data."""
    model = chain_model()
    source = RandomSource(runtime.input_specs(model), 32, seed=0, batch_size=4)
    _, report = quantize(model, source, control_float_macs=0.0, control_latency_ratio=0)
    assert len(report.changed) == _LAYERS
    note = next(n for n in report.notes if "accuracy control skipped on RANDOM data" in n)
    assert "every layer quantized unchecked" in note and "--calib" in note
    assert not any("left float" in n or "holds with" in n for n in report.notes)


def test_a_target_asked_for_on_random_data_is_worked_towards_and_a_miss_reported():
    """A target asked for (tune's searches of synthetic models) is held on random data as far
    as the bounds allow; a miss there says nothing about the task: the model is quantized as
    far as the control went, and the warning says to pass real data."""
    model = chain_model()
    source = RandomSource(runtime.input_specs(model), 32, seed=0, batch_size=4)
    _, report = quantize(
        model, source, target="cosine>=0.99999", control_float_macs=0.0, control_latency_ratio=0
    )
    assert len(report.changed) == _LAYERS
    note = next(n for n in report.notes if "on RANDOM data, which says nothing" in n)
    assert "not left float" in note and "--calib" in note
    assert any("calibration batches of RANDOM data" in n for n in report.notes)
    assert not any(n.startswith("WARNING: every layer left float") for n in report.notes)


@pytest.mark.parametrize(
    ("share", "reads", "holds"),
    [
        (0.99, 100, False),
        (1.0, 100, True),
        (1.0, 10, True),
        (0.9899, 99, False),
        (0.995, 800, True),
    ],
)
def test_an_agreement_holds_at_its_lower_bound_or_where_every_read_agrees(share, reads, holds):
    """The control keeps the best of many noisy candidates: an agreement gate holds where the
    Wilson bound one standard error below the share counted meets it, or where every read
    agreed (too few reads for any bound to reach the gate)."""
    measure = object.__new__(accuracy_control._Measure)
    measure.gate = parse_gate("argmax_agreement>=0.98")
    assert measure.holds(accuracy_control.Reading(share, 0.0, reads)) is holds
    assert measure.holds(accuracy_control.Reading(share, 0.0)) is (share >= 0.98)  # no count
    bound = gates.agreement_bound(share, reads)
    assert bound < share  # one standard error below, even where every read agrees


@pytest.mark.parametrize("bound", [0.9, 10.0])
def test_accuracy_control_times_a_step_beyond_its_mac_share(tmp_path, bound):
    """The harmful layer is 12.5 % of the MACs, beyond a 10 % share: the step is timed. INT8
    16x16 MatMuls run slower than float (QDQ around tiny kernels), so a 0.9x latency bound
    refuses it, and a generous bound lets the layer return to float and the gate hold."""
    model = chain_model()
    data = chain_data(str(tmp_path))
    specs = runtime.input_specs(model)
    feeds = [{"x": f["x"]} for f in NpzSource(data, specs, batch_size=4)]
    source = NpzSource(data, specs, batch_size=4)
    result, report = quantize(
        model,
        source,
        control_float_macs=0.1,
        control_latency_ratio=bound,
        if_missed="quantize",
    )
    kept = [r for r in report.skipped if "accuracy control" in r.detail]
    note = next(n for n in report.notes if "accuracy control" in n)
    if bound < 1:
        assert not kept and note.startswith("WARNING") and "NOT met with 0 of 8" in note
        assert f"the original's latency, beyond its bound of {bound:g}x" in note
        assert measured(model, result, feeds).worst_channel_sqnr_db < 10
    else:
        assert [r.node for r in kept] == [f"m{_HARD}"]
        assert "x the original's latency" in kept[0].detail and "holds with 1 of 8" in note
        assert measured(model, result, feeds).worst_channel_sqnr_db >= 12


@pytest.mark.parametrize("slow", [False, True])
def test_a_step_that_does_not_pay_gives_way_to_the_half_passed_over(monkeypatch, slow):
    """The search as a table: the later half (m4-m7) in float ranks best and holds the gate,
    but the result would run at 0.95x the original's latency, beyond the 0.9x bound; the early
    half, which the bisection passed over, holds it too at 0.7x and returns to float instead.
    Where that half would not pay either, the control stops and says why."""
    model = chain_model()
    early, late = {"m0", "m1", "m2", "m3"}, {"m4", "m5", "m6", "m7"}

    def metric(self, floated, on="search"):
        self.runs += 1
        value = 5.0 + 0.1 * len(floated)
        if late <= set(floated):
            value = 12.0
        elif early <= set(floated):
            value = 11.0 if on == "check" else 8.0
        return accuracy_control.Reading(value, value)

    def slowdown(quantized):  # the copies are the names quantized (see _controlled)
        timed.append(set(quantized))
        return 0.95 if slow or not late & set(quantized) else 0.7

    timed = []
    monkeypatch.setattr(accuracy_control._Measure, "__call__", metric)
    report = PassReport("quantize_int8")
    bounds = accuracy_control.Bounds(runs=100, float_macs=0.0, latency_ratio=0.9, slowdown=slowdown)
    anchors, kept = _controlled(
        model, report, "worst_channel_sqnr_db>=10", samples=8, batch=1, batches=2, bounds=bounds
    )
    assert timed[0] == early  # the later half in float: timed first
    if slow:
        assert kept == anchors and "NOT met with 0 of 8" in report.notes[-1]
        assert "0.95x the original's latency, beyond its bound of 0.9x" in report.notes[-1]
    else:
        assert [n.name for n in anchors if n not in kept] == sorted(early)
        assert "holds with 4 of 8" in report.notes[-1] and "0.7x" in report.notes[-1]


def test_accuracy_control_steps_back_when_the_best_layer_does_not_help(monkeypatch):
    """The search as a table: returning m1 to float helps (5 -> 8 dB), every other layer makes
    it worse. The control keeps m1 in float, then takes back the next layer it finds (it stays
    quantized) and stops."""
    model = chain_model()

    def metric(self, floated, on="search"):
        self.runs += 1
        value = (8.0 if "m1" in floated else 5.0) - 0.5 * len(set(floated) - {"m1"})
        return accuracy_control.Reading(value, value)

    monkeypatch.setattr(accuracy_control._Measure, "__call__", metric)
    report = PassReport("quantize_int8")
    anchors, kept = _controlled(
        model, report, "worst_channel_sqnr_db>=10", samples=2, batch=2, batches=1
    )
    assert [node.name for node in anchors if node not in kept] == ["m1"]
    assert [r.node for r in report.skipped] == ["m1"]
    note = report.notes[-1]
    assert "NOT met with 1 of 8 layers in float" in note and "5 -> 8" in note
    assert "stepped back from m" in note and "RANDOM" in note


def test_an_agreement_gate_is_searched_by_sqnr_and_checked_on_enough_positions(monkeypatch):
    """The search as a table: the agreement is the same whichever half is in float (a few
    positions either way), the read output's SQNR names m6. The control follows the SQNR to m6
    and checks it on AGREEMENT_POSITIONS positions (one per batch here), at most CHECK_BATCHES
    batches, where the agreement rises to the gate."""
    model = chain_model()
    checked = []

    def metric(self, floated, on="search"):
        self.runs += 1
        checked.append(len(self.feeds[on]))
        fixed = "m6" in floated
        value = 0.99 if fixed and on == "check" else 0.95
        return accuracy_control.Reading(value, 20.0 if fixed else 10.0 + 0.1 * len(floated))

    monkeypatch.setattr(accuracy_control._Measure, "__call__", metric)
    report = PassReport("quantize_int8")
    anchors, kept = _controlled(
        model, report, "argmax_agreement>=0.98", samples=200, batch=1, batches=4
    )
    assert [node.name for node in anchors if node not in kept] == ["m6"]
    assert "0.95 -> 0.99" in report.notes[-1] and "holds with 1 of 8" in report.notes[-1]
    assert max(checked) == accuracy_control.CHECK_BATCHES == 128  # the check's batches
    assert min(checked) == 4  # the search's


def test_a_score_decision_gate_floats_the_layer_that_flips_decisions(tmp_path):
    """Sigmoid scores over 16 channels (a multi-label head whose scores reach 0.5 at 3 % of
    its positions, as a detector's classes at its anchors): INT8 everywhere flips decisions at
    the thresholds; ``score_agreement`` is searched by the scores' SQNR and met with the
    harmful layer in float. The check reads the decisions at every threshold over all the
    batches: with the harmful layer in float, 0.82 of 139 decisions agree at 0.5 (0.79 at the
    bound), where the 7 batches that counted the most common threshold's read every one."""
    logits = run(chain_model(), {"x": np.load(chain_data(str(tmp_path), 256))["x"]})[0]
    model = chain_model("Sigmoid", offset=np.quantile(logits, 0.97, axis=0))
    feeds, plain, result, report = _without_and_with_control(
        model, tmp_path, 256, target="score_agreement>=0.75", control_float_macs=0.25
    )
    assert measured(model, plain, feeds).score_agreement < 0.5
    floated = [r.node for r in report.skipped]
    # the harmful layer (and its producer, whose output carries the large channel); sparse
    # decisions near their thresholds stay sensitive to the other layers' rounding
    assert f"m{_HARD}" in floated and set(floated) <= {f"m{_HARD}", f"m{_HARD - 1}"}
    assert measured(model, result, feeds).score_agreement >= 0.75


def test_target_is_the_gate_the_control_meets(tmp_path):
    model = chain_model()
    data = chain_data(str(tmp_path))
    specs = runtime.input_specs(model)
    feeds = [{"x": f["x"]} for f in NpzSource(data, specs, batch_size=4)]
    result, report = quantize(
        model,
        NpzSource(data, specs, batch_size=4),
        target="cosine>=0.999",
        control_float_macs=0.25,
    )
    assert [r.node for r in report.skipped] == [f"m{_HARD}"]
    assert measured(model, result, feeds).cosine >= 0.999


def test_accuracy_control_measures_nothing_more_when_the_gate_holds(tmp_path):
    model = chain_model()
    source = NpzSource(chain_data(str(tmp_path), 8), runtime.input_specs(model), batch_size=2)
    _, report = quantize(model, source, target="cosine>=0.0")
    note = next(n for n in report.notes if n.startswith("accuracy control"))
    assert "cosine>=0 holds with every layer quantized" in note
    assert not report.skipped


def test_a_target_no_output_has_leaves_every_layer_quantized(tmp_path):
    model = chain_model()  # no Sigmoid/Softmax output: no score channels
    source = NpzSource(chain_data(str(tmp_path), 8), runtime.input_specs(model), batch_size=2)
    _, report = quantize(model, source, target="score_cosine>=0.99")
    assert any("no output of this model has score_cosine" in note for note in report.notes)
    assert not report.skipped and len(report.changed) == _LAYERS


def test_a_target_that_quantization_cannot_measure_is_refused():
    with pytest.raises(SettingsError, match="latency_ratio cannot be measured"):
        make_pass("quantize_int8", {"target": "latency_ratio<=0.5"})


def _controlled(model, report, gate: str, *, samples: int, batch: int, batches: int, bounds=None):
    """Accuracy control over ``model``'s MatMuls (copies are the names of the anchors they
    quantize: the tests replace the measurement and the timing), towards ``gate`` on random
    feeds, within ``bounds`` (by default any MAC share, untimed): (anchors, those kept
    quantized)."""
    anchors = [node for node in model.graph if node.op_type == "MatMul"]
    source = RandomSource(runtime.input_specs(model), samples, seed=0, batch_size=batch)
    kept = accuracy_control.keep_harmful_float(
        model,
        anchors,
        lambda chosen: [node.name for node in chosen],
        PassContext(calibration=source),
        report,
        gates=[parse_gate(gate)],
        batches=batches,
        bounds=bounds or accuracy_control.Bounds(runs=100, float_macs=1.0),
    ).anchors
    return anchors, kept


def test_a_group_the_search_passed_gains_where_its_last_layer_does_not():
    """Where the error is spread (ddddocr_beta), the single layer a bisection ends on can gain
    nothing; the best ranked group it passed through that gains goes back to float instead of
    the search ending with every layer INT8."""
    Reading = accuracy_control.Reading
    layers = {name: ir.Node("", "Conv", [], name=name) for name in "abcd"}
    ranks = {"b": 5.0, "ab": 12.0, "cd": 9.0}  # what each set in float measures (SQNR rank)

    class Measure:
        runs = 0

        def __call__(self, floated, on="search"):
            self.runs += 1
            return Reading(0.95, ranks.get("".join(floated), 0.0))

    def worth(reading):
        return reading.rank > 8.0  # the noise a gain must beat

    groups = [[layers["a"], layers["b"]], [layers["c"], layers["d"]], [layers["b"]]]
    single = ([layers["b"]], Reading(0.95, 5.0))
    chosen, reading = accuracy_control._best_gaining(groups, single, [], Measure(), worth, 24)
    assert [n.name for n in chosen] == ["a", "b"] and reading.rank == 12.0
    ranks.update(ab=1.0, cd=2.0)  # no group gains beyond the noise: the search stops there
    assert accuracy_control._best_gaining(groups, single, [], Measure(), worth, 24) == single
    assert accuracy_control._best_gaining(groups, single, [], Measure(), worth, 0) == single


def test_halves_split_by_cost_isolate_a_costly_layer():
    """The bisection halves by the time INT8 saves per layer where it has it: a layer that
    saves as much as all the others (ddddocr_beta's Gemm_97 against its 20 Convs) is a half of
    its own; without costs, or with like costs, it halves by count as before."""
    nodes = [ir.Node("", "Conv", [], name=f"c{i}") for i in range(21)]
    costs = {node.name: 100.0 for node in nodes} | {"c20": 2100.0}
    assert accuracy_control._half(nodes, costs) == 20
    assert accuracy_control._half(nodes, None) == 10
    assert accuracy_control._half(nodes, dict.fromkeys(costs, 1.0)) == 10  # a tie: the shorter
    assert accuracy_control._search_runs(nodes, None) == 2 * 5  # 2 per halving, log2(21) up
    assert accuracy_control._search_runs(nodes, dict.fromkeys(costs, 1.0)) == 2 * 5
    assert accuracy_control._search_runs(nodes, costs) == 2 * 6  # 20, then 10, 5, 3, 2, 1
    assert accuracy_control._search_runs(nodes[:1], costs) == 0


def test_a_costly_layer_that_gains_nothing_stays_int8_while_the_cheap_ones_hold_the_gate(
    monkeypatch,
):
    """The search as a table (ddddocr_beta): m7 saves as much as the seven layers before it
    together and gains nothing in float; the error is spread over m0-m6, which hold the gate
    only together. Halved by count, no group the bisection passes through holds it, and the
    control ends with every layer INT8. Halved by what INT8 saves per layer (profiled by the
    slowdown), m0-m6 are one half: they hold the gate and return to float at 0.7x the
    original's latency, and m7 stays INT8."""
    model = chain_model()
    cheap = {f"m{i}" for i in range(7)}

    def metric(self, floated, on="search"):
        self.runs += 1
        value = 12.0 if cheap <= set(floated) else 5.0 + 0.1 * len(cheap & set(floated))
        return accuracy_control.Reading(value, value)

    class Slowdown:
        def __call__(self, quantized):  # the copies are the names quantized (see _controlled)
            return 0.7 if "m7" in quantized else 0.95

        def layer_savings(self, quantized, names):
            assert sorted(quantized) == sorted(names)  # profiled with every layer quantized
            return {name: 700.0 if name == "m7" else 100.0 for name in names}

    def control(slowdown) -> tuple[list[str], str]:
        report = PassReport("quantize_int8")
        bounds = accuracy_control.Bounds(
            runs=100, float_macs=0.0, latency_ratio=0.9, slowdown=slowdown
        )
        anchors, kept = _controlled(
            model, report, "worst_channel_sqnr_db>=10", samples=8, batch=1, batches=2, bounds=bounds
        )
        return [n.name for n in anchors if n not in kept], report.notes[-1]

    monkeypatch.setattr(accuracy_control._Measure, "__call__", metric)
    floated, note = control(Slowdown().__call__)  # a function: no profile, halves by count
    assert not floated and "NOT met with 0 of 8" in note
    floated, note = control(Slowdown())
    assert floated == sorted(cheap) and "holds with 7 of 8" in note and "0.7x" in note
    assert "halves of like profiled INT8 savings" in note


def test_with_few_reads_a_smaller_holding_group_must_keep_the_larger_ones_sqnr():
    """An agreement gate counted on fewer than AGREEMENT_POSITIONS reads: of two nested
    groups that both hold it, the smaller goes back to float only while it keeps
    HOLDING_SHARE of the larger's SQNR gain (ddddocr_beta: 20 Convs at +20 dB read 98 of 99
    check strings the same, their later 11 all 99 at +7.4 dB, and 0.980 against 0.961 of 153
    others); with enough reads, the smallest that holds."""
    Reading = accuracy_control.Reading
    layers = [ir.Node("", "Conv", [], name=f"c{i}") for i in range(4)]
    groups = [layers, layers[2:], layers[3:]]
    ranks = {4: Reading(0.99, 48.7), 2: Reading(1.0, 36.0), 1: Reading(0.93, 28.7)}
    current = Reading(0.96, 28.7)

    class Measure:
        runs = 0

        def __call__(self, floated, on="search"):
            self.runs += 1
            return ranks[len(floated)]

    def holds(reading):
        return reading.value >= 0.98 and reading.rank > current.rank

    def keeps(few):
        def keeps(reading, largest):
            gain = reading.rank - current.rank
            share = accuracy_control.HOLDING_SHARE
            return not few or gain >= share * (largest.rank - current.rank)

        return keeps

    found = accuracy_control._smallest_holding(groups, [], Measure(), holds, keeps(True), 24)
    assert found == (layers, ranks[4])
    found = accuracy_control._smallest_holding(groups, [], Measure(), holds, keeps(False), 24)
    assert found == (layers[2:], ranks[2])


def test_slowdown_profiles_what_int8_saves_per_layer():
    """The slowdown profiles the original and a quantized copy in onnxruntime: a saving per
    layer named, none below zero; None for a name that no profile times."""
    from onnx_squeeze.passes.quantize import speed_check

    model = chain_model()
    source = RandomSource(runtime.input_specs(model), 4, seed=0, batch_size=1)
    quantized, _ = quantize(model, source, accuracy_control=False)
    slowdown = speed_check.Slowdown(model, PassContext(calibration=source), batch=1)
    names = [f"m{i}" for i in range(_LAYERS)]
    savings = slowdown.layer_savings(quantized, names)
    assert savings is not None and sorted(savings) == names
    assert all(value >= 0 for value in savings.values())
    assert slowdown.layer_savings(quantized, [*names, "not_a_node"]) is None


def test_a_timing_near_the_latency_bound_is_timed_again():
    """One timing within NEAR_BOUND of the bound is noise's to decide: the median of three
    does; one far from it stands alone."""
    timings = iter([0.91, 0.88, 0.89])
    bounds = accuracy_control.Bounds(
        runs=1, float_macs=0.0, latency_ratio=0.9, slowdown=lambda model: next(timings)
    )
    assert (
        accuracy_control._latency(ir.Model(ir.Graph([], [], nodes=[]), ir_version=8), bounds)
        == 0.89
    )
    timings = iter([0.95, 0.5])
    assert (
        accuracy_control._latency(ir.Model(ir.Graph([], [], nodes=[]), ir_version=8), bounds)
        == 0.95
    )
