"""FP16/BF16 conversion and FP8 QDQ: structure, validity, numerics against the FP32 model."""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import model_io, runtime, zoo
from onnx_squeeze.calibration import RandomSource
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.passes import fp8
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.pipeline import compress, convert_opset, finalize
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.records import PassContext
from tests.helpers import check, random_feeds, run

F16 = ir.DataType.FLOAT16
F32 = ir.DataType.FLOAT


def parse(text: str) -> ir.Model:
    """A model from onnx's text format, its nodes named ``<op>_<index>`` and shapes inferred."""
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    for index, node in enumerate(model.graph):
        node.name = f"{node.op_type}_{index}"
    return model


def convert(model: ir.Model, context: PassContext | None = None, **settings):
    return make_pass("fp16", settings)(model, context)


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def casts(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == "Cast"]


def worst_relative_error(a: ir.Model, b: ir.Model, feeds) -> float:
    """Largest |a - b| over all outputs and feeds, relative to each output's largest value."""
    worst = 0.0
    for feed in feeds:
        for out_a, out_b in zip(run(a, feed), run(b, feed), strict=True):
            assert np.isfinite(out_b).all()
            scale = max(1.0, float(np.abs(out_a).max()))
            worst = max(worst, float(np.abs(out_b - out_a).max()) / scale)
    return worst


def calibration(model: ir.Model, count: int = 4) -> RandomSource:
    return RandomSource(runtime.input_specs(model), count=count, batch_size=2)


# ---------------------------------------------------------------------------------------------
# FP16


@pytest.mark.parametrize("name", ["resnet18", "transformer"])
def test_fp16_for_a_gpu_converts_every_node_with_casts_only_at_the_borders(name):
    model = zoo.small(name)
    original = model.clone()
    report = convert(model, provider="none")
    check(model)
    touching_float = [
        n for n in original.graph if F32 in {v.dtype for v in (*n.inputs, *n.outputs) if v}
    ]
    assert not report.skipped and len(report.changed) == len(touching_float)
    # One Cast per float graph input and output; the interface keeps its types, names and dims.
    float_inputs = [v for v in model.graph.inputs if v.dtype == F32]
    assert len(casts(model)) == len(float_inputs) + len(model.graph.outputs)
    for new, old in zip(model.graph.inputs, original.graph.inputs, strict=True):
        assert (new.name, new.dtype, new.shape) == (old.name, old.dtype, old.shape)
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    assert all(v.dtype == F32 for v in model.graph.outputs)
    weights = [v for v in model.graph.initializers.values() if v.dtype in (F16, F32)]
    assert weights and all(v.dtype == F16 for v in weights)
    # FP16 rounding (2**-11 relative per op) through a few layers stays within 2 %.
    assert worst_relative_error(original, model, random_feeds(original)) < 2e-2
    assert weight_bytes(model, F16) == weight_bytes(original, F32) / 2  # one copy of each


def weight_bytes(model: ir.Model, dtype: ir.DataType) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.dtype == dtype)


def serialized_size(model: ir.Model) -> int:
    return len(ir.to_proto(model).SerializeToString())


def test_fp16_keeps_the_teacher_untouched():
    model = zoo.small("mlp")
    teacher = model.clone()  # shares tensors and type objects with the model, as in the pipeline
    convert(model, provider="none")
    assert all(v.dtype == F32 for v in teacher.graph.initializers.values())
    assert all(v.dtype == F32 for node in teacher.graph for v in node.outputs)
    run(teacher, random_feeds(teacher, 1)[0])


def test_fp16_on_cpu_keeps_ops_without_kernels_fp32():
    model = zoo.small("resnet18")
    original = model.clone()
    report = convert(model, provider="cpu")
    assert not report.changed and not casts(model)
    assert {r.detail for r in report.skipped if r.op_type == "Conv"} == {
        "no float16 kernel for Conv on this provider"
    }
    feed = random_feeds(original, 1)[0]
    for a, b in zip(run(original, feed), run(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fp16_on_cpu_converts_ops_with_native_kernels():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4, 8] x) => (float[N, 8, 4] y)
        <float[4] scale = {1, 2, 3, 4}, float[4] bias = {0, 1, 0, 1}, float low = {-1}, float high = {1}>
        {
            t = Transpose <perm = [0, 2, 1]> (x)
            n = LayerNormalization <axis = -1> (t, scale, bias)
            y = Clip (n, low, high)
        }"""
    )
    original = model.clone()
    report = convert(model, provider="cpu", keep_io_types=False)
    check(model)
    assert len(report.changed) == 3 and not casts(model)
    assert model.graph.inputs[0].dtype == F16 and model.graph.outputs[0].dtype == F16
    # onnxruntime runs them natively: it adds no Cast of its own when loading the model.
    assert "Cast" not in _ort_optimized_ops(model)
    feed = {"x": np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)}
    (expected,) = run(original, feed)
    (got,) = run(model, {"x": feed["x"].astype(np.float16)})
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-2)


def _ort_optimized_ops(model: ir.Model) -> list[str]:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        runtime.create_session(model, optimization="none", optimized_model_path=path)
        return [node.op_type for node in onnx.load(path).graph.node]


def test_block_ops_and_block_nodes_stay_fp32_with_shared_casts():
    model = zoo.small("transformer")
    original = model.clone()
    first_gemm = next(n.name for n in model.graph if n.op_type in ("MatMul", "Gemm"))
    report = convert(model, provider="none", block_ops=["Softmax"], block_nodes=[first_gemm])
    check(model)
    kept = {r.node: r.detail for r in report.skipped}
    softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
    assert softmaxes and all(n.outputs[0].dtype == F32 for n in softmaxes)
    assert all("block list" in kept[n.name] for n in softmaxes)
    assert kept[first_gemm] == "in block_nodes"
    assert model.graph.node(first_gemm).outputs[0].dtype == F32
    _assert_minimal_casts(model)
    assert worst_relative_error(original, model, random_feeds(original)) < 2e-2


def _assert_minimal_casts(model: ir.Model) -> None:
    """No Cast feeds a Cast, and a value is cast at most once to each type."""
    targets = Counter((id(n.inputs[0]), n.attributes["to"].value) for n in casts(model))
    assert max(targets.values(), default=1) == 1
    for node in casts(model):
        producer = node.inputs[0].producer()
        assert producer is None or producer.op_type != "Cast"


def test_data_movement_follows_its_fp32_producer():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4] x) => (float[N, 3] y)
        <int64[1] k = {3}, int64[2] shape = {-1, 3}, float[3, 3] w = {1,0,0, 0,1,0, 0,0,1}>
        {
            values, indices = TopK <axis = 1> (x, k)
            r = Reshape (values, shape)
            y = MatMul (r, w)
        }"""
    )
    report = convert(model, provider="none")
    check(model)
    details = {r.op_type: r.detail for r in report.skipped}
    assert "TopK" in details and "follows it" in details["Reshape"]
    assert ops(model) == ["TopK", "Reshape", "Cast", "MatMul", "Cast"]


def test_lone_elementwise_op_between_fp32_neighbours_is_not_converted():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4] x) => (float[N, 4] y)
        <int64 axis = {1}>
        {
            a = CumSum (x, axis)
            b = Relu (a)
            y = CumSum (b, axis)
        }"""
    )
    report = convert(model, provider="none")
    assert not report.changed and not casts(model)
    assert "only add Casts" in {r.op_type: r.detail for r in report.skipped}["Relu"]


OUT_OF_RANGE = """<ir_version: 8, opset_import: ["": 17]>
    g (float[N, 2] x) => (float[N, 2] y)
    <float[2] big = {100000, 1}, float tiny = {1e-12}, float[2, 2] w = {1, 0, 0, 1}>
    {
        m = Mul (x, big)
        a = Add (m, tiny)
        y = MatMul (a, w)
    }"""


def test_constants_outside_fp16_are_clamped():
    model = parse(OUT_OF_RANGE)
    report = convert(model, provider="none")
    check(model)
    assert any("2 constant values clamped" in note for note in report.notes)
    big = model.graph.node("Mul_0").inputs[1].const_value.numpy()
    tiny = model.graph.node("Add_1").inputs[1].const_value.numpy()
    assert big.dtype == np.float16 and big[0] == np.float16(65504)
    assert tiny == np.float16(2**-24)  # not flushed to zero (it may be an epsilon)


def test_constants_outside_fp16_keep_their_op_fp32():
    model = parse(OUT_OF_RANGE)
    original = model.clone()
    report = convert(model, provider="none", out_of_range="keep_fp32")
    check(model)
    kept = {r.op_type: r.detail for r in report.skipped}
    assert kept["Mul"] == "constant input 1 exceeds the FP16 range"
    feed = {"x": np.array([[0.5, 2.0]], dtype=np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-3)


def test_calibrated_activation_beyond_fp16_keeps_its_ops_fp32():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4] x) => (float[N, 4] y)
        <float[4, 4] w1 = {9e4,0,0,0, 0,9e4,0,0, 0,0,9e4,0, 0,0,0,9e4}, float[4, 4] w2 = {1e-3,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>
        {
            h = MatMul (x, w1)
            r = Relu (h)
            y = MatMul (r, w2)
        }"""
    )
    original = model.clone()
    report = convert(model, PassContext(calibration=calibration(model)), provider="none")
    check(model)
    kept = {r.op_type: r.detail for r in report.skipped}
    assert "beyond FP16 range" in kept["Relu"]
    # Every op touches the wide activation (produces or consumes it): all stay FP32, exact.
    assert not report.changed
    feed = {"x": np.full((1, 4), 2.0, dtype=np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-6)
    no_data = convert(parse(OUT_OF_RANGE), provider="none")
    assert any("activation ranges not checked" in note for note in no_data.notes)


def test_large_reductions_stay_fp32():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 8192] x) => (float[N, 1] y, float[N, 1] z)
        <int64[1] axes = {1}, int64[1] starts = {0}, int64[1] ends = {16}>
        {
            y = ReduceSum <keepdims = 1> (x, axes)
            s = Slice (x, starts, ends, axes)
            z = ReduceSum <keepdims = 1> (s, axes)
        }"""
    )
    report = convert(model, provider="none", keep_io_types=False)
    check(model)
    kept = {r.node: r.detail for r in report.skipped}
    reductions = [n for n in model.graph if n.op_type == "ReduceSum"]
    assert "8192 elements" in kept[reductions[0].name]
    assert reductions[1] not in kept and reductions[1].outputs[0].dtype == F16


def test_existing_casts_to_float_become_casts_to_fp16():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 2] x, int64[N, 2] i) => (float[N, 2] y)
        <float[2, 2] w = {1, 2, 3, 4}>
        {
            f = Cast <to = 1> (i)
            s = Add (x, f)
            y = MatMul (s, w)
        }"""
    )
    original = model.clone()
    convert(model, provider="none")
    check(model)
    cast = model.graph.node(0)
    assert cast.op_type == "Cast" and cast.attributes["to"].value == int(F16)
    assert len(casts(model)) == 3  # the model's own, x to FP16, y back to FP32
    _assert_minimal_casts(model)
    feed = {"x": np.ones((1, 2), np.float32), "i": np.array([[1, 2]], np.int64)}
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-3)


def test_casts_of_the_model_convert_on_cpu():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (int64[N, 2] i) => (float[N, 2] y)
        <float low = {0}, float high = {1}>
        {
            f = Cast <to = 1> (i)
            y = Clip (f, low, high)
        }"""
    )
    report = convert(model, provider="cpu", keep_io_types=False)
    check(model)
    assert [r.op_type for r in report.changed] == ["Cast", "Clip"]
    (got,) = run(model, {"i": np.array([[-1, 2]], np.int64)})
    assert got.dtype == np.float16 and got.tolist() == [[0.0, 1.0]]


def test_initializer_that_is_also_an_input_gets_a_cast_not_a_conversion():
    model = parse(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[N, 2] x, float[2, 2] w) => (float[N, 2] y)
        <float[2, 2] w = {1, 2, 3, 4}>
        {
            y = MatMul (x, w)
        }"""
    )
    original = model.clone()
    convert(model, provider="none")
    check(model)
    assert model.graph.inputs[1].dtype == F32 and len(casts(model)) == 3
    feed = {"x": np.ones((1, 2), np.float32), "w": np.full((2, 2), 0.5, np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-3)


def test_bf16_where_the_provider_has_kernels():
    model = zoo.small("mlp")
    original = model.clone()
    report = convert(model, dtype="bfloat16", provider="cpu")
    check(model)
    feed = random_feeds(original, 1)[0]
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], rtol=1e-6)
    assert all("bfloat16" in r.detail or "Casts" in r.detail for r in report.skipped)
    for_gpu = zoo.small("mlp")
    convert(for_gpu, dtype="bfloat16", provider="none")
    check(for_gpu)
    weights = [v for v in for_gpu.graph.initializers.values() if v.dtype != ir.DataType.INT64]
    assert weights and all(v.dtype == ir.DataType.BFLOAT16 for v in weights)


def test_fp16_in_a_recipe():
    recipe = Recipe.from_cli(["fp16:provider=none"])
    recipe.prepare["simplify"] = False  # onnxsim runs in a subprocess: slow, and not tested here
    result = compress(zoo.small("mlp"), recipe, compare=False)
    assert any(node.op_type == "Cast" for node in result.model.graph)
    assert result.passes[0].name == "fp16" and result.passes[0].changed


@pytest.mark.parametrize(
    "settings",
    [{"dtype": "float8"}, {"out_of_range": "wrap"}, {"range_margin": 0.5}, {"provider": "tpu"}],
)
def test_fp16_bad_settings(settings):
    with pytest.raises(SettingsError):
        make_pass("fp16", settings)


# ---------------------------------------------------------------------------------------------
# FP8


def opset19(name: str) -> ir.Model:
    return convert_opset(zoo.small(name), 19)


def test_fp8_quantizes_conv_weights_and_activations():
    model = opset19("resnet18")
    original = model.clone()
    report = make_pass("fp8")(model, PassContext(calibration=calibration(model)))
    check(model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(report.changed) == len(convs) + 1  # and the classifier Gemm
    for conv in convs:
        weight_dq, input_dq = conv.inputs[1].producer(), conv.inputs[0].producer()
        if input_dq.op_type == "Relu":  # the pair sits before a Relu that only feeds Convs
            input_dq = input_dq.inputs[0].producer()
        assert weight_dq.op_type == input_dq.op_type == "DequantizeLinear"
        assert weight_dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
        assert weight_dq.attributes["axis"].value == 0
        assert input_dq.inputs[0].producer().op_type == "QuantizeLinear"
        assert conv.metadata_props == original.graph.node(conv.name).metadata_props
    feed = random_feeds(original, 1)[0]
    for a, b in zip(run(original, feed), run(model, feed), strict=True):
        assert np.isfinite(b).all()
        cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        # E4M3 keeps 3 mantissa bits: ~2.6 % rms error per tensor (INT8: ~0.8 %), compounded
        # over 13 layers on random features; measured 0.95-0.995 over seeds.
        assert cosine > 0.93


def test_fp8_weight_scale_is_amax_over_448():
    weight = np.array([[1.0, -448.0], [0.5, 0.25]], dtype=np.float32)
    scale = quant_params.fp8_scale(quant_params.largest_magnitude(weight, axis=1))
    np.testing.assert_allclose(scale, [1 / 448, 1.0])
    stored = quant_params.quantize_fp8(weight, scale, axis=1)
    assert stored.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_allclose(stored.astype(np.float32) * scale, weight, rtol=2**-4)


def test_fp8_transformer_skips_activation_matmuls_and_shares_weights():
    model = opset19("transformer")
    report = make_pass("fp8")(model, PassContext(calibration=calibration(model)))
    check(model)
    skipped = {r.detail for r in report.skipped}
    assert skipped == {"weight is not a constant (both inputs are activations)"}
    quantize = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len({id(n.inputs[0]) for n in quantize}) == len(quantize)  # one Q per activation
    run(model, random_feeds(model, 1)[0])


@pytest.mark.parametrize("name, activation", [("resnet18", "Relu"), ("mobilenetv2", "Clip")])
def test_fp8_pairs_go_before_relu_and_clip_so_onnxruntime_fusions_keep_results(name, activation):
    model = opset19(name)
    make_pass("fp8")(model, PassContext(calibration=calibration(model)))
    check(model)
    before = [n for n in model.graph if n.op_type == activation and _feeds_only_quantized(n)]
    assert before and all(n.inputs[0].producer().op_type == "DequantizeLinear" for n in before)
    # onnxruntime's Relu/Clip -> QuantizeLinear rewrites assume integer types: with the pair
    # after the activation the optimized model drops the Relu (or fails to load for Clip).
    feed = random_feeds(model, 1)[0]
    plain = runtime.create_session(model, optimization="none").run(None, feed)
    optimized = runtime.create_session(model, optimization="all").run(None, feed)
    for a, b in zip(plain, optimized, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()))


def _feeds_only_quantized(node: ir.Node) -> bool:
    users = [user for user, _ in node.outputs[0].uses()]
    return bool(users) and all(user.op_type in ("Conv", "Gemm", "MatMul") for user in users)


def test_fp8_weights_only_needs_no_calibration_and_needs_it_otherwise():
    model = opset19("mlp")
    with pytest.raises(SettingsError, match="calibration data"):
        make_pass("fp8")(model.clone(), PassContext())
    report = make_pass("fp8", {"activations": False})(model, PassContext())
    check(model)
    assert report.changed and "QuantizeLinear" not in ops(model)
    make_pass("fp8", {"activations": False})(model, PassContext())  # already quantized: skipped
    assert ops(model).count("DequantizeLinear") == len(report.changed)


def test_fp8_converts_the_model_to_opset_19():
    """FP8 Q/DQ needs opset 19: an older model is converted first, and the result says so."""
    result = compress(zoo.small("mlp"), Recipe.from_cli(["fp8:activations=false"]), compare=False)
    assert model_io.opset_version(result.model) == 19
    assert any("converted from opset 17 to 19" in note for note in result.notes)


NO_KERNEL = "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation"


@pytest.mark.parametrize(
    "error",
    [
        InputError(f"onnxruntime cannot load the model: {NO_KERNEL}"),
        runtime.ort.capi.onnxruntime_pybind11_state.NotImplemented(NO_KERNEL),
    ],
)
def test_fp8_without_kernel_gives_a_clear_message(monkeypatch, error):
    model = opset19("mlp")

    def no_kernel(*args, **kwargs):
        raise error

    monkeypatch.setattr(fp8.runtime, "create_session", no_kernel)
    report = make_pass("fp8", {"activations": False})(model, PassContext())
    assert len(report.notes) == 1 and "has no CPUExecutionProvider kernel" in report.notes[0]
    check(model)


def test_fp8_bad_settings():
    with pytest.raises(SettingsError, match="Conv, Gemm, MatMul"):
        make_pass("fp8", {"op_types": ["Relu"]})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "yolo", "transformer"])
def test_full_size_zoo_models(name):
    """FP16 for a GPU (half the size, outputs within 3 %) and FP8 QDQ (a quarter) at full size."""
    original = zoo.build(name)
    fp16 = original.clone()
    convert(fp16, PassContext(calibration=calibration(fp16, 2)), provider="none")
    check(fp16)
    feeds = random_feeds(original, 1, batch=1)
    # 50+ layers of FP16 rounding on random features: within 3 % of the largest logit.
    assert worst_relative_error(original, fp16, feeds) < 3e-2
    assert serialized_size(fp16) < 0.55 * serialized_size(original)
    fp8 = convert_opset(original.clone(), 19)
    make_pass("fp8")(fp8, PassContext(calibration=calibration(fp8, 2)))
    finalize(fp8)
    assert serialized_size(fp8) < 0.3 * serialized_size(original)
    for out in runtime.create_session(fp8).run(None, feeds[0]):
        assert np.isfinite(out).all()
