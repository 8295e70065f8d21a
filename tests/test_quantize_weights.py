"""Weight-only quantization: block codecs and GPTQ, MatMulNBits / blocked DequantizeLinear
graphs, codebook weights folded by onnxruntime."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import runtime, zoo
from onnx_squeeze.errors import SettingsError, UnsupportedModelError
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import weight_codecs
from onnx_squeeze.records import PassContext
from tests.helpers import assert_same_outputs, check, random_feeds, run

RNG = np.random.default_rng(0)


@functools.cache
def _zoo_once(name: str) -> ir.Model:
    return zoo.small(name)


def _zoo(name: str) -> ir.Model:
    """A small zoo model as exported (not prepared: passes must not need it), a fresh copy."""
    return _zoo_once(name).clone()


def _apply(model: ir.Model, name: str, calibration=None, **settings):
    """``model`` through the pass, every weight quantized (accuracy control off: the encoding
    is under test; tests/test_weight_control.py covers the control)."""
    if name in ("quantize_weights", "quantize_dynamic"):
        settings.setdefault("accuracy_control", False)
    student = model.clone()
    report = make_pass(name, settings)(student, PassContext(calibration=calibration))
    return student, report


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _with_weights(model: ir.Model, arrays: dict[str, np.ndarray]) -> ir.Model:
    """A copy of ``model`` whose named initializers hold ``arrays``."""
    copy = model.clone()
    for name, array in arrays.items():
        copy.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32), name=name)
    return copy


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _parse(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    """A model from onnx's text format, with ``weights`` as float32 initializers; nodes are
    named ``<op>_<index>``."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(array.astype(np.float32), name)
        for name, array in weights.items()
    )
    model = ir.from_proto(proto)
    for index, node in enumerate(model.graph):
        node.name = f"{node.op_type}_{index}"
    return model


def _linear_model(opset: int = 17) -> ir.Model:
    """MatMul on 3-D input, Gemm(transB=1, alpha, bias), Gemm(transB=0), K not a block multiple."""
    text = f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    linear (float[N, 4, 100] x) => (float[N, 24] y) {{
        h = MatMul(x, w1)
        f = Flatten<axis=1>(h)
        g = Gemm<transB=1, alpha=0.5, beta=2.0>(f, w2, b2)
        y = Gemm(g, w3)
    }}
    """
    weights = {
        "w1": RNG.standard_normal((100, 40)),
        "w2": RNG.standard_normal((48, 160)) / 10,
        "b2": RNG.standard_normal(48),
        "w3": RNG.standard_normal((48, 24)) / 5,
    }
    return _parse(text, weights)


def _dequantized(model: ir.Model, bits: int, block: int, symmetric: bool) -> dict:
    """Round-to-nearest dequantized weights of ``_linear_model`` (stored layout)."""
    out = {}
    for name, transposed in (("w1", True), ("w2", False), ("w3", True)):
        array = model.graph.initializers[name].const_value.numpy()
        matrix = array.T if transposed else array
        weight = weight_codecs.quantize_blocks(matrix, bits, block, symmetric).dequantize()
        out[name] = weight.T if transposed else weight
    return out


# ---------------------------------------------------------------------------------------------
# codecs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_rounding_error_within_one_step(bits, symmetric):
    weight = RNG.standard_normal((16, 70)).astype(np.float32)
    quantized = weight_codecs.quantize_blocks(weight, bits, 32, symmetric)
    step = np.repeat(np.abs(quantized.scales), 32, axis=1)[:, :70]
    error = np.abs(quantized.dequantize() - weight)
    bound = step if symmetric else step / 2  # symmetric clips the side opposite the extreme
    assert np.all(error <= bound * (1 + 1e-5) + 1e-7)
    assert quantized.codes.max() < 2**bits


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    mixing = RNG.standard_normal((64, 64))
    inputs = RNG.standard_normal((2048, 64)) @ mixing  # strongly correlated features
    weight = RNG.standard_normal((32, 64)).astype(np.float32)
    hessian = inputs.T @ inputs
    rtn = weight_codecs.quantize_blocks(weight, 4, 32, False).dequantize()
    gptq = weight_codecs.quantize_blocks_gptq(weight, hessian, 4, 32, False).dequantize()
    error_rtn = np.linalg.norm(inputs @ (rtn - weight).T)
    error_gptq = np.linalg.norm(inputs @ (gptq - weight).T)
    assert error_gptq < 0.8 * error_rtn


def test_codebook_levels():
    levels = weight_codecs.power_of_two_levels(4)
    assert len(levels) == 15 and levels[7] == 0 and np.all(np.diff(levels) > 0)
    assert set(np.abs(levels[levels != 0])) == {2.0**-j for j in range(7)}
    rows = RNG.standard_normal((8, 300)).astype(np.float32)
    pow2 = weight_codecs.fit_codebook(rows, "pow2", 4, per_channel=True)
    normalized = pow2.decode() / pow2.scales[:, None]
    assert np.all(np.isin(normalized, levels))
    kmeans = weight_codecs.fit_codebook(rows, "kmeans", 3, per_channel=False)
    assert len(kmeans.levels) == 8 and kmeans.scales is None
    uniform = np.linspace(rows.min(), rows.max(), 8)
    uniform_error = np.abs(uniform[weight_codecs.nearest_level(rows, uniform)] - rows).mean()
    assert np.abs(kmeans.decode() - rows).mean() < uniform_error  # k-means beats a grid


# ---------------------------------------------------------------------------------------------
# quantize_weights


@pytest.mark.parametrize(
    ("bits", "block", "symmetric"), [(4, 32, False), (4, 64, True), (8, 32, False)]
)
def test_matmulnbits_matches_dequantized_float_model(bits, block, symmetric):
    model = _linear_model()
    student, report = _apply(
        model, "quantize_weights", bits=bits, block_size=block, symmetric=symmetric
    )
    assert _ops(student) == ["MatMulNBits", "Flatten", "MatMulNBits", "MatMulNBits"]
    assert [n.name for n in student.graph] == [n.name for n in model.graph]
    assert len(report.changed) == 3 and not report.skipped
    check(student)
    feeds = random_feeds(model, count=2)
    reference = _with_weights(model, _dequantized(model, bits, block, symmetric))
    assert_same_outputs(reference, student, feeds, rtol=1e-4, atol=1e-5)
    # INT4 blocks of Gaussian weights: step ≈ 4.8σ/15, ~10% weight noise per layer, 3 layers
    cosine = min(_cosine(run(model, f)[0], run(student, f)[0]) for f in feeds)
    assert cosine > (0.98 if bits == 4 else 0.9999)


def test_blocked_dequantize_linear_format():
    model = _linear_model(opset=21)
    student, _ = _apply(model, "quantize_weights", format="dequantizelinear")
    assert _ops(student).count("DequantizeLinear") == 3
    assert _ops(student).count("Gemm") == 2 and _ops(student).count("MatMul") == 1
    dequantize = next(n for n in student.graph if n.op_type == "DequantizeLinear")
    assert dequantize.inputs[0].dtype == ir.DataType.UINT4
    assert dequantize.attributes["block_size"].value == 32
    check(student)
    reference = _with_weights(model, _dequantized(model, 4, 32, False))
    assert_same_outputs(reference, student, random_feeds(model, count=2))
    with pytest.raises(UnsupportedModelError, match="target-opset 21"):
        _apply(_linear_model(opset=17), "quantize_weights", format="dequantizelinear")


def test_shared_weight_quantized_once_and_foreign_use_skipped():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    shared (float[N, 64] x) => (float[N, 64] y, float[64, 64] z) {
        a = MatMul(x, w)
        b = MatMul(a, w)
        y = MatMul(b, v)
        z = Add(v, v)
    }
    """
    model = _parse(text, {name: RNG.standard_normal((64, 64)) / 8 for name in ("w", "v")})
    student, report = _apply(model, "quantize_weights")
    assert _ops(student) == ["MatMulNBits", "MatMulNBits", "MatMul", "Add"]
    first, second = (n for n in student.graph if n.op_type == "MatMulNBits")
    assert first.inputs[1] is second.inputs[1]
    assert "w" not in student.graph.initializers
    assert len(report.skipped) == 1 and "also read by" in report.skipped[0].detail
    check(student)
    feeds = random_feeds(model, count=1)
    outputs = zip(run(model, feeds[0]), run(student, feeds[0]), strict=True)
    assert all(_cosine(a, b) > 0.99 for a, b in outputs)


def test_transformer_gptq_beats_rtn():
    model = _zoo("transformer")
    specs = runtime.input_specs(model)
    rng = np.random.default_rng(1)
    # 8 x 4 x 16 = 512 rows: more than the widest input (128 features), a full-rank Hessian
    feeds = [runtime.random_feed(specs, rng, {"input_ids": (4, 16)}) for _ in range(12)]
    calibration, held_out = feeds[:8], feeds[8:]
    rtn, report = _apply(model, "quantize_weights", symmetric=True)
    gptq = model.clone()
    context = PassContext(calibration=calibration)
    gptq_settings = {"symmetric": True, "algorithm": "gptq", "accuracy_control": False}
    make_pass("quantize_weights", gptq_settings)(gptq, context)
    assert len(report.changed) == 14 and all(
        r.detail == "input 1 is not a constant weight" for r in report.skipped
    )
    check(gptq)
    # one Hessian per distinct input (Q/K/V share one; 4 per layer, pooler, classifier)
    grams = list(context.data.store(model, "grams", 32, None).values())  # 32 batches, all rows
    assert len(grams) == 2 * 4 + 2
    assert sorted(moments.rows for moments in grams) == [32, 32] + [512] * 8  # pooled: token 0

    def error(student: ir.Model) -> float:
        return sum(float(np.square(run(model, f)[1] - run(student, f)[1]).mean()) for f in held_out)

    assert error(gptq) < 0.5 * error(rtn)


def test_settings_and_missing_calibration():
    for bad in ({"bits": 3}, {"block_size": 48}, {"format": "qdq"}, {"algorithm": "awq"}):
        with pytest.raises(SettingsError):
            make_pass("quantize_weights", bad)
    with pytest.raises(SettingsError, match="calibration"):
        _apply(_linear_model(), "quantize_weights", algorithm="gptq")


def test_no_linear_layers_is_a_no_op():
    model = ir.from_proto(
        onnx.parser.parse_model(
            '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }'
        )
    )
    for name in ("quantize_weights", "codebook"):
        student, report = _apply(model, name)
        assert _ops(student) == ["Relu"] and not report.records


# ---------------------------------------------------------------------------------------------
# codebook


def _optimized_ops(model: ir.Model) -> list[str]:
    """Op types (sorted) of the graph onnxruntime runs after its basic optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        runtime.create_session(model, optimization="basic", optimized_model_path=path)
        return sorted(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize(
    ("levels", "bits", "per_channel"),
    [("kmeans", 4, True), ("pow2", 4, False), ("kmeans", 8, True)],
)
def test_codebook_on_resnet_is_exact_and_folds(levels, bits, per_channel):
    model = _zoo("resnet50")
    student, report = _apply(model, "codebook", levels=levels, bits=bits, per_channel=per_channel)
    check(student)
    assert len(report.changed) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph) - len(
        report.skipped
    )
    assert _optimized_ops(student) == _optimized_ops(model)  # every decode node folded away
    decoded = {}
    for node in model.graph:
        weight = node.inputs[1] if node.op_type in ("Conv", "Gemm") else None  # [Cout, ...]
        if weight is None or weight.name in student.graph.initializers:
            continue
        array = weight.const_value.numpy()
        rows = array.reshape(array.shape[0] if per_channel else 1, -1)
        codebook = weight_codecs.fit_codebook(rows, levels, bits, per_channel)
        decoded[weight.name] = codebook.decode().reshape(array.shape)
    assert decoded
    feeds = random_feeds(model, count=2)
    assert_same_outputs(_with_weights(model, decoded), student, feeds, rtol=1e-3, atol=1e-4)


def test_codebook_on_transformer_matmul_layout():
    model = _zoo("transformer")
    student, report = _apply(model, "codebook", bits=8)
    assert len(report.changed) == 13  # 12 MatMul + pooler; the 10-class head is too small
    reasons = {r.detail.split(" (")[0] for r in report.skipped}
    assert reasons == {"no constant weight", "too small for a codebook"}
    check(student)
    assert "Gather" in _ops(student) and "Transpose" in _ops(student)
    assert _optimized_ops(student) == _optimized_ops(model)
    for feed in random_feeds(model, count=2):
        for a, b in zip(run(model, feed), run(student, feed), strict=True):
            assert np.all(np.isfinite(b)) and _cosine(a, b) > 0.999


@pytest.mark.parametrize(("bits", "ratio"), [(8, 3.8), (4, 7.4)])
def test_codebook_file_size(bits, ratio):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    big (float[N, 512] x) => (float[N, 256] y) { y = MatMul(x, w) }
    """
    model = _parse(text, {"w": RNG.standard_normal((512, 256))})
    student, _ = _apply(model, "codebook", bits=bits)
    before = len(ir.to_proto(model).SerializeToString())
    after = len(ir.to_proto(student).SerializeToString())
    assert before / after > ratio


def test_weights_inside_if_branches_are_encoded_once():
    """An If whose branches both read an outer weight and one holds its own: every MatMul is
    encoded, the outer weight once for both branches, the inner one in its own branch; the
    result passes the checker and runs both ways."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    branchy (bool c, float[N, 64] x) => (float[N, 32] y) {
        y = If(c) <
            then_branch = then_graph () => (float[N, 32] t) {
                h = MatMul(x, w)
                t = MatMul(h, inner)
            },
            else_branch = else_graph () => (float[N, 32] e) { e = MatMul(x, w) }
        >
    }
    """
    model = _parse(text, {"w": RNG.standard_normal((64, 32))})
    then_branch = model.graph.node(0).attributes["then_branch"].value
    inner = ir.Value(name="inner", const_value=ir.tensor(RNG.standard_normal((32, 32), np.float32)))
    then_branch.register_initializer(inner)
    then_branch.node(1).replace_input_with(1, inner)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    for name, op in (("quantize_weights", "MatMulNBits"), ("codebook", "MatMul")):
        student, report = _apply(model, name)
        assert len(report.changed) == 3 and not report.skipped and not report.notes
        assert "w" not in student.graph.initializers
        branches = [
            student.graph.node(-1).attributes[b].value for b in ("then_branch", "else_branch")
        ]
        assert "inner" not in branches[0].initializers and branches[0].initializers  # encoded there
        assert [n.op_type for n in branches[0]][-2:] == [op, op]
        assert [n.op_type for n in branches[1]] == [op]
        check(student)
        for condition in (True, False):
            feed = {"c": np.array(condition), "x": x}
            assert _cosine(run(model, feed)[0], run(student, feed)[0]) > 0.99
    feeds = [{"c": np.array(True), "x": x}] * 2
    _, report = _apply(model, "quantize_weights", calibration=feeds, algorithm="gptq")
    assert len(report.changed) == 3 and all("rounded to nearest" in n for n in report.notes)
