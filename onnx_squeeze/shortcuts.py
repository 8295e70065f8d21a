"""``compress`` flags that stand for recipe steps (``--int8``, ``--prune-channels 0.3``, ...).

Flags are the quick way in; ``--pass NAME:key=value`` and recipe files reach every setting.
Steps from flags run in the order DESIGN.md prescribes whatever the order on the command line:
structure-changing passes, weight pruning, recovery, quantization last.
"""

from __future__ import annotations

import argparse
from typing import Any

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.recipe import Step

# Where each pass goes when several come from flags.
PASS_ORDER = (
    "prune_channels",
    "low_rank",
    "prune_weights",
    "reconstruct",
    "finetune",
    "quantize_int8",
    "quantize_dynamic",
    "fp16",
    "fp8",
    "quantize_weights",
    "codebook",
)
# Passes after which recovery (``reconstruct``) has something to recover.
LOSSY_STRUCTURE = frozenset({"prune_channels", "low_rank", "prune_weights"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the shortcut flags to the ``compress`` parser."""
    group = parser.add_argument_group("passes (shortcuts for --pass; run in the order listed)")
    group.add_argument(
        "--prune-channels",
        type=_prune_target,
        nargs="?",
        const={},
        metavar="FRACTION|latency=FRACTION",
        help="remove channels until FRACTION of the MACs is gone (e.g. 0.3), or FRACTION of "
        "the time the model takes here, each layer timed at batch 1 (latency=0.5); without "
        "FRACTION, up to 30%% of the MACs, as much as still meets the accuracy gate (judged "
        "after recovery when recovery runs), else the model is left unchanged with a warning",
    )
    group.add_argument(
        "--low-rank",
        nargs="?",
        const="",
        metavar="ENERGY|macs=FRACTION",
        help="factorize Conv/Gemm/MatMul keeping ENERGY of the spectrum (e.g. 0.95), "
        "or remove FRACTION of the MACs (macs=0.5); without a value, the lowest ranks that "
        "still meet the accuracy gate, only where the factors run faster, else the model is "
        "left unchanged with a warning; data-aware with --calib",
    )
    group.add_argument(
        "--prune-weights",
        type=_fraction,
        metavar="RATIO",
        help="zero RATIO of the weights, one global magnitude threshold (e.g. 0.5)",
    )
    group.add_argument(
        "--sparsity", metavar="N:M", help="N:M semi-structured weight sparsity (e.g. 2:4)"
    )
    group.add_argument(
        "--recover",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refit layers to the original model on the calibration data "
        "(default: on when --calib is given and a pruning or low-rank flag is used)",
    )
    group.add_argument(
        "--finetune",
        type=_positive,
        metavar="STEPS",
        help="then train the float weights for STEPS minibatches of --calib to match the "
        "original's outputs (distillation; needs PyTorch: pip install 'onnx-squeeze[torch]')",
    )
    quantize = group.add_mutually_exclusive_group()
    quantize.add_argument(
        "--int8", action="store_true", help="static INT8 QDQ, activations calibrated on --calib"
    )
    quantize.add_argument(
        "--int8-dynamic", action="store_true", help="dynamic INT8 (MatMul/Gemm-heavy models)"
    )
    quantize.add_argument("--fp16", action="store_true", help="float16 weights and activations")
    quantize.add_argument("--bf16", action="store_true", help="bfloat16 weights and activations")
    quantize.add_argument("--fp8", action="store_true", help="FP8 (E4M3FN) QDQ, opset 19+")
    group.add_argument(
        "--fp16-for",
        choices=("cuda", "tensorrt", "cpu"),
        help="the execution provider --fp16/--bf16 converts for (default cuda: nearly every op "
        "in float16, half the size, no faster on CPU; cpu: only ops with native CPU kernels, "
        "as fast as float32 there)",
    )
    group.add_argument(
        "--int8-method",
        choices=("minmax", "percentile", "entropy", "mse"),
        help="activation calibration method for --int8 (default mse: least expected squared error)",
    )
    group.add_argument(
        "--int8-calib-all",
        action="store_true",
        help="calibrate --int8 on every batch of --calib (by default reading stops once the "
        "activation ranges settle; the report says after how many)",
    )
    group.add_argument(
        "--int8-speed-check",
        type=_positive,
        nargs="?",
        const=1,
        metavar="BATCH",
        help="always search which of --int8's smallest layers to keep float while the model "
        "runs faster so on this machine, at batch BATCH (default 1); without it the search "
        "runs only where INT8, timed once against float, is slower",
    )
    group.add_argument(
        "--int8-no-speed-check",
        action="store_true",
        help="quantize every layer --int8 places, untimed, even where INT8 runs slower here",
    )
    group.add_argument(
        "--int4",
        action="store_true",
        help="weight-only INT4 of MatMul/Gemm in blocks (MatMulNBits)",
    )
    group.add_argument("--int4-block", type=int, default=32, metavar="N", help="default 32")
    group.add_argument(
        "--codebook",
        choices=("kmeans", "pow2"),
        help="store Conv/Gemm/MatMul weights as 4-bit codebook indices (k-means or "
        "power-of-two levels), decoded when onnxruntime loads the model",
    )


def steps_from_args(args: argparse.Namespace, *, calibrated: bool) -> list[Step]:
    """The recipe steps the shortcut flags ask for, in :data:`PASS_ORDER`."""
    steps: list[Step] = []
    if args.prune_channels is not None:
        steps.append(Step("prune_channels", dict(args.prune_channels)))
    if args.low_rank is not None:
        steps.append(
            Step("low_rank", {**_low_rank_target(args.low_rank), "data_aware": calibrated})
        )
    if args.prune_weights is not None:
        steps.append(Step("prune_weights", {"mode": "global", "ratio": args.prune_weights}))
    if args.sparsity is not None:
        n, m = _n_of_m(args.sparsity)
        steps.append(Step("prune_weights", {"mode": "nm", "n": n, "m": m}))
    lossy = any(step.name in LOSSY_STRUCTURE for step in steps)
    recover = args.recover if args.recover is not None else calibrated and lossy
    if recover and not calibrated:
        raise SettingsError("--recover needs calibration data: add --calib SRC")
    if args.prune_channels == {}:  # the default judges its candidates as recovery leaves them
        steps[0].settings["recover"] = recover
    if recover and any(s.name in LOSSY_STRUCTURE and not s.settings.get("recover") for s in steps):
        steps.append(Step("reconstruct"))
    if args.finetune is not None:
        if not calibrated:
            raise SettingsError("--finetune needs calibration data to train on: add --calib SRC")
        steps.append(Step("finetune", {"steps": args.finetune}))
    if args.int8:
        settings: dict[str, Any] = {"method": args.int8_method} if args.int8_method else {}
        if args.int8_speed_check is not None and args.int8_no_speed_check:
            raise SettingsError("--int8-speed-check and --int8-no-speed-check exclude each other")
        if args.int8_speed_check is not None:
            settings.update(speed_check=True, speed_batch=args.int8_speed_check)
        if args.int8_no_speed_check:
            settings["speed_check"] = False
        if args.int8_calib_all:
            settings["settle_db"] = 0.0
        steps.append(Step("quantize_int8", settings))
    else:
        given = {
            "--int8-method": args.int8_method,
            "--int8-speed-check": args.int8_speed_check is not None,
            "--int8-no-speed-check": args.int8_no_speed_check,
            "--int8-calib-all": args.int8_calib_all,
        }
        for flag, used in given.items():
            if used:
                raise SettingsError(f"{flag} applies to --int8; add --int8")
    if args.int8_dynamic:
        steps.append(Step("quantize_dynamic"))
    if args.fp16 or args.bf16:
        settings = {"dtype": "float16" if args.fp16 else "bfloat16"}
        if args.fp16_for is not None:
            settings["provider"] = args.fp16_for
        steps.append(Step("fp16", settings))
    elif args.fp16_for is not None:
        raise SettingsError("--fp16-for applies to --fp16 or --bf16; add one of them")
    if args.fp8:  # activations need calibrated ranges; without data, weights only
        steps.append(Step("fp8", {} if calibrated else {"activations": False}))
    if args.int4:
        algorithm = "gptq" if calibrated else "rtn"  # GPTQ needs the input Hessian
        steps.append(
            Step(
                "quantize_weights",
                {"bits": 4, "block_size": args.int4_block, "algorithm": algorithm},
            )
        )
    if args.codebook is not None:
        steps.append(Step("codebook", {"levels": args.codebook}))
    return steps


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _prune_target(text: str) -> dict[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        key, value = "macs", text
    if key not in ("macs", "latency"):
        raise argparse.ArgumentTypeError(
            f"expected FRACTION, macs=FRACTION or latency=FRACTION, got {text!r}"
        )
    return {f"{key}_target": _fraction(value)}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _low_rank_target(text: str) -> dict[str, float]:
    if not text:
        return {}  # the pass's default: ranks chosen by the gate
    key, sep, value = text.partition("=")
    if not sep:
        key, value = "energy", text
    if key not in ("energy", "macs", "params"):
        raise SettingsError(f"--low-rank {text}: write ENERGY, macs=FRACTION or params=FRACTION")
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"--low-rank {text}: {value!r} is not a number") from None
    setting = {"energy": "energy", "macs": "macs_target", "params": "params_target"}[key]
    return {setting: number}


def _n_of_m(text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise SettingsError(f"--sparsity {text}: write N:M with 0 < N < M, e.g. 2:4")
    return int(n), int(m)
