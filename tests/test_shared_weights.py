"""Shared weights stay shared: a weight read by many nodes (a layer applied repeatedly, an LSTM
unrolled over its time steps) is encoded once and every reader reads the one copy; no pass
makes the file larger than the model it was given."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_squeeze import fidelity
from onnx_squeeze.passes import load_all
from onnx_squeeze.passes.base import PASS_REGISTRY, make_pass
from onnx_squeeze.pipeline import convert_opset, finalize
from onnx_squeeze.records import PassContext
from tests.helpers import assert_same_outputs, check, random_feeds, run

STEPS = 8


@functools.cache
def _repeated_layer() -> onnx.ModelProto:
    """One [256, 256] MatMul weight applied ``STEPS`` times, with a Tanh between."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    nodes, previous = [], "x"
    for step in range(STEPS):
        nodes += [
            helper.make_node("MatMul", [previous, "w"], [f"m{step}"], name=f"matmul_{step}"),
            helper.make_node("Tanh", [f"m{step}"], [f"h{step}"], name=f"tanh_{step}"),
        ]
        previous = f"h{step}"
    graph = helper.make_graph(
        nodes,
        "repeated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@functools.cache
def _unrolled_lstm() -> onnx.ModelProto:
    """An RNN cell unrolled over ``STEPS`` steps as exporters write it: every step reads the
    same input and recurrent Gemm weights (transB=1) and biases,
    ``h_t = tanh(Gemm(x_t, W_ih, b_ih) + Gemm(h_t-1, W_hh, b_hh))``."""
    rng = np.random.default_rng(1)
    arrays = {
        "w_ih": rng.standard_normal((256, 128)) / 11,
        "w_hh": rng.standard_normal((256, 256)) / 16,
        "b_ih": rng.standard_normal(256) / 10,
        "b_hh": rng.standard_normal(256) / 10,
    }
    nodes, previous = [], "h0"
    for t in range(STEPS):
        nodes += [
            helper.make_node("Gather", ["x", f"t{t}"], [f"x{t}"], name=f"step_{t}", axis=1),
            helper.make_node(
                "Gemm", [f"x{t}", "w_ih", "b_ih"], [f"i{t}"], name=f"gemm_ih_{t}", transB=1
            ),
            helper.make_node(
                "Gemm", [previous, "w_hh", "b_hh"], [f"r{t}"], name=f"gemm_hh_{t}", transB=1
            ),
            helper.make_node("Add", [f"i{t}", f"r{t}"], [f"s{t}"], name=f"add_{t}"),
            helper.make_node("Tanh", [f"s{t}"], [f"h{t + 1}"], name=f"tanh_{t}"),
        ]
        previous = f"h{t + 1}"
    initializers = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    initializers += [numpy_helper.from_array(np.array(t, np.int64), f"t{t}") for t in range(STEPS)]
    graph = helper.make_graph(
        nodes,
        "unrolled",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, 128]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", 256]),
        ],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", 256])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@functools.cache
def _branches() -> onnx.ModelProto:
    """An If whose branches both apply one outer [256, 256] weight twice (the condition is
    computed, so data need not give it)."""
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        branches (float[N, 256] x) => (float[N, 256] y) {
            s = ReduceSum<keepdims=0>(x)
            zero = Constant<value = float {0}>()
            c = Greater(s, zero)
            y = If(c) <
                then_branch = g1 () => (float[N, 256] t) {
                    a1 = MatMul(x, w)
                    b1 = Tanh(a1)
                    a2 = MatMul(b1, w)
                    t = Tanh(a2)
                },
                else_branch = g2 () => (float[N, 256] e) {
                    c1 = MatMul(x, w)
                    d1 = Relu(c1)
                    e = MatMul(d1, w)
                }
            >
        }"""
    )
    weight = np.random.default_rng(2).standard_normal((256, 256)) / 16
    proto.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    return proto


MODELS = {"repeated_layer": _repeated_layer, "unrolled_lstm": _unrolled_lstm}
# How many float weight tensors each model holds (one per distinct weight).
WEIGHTS = {"repeated_layer": 1, "unrolled_lstm": 2}


def _model(name: str) -> ir.Model:
    """The model with its intermediate types inferred, as the pipeline's prepare leaves it."""
    build = MODELS.get(name, _branches)
    return ir.from_proto(onnx.shape_inference.infer_shapes(build()))


def _size(model: ir.Model) -> int:
    return len(ir.to_proto(model).SerializeToString())


def _apply(model: ir.Model, name: str, calibration=None, **settings) -> tuple[ir.Model, object]:
    if name in ("quantize_dynamic", "quantize_weights"):  # every reader quantized, unchecked
        settings.setdefault("accuracy_control", False)
    student = model.clone()
    report = make_pass(name, settings)(student, PassContext(calibration=calibration))
    finalize(student)
    return student, report


def _large_tensors(model: ir.Model) -> list[ir.Value]:
    """Initializers of at least 4096 elements: the weights and their encoded copies."""
    return [v for v in model.graph.initializers.values() if v.const_value.size >= 4096]


def _worst_channel_sqnr(model: ir.Model, student: ir.Model) -> float:
    """Worst per-output-channel SQNR of ``student`` against ``model`` on random inputs."""
    feeds = random_feeds(model, count=2, batch=16)
    name = model.graph.outputs[0].name
    reference = [{name: run(model, feed)[0]} for feed in feeds]
    result = [{name: run(student, feed)[0]} for feed in feeds]
    (measured,) = fidelity.measure(reference, result, channel_axes={name: 1}).values()
    return measured.worst_channel_sqnr_db


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_int8_stores_a_shared_weight_once(name):
    model = _model(name)
    student, report = _apply(model, "quantize_dynamic")
    check(student)
    readers = sum(n.op_type in ("MatMul", "Gemm") for n in model.graph)
    assert len(report.changed) == readers and not report.skipped
    assert all("stored once" in r.detail for r in report.changed)
    stored = _large_tensors(student)
    assert len(stored) == WEIGHTS[name]  # one INT8 copy per weight, no float one
    assert all(v.dtype == ir.DataType.INT8 for v in stored)
    quantized = {id(n.inputs[1]) for n in student.graph if n.op_type == "MatMulInteger"}
    assert len(quantized) == WEIGHTS[name]
    assert _size(student) <= 0.32 * _size(model)  # weights 0.25x, and the nodes of 8 steps
    assert _worst_channel_sqnr(model, student) > 20  # 8 chained steps: 26 and 32 dB


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    ("pass_name", "ratio"), [("quantize_weights", 0.2), ("codebook", 0.2), ("prune_weights", 1.0)]
)
def test_weight_only_passes_store_a_shared_weight_once(name, pass_name, ratio):
    model = _model(name)
    settings = {"keep_first": False, "keep_last": False} if pass_name == "prune_weights" else {}
    student, report = _apply(model, pass_name, **settings)
    check(student)
    readers = sum(n.op_type in ("MatMul", "Gemm") for n in model.graph)
    assert len(report.changed) == readers and not report.skipped
    assert len(_large_tensors(student)) == WEIGHTS[name]
    assert _size(student) <= ratio * _size(model)
    if pass_name == "prune_weights":  # lossless given the pruned weights: the same outputs
        pruned = {v.name: v.const_value.numpy() for v in _large_tensors(student)}
        assert all(np.mean(a == 0) == 0.5 for a in pruned.values())
        reference = model.clone()
        for value_name, array in pruned.items():
            reference.graph.initializers[value_name].const_value = ir.tensor(array)
        assert_same_outputs(reference, student, random_feeds(model, count=2))
    else:
        assert _worst_channel_sqnr(model, student) > 5  # 4 bits over 8 steps: 6 to 14 dB


def _weight_rewriting_passes() -> list[str]:
    load_all()
    return sorted(set(PASS_REGISTRY) - {"finetune", "reconstruct"})  # recovery: refits only


@pytest.mark.parametrize("name", [*MODELS, "branches"])
@pytest.mark.parametrize("pass_name", _weight_rewriting_passes())
def test_no_pass_grows_a_model_with_shared_weights(name, pass_name):
    """Every pass that rewrites weights, at its defaults with calibration data (random here):
    the result is never larger than the model (a shared weight copied per reader would be)."""
    model = _model(name)
    opset = max(PASS_REGISTRY[pass_name].min_opset, 17)
    if opset > 17:  # as the pipeline does for fp8
        model = convert_opset(model, opset)
    student, report = _apply(model, pass_name, calibration=random_feeds(model, count=4))
    check(student)
    assert _size(student) <= _size(model), (report.notes, report.records[:3])


def test_static_int8_floats_every_reader_of_a_weight_one_reader_keeps_in_float():
    """One reader of the shared weight left float (here by the selection; the speed check and
    accuracy control do the same): its siblings stay float too, or the weight would be stored
    in float and in INT8."""
    model = _model("repeated_layer")
    settings = {"exclude": ["matmul_3"], "speed_check": False, "accuracy_control": False}
    student, report = _apply(model, "quantize_int8", random_feeds(model, count=4), **settings)
    check(student)
    assert _size(student) <= _size(model)
    assert not report.changed
    shared = [r for r in report.skipped if "also read in float by 'matmul_3'" in r.detail]
    assert len(shared) == STEPS - 1
