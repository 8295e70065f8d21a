"""Verification that exported models cannot fool: shapes never invented, held-out data, loud
warnings, the default gate and --strict, end to end through the command line."""

from __future__ import annotations

import html
import json

import jsonschema
import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper, numpy_helper

from onnx_squeeze import analysis, cli, model_io, report, verdict, zoo
from tests.helpers import run
from tests.test_fidelity import _detector


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _shapeless_conv(tmp_path) -> str:
    """A Conv whose input has no shape at all, as some exports ship ``images``."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [
            onnx.ValueInfoProto(
                name="images",
                type=onnx.TypeProto(
                    tensor_type=onnx.TypeProto.Tensor(elem_type=onnx.TensorProto.FLOAT)
                ),
            )
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "shapeless.onnx"
    onnx.save(proto, path)
    return str(path)


@pytest.fixture
def transformer(tmp_path) -> str:
    path = tmp_path / "transformer.onnx"
    model_io.save(zoo.small("transformer"), path)  # input_ids [N, sequence]
    return str(path)


def test_inspect_reports_unknown_macs_with_the_shape_hint_for_a_shapeless_input(tmp_path, capsys):
    path = _shapeless_conv(tmp_path)
    code, out, _ = run_cli(capsys, "inspect", path, "--json", str(tmp_path / "a.json"))
    assert code == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["macs"] is None
    assert any("--shape images:" in note for note in data["notes"])
    assert "unknown" in out
    code, _, _ = run_cli(
        capsys, "inspect", path, "--shape", "images:1x3x8x8", "--json", str(tmp_path / "b.json")
    )
    assert json.loads((tmp_path / "b.json").read_text())["macs"] == 4 * 3 * 9 * 64


def test_symbolic_sequence_length_is_never_set_to_one(transformer, tmp_path, capsys):
    summary = analysis.analyze(transformer)
    assert summary.macs is None and "input_ids[1]" in summary.notes[0]
    code, _, err = run_cli(capsys, "compare", transformer, transformer, "--runs", "1")
    assert code == cli.EXIT_INPUT
    assert "--shape input_ids:1xSEQUENCE" in err and "never guessed" in err
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "compress", transformer, "-o", str(out), "--int8-dynamic")
    assert code == cli.EXIT_INPUT and not out.exists()
    code, _, _ = run_cli(
        capsys,
        "compress",
        transformer,
        "-o",
        str(out),
        "--int8-dynamic",
        "--shape",
        "input_ids:2x24",
        "--runs",
        "1",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["comparison"]["input_shapes"] == {"input_ids": [2, 24]}
    assert data["comparison"]["models"][0]["macs"] > 0


def test_default_dim_is_an_explicit_choice(transformer, tmp_path, capsys):
    code, _, _ = run_cli(
        capsys,
        "compare",
        transformer,
        transformer,
        "--default-dim",
        "16",
        "--runs",
        "1",
        "--json",
        str(tmp_path / "c.json"),
    )
    assert code == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["comparison"]["input_shapes"] == {"input_ids": [1, 16]}


def test_shapes_come_from_the_data(transformer, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ids.npz", input_ids=rng.integers(0, 64, (12, 20)).astype(np.int64))
    code, _, _ = run_cli(
        capsys,
        "compare",
        transformer,
        transformer,
        "--inputs",
        str(tmp_path / "ids.npz"),
        "--runs",
        "1",
        "--json",
        str(tmp_path / "c.json"),
    )
    assert code == 0
    comparison = json.loads((tmp_path / "c.json").read_text())["comparison"]
    assert comparison["input_shapes"] == {"input_ids": [1, 20]}
    assert comparison["models"][0]["macs"] > 0


def _images(path, samples: int) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((samples, 3, 32, 32)).astype(np.float32))
    return str(path)


@pytest.fixture
def small_resnet(tmp_path) -> str:
    path = tmp_path / "resnet.onnx"
    model_io.save(zoo.small("resnet18"), path)
    return str(path)


def _compress(capsys, tmp_path, model: str, *flags: str) -> tuple[int, dict, str]:
    out, json_path = tmp_path / "out.onnx", tmp_path / "run.json"
    out.unlink(missing_ok=True)
    code, _, err = run_cli(
        capsys, "compress", model, "-o", str(out), "--runs", "3", "--json", str(json_path), *flags
    )
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    json_path.unlink(missing_ok=True)
    return code, data, err


def test_calibration_data_is_split_and_evaluation_is_held_out(small_resnet, tmp_path, capsys):
    calib = _images(tmp_path / "calib.npz", 20)
    code, data, _ = _compress(capsys, tmp_path, small_resnet, "--int8", "--calib", calib)
    assert code == 0
    assert "every 5th batch, held out for evaluation" in data["evaluation"]
    assert "4 of every 5 batches" in data["calibration"]
    assert not any("optimistic" in w for w in data["warnings"])
    assert data["comparison"]["fidelity"][0]["samples"] == 4  # batches 5, 10, 15, 20


def test_evaluation_on_the_calibration_data_is_flagged(small_resnet, tmp_path, capsys):
    few = _images(tmp_path / "few.npz", 3)
    code, data, _ = _compress(capsys, tmp_path, small_resnet, "--int8", "--calib", few)
    assert code == 0 and any("optimistic" in w for w in data["warnings"])
    calib = _images(tmp_path / "calib.npz", 20)
    flags = ("--int8", "--calib", calib, "--eval", calib)
    code, data, _ = _compress(capsys, tmp_path, small_resnet, *flags)
    assert any("optimistic" in w for w in data["warnings"])
    held = _images(tmp_path / "eval.npz", 6)
    code, data, _ = _compress(
        capsys, tmp_path, small_resnet, "--int8", "--calib", calib, "--eval", held
    )
    assert data["evaluation"].startswith(held) or held in data["evaluation"]
    assert not any("optimistic" in w for w in data["warnings"])
    assert data["comparison"]["fidelity"][0]["samples"] == 6


def test_random_data_warns_first_and_strict_writes_nothing(small_resnet, tmp_path, capsys):
    code, data, _ = _compress(capsys, tmp_path, small_resnet, "--int8")
    assert code == 0 and (tmp_path / "out.onnx").exists()
    assert "RANDOM" in data["warnings"][0] or "random" in data["warnings"][0]
    code, out, _ = run_cli(
        capsys, "compress", small_resnet, "-o", str(tmp_path / "s.onnx"), "--int8", "--runs", "2"
    )
    assert out.lstrip().startswith("WARNING")  # before any table
    code, data, err = _compress(capsys, tmp_path, small_resnet, "--int8", "--strict")
    assert code == cli.EXIT_GATE and "--strict" in err
    assert not (tmp_path / "out.onnx").exists()


def test_the_default_gate_fails_a_collapsed_detector_only_under_strict(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_detector(np.full(6, -2.0)), a)
    onnx.save(_detector(np.full(6, -5.0)), b)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((8, 8, 50)).astype(np.float32))
    flags = ("--inputs", str(tmp_path / "x.npz"), "--runs", "2", "--json", str(tmp_path / "c.json"))
    code, out, _ = run_cli(capsys, "compare", str(a), str(b), *flags)
    assert code == 0
    data = json.loads((tmp_path / "c.json").read_text())
    (gate,) = data["gates"]  # no classes to take an argmax of: only the value gate applies
    assert gate["default"] and gate["expr"] == "worst_value_channel_sqnr_db>=12"
    assert gate["expr"] in verdict.DEFAULT_GATE and not gate["passed"]
    assert not data["passed"] and "FAIL" in out
    assert data["comparison"]["metrics"]["cosine"] > 0.999
    assert any("SQNR" in w for w in data["warnings"])
    code, _, err = run_cli(capsys, "compare", str(a), str(b), *flags, "--strict")
    assert code == cli.EXIT_GATE and "accuracy gate failed" in err
    code, _, _ = run_cli(capsys, "compare", str(a), str(a), *flags, "--strict", "--runs", "0")
    assert code == 0  # identical, real inputs, no timing (noise on a busy machine): no warning


def test_a_pass_that_changes_nothing_is_a_warning(tmp_path, capsys):
    path = tmp_path / "det.onnx"
    onnx.save(_detector(np.full(6, -2.0)), path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((8, 8, 50)).astype(np.float32))
    flags = ("--prune-weights", "0.5", "--eval", str(tmp_path / "x.npz"))
    code, data, _ = _compress(capsys, tmp_path, str(path), *flags)
    assert code == 0
    assert any("prune_weights changed nothing" in w for w in data["warnings"])


def _latency(a: float, b: float, b_min: float) -> dict:
    return {
        "cpu/t1": [{"median_ms": a, "p90_ms": a}, {"median_ms": b, "p90_ms": b, "min_ms": b_min}]
    }


def test_slower_bigger_and_nonfinite_results_are_warnings():
    output = {"name": "y", "nonfinite_a": 0, "nonfinite_b": 3, "worst_channel_sqnr_db": 50.0}
    comparison = {
        "fidelity": [output],
        "latency": _latency(1.0, 1.5, 1.4),
        "metrics": {"size_ratio": 1.2},
    }
    found = verdict.run_warnings(comparison)
    assert any("SLOWER" in w for w in found)
    assert any("BIGGER" in w for w in found)
    assert any("NaN/inf" in w for w in found)
    # Timing noise: a higher median whose fastest run beats the original's median.
    noisy = {"fidelity": [], "latency": _latency(1.0, 1.1, 0.9), "metrics": {}}
    assert verdict.run_warnings(noisy) == []


def test_the_html_page_opens_with_the_warnings_and_the_json_validates(
    tmp_path, small_resnet, capsys
):
    _, data, _ = _compress(capsys, tmp_path, small_resnet, "--int8")
    schema = json.loads(report.SCHEMA_PATH.read_text())
    jsonschema.validate(data, schema)
    page = report.to_html(data)
    assert page.index("class='warnings'") < page.index("<h2>")
    for warning in data["warnings"]:
        assert html.escape(warning) in page


def _detections(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchors whose best class scores above 0.25, and that class: what a detector's NMS reads."""
    return scores.max(axis=1) > 0.25, scores.argmax(axis=1)


@pytest.mark.parametrize(
    ("flags", "broken"),
    [
        (("--prune-channels", "0.6"), True),
        (("--prune-channels", "0.3"), False),
        (("--prune-weights", "0.1"), False),
    ],
)
def test_the_default_gate_tells_lost_detections_from_kept_ones(flags, broken, tmp_path, capsys):
    """The zoo detector as exporters ship it (pixel boxes concatenated with Sigmoid scores):
    pruning 60 % of its MACs loses more than half of the detections while the whole-output
    cosine stays above 0.95; pruning 30 % (sensitivity and recovery weigh each output channel
    against its own spread; weighed whole, the boxes hid the scores and half the detections
    went) and light weight pruning keep them. The default gate must tell them apart: both its
    conditions fail the first (SQNR 1.6 dB, score decisions 0.31) and hold on the others
    (15.0 dB and 0.90; 27.4 dB and 0.96)."""
    path = tmp_path / "detector.onnx"
    model_io.save(zoo.small("yolo_detect"), path)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((40, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", images=images)
    code, data, _ = _compress(
        capsys, tmp_path, str(path), *flags, "--calib", str(tmp_path / "calib.npz")
    )
    assert code == 0
    held_out = images[4::5]  # the batches the passes did not see
    expected = run(model_io.load(path), {"images": held_out})[0][:, 4:]
    actual = run(model_io.load(tmp_path / "out.onnx"), {"images": held_out})[0][:, 4:]
    (found, label), (kept, kept_label) = _detections(expected), _detections(actual)
    recall = np.count_nonzero(found & kept & (label == kept_label)) / np.count_nonzero(found)
    metrics = data["comparison"]["metrics"]
    gates = {gate["expr"].split(">")[0]: gate for gate in data["gates"]}
    assert all(gate["default"] for gate in gates.values())
    assert all(gate["passed"] for gate in gates.values()) is not broken
    assert gates["score_agreement"]["passed"] is not broken
    if broken:
        assert recall < 0.8 and metrics["cosine"] > 0.95
        assert metrics["score_cosine"] < 0.9
    else:
        assert recall > 0.95 and metrics["score_cosine"] > 0.99


def _softmax_classifier(bias: np.ndarray) -> onnx.ModelProto:
    """x [N, 8] -> MatMul -> Add(bias) -> Softmax over 6 classes (a distribution per row)."""
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(bias.astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 6])],
        [weight, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_default_gate_reads_class_probabilities_by_their_argmax(tmp_path, capsys):
    # A rare class's probability shrinks 4x where it is active (its own SQNR collapses) while
    # the chosen class never changes: kept (as magika's 214-way softmax after pruning). Moving
    # the classes enough to change the choice on more than 2 % of rows fails.
    bias = np.array([0.0, 0.5, -0.5, 0.2, -0.2, -3.0])
    paths = {}
    for name, shift in (("a", 0.0), ("rare", -1.4), ("flip", 1.2)):
        moved = bias + np.array([0, 0, 0, 0, shift if name == "flip" else 0, 0])
        moved[5] += shift if name == "rare" else 0.0
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(_softmax_classifier(moved), paths[name])
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((256, 8)).astype(np.float32))
    flags = ("--inputs", str(tmp_path / "x.npz"), "--runs", "0", "--json", str(tmp_path / "c.json"))
    verdicts = {}
    for name in ("rare", "flip"):
        code, _, _ = run_cli(capsys, "compare", str(paths["a"]), str(paths[name]), *flags)
        assert code == 0
        data = json.loads((tmp_path / "c.json").read_text())
        (output,) = data["comparison"]["fidelity"]
        assert output["class_probabilities"]
        assert "worst_value_channel_sqnr_db" not in data["comparison"]["metrics"]
        (gate,) = data["gates"]
        assert gate["expr"] == "argmax_agreement>=0.98"
        verdicts[name] = (gate["passed"], data["comparison"]["metrics"], data["warnings"])
    passed, metrics, warnings = verdicts["rare"]
    assert passed and metrics["argmax_agreement"] == 1.0
    assert metrics["worst_channel_sqnr_db"] < 10  # what the old default gate failed on
    assert not any("class" in w for w in warnings)
    passed, metrics, warnings = verdicts["flip"]
    assert not passed and metrics["argmax_agreement"] < 0.98
    assert any("top class agrees" in w for w in warnings)


def test_an_agreement_on_too_few_reads_is_flagged(tmp_path, capsys):
    # The same classifier twice: its top class agrees everywhere, but on 6 rows one
    # disagreement would move the agreement by 17 %, so the verdict is flagged as weak; on 64
    # rows it is not.
    path = tmp_path / "a.onnx"
    onnx.save(_softmax_classifier(np.array([0.0, 0.5, -0.5, 0.2, -0.2, -3.0])), path)
    rng = np.random.default_rng(4)
    found = {}
    for rows in (6, 64):
        np.savez(tmp_path / "x.npz", x=rng.standard_normal((rows, 8)).astype(np.float32))
        code, _, _ = run_cli(
            capsys, "compare", str(path), str(path), "--inputs", str(tmp_path / "x.npz"),
            "--runs", "0", "--json", str(tmp_path / "c.json"),
        )  # fmt: skip
        assert code == 0
        data = json.loads((tmp_path / "c.json").read_text())
        (output,) = data["comparison"]["fidelity"]
        assert output["reads"] == rows and output["argmax_agreement"] == 1.0
        found[rows] = [w for w in data["warnings"] if "too few" in w]
    assert len(found[6]) == 1 and "only 6 positions" in found[6][0] and "17%" in found[6][0]
    assert found[64] == []
