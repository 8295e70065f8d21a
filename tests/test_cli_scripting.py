"""The CLI as scripts and CI logs use it: discoverable settings (``passes``), shapes as onnxsim
writes them, logging levels, progress lines where no terminal is, ``--json -`` on a clean
stdout, a reproducible record of the run, tables that are never cut."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_squeeze import cli, log, pass_docs, progress, report
from onnx_squeeze.passes import base, load_all

# Settings nothing documents yet (no comment beside or above the field, no clause in the
# settings docstring): this list may only shrink, and a new setting must come documented.
UNDOCUMENTED: set[tuple[str, str]] = set()

LONG_NAME = "backbone.stage4.block3.attention.output_projection.weight_layer_with_a_long_name"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def symbolic_proto() -> onnx.ModelProto:
    """One MatMul with a long name; the input has lowercase symbolic dims (batch, seq)."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name=LONG_NAME)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def symbolic(tmp_path):
    path = tmp_path / "symbolic.onnx"
    onnx.save(symbolic_proto(), path)
    return path


# ------------------------------------------------------------------------ passes


def test_passes_lists_every_pass_and_setting_with_type_default_values_and_doc(capsys):
    load_all()
    code, out, _ = run_cli(capsys, "passes", "--json", "-")
    assert code == 0
    listed = {item["name"]: item for item in json.loads(out)["passes"]}
    assert set(listed) == set(base.PASS_REGISTRY)
    for name, cls in base.PASS_REGISTRY.items():
        fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
        settings = {s["name"]: s for s in listed[name]["settings"]}
        assert list(settings) == list(fields), name  # every setting, in declaration order
        defaults = cls.Settings()
        for key, setting in settings.items():
            assert setting["default"] == getattr(defaults, key), (name, key)
            assert setting["type"], (name, key)
    ratio = {s["name"]: s for s in listed["prune_weights"]["settings"]}["ratio"]
    assert ratio["type"] == "float" and ratio["values"] == "in [0, 1)"
    assert "share of weights pruned" in ratio["doc"]
    method = {s["name"]: s for s in listed["quantize_int8"]["settings"]}["method"]
    assert method["values"].startswith("one of ") and "mse" in method["values"]


def test_every_setting_is_documented_where_it_is_declared():
    undocumented = {
        (item.name, setting.name)
        for item in pass_docs.all_passes()
        for setting in item.settings
        if not setting.doc
    }
    assert undocumented <= UNDOCUMENTED, (
        f"document these settings (a comment beside the field): {undocumented - UNDOCUMENTED}"
    )
    assert undocumented >= UNDOCUMENTED, (
        f"now documented, remove from UNDOCUMENTED: {UNDOCUMENTED - undocumented}"
    )


def test_field_metadata_doc_comes_first():
    @dataclasses.dataclass
    class Settings:
        ratio: float = dataclasses.field(default=0.5, metadata={"doc": "from metadata"})  # beside
        # above
        steps: int = base.bounded(3, low=1)

    class Fake(base.Pass):
        name = "fake"

        def apply(self, model, context, report):  # pragma: no cover - never run
            pass

    Fake.Settings = Settings
    docs = {s.name: s for s in pass_docs.describe(Fake).settings}
    assert docs["ratio"].doc == "from metadata"
    assert docs["steps"].doc == "above" and docs["steps"].values == "at least 1"


def test_passes_with_a_name_shows_that_pass_and_an_unknown_name_is_exit_1(capsys):
    code, out, _ = run_cli(capsys, "passes", "prune_weights")
    assert code == 0 and "prune_weights" in out and "quantize_int8" not in out
    assert "min_params" in out and "1024" in out
    assert "key=[a,b]" in out  # markup characters printed as written
    code, _, err = run_cli(capsys, "passes", "no_such_pass")
    assert code == 1 and "unknown pass 'no_such_pass'" in err and "prune_weights" in err


# ------------------------------------------------------------------------ options


@pytest.mark.parametrize("text", ["x:1x3x224x224", "x:1,3,224,224", "x:1,3x224,224"])
def test_shape_takes_x_and_comma(text):
    args = cli.build_parser().parse_args(["inspect", "m.onnx", "--shape", text])
    assert args.shape == ["x:1x3x224x224"]


def test_no_arguments_is_one_error_line_with_one_prefix(capsys):
    code, out, err = run_cli(capsys)
    assert code == 1 and not out
    assert err.count("onnx-squeeze:") == 1 and err.startswith("onnx-squeeze: error: ")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ((), logging.INFO),
        (("-q",), logging.ERROR),
        (("-v",), logging.DEBUG),
        (("--log-level", "warning"), logging.WARNING),
    ],
)
def test_log_level_options_before_or_after_the_command(symbolic, capsys, argv, level):
    for order in ((*argv, "inspect", str(symbolic)), ("inspect", str(symbolic), *argv)):
        assert run_cli(capsys, *order)[0] == 0
        assert log.logger.level == level, order


def test_progress_is_plain_lines_where_stderr_is_no_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="onnx_squeeze.progress"):
        assert list(progress.track(range(3), "latency cpu/t1", total=3)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"latency cpu/t1: {i}/3 (0 s)" for i in (1, 2, 3)]
    assert lines[-1].startswith("latency cpu/t1: done, 3 in ")
    caplog.clear()
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="onnx_squeeze.progress"):
        list(progress.track(range(3), "quick", total=3))
    assert not caplog.records  # a short step adds no noise


# ------------------------------------------------------------------------ output


def test_json_to_stdout_leaves_stdout_to_the_json_and_records_the_run(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(symbolic_proto(), model)
    out_path = tmp_path / "out.onnx"
    argv = [
        "compress",
        str(model),
        "-o",
        str(out_path),
        "--pass",
        "prune_weights:ratio=0.5,keep_first=false,keep_last=false,min_params=0",
        "--shape",
        "x:2,3,8",
        "--runs",
        "2",
        "--json",
        "-",
    ]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    data = json.loads(out)  # nothing but the JSON on stdout
    jsonschema.validate(data, json.loads(report.SCHEMA_PATH.read_text()))
    assert data["command"] == "compress"
    assert data["command_line"] == "onnx-squeeze " + shlex.join(argv)
    assert data["input_shapes"] == {"x": [2, 3, 8]}
    assert data["tool"]["onnxruntime"] and data["tool"]["python"]
    assert data["machine"]["cpus"] >= 1 and "CPUExecutionProvider" in data["machine"]["providers"]
    assert data["calibration"] is None or "random" in data["calibration"]
    assert "random" in data["evaluation"]
    assert "compare" in err and LONG_NAME in err  # the tables went to stderr, uncut
    # each warning once: in the report, not again as a log line or a Python warning
    assert err.count("fidelity measured on RANDOM") == 1
    assert "prune_weights: done in" in err  # what runs is logged
    # the compressed model is the one the JSON describes: half of the weights are zero
    weight = numpy_helper.to_array(onnx.load(out_path).graph.initializer[0])
    assert np.count_nonzero(weight == 0) == weight.size // 2


def test_tables_are_not_cut_and_symbolic_dims_are_shown_where_no_terminal_is(symbolic, capsys):
    code, out, _ = run_cli(capsys, "inspect", str(symbolic), "--shape", "x:1,2,8")
    assert code == 0
    assert LONG_NAME in out  # rich would cut it to 80 columns: 'backbone.stage4…'
    assert "…" not in out
    assert "[batch, seq, 8]" in out and "[batch, seq, 4]" in out  # not read as markup


def test_demo_without_out_names_no_report_in_the_folder_it_removes(monkeypatch, capsys):
    inner: list[list[str]] = []
    monkeypatch.setattr(cli, "run", lambda argv: inner.append(list(argv)) or cli.EXIT_OK)
    args = cli.build_parser().parse_args(["-q", "demo", "--width", "0.25", "--runs", "2"])
    assert cli.cmd_demo(args) == cli.EXIT_OK
    (argv,) = inner
    assert argv[0] == "compress" and "--json" not in argv and "--report" not in argv
    assert argv[-1] == "-q"  # the logging options reach the compress it runs
    assert "pass --out DIR to keep" in capsys.readouterr().out
