"""Every model run is bounded in time: a Loop of 2**40 trips ends as a one-line error (exit 1),
not a run until killed; onnxruntime's own log lines stay out of the terminal (issue 23)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.hostile_cases import endless_loop
from onnx_squeeze import runtime
from onnx_squeeze.errors import RunLimitError


def test_a_run_past_its_limit_is_stopped_and_later_runs_are_not(monkeypatch):
    monkeypatch.setattr(runtime.BoundedSession, "limit_s", 0.5)
    session = runtime.create_session(endless_loop())
    start = time.perf_counter()
    with pytest.raises(RunLimitError, match="took over 0 s and was stopped"):
        session.run(None, {"x": np.zeros((1, 8), np.float32)})
    assert time.perf_counter() - start < 5
    relu = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    quick = runtime.create_session(relu)
    time.sleep(0.6)  # past the earlier deadline: the watchdog must not stop a new run
    for _ in range(3):
        np.testing.assert_array_equal(
            quick.run(None, {"x": np.array([-1, 2], np.float32)})[0], [0, 2]
        )


def test_cli_stops_the_endless_loop_with_one_line(tmp_path):
    source = tmp_path / "loop.onnx"
    onnx.save(endless_loop(), source)
    env = {**os.environ, "ONNX_SQUEEZE_RUN_TIMEOUT": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "onnx_squeeze", "compare", str(source), str(source), "--runs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "took over 2 s and was stopped" in lines[0], done.stderr
