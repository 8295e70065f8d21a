"""The ``onnx-squeeze`` command.

Exit codes: 0 success, 1 usage or input error, 2 internal error, 3 an accuracy gate failed.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.markup import escape

from onnx_squeeze import __version__, log, model_io, report, runtime, scratch, shortcuts, verdict
from onnx_squeeze.calibration.constants import parse_settings
from onnx_squeeze.errors import GateFailedError, SettingsError, SqueezeError
from onnx_squeeze.tune import cli as tune_cli

EXIT_OK, EXIT_INPUT, EXIT_INTERNAL, EXIT_GATE = 0, 1, 2, 3

console = Console()  # made again by run() for where its output goes
errors = Console(stderr=True, soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as SettingsError (exit code 1, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SettingsError(f"{message} (see {self.prog} --help)")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _shape(text: str) -> str:
    """``NAME:1x3x224x224`` as given, or onnxsim's ``NAME:1,3,224,224`` written so."""
    name, sep, dims = text.rpartition(":")
    return f"{name}{sep}{dims.replace(',', 'x')}"


def _add_run_options(parser: argparse.ArgumentParser, *, runs: int = 30) -> None:
    """Options shared by commands that run models: inputs, providers, threads, latency runs."""
    parser.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="NAME:1x3x224x224",
        help="concrete shape for an input with symbolic dims, as 1x3x224x224 or 1,3,224,224 "
        "(repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="one value for an input in every feed (calibration, evaluation, random), typed "
        "by the model: a sample rate, a flag (e.g. --set sr=16000; repeatable)",
    )
    parser.add_argument(
        "--providers",
        type=_csv,
        default=["cpu"],
        help="execution providers, comma-separated: cpu,cuda,tensorrt (default cpu)",
    )
    parser.add_argument(
        "--threads",
        type=_ints,
        default=[1],
        help="intra-op thread counts to time, comma-separated (default 1)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="samples per run for a symbolic batch dimension (default: the model's fixed batch "
        "dimension, else 1)",
    )
    parser.add_argument(
        "--runs", type=int, default=runs, help=f"timed runs per model (default {runs})"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=8,
        help="input samples for fidelity when no data is given (default 8)",
    )
    parser.add_argument(
        "--default-dim",
        type=int,
        metavar="N",
        help="size for every symbolic input dimension that neither --shape nor the data gives "
        "(never guessed otherwise: without it such a run stops and names the --shape to pass)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="write the report as JSON (schema: onnx_squeeze/report/schema.json); '-': to "
        "stdout, and everything else to stderr",
    )
    parser.add_argument("--report", metavar="FILE.html", help="write the report as an HTML page")
    parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="EXPR",
        help="accuracy gate such as 'top1_agreement>=0.99' or 'worst_channel_sqnr_db>=20' "
        f"(repeatable; default {verdict.DEFAULT_GATE}, which fails only with --strict)",
    )
    parser.add_argument(
        "--channel-axis",
        action="append",
        default=[],
        metavar="OUTPUT:AXIS",
        help="judge OUTPUT per channel along AXIS (or 'none': as a whole) instead of the axis "
        "whose slices differ most in scale (repeatable)",
    )
    parser.add_argument(
        "--warn-sqnr",
        type=float,
        default=verdict.WARN_SQNR_DB,
        metavar="DB",
        help=f"warn when an output channel's SQNR falls below DB (default {verdict.WARN_SQNR_DB:g})",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="treat every warning and the default gate as failures: exit 3, nothing written",
    )


def _add_log_options(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """--debug, -q, -v, --log-level: before the command, and after it (where an option not
    given must not reset one given before: SUPPRESS)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show tracebacks on errors"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="log only errors (no progress lines)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=default(0), help="log more (debug)"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default(None),
        help="level of the onnx_squeeze logger on stderr (default info: progress lines; "
        "-q: error, -v: debug)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-squeeze",
        description="Make exported ONNX models smaller and faster, and check what it cost.",
    )
    parser.add_argument("--version", action="version", version=f"onnx-squeeze {__version__}")
    _add_log_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    anywhere = argparse.ArgumentParser(add_help=False)  # also accepted after the command
    _add_log_options(anywhere, after_command=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[anywhere], **kwargs)

    compress = command("compress", help="run a recipe of passes on a model, compare, save")
    compress.add_argument("model", help="input .onnx file (or zoo:NAME)")
    compress.add_argument("-o", "--output", required=True, help="output .onnx file")
    compress.add_argument("--recipe", help="recipe file (YAML/JSON) or preset name")
    compress.add_argument(
        "--pass",
        dest="passes",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="add a pass after the recipe's (repeatable); 'onnx-squeeze passes' lists every "
        "pass and setting",
    )
    compress.add_argument(
        "--calib",
        metavar="SRC",
        help="calibration data: .npz/.npy, a folder of them or of images, or 'random'",
    )
    compress.add_argument(
        "--eval",
        metavar="SRC",
        help="held-out data to judge the result on (like --calib); without it every 5th batch "
        "of --calib is held out from the passes for this",
    )
    compress.add_argument(
        "--calib-count", type=int, default=32, help="random calibration samples (default 32)"
    )
    compress.add_argument(
        "--preset",
        default="imagenet",
        help="image preprocessing preset for image folders (default imagenet)",
    )
    compress.add_argument("--no-simplify", action="store_true", help="skip onnxsim in prepare")
    compress.add_argument("--no-fold-bn", action="store_true", help="keep BatchNormalization nodes")
    compress.add_argument("--target-opset", type=int, help="convert the model to this opset first")
    compress.add_argument(
        "--no-compare", action="store_true", help="skip the comparison with the original"
    )
    compress.add_argument("--force", action="store_true", help="allow overwriting the input file")
    compress.add_argument(
        "--write-on-fail",
        action="store_true",
        help="write the output even when a --check gate fails",
    )
    compress.add_argument(
        "--external-data",
        action="store_true",
        help="store weights in a data file beside the model (OUT.<token>.data: model and data are replaced together)",
    )
    compress.add_argument("--seed", type=int, default=0)
    shortcuts.add_arguments(compress)
    _add_run_options(compress, runs=20)
    _add_output_options(compress)

    inspect = command("inspect", help="ops, parameters, MACs, inputs and outputs of a model")
    inspect.add_argument("model")
    inspect.add_argument("--shape", action="append", type=_shape, metavar="NAME:1x3x224x224")
    inspect.add_argument(
        "--default-dim",
        type=int,
        metavar="N",
        help="size for every symbolic dimension --shape does not give (MACs are unknown otherwise)",
    )
    inspect.add_argument(
        "--all-nodes", action="store_true", help="list every node, not only the heaviest"
    )
    inspect.add_argument(
        "--groups",
        action="store_true",
        help="list channel dependency groups: what channel pruning can remove, what is frozen",
    )
    inspect.add_argument("--json", metavar="FILE", help="write the analysis as JSON ('-': stdout)")

    compare = command("compare", help="fidelity, size and latency of B against A")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument(
        "--inputs",
        metavar="SRC",
        help="input data like --calib; random from the input spec when omitted",
    )
    compare.add_argument("--preset", default="imagenet")
    compare.add_argument("--seed", type=int, default=0)
    _add_run_options(compare)
    _add_output_options(compare)

    bench = command("bench", help="latency of one or more models across execution providers")
    bench.add_argument("models", nargs="+")
    bench.add_argument("--json", metavar="FILE", help="write the rows as JSON ('-': stdout)")
    bench.add_argument("--warmup", type=int, default=5)
    _add_run_options(bench)

    demo = command("demo", help="the main job on a built-in ResNet-18: compress, compare, report")
    demo.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the models and reports (default: a temporary folder)",
    )
    demo.add_argument("--runs", type=int, default=20)
    demo.add_argument("--threads", type=_ints, default=[1])
    demo.add_argument(
        "--width", type=float, default=1.0, help="channel width multiplier of the ResNet-18"
    )

    passes = command("passes", help="every pass and its settings: type, default, values, doc")
    passes.add_argument("name", nargs="?", help="one pass (default: all)")
    passes.add_argument("--json", metavar="FILE", help="write the list as JSON ('-': stdout)")

    tune_cli.add_parser(commands, parents=[anywhere])

    zoo_cmd = command("zoo", help="save a built-in reference model to a file")
    zoo_cmd.add_argument("name")
    zoo_cmd.add_argument("-o", "--output", required=True)
    zoo_cmd.add_argument("--width", type=float, default=1.0)
    zoo_cmd.add_argument("--depth", type=float, default=1.0)
    zoo_cmd.add_argument("--seed", type=int, default=0)
    zoo_cmd.add_argument("--force", action="store_true")
    return parser


# ---------------------------------------------------------------- commands


def _channel_axes(items: Sequence[str]) -> dict[str, int | None]:
    """``--channel-axis OUTPUT:AXIS`` (AXIS an integer or 'none') into a mapping."""
    axes: dict[str, int | None] = {}
    for item in items:
        name, _, axis = item.rpartition(":")
        if not name or not axis:
            raise SettingsError(
                f"bad --channel-axis {item!r}: write it as OUTPUT:AXIS or OUTPUT:none"
            )
        try:
            axes[name] = None if axis.lower() == "none" else int(axis)
        except ValueError:
            raise SettingsError(
                f"bad --channel-axis {item!r}: the axis must be an integer or 'none'"
            ) from None
    return axes


def _open_inputs(
    spec: str, model: ir.Model, args: argparse.Namespace, count: int, seed: int | None = None
) -> Any:
    from onnx_squeeze import calibration

    return calibration.open_source(
        spec,
        model,
        shapes=runtime.parse_shape_overrides(args.shape),
        count=count,
        seed=args.seed if seed is None else seed,
        preset=args.preset,
        batch_size=args.batch,
        default_dim=args.default_dim,
        constants=parse_settings(args.set),
    )


def _finish(run_report: dict[str, Any], args: argparse.Namespace) -> None:
    run_report["command_line"] = shlex.join(["onnx-squeeze", *args.argv])
    report.print_report(run_report, console)
    if getattr(args, "report", None):
        report.write(run_report, args.report)
        console.print(f"HTML report: {args.report}")
    if getattr(args, "json", None):
        _write_json(args.json, report.to_json(run_report), "JSON report")


def _write_json(target: str, text: str, what: str) -> None:
    """JSON to a file, or to stdout for '-' (where nothing else is written: see :func:`run`)."""
    if target == STDOUT:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    report.write_text_atomic(target, text)
    console.print(f"{what}: {target}")


def cmd_compress(args: argparse.Namespace) -> int:
    from onnx_squeeze.pipeline import compress
    from onnx_squeeze.recipe import Recipe

    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    recipe.steps += shortcuts.steps_from_args(args, calibrated=bool(args.calib))
    recipe.steps += Recipe.from_cli(args.passes).steps
    if args.no_simplify:
        recipe.prepare["simplify"] = False
    if args.no_fold_bn:
        recipe.prepare["fold_batchnorm"] = False
    result = compress(
        args.model,
        recipe,
        calibration=args.calib,
        evaluation=args.eval,
        constants=parse_settings(args.set),
        output=args.output,
        compare=not args.no_compare,
        checks=args.check,
        strict=args.strict,
        warn_sqnr_db=args.warn_sqnr,
        channel_axes=_channel_axes(args.channel_axis),
        shapes=runtime.parse_shape_overrides(args.shape) or None,
        default_dim=args.default_dim,
        batch=args.batch,
        preset=args.preset,
        calibration_samples=args.calib_count,
        samples=args.samples,
        providers=tuple(args.providers),
        threads=tuple(args.threads),
        runs=args.runs,
        seed=args.seed,
        target_opset=args.target_opset,
        force=args.force,
        external_data=True if args.external_data else None,
        write_on_fail=args.write_on_fail,
    )
    _finish(result.report, args)
    if result.blocking:
        raise GateFailedError(
            result.blocking
            + ("" if result.output else " (output not written; --write-on-fail writes it anyway)")
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from onnx_squeeze import analysis

    model = model_io.load(args.model)
    path = model_io.input_path(args.model)
    summary = analysis.analyze(
        model,
        shapes=runtime.parse_shape_overrides(args.shape),
        path=path,
        default_dim=args.default_dim,
    )
    report.print_summary(summary, console, all_nodes=args.all_nodes)
    data = summary.to_dict()
    if args.groups:
        from onnx_squeeze.passes.prune_channels import trace as channel_groups
        from onnx_squeeze.prepare import prepare

        prepared, _ = prepare(model.clone())  # the graph compress prunes, not the file's
        groups = channel_groups.build_groups(prepared, split_heads=True)
        report.print_groups(channel_groups.format_groups(groups), console)
        console.print(
            "groups of the prepared model (simplified, BatchNorm folded), as compress sees it"
        )
        data["channel_groups"] = [group.to_dict() for group in groups]
    if args.json:
        _write_json(args.json, report.to_json(data), "JSON")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from onnx_squeeze import gates
    from onnx_squeeze.pipeline import judge

    checks = gates.validated(args.check)
    a, b = model_io.load(args.a), model_io.load(args.b)
    source = _open_inputs(args.inputs or "random", a, args, args.samples)
    comparison = judge(
        a,
        b,
        source,
        names=(Path(args.a).name, Path(args.b).name),
        paths=(model_io.input_path(args.a), model_io.input_path(args.b)),
        providers=args.providers,
        threads=args.threads,
        batch=args.batch,
        runs=args.runs,
        shapes=runtime.parse_shape_overrides(args.shape),
        default_dim=args.default_dim,
        channel_axes=_channel_axes(args.channel_axis),
    )
    gate_results = gates.judged(checks, comparison["metrics"], verdict.DEFAULT_GATE)
    warnings = verdict.run_warnings(comparison, evaluation=source, warn_sqnr_db=args.warn_sqnr)
    run_report = report.build_report(
        command="compare",
        input_path=args.a,
        output_path=args.b,
        comparison=comparison,
        gates=gate_results,
        warnings=warnings,
        evaluation=source.label,
    )
    _finish(run_report, args)
    blocking = verdict.blocking(gate_results, warnings, args.strict)
    if blocking:
        raise GateFailedError(blocking)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from onnx_squeeze.comparison import bench

    models = {source: model_io.load(source) for source in args.models}
    rows = bench(
        models,
        providers=tuple(args.providers),
        threads=tuple(args.threads),
        batch=args.batch or 1,
        runs=args.runs,
        warmup=args.warmup,
        shapes=runtime.parse_shape_overrides(args.shape),
        default_dim=args.default_dim,
        constants=parse_settings(args.set),
    )
    report.print_bench(rows, console)
    if args.json:
        data = {"schema": "onnx-squeeze/bench", "schema_version": 1, "rows": rows}
        _write_json(args.json, report.to_json(data), "JSON")
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    from onnx_squeeze import pass_docs

    every = pass_docs.all_passes()
    if args.name:
        every = [doc for doc in every if doc.name == args.name]
        if not every:
            known = ", ".join(doc.name for doc in pass_docs.all_passes())
            raise SettingsError(f"unknown pass {args.name!r}; available passes: {known}")
    report.print_passes(every, console)
    if args.json:
        _write_json(args.json, report.to_json({"passes": [d.to_dict() for d in every]}), "JSON")
    return EXIT_OK


def cmd_zoo(args: argparse.Namespace) -> int:
    from onnx_squeeze import zoo

    model = zoo.build(args.name, width=args.width, depth=args.depth, seed=args.seed)
    if Path(args.output).exists() and not args.force:
        raise SettingsError(f"{args.output}: exists; pass --force to overwrite")
    model_io.save(model, args.output)
    console.print(f"saved {args.name} to {args.output}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Build ResNet-18, save it, then run compress on it exactly as a user would."""
    from onnx_squeeze import zoo

    with scratch.folder("demo") as temporary:
        folder = Path(args.out or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / "resnet18.onnx"
        console.print(
            f"[bold]onnx-squeeze demo[/]: building ResNet-18 (1×3×224×224, seeded weights) in {folder}"
        )
        model_io.save(zoo.build("resnet18", width=args.width), original)
        argv = [
            "compress",
            str(original),
            "-o",
            str(folder / "resnet18.squeezed.onnx"),
            *DEMO_FLAGS,
            "--runs",
            str(args.runs),
            "--threads",
            ",".join(map(str, args.threads)),
        ]
        if args.out:  # reports only where they are kept, never paths to a deleted folder
            argv += ["--json", str(folder / "report.json"), "--report", str(folder / "report.html")]
        console.print(escape("$ onnx-squeeze " + shlex.join(argv)), style="dim")
        code = run([*argv, *_log_options(args)])
        if not args.out:
            console.print(
                "(the models were in a temporary folder, now removed: pass --out DIR to keep "
                "them with the JSON and HTML reports)",
                style="dim",
            )
        return code


def _log_options(args: argparse.Namespace) -> list[str]:
    """The logging options of ``args`` as command-line words, for a command run from another."""
    if args.log_level:
        return ["--log-level", args.log_level]
    return ["-q"] if args.quiet else ["-v"] * args.verbose


# The demo's job: remove 30% of the MACs by channel pruning, refit the pruned layers to the
# original (recovery), quantize to INT8, all calibrated on 16 random images (the demo has no
# data set; the warnings say so), then judge the result on other random images by the default
# gate, per output channel.
DEMO_FLAGS = ("--prune-channels", "0.3", "--int8", "--calib", "random", "--calib-count", "16")

COMMANDS = {
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "compare": cmd_compare,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "passes": cmd_passes,
    "tune": tune_cli.run,
    "zoo": cmd_zoo,
}

STDOUT = "-"  # --json - writes to stdout

# Columns for output that is not a terminal (a log, a pipe): wide enough that rich never cuts
# a table (it assumes 80 there, and 'resnet18.onnx' became 'resnet1…').
UNLIMITED_WIDTH = 10_000


def _console(*, stderr: bool) -> Console:
    """A console on stdout or stderr (whichever stream is current when it prints): the
    terminal's width there, else one that never cuts."""
    terminal = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(
        stderr=stderr, width=None if terminal else UNLIMITED_WIDTH, soft_wrap=not terminal
    )


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", None):
        return logging.getLevelName(args.log_level.upper())
    if getattr(args, "quiet", False):
        return logging.ERROR
    if getattr(args, "verbose", 0):
        return logging.DEBUG
    return logging.INFO


def run(argv: Sequence[str]) -> int:
    """Parse and run a command; map errors to exit codes with one-line messages."""
    global console, errors
    debug = "--debug" in argv
    if debug:
        runtime.show_onnxruntime_log()
    errors = Console(stderr=True, soft_wrap=True)  # one line per error, however narrow
    scratch.sweep()  # temporary folders of runs that were killed
    try:
        args = build_parser().parse_args(list(argv))
        args.argv = list(argv)
        console = _console(stderr=getattr(args, "json", None) == STDOUT)
        log.configure(_log_level(args))
        with warnings.catch_warnings():
            # run warnings are in the report the command prints: not a second time on stderr
            warnings.simplefilter("ignore", log.SqueezeWarning)
            return COMMANDS[args.command](args)
    except GateFailedError as error:
        errors.print(f"onnx-squeeze: {error}", markup=False, highlight=False)
        return EXIT_GATE
    except SqueezeError as error:
        if debug:
            traceback.print_exc()
        errors.print(f"onnx-squeeze: error: {error}", markup=False, highlight=False)
        return EXIT_INPUT
    except KeyboardInterrupt:
        errors.print("onnx-squeeze: interrupted; nothing was written", markup=False)
        return EXIT_INPUT
    except MemoryError:
        if debug:
            traceback.print_exc()
        errors.print(
            "onnx-squeeze: error: ran out of memory (the model or its data needs more than this "
            "machine has; ONNX_SQUEEZE_MAX_TENSOR_BYTES bounds one tensor); nothing was written",
            markup=False,
        )
        return EXIT_INPUT
    except Exception as error:  # an internal bug: say so, and keep the traceback for --debug
        if debug:
            traceback.print_exc()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        errors.print(
            f"onnx-squeeze: internal error: {type(error).__name__}: {first} (rerun with --debug for the traceback and report it)",
            markup=False,
            highlight=False,
        )
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(run(sys.argv[1:]))
