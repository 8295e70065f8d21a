"""The command line: every subcommand end to end, exit codes, and bad input handled cleanly.

Bad input must give one line on stderr (no traceback without --debug), exit code 1, the input
file untouched and no output (not even a temporary file) left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jsonschema
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper, parser

from onnx_squeeze import cli, model_io, report, runtime, verdict, zoo
from onnx_squeeze.passes import base


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def small_resnet(tmp_path):
    path = tmp_path / "resnet.onnx"
    model_io.save(zoo.small("resnet18"), path)
    return path


def matmul_proto(opset: int = 17) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def custom_domain_proto() -> onnx.ModelProto:
    proto = matmul_proto()
    proto.graph.node.append(
        helper.make_node("Frobnicate", ["y"], ["z"], name="frob", domain="com.acme")
    )
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("com.acme", 1))
    return proto


def empty_graph_proto() -> onnx.ModelProto:
    return helper.make_model(
        helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)]
    )


BAD_INPUTS = {
    "not_onnx": (
        lambda path: path.write_text("hello, I am a text file\n"),
        "not a valid ONNX protobuf",
    ),
    "truncated": (
        lambda path: path.write_bytes(ir.to_proto(zoo.small("mlp")).SerializeToString()[:300]),
        "not a valid ONNX protobuf",
    ),
    "git_lfs": (
        lambda path: path.write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"
        ),
        "git lfs pull",
    ),
    "empty_graph": (lambda path: onnx.save(empty_graph_proto(), path), "no nodes"),
    "custom_domain": (
        lambda path: onnx.save(custom_domain_proto(), path),
        "custom domain 'com.acme'",
    ),
    "empty_file": (lambda path: path.write_bytes(b""), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_1_nothing_written(tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    source = tmp_path / "in.onnx"
    make(source)
    before = source.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "compress", str(source), "-o", str(out_dir / "o.onnx"))
    assert code == cli.EXIT_INPUT
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert source.read_bytes() == before
    assert os.listdir(out_dir) == []


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing.onnx"))
    assert code == cli.EXIT_INPUT and "no such file" in err


def test_usage_error_is_exit_1(capsys):
    code, _, err = run_cli(capsys, "compress", "model.onnx")
    assert code == cli.EXIT_INPUT and "-o/--output" in err


def test_refuses_to_overwrite_input(small_resnet, capsys):
    before = small_resnet.read_bytes()
    code, _, err = run_cli(capsys, "compress", str(small_resnet), "-o", str(small_resnet))
    assert code == cli.EXIT_INPUT and "--force" in err
    assert small_resnet.read_bytes() == before


def test_compress_empty_recipe_writes_valid_model_and_reports(small_resnet, tmp_path, capsys):
    out, js, page = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.html"
    code, stdout, err = run_cli(
        capsys,
        "compress",
        str(small_resnet),
        "-o",
        str(out),
        "--runs",
        "3",
        "--json",
        str(js),
        "--report",
        str(page),
        "--check",
        "cosine>=0.999",
        "--check",
        "top1_agreement>=0.99",
    )
    assert code == cli.EXIT_OK, err
    assert "fidelity" in stdout and "prepare" in stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(js.read_text())
    jsonschema.validate(data, json.loads(report.SCHEMA_PATH.read_text()))
    assert data["passed"] and data["output"] == str(out)
    assert data["comparison"]["metrics"]["cosine"] > 0.999
    assert "<table>" in page.read_text()
    # dynamic batch kept
    assert model_io.load(out).graph.inputs[0].shape[0] == ir.SymbolicDim("N")


def test_gate_failure_is_exit_3_and_writes_nothing(small_resnet, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    failing = (
        "compress",
        str(small_resnet),
        "-o",
        str(out),
        "--runs",
        "2",
        "--check",
        "max_abs_error<0",
    )
    code, _, err = run_cli(capsys, *failing)
    assert code == cli.EXIT_GATE and "gate failed" in err
    assert not out.exists()
    code, _, _ = run_cli(capsys, *failing, "--write-on-fail")
    assert code == cli.EXIT_GATE and out.exists()


def test_bad_gate_fails_before_any_work(small_resnet, tmp_path, capsys):
    code, _, _ = run_cli(
        capsys,
        "compress",
        str(small_resnet),
        "-o",
        str(tmp_path / "o.onnx"),
        "--check",
        "accuracy>>1",
    )
    assert code == cli.EXIT_INPUT
    assert not (tmp_path / "o.onnx").exists()


@dataclasses.dataclass
class _Empty:
    pass


class _NeedsOpset19(base.Pass):
    name = "test_needs_opset19"
    Settings = _Empty
    min_opset = 19

    def apply(self, model, context, report):
        report.notes.append("ran")


class _Crashes(base.Pass):
    name = "test_crashes"
    Settings = _Empty

    def apply(self, model, context, report):
        raise RuntimeError("boom in a pass")


@pytest.fixture
def test_passes():
    base.register(_NeedsOpset19)
    base.register(_Crashes)
    yield
    base.PASS_REGISTRY.pop(_NeedsOpset19.name)
    base.PASS_REGISTRY.pop(_Crashes.name)


def test_opset_too_old_for_a_pass_is_converted(tmp_path, capsys, test_passes):
    source = tmp_path / "m.onnx"
    onnx.save(matmul_proto(opset=13), source)
    code, out, err = run_cli(
        capsys,
        "compress",
        str(source),
        "-o",
        str(tmp_path / "o.onnx"),
        "--pass",
        "test_needs_opset19",
        "--runs",
        "2",
    )
    assert code == cli.EXIT_OK, err
    assert "converted from opset 13 to 19" in out
    assert model_io.opset_version(model_io.load(tmp_path / "o.onnx")) == 19
    code, _, err = run_cli(
        capsys,
        "compress",
        str(source),
        "-o",
        str(tmp_path / "o2.onnx"),
        "--pass",
        "test_needs_opset19",
        "--target-opset",
        "19",
        "--runs",
        "2",
    )
    assert code == cli.EXIT_OK, err
    assert model_io.opset_version(model_io.load(tmp_path / "o2.onnx")) == 19


def test_internal_error_is_exit_2_with_traceback_only_in_debug(
    small_resnet, tmp_path, capsys, test_passes
):
    argv = ["compress", str(small_resnet), "-o", str(tmp_path / "o.onnx"), "--pass", "test_crashes"]
    code, _, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_INTERNAL and "boom in a pass" in err and "Traceback" not in err
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
        code, _, err = run_cli(capsys, *debug_argv)
        assert code == cli.EXIT_INTERNAL and "Traceback" in err
    assert not (tmp_path / "o.onnx").exists()


def if_model_proto() -> onnx.ModelProto:
    return parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool cond) => (float[N, 4] y) {
            y = If (cond) <
                then_branch = t () => (float[N, 4] a) { a = Relu (x) },
                else_branch = e () => (float[N, 4] b) { b = Neg (x) }
            >
        }
        """
    )


def test_model_with_subgraphs_is_kept_working(tmp_path, capsys):
    """The branch condition is a bool scalar: random data would invent it, so compress asks
    for it (one line, nothing written) and runs with --set."""
    source = tmp_path / "if.onnx"
    onnx.save(if_model_proto(), source)
    args = ["compress", str(source), "-o", str(tmp_path / "o.onnx"), "--runs", "2"]
    code, _, err = run_cli(capsys, *args)
    assert code == cli.EXIT_INPUT and not (tmp_path / "o.onnx").exists()
    assert "input 'cond' is a bool scalar" in err and "--set cond=VALUE" in err
    code, stdout, err = run_cli(capsys, *args, "--set", "cond=false")
    assert code == cli.EXIT_OK, err
    assert "subgraphs" in stdout
    session = runtime.create_session(tmp_path / "o.onnx")
    x = np.array([[1, -2, 3, -4]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x, "cond": np.array(False)})[0], -x)


def test_symbolic_dims_preserved(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(matmul_proto(), source)
    code, _, err = run_cli(
        capsys,
        "compress",
        str(source),
        "-o",
        str(tmp_path / "o.onnx"),
        "--runs",
        "2",
        "--batch",
        "3",
    )
    assert code == cli.EXIT_OK, err
    out = model_io.load(tmp_path / "o.onnx")
    assert str(out.graph.inputs[0].shape[0]) == "batch"
    assert str(out.graph.outputs[0].shape[0]) == "batch"


def test_inspect_and_compare_and_bench(small_resnet, tmp_path, capsys):
    code, stdout, _ = run_cli(
        capsys, "inspect", str(small_resnet), "--json", str(tmp_path / "i.json")
    )
    assert code == cli.EXIT_OK
    assert "Conv" in stdout and "MACs" in stdout
    assert json.loads((tmp_path / "i.json").read_text())["macs"] > 0
    code, stdout, _ = run_cli(
        capsys,
        "compare",
        str(small_resnet),
        str(small_resnet),
        "--runs",
        "2",
        "--check",
        "cosine>=0.9999",
    )
    assert code == cli.EXIT_OK and "fidelity" in stdout
    code, stdout, err = run_cli(
        capsys, "bench", str(small_resnet), "zoo:mlp", "--runs", "2", "--providers", "cpu,cuda"
    )
    assert code == cli.EXIT_OK, err
    assert "cuda" in stdout.lower()


def test_zoo_command(tmp_path, capsys):
    code, _, _ = run_cli(capsys, "zoo", "mlp", "-o", str(tmp_path / "mlp.onnx"))
    assert code == cli.EXIT_OK
    onnx.checker.check_model(onnx.load(tmp_path / "mlp.onnx"), full_check=True)
    code, _, err = run_cli(capsys, "zoo", "nosuch", "-o", str(tmp_path / "x.onnx"))
    assert code == cli.EXIT_INPUT and "resnet18" in err


def test_demo_prunes_recovers_and_quantizes(tmp_path, capsys):
    argv = ("demo", "--out", str(tmp_path), "--runs", "2", "--width", "0.25")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_OK, err
    assert (tmp_path / "resnet18.squeezed.onnx").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] == report["gates"][0]["passed"]
    assert [p["name"] for p in report["passes"]] == [
        "prepare",
        "prune_channels",
        "reconstruct",
        "quantize_int8",
    ]
    metrics = report["comparison"]["metrics"]
    assert metrics["macs_ratio"] <= 0.72 and metrics["size_ratio"] < 0.3
    # on random images the passes did not see; pruning and recovery weigh each logit against
    # its own spread, which on this tiny random model costs some whole-output cosine (0.94 ->
    # 0.87; full-size ResNet-18 keeps 0.96)
    assert metrics["cosine"] >= 0.85
    assert "latency" in stdout
    assert "RANDOM" in report["warnings"][0] and stdout.lstrip().startswith("onnx-squeeze demo")
    # a classifier's logits: the default gate's argmax and value conditions both apply
    assert [(g["expr"], g["default"]) for g in report["gates"]] == [
        ("argmax_agreement>=0.98", True),
        ("worst_value_channel_sqnr_db>=12", True),
    ]


def test_inspect_groups_lists_prunable_and_frozen_groups(small_resnet, tmp_path, capsys):
    out = tmp_path / "groups.json"
    code, stdout, _ = run_cli(capsys, "inspect", str(small_resnet), "--groups", "--json", str(out))
    assert code == cli.EXIT_OK
    assert "prunable" in stdout and "frozen" in stdout
    groups = json.loads(out.read_text())["channel_groups"]
    frozen = [g for g in groups if g["frozen"]]
    assert frozen and all("graph output" in g["frozen"] for g in frozen)
    assert len(groups) - len(frozen) >= 8


def test_inspect_groups_are_those_of_the_prepared_model(tmp_path, capsys):
    """A bias behind an Identity (how torch writes deduplicated parameters) freezes its group
    in the file as written; prepare folds it, and compress prunes the group: inspect says so."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    initializers = [
        onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (8, 4, 1, 1)), ("b", (8, 1, 1)), ("w2", (4, 8, 1, 1)))
    ]
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        h.make_node("Identity", ["b"], ["bias"], name="dedup"),
        h.make_node("Add", ["c", "bias"], ["a"], name="add"),
        h.make_node("Relu", ["a"], ["r"], name="relu"),
        h.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 4, 4, 4]) for n in "xy"]
    graph = h.make_graph(nodes, "g", io[:1], io[1:], initializers)
    path = tmp_path / "identity_bias.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    out = tmp_path / "groups.json"
    code, stdout, _ = run_cli(capsys, "inspect", str(path), "--groups", "--json", str(out))
    assert code == cli.EXIT_OK and "prepared model" in stdout
    groups = json.loads(out.read_text())["channel_groups"]
    assert [g["frozen"] for g in groups if g["producers"] == ["conv1"]] == [None]


def test_shortcut_flags_compress_and_report(small_resnet, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(
        capsys,
        "compress",
        str(small_resnet),
        "-o",
        str(out),
        "--prune-channels",
        "0.3",
        "--int8",
        "--calib",
        "random",
        "--calib-count",
        "8",
        "--runs",
        "2",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == cli.EXIT_OK, err
    passes = [p["name"] for p in json.loads((tmp_path / "r.json").read_text())["passes"]]
    assert passes == ["prepare", "prune_channels", "reconstruct", "quantize_int8"]
    assert out.is_file()


def test_a_slower_untimed_int8_result_points_to_the_speed_check():
    from onnx_squeeze.recipe import Step

    slower = {"metrics": {"latency_ratio": 1.25}}
    untimed = Step("quantize_int8", {"speed_check": False})
    hint = verdict.speed_hint([Step("prune_channels"), untimed], slower)
    assert len(hint) == 1 and "1.25x" in hint[0] and "--int8-no-speed-check" in hint[0]
    # INT8 timed itself (the default, or the full search): it already fell back where slower
    assert verdict.speed_hint([Step("quantize_int8")], slower) == []
    assert verdict.speed_hint([Step("quantize_int8", {"speed_check": True})], slower) == []
    assert verdict.speed_hint([untimed], {"metrics": {"latency_ratio": 0.6}}) == []
    assert verdict.speed_hint([Step("fp16")], slower) == []
    assert verdict.speed_hint([untimed], None) == []


def test_running_out_of_memory_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    def exhausted(args):
        raise MemoryError

    monkeypatch.setitem(cli.COMMANDS, "inspect", exhausted)
    code, out, err = run_cli(capsys, "inspect", "zoo:mlp")
    assert code == cli.EXIT_INPUT and not out
    assert err.strip().count("\n") == 0 and "ran out of memory" in err
