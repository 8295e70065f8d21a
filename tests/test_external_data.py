"""External data is untrusted: a model may only read weights from files inside its own folder,
and only the bytes that are there (issue 23, onnx's CVE-2024-27318 class)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_squeeze import model_io
from onnx_squeeze.errors import InputError

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4)


def _external(name: str, location: str, offset: int = 0, length: int | None = None):
    """A 4×4 float tensor whose bytes are said to sit in ``location``."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[4, 4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model(tensor: onnx.TensorProto, inside_if: bool = False) -> onnx.ModelProto:
    """y = x @ W, with W external; with ``inside_if`` the MatMul and W sit in an If branch."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    if not inside_if:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [tensor]
        )
    else:
        branch = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["b"])],
            "branch",
            [],
            [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 4])],
            [tensor],
        )
        flag = helper.make_tensor("flag", onnx.TensorProto.BOOL, [], [True])
        graph = helper.make_graph(
            [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)],
            "g",
            [x],
            [y],
            [flag],
        )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def canary(tmp_path):
    """A file outside the model's folder that must never be read."""
    path = tmp_path / "secret.bin"
    path.write_bytes(WEIGHT.tobytes())
    return path


def _save(folder: Path, proto: onnx.ModelProto) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("inside_if", [False, True])
@pytest.mark.parametrize("how", ["absolute", "climbs out", "link out"])
def test_data_outside_the_model_folder_is_refused_unread(
    tmp_path, canary, monkeypatch, how, inside_if
):
    folder = tmp_path / "model"
    folder.mkdir()
    if how == "absolute":
        location = str(canary)
    elif how == "climbs out":
        location = "../secret.bin"
    else:
        os.symlink(canary, folder / "w.bin")
        location = "w.bin"
    path = _save(folder, _model(_external("w", location), inside_if))
    opened = []
    real_open = open

    def watch(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, str | os.PathLike) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    with pytest.raises(InputError, match=r"tensor 'w': .*outside the model's folder"):
        model_io.load(path)
    assert str(canary.resolve()) not in opened


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (0, None, "needs 64 bytes at offset 0 of 'w.bin', which holds 40"),
        (32, 64, "needs 64 bytes at offset 32"),
        (0, 12, "length 12 does not match"),
    ],
)
def test_short_or_mismatched_data_is_refused(tmp_path, offset, length, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(WEIGHT.tobytes()[:40] if length is None else WEIGHT.tobytes())
    path = _save(folder, _model(_external("w", "w.bin", offset, length)))
    with pytest.raises(InputError, match=message):
        model_io.load(path)


def test_missing_data_file_is_named(tmp_path):
    path = _save(tmp_path / "model", _model(_external("w", "gone.bin")))
    with pytest.raises(InputError, match=r"external data file 'gone\.bin' is missing"):
        model_io.load(path)


def test_data_inside_the_folder_loads_and_runs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(WEIGHT.tobytes())
    path = _save(folder, _model(_external("w", "w.bin"), inside_if=True))
    model = model_io.load(path)
    from onnx_squeeze import runtime

    session = runtime.create_session(model)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x @ WEIGHT)


def test_cli_exits_1_and_writes_nothing(tmp_path, canary):
    path = _save(tmp_path / "model", _model(_external("w", str(canary))))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    for command in (["inspect", str(path)], ["compress", str(path), "-o", str(out), "--fp16"]):
        done = subprocess.run(
            [sys.executable, "-m", "onnx_squeeze", *command], capture_output=True, text=True
        )
        assert done.returncode == 1, done.stderr
        assert "outside the model's folder" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []
