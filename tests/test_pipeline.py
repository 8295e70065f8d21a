"""The flow in Python: compress() prepares, runs the passes, compares, gates, saves and reports,
as the CLI does (the CLI only parses options into it and prints what it returns)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_squeeze as sq
from onnx_squeeze import model_io, pipeline, zoo
from onnx_squeeze.errors import SettingsError, UnsupportedModelError


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "mlp.onnx"
    model_io.save(zoo.small("mlp"), path)
    return path


def _pruned(source, out, ratio: float, check: str, **options) -> sq.pipeline.CompressResult:
    """``prune_weights`` at ``ratio`` through the whole flow, judged by ``check``."""
    recipe = sq.Recipe.from_cli([f"prune_weights:ratio={ratio}"])
    return sq.compress(str(source), recipe, output=out, checks=[check], runs=2, **options)


def test_compress_returns_the_comparison_the_gates_the_warnings_and_the_report(mlp_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _pruned(mlp_path, out, 0.3, "cosine>=0.5")
    assert result.passed and result.output == str(out) and out.is_file()
    metrics = result.comparison["metrics"]
    assert 0.5 <= metrics["cosine"] < 1.0  # weights were pruned, so not identical
    assert [g["expr"] for g in result.gates] == ["cosine>=0.5"] and result.gates[0]["passed"]
    # No data was given: judged on random draws, and the first warning says so.
    assert "RANDOM" in result.warnings[0]
    assert result.report["output"] == str(out) and result.report["input"] == str(mlp_path)
    assert json.loads(json.dumps(result.report, default=str))["comparison"]["names"] == [
        "original",
        "compressed",
    ]
    # The result on disk is the model compared: same outputs in onnxruntime.
    feed = next(iter(result.evaluation))
    a = sq.compare(result.model, sq.load(out), feeds=[feed], runs=1).fidelity[0]
    assert a.max_abs == 0.0


def test_a_failed_gate_blocks_and_writes_nothing(mlp_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _pruned(mlp_path, out, 0.9, "cosine>=0.99999")
    assert not result.passed and "cosine>=0.99999" in result.blocking
    assert result.output is None and not out.exists()
    written = _pruned(mlp_path, out, 0.9, "cosine>=0.99999", write_on_fail=True)
    assert written.output == str(out) and out.is_file()


def test_calibration_data_gives_the_shapes_and_is_all_judged_when_no_pass_reads_it(tmp_path):
    """A model with a symbolic sequence length is compared at the data's shapes (never at an
    invented 1); dynamic INT8 without its accuracy control reads no data, so all ten batches
    are unseen and judged on (a data-reading pass is judged on the held-out fifth:
    test_verification)."""
    model = zoo.build("transformer", width=0.25, depth=0.25)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 100, (10, 7)).astype(np.int64))
    result = sq.compress(
        model,
        sq.Recipe.from_cli(["quantize_dynamic:accuracy_control=false"]),
        calibration=str(tmp_path / "calib.npz"),
        runs=2,
    )
    assert result.comparison["input_shapes"] == {"input_ids": [1, 7]}
    assert "no pass read the calibration data" in result.comparison["inputs_label"]
    assert result.comparison["fidelity"][0]["samples"] == 10
    assert not any("RANDOM" in w or "optimistic" in w for w in result.warnings)


def test_options_that_need_the_comparison_are_refused_without_it(mlp_path):
    with pytest.raises(SettingsError, match="comparison"):
        sq.compress(str(mlp_path), checks=["cosine>=0.9"], compare=False)
    with pytest.raises(SettingsError, match="overwrite"):
        sq.compress(str(mlp_path), output=mlp_path)


def _conv_net(opset: int) -> onnx.ModelProto:
    """Conv-Relu-Conv-pool-Gemm exported at ``opset`` (11 and 12 are common for detectors/OCR)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)),
        "w3": rng.normal(0, 0.2, (4, 8)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize("opset", [11, 12])
def test_an_old_opset_is_converted_for_the_pass_that_needs_a_newer_one(opset, tmp_path):
    """INT8 needs opset 13 (per-axis Q/DQ): an opset 11/12 export is converted, and says so."""
    source = tmp_path / "old.onnx"
    onnx.save(_conv_net(opset), source)
    recipe = sq.Recipe.from_cli(["quantize_int8:speed_check=false"])  # INT8 slows this toy
    result = sq.compress(str(source), recipe, output=tmp_path / "q.onnx", runs=2)
    assert model_io.opset_version(result.model) == 13
    assert any(f"converted from opset {opset} to 13" in note for note in result.notes)
    quantized = {node.op_type for node in result.model.graph}
    assert "QuantizeLinear" in quantized  # the pass ran on the converted model
    assert result.comparison["metrics"]["worst_channel_sqnr_db"] > 20
    assert (tmp_path / "q.onnx").is_file()


def test_an_opset_that_cannot_be_converted_is_refused_with_the_reason(tmp_path, monkeypatch):
    source = tmp_path / "old.onnx"
    onnx.save(_conv_net(11), source)

    def fails(*_):
        raise RuntimeError("No Adapter From Version $11 for Conv")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fails)
    with pytest.raises(UnsupportedModelError, match=r"needs opset >= 13.*No Adapter"):
        sq.compress(str(source), sq.Recipe.from_cli(["quantize_int8"]), output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_int8_accuracy_control_aims_at_the_users_check(mlp_path):
    """The user's checks are what INT8's accuracy control works towards (the default gate
    otherwise), every one it can measure while quantizing; one it cannot (latency) is left to
    the gate, and a target the recipe sets stays."""
    result = sq.compress(
        str(mlp_path),
        sq.Recipe.from_cli(["quantize_int8"]),
        checks=["latency_ratio<=2", "top1_agreement>=0.5", "cosine>=0.5"],
        runs=2,
    )
    settings = result.report["recipe"]["passes"][0]
    assert settings["target"] == "top1_agreement>=0.5, cosine>=0.5"
    # every pass with a gate search gets the same aim; the others are left as they were
    recipe = sq.Recipe.from_cli(["prune_channels", "reconstruct", "low_rank", "quantize_int8"])
    aimed = pipeline._aimed_at(recipe, ["cosine>=0.9", "latency_ratio<=2"])
    assert [step.settings.get("target") for step in aimed.steps] == [
        "cosine>=0.9",
        None,
        "cosine>=0.9",
        "cosine>=0.9",
    ]
    # a latency gate bounds INT8's accuracy control; a bound the step sets stays
    assert aimed.steps[3].settings["control_latency_ratio"] == 2.0
    assert "control_latency_ratio" not in aimed.steps[0].settings
    bounded = sq.Recipe.from_cli(["quantize_int8:control_latency_ratio=0.5"])
    kept = pipeline._aimed_at(bounded, ["latency_ratio<=0.8", "latency_ratio<0.7"])
    assert kept.steps[0].settings["control_latency_ratio"] == 0.5
    loose = pipeline._aimed_at(sq.Recipe.from_cli(["quantize_int8"]), ["latency<=0.8"])
    assert loose.steps[0].settings == {"control_latency_ratio": 0.8}
    own = sq.Recipe.from_cli(["quantize_int8:target=cosine>=0.9"])
    result = sq.compress(str(mlp_path), own, checks=["top1_agreement>=0.5"], runs=2)
    assert result.report["recipe"]["passes"][0]["target"] == "cosine>=0.9"


def _near_tie_classifier() -> onnx.ModelProto:
    """Two logits that differ only by -0.002·x0: INT8 weights (per column, scaled by its largest
    value, 1) round both columns to ones, so the logits tie and argmax reads class 0; every
    sample that the original put in class 1 (x0 < 0) flips."""
    weight = np.ones((8, 2), np.float32)
    weight[0, 1] -= 0.002
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head")],
        "tie",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _int8_on_ties(tmp_path, ties: int) -> sq.pipeline.CompressResult:
    """INT8 of the near-tie classifier on ten samples: the two held out (every 5th) are class 0
    and keep it; ``ties`` of the eight seen ones are class 1 by a hair and flip."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (10, 8)).astype(np.float32)
    x[:, 0] = 1.0  # class 0 in both models
    x[[i for i in range(10) if i % 5 != 4][:ties], 0] = -1.0  # class 1 by 0.002: ties after INT8
    np.savez(tmp_path / "calib.npz", x=x)
    recipe = sq.Recipe.from_cli(["quantize_int8:accuracy_control=false,speed_check=false"])
    return sq.compress(
        _near_tie_classifier(), recipe, calibration=str(tmp_path / "calib.npz"), runs=1
    )


def test_too_few_held_out_reads_are_backed_by_the_data_the_passes_saw(tmp_path):
    """Two held-out reads cannot tell, so the gates are also checked on the eight seen ones,
    where the result fails (figures there are optimistic); one flip among eight is no evidence."""
    result = _int8_on_ties(tmp_path, ties=8)
    assert result.comparison["metrics"]["argmax_agreement"] == 1.0  # 2 of 2 held out agree
    assert any("only 2 positions" in w for w in result.warnings)
    seen = result.comparison["seen"]
    assert "seen by the passes" in seen["inputs_label"]
    assert seen["metrics"]["argmax_agreement"] < 0.5
    assert any("on the data the passes saw (8 reads)" in note for note in result.notes)
    failed = [g for g in result.gates if not g["passed"]]
    assert failed and all(g["seen"] for g in failed) and not result.report["passed"]
    assert "argmax_agreement" in failed[0]["expr"]
    one = _int8_on_ties(tmp_path, ties=1)
    assert one.comparison["seen"]["metrics"]["argmax_agreement"] == 7 / 8
    assert one.report["passed"] and not any(g.get("seen") for g in one.gates)
