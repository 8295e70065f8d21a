"""compress shortcut flags: which steps they make, in which order, and their errors."""

from __future__ import annotations

import argparse

import pytest

from onnx_squeeze import shortcuts
from onnx_squeeze.errors import SettingsError


def _steps(*flags: str, calibrated: bool = False) -> list[tuple[str, dict]]:
    parser = argparse.ArgumentParser()
    shortcuts.add_arguments(parser)
    args = parser.parse_args(list(flags))
    return [(s.name, s.settings) for s in shortcuts.steps_from_args(args, calibrated=calibrated)]


def test_no_flags_no_steps():
    assert _steps() == []


def test_steps_follow_the_design_order_not_the_command_line():
    steps = _steps("--int8", "--prune-weights", "0.5", "--prune-channels", "0.3")
    assert [name for name, _ in steps] == ["prune_channels", "prune_weights", "quantize_int8"]
    assert steps[0][1] == {"macs_target": 0.3}
    assert steps[1][1] == {"mode": "global", "ratio": 0.5}


def test_recovery_is_on_by_default_with_calibration_data_after_lossy_passes():
    names = [n for n, _ in _steps("--prune-channels", "0.3", "--int8", calibrated=True)]
    assert names == ["prune_channels", "reconstruct", "quantize_int8"]
    assert "reconstruct" not in [n for n, _ in _steps("--prune-channels", "0.3")]
    assert "reconstruct" not in [n for n, _ in _steps("--int8", calibrated=True)]
    no = _steps("--prune-channels", "0.3", "--no-recover", calibrated=True)
    assert "reconstruct" not in [n for n, _ in no]


def test_recover_without_calibration_data_says_what_to_add():
    with pytest.raises(SettingsError, match="--calib"):
        _steps("--recover")


def test_finetune_follows_recovery_and_precedes_quantization():
    flags = ("--int8", "--finetune", "50", "--prune-channels", "0.3")
    steps = _steps(*flags, calibrated=True)
    assert [n for n, _ in steps] == ["prune_channels", "reconstruct", "finetune", "quantize_int8"]
    assert steps[2][1] == {"steps": 50}
    with pytest.raises(SettingsError, match="--finetune needs calibration data"):
        _steps("--finetune", "50")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--low-rank", "0.9"), ("low_rank", {"energy": 0.9, "data_aware": False})),
        (("--low-rank", "macs=0.5"), ("low_rank", {"macs_target": 0.5, "data_aware": False})),
        (("--low-rank",), ("low_rank", {"data_aware": False})),
        (("--sparsity", "2:4"), ("prune_weights", {"mode": "nm", "n": 2, "m": 4})),
        (("--int8", "--int8-method", "entropy"), ("quantize_int8", {"method": "entropy"})),
        (("--int8", "--int8-calib-all"), ("quantize_int8", {"settle_db": 0.0})),
        (
            ("--int8", "--int8-speed-check"),
            ("quantize_int8", {"speed_check": True, "speed_batch": 1}),
        ),
        (
            ("--int8", "--int8-speed-check", "8"),
            ("quantize_int8", {"speed_check": True, "speed_batch": 8}),
        ),
        (("--int8", "--int8-no-speed-check"), ("quantize_int8", {"speed_check": False})),
        (("--int8-dynamic",), ("quantize_dynamic", {})),
        (("--bf16",), ("fp16", {"dtype": "bfloat16"})),
        (("--fp8",), ("fp8", {"activations": False})),
        (
            ("--int4", "--int4-block", "64"),
            ("quantize_weights", {"bits": 4, "block_size": 64, "algorithm": "rtn"}),
        ),
        (("--codebook", "pow2"), ("codebook", {"levels": "pow2"})),
    ],
)
def test_each_flag_maps_to_its_pass(flags, expected):
    assert _steps(*flags) == [expected]


def test_low_rank_is_data_aware_with_calibration_data():
    assert _steps("--low-rank", "0.9", calibrated=True)[0][1]["data_aware"] is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--sparsity", "4:2"), "N:M"),
        (("--low-rank", "rank=3"), "ENERGY"),
        (("--int8-method", "entropy"), "add --int8"),
        (("--int8-speed-check",), "--int8-speed-check applies to --int8"),
        (("--int8-calib-all",), "--int8-calib-all applies to --int8"),
        (("--int8-no-speed-check",), "--int8-no-speed-check applies to --int8"),
        (("--int8", "--int8-speed-check", "--int8-no-speed-check"), "exclude each other"),
    ],
)
def test_bad_values_name_the_fix(flags, message):
    with pytest.raises(SettingsError, match=message):
        _steps(*flags)


def test_prune_channels_by_measured_latency():
    assert _steps("--prune-channels", "latency=0.4") == [
        ("prune_channels", {"latency_target": 0.4})
    ]
    assert _steps("--prune-channels", "macs=0.4") == [("prune_channels", {"macs_target": 0.4})]


@pytest.mark.parametrize(
    "flags",
    [
        ("--prune-channels", "1.5"),
        ("--prune-channels", "latency=1.5"),
        ("--prune-channels", "params=0.3"),
        ("--finetune", "0"),
    ],
)
def test_out_of_range_number_is_a_usage_error(flags):
    with pytest.raises(SystemExit):
        _steps(*flags)
