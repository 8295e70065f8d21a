"""Settings declared on their fields (choice, subset, bounded): checked when a pass is made, with
one message shape for every pass, before its own validate()."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
import pytest

from onnx_squeeze import zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.passes import base
from onnx_squeeze.passes.base import bounded, choice, make_pass, subset
from onnx_squeeze.recipe import Recipe


@dataclasses.dataclass
class _DeclaredSettings:
    mode: str = choice("fast", ("fast", "exact"))
    ops: Sequence[str] = subset(("Conv",), ("Conv", "Gemm"), nonempty=True)
    share: float = bounded(0.5, low=0, below=1)
    count: int = bounded(1, low=1)
    rate: float | None = bounded(None, above=0)
    plain: int = 3  # no declaration: anything goes


class _Declared(base.Pass):
    name = "declared"
    Settings = _DeclaredSettings

    def validate(self) -> None:
        self.validated = True

    def apply(self, model: ir.Model, context: base.PassContext, report: base.PassReport) -> None:
        pass


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "slow"}, "declared: mode must be one of fast, exact, got 'slow'"),
        ({"ops": ["Conv", "Relu"]}, "declared: ops must hold only Conv, Gemm, got 'Relu'"),
        ({"ops": []}, "declared: ops must hold at least one of Conv, Gemm"),
        ({"share": 1.5}, r"declared: share must be in \[0, 1\), got 1.5"),
        ({"share": "half"}, "declared: share must be a number, got 'half'"),
        ({"share": True}, "declared: share must be a number, got True"),
        ({"count": 0}, "declared: count must be at least 1, got 0"),
        ({"count": 2.5}, "declared: count must be an integer, got 2.5"),
        ({"rate": 0}, "declared: rate must be > 0, got 0"),
    ],
)
def test_a_declared_setting_out_of_bounds_fails_with_one_message_shape(settings, message):
    with pytest.raises(SettingsError, match=f"^{message}$"):
        _Declared(**settings)


def test_values_within_the_declarations_pass_and_validate_runs_after():
    made = _Declared(mode="exact", ops="Gemm", share=0, count=4, rate=1e-3, plain=-7)
    assert made.validated
    assert made.settings.ops == ["Gemm"]  # one name alone is a list of one
    assert made.settings.rate == 1e-3
    assert _Declared().settings.rate is None  # an Optional left unset passes


def test_the_report_lists_the_declared_defaults():
    report = _Declared()(zoo.small("mlp"))
    assert report.settings == {
        "mode": "fast",
        "ops": ["Conv"],
        "share": 0.5,
        "count": 1,
        "rate": None,
        "plain": 3,
    }
    assert _Declared().settings.ops is not _Declared().settings.ops  # a fresh list each time


def test_real_passes_speak_the_same_shape():
    with pytest.raises(SettingsError, match=r"^quantize_weights: bits must be one of 4, 8, got 3$"):
        make_pass("quantize_weights", {"bits": 3})
    with pytest.raises(SettingsError, match=r"^low_rank: rank must be at least 1, got 0$"):
        make_pass("low_rank", {"rank": 0})
    with pytest.raises(SettingsError, match=r"^fp16: range_margin must be at least 1, got 0.5$"):
        Recipe.from_cli(["fp16:range_margin=0.5"]).passes()
    assert make_pass("low_rank", {"rank": 4}).settings.energy is None
    assert Recipe.from_cli(["prune_weights:op_types=Gemm"]).passes()[0].settings.op_types == [
        "Gemm"
    ]
