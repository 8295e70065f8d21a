"""Every hostile or malformed input of issue 23 (the cases of ``benchmarks/robustness.py
--hostile``) through the CLI, in this process: the exit code the case allows (never 2), one
error line, the inputs unchanged, nothing left behind, no file outside the model's folder
read, and any written model valid and runnable (``benchmarks/hostile_judge.judge``)."""

from __future__ import annotations

import pytest

from benchmarks import hostile_cases, hostile_judge
from onnx_squeeze import cli


@pytest.mark.parametrize("case", hostile_cases.CASES, ids=lambda case: case.name)
def test_hostile_input_is_handled_cleanly(case, tmp_path, capfd):
    outcomes = hostile_judge.run_case(case, tmp_path, cli.run, lambda: capfd.readouterr().err)
    assert len(outcomes) == len(case.commands)
    for outcome in outcomes:
        assert not outcome.problems, (outcome.command, outcome.code, outcome.message)
