"""The model flow: load, prepare, the recipe's passes, finalize, compare, gate, save, report.

The original model is kept unchanged (passes work on a clone that shares weight tensors, so a
pass must replace a tensor rather than write into it) and is handed to passes as the teacher.
The CLI only parses options into :func:`compress` and prints what it returns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_squeeze import gates, log, model_io, report, scratch, validation, verdict
from onnx_squeeze.calibration import (
    HOLDOUT_EVERY,
    CalibrationSource,
    open_source,
    split_for_evaluation,
)
from onnx_squeeze.calibration.service import RANDOM_SAMPLES, Calibration
from onnx_squeeze.comparison import compare as compare_models
from onnx_squeeze.errors import SettingsError, UnsupportedModelError
from onnx_squeeze.graph_utils import flush_subnormals
from onnx_squeeze.passes.base import PASS_REGISTRY, Pass
from onnx_squeeze.passes.quantize import accuracy_control
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.recipe import Recipe, Step
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.shapes import concrete_input_shapes, feed_shapes, resolve_input_shapes


@dataclasses.dataclass
class CompressResult:
    """Everything a run did and found: the compressed model and the untouched original, what
    every step did, the data the passes calibrated on and the data the result was judged on,
    the comparison, gates and warnings, where the model was written and the report."""

    model: ir.Model
    original: ir.Model
    prepare: PassReport
    passes: list[PassReport]
    notes: list[str]
    seconds: float
    calibration: Calibration
    evaluation: CalibrationSource | None = None
    evaluation_warning: str | None = None
    comparison: dict[str, Any] | None = None
    gates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    blocking: str | None = None
    output: str | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    input_path: str | None = None

    @property
    def reports(self) -> list[PassReport]:
        return [self.prepare, *self.passes]

    def model_proto(self) -> onnx.ModelProto:
        """The compressed model as an ``onnx.ModelProto`` (weights in memory)."""
        return ir.to_proto(self.model)

    def save(
        self, path: str | os.PathLike, *, external_data: bool | None = None, force: bool = False
    ) -> Path:
        """Write the compressed model atomically (never over the input model unless ``force``);
        ``external_data`` as :func:`onnx_squeeze.model_io.save` takes it. Returns the path."""
        return model_io.save(
            self.model,
            path,
            input_path=self.input_path,
            force=force,
            external_data=external_data,
        )

    @property
    def passed(self) -> bool:
        """No user gate failed (and, under ``strict``, no default gate or warning either)."""
        return self.blocking is None


def compress(
    source: model_io.ModelSource,
    recipe: Recipe | None = None,
    *,
    calibration: Any = None,
    evaluation: Any = None,
    constants: Mapping[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    compare: bool = True,
    checks: Sequence[str] = (),
    strict: bool = False,
    warn_sqnr_db: float = verdict.WARN_SQNR_DB,
    channel_axes: Mapping[str, int | None] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    default_dim: int | None = None,
    batch: int | None = None,
    preset: str = "imagenet",
    calibration_samples: int = RANDOM_SAMPLES,
    samples: int = 8,
    providers: tuple[str, ...] = ("cpu",),
    threads: Sequence[int] = (1,),
    runs: int = 30,
    seed: int = 0,
    target_opset: int | None = None,
    check: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    write_on_fail: bool = False,
) -> CompressResult:
    """The whole flow: load, prepare, the recipe's passes, finalize, compare, gate, save, report.

    ``source`` is a path, ``zoo:NAME``, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never
    modified). ``calibration`` and ``evaluation`` are data (:func:`onnx_squeeze.calibration.
    open_source`): a path (.npz/.npy, a folder of them or of images), ``"random"``, a dict
    {input name: samples stacked on the batch axis}, a list or other iterable of feed dicts,
    an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``), or a source. Without
    ``evaluation``, every 5th batch of real calibration data is held out from the passes and
    judged on (:func:`evaluation_data`), or all of it when no pass read it; with random or no
    calibration data the result is judged on other random draws, and the warnings say so.
    ``constants`` (input name -> one value, e.g. ``{"sr": 16000}``, or an array) go with every
    feed of all of them; random data is refused for an integer or scalar input none gives.
    Input shapes come from ``shapes``, else the data, else the model (``default_dim`` for
    dimensions none gives, only when asked).

    ``compare`` runs original and result side by side (fidelity per output channel, latency at
    each of ``threads`` on the first of ``providers``, ``runs`` timed runs, size); ``checks``
    are gate expressions (none: the default gate, which blocks only under ``strict``).
    ``output`` is written atomically when nothing blocks (or with ``write_on_fail``); else
    :meth:`CompressResult.save` writes the model later. Run warnings are also issued as
    :class:`onnx_squeeze.SqueezeWarning` and logged to the ``onnx_squeeze`` logger.
    """
    start = time.perf_counter()
    recipe = recipe or Recipe()
    recipe.passes()  # a bad recipe fails before any work is done
    checks = gates.validated(checks)
    recipe = _aimed_at(recipe, checks)
    if (checks or evaluation is not None) and not compare:
        raise SettingsError("gates and evaluation data need the comparison; keep compare on")
    path = model_io.input_path(source)
    if output is not None and path and not force and model_io.same_file(path, output):
        raise SettingsError(
            f"{output}: refusing to overwrite the input model; choose another output (-o) or "
            "force it (--force)"
        )
    original = model_io.load(source)
    model_io.check_runnable(original)

    def data(spec: Any, count: int, data_seed: int) -> CalibrationSource:
        return open_source(
            spec,
            original,
            shapes=shapes,
            count=count,
            seed=data_seed,
            preset=preset,
            batch_size=batch,
            default_dim=default_dim,
            constants=constants,
        )

    given = data(calibration, calibration_samples, seed) if calibration is not None else None
    if shapes is None and given is not None:
        shapes = _data_shapes(original, given)
    judged = data(evaluation, samples, seed) if evaluation is not None else None
    if not compare or (judged is not None and _same_data(calibration, evaluation)):
        judged = given  # nothing judged, or judged on the same data: nothing held out
    if compare and judged is None and (given is None or getattr(given, "is_random", False)):
        # Random data to judge on, drawn before any work (it fails fast on unknown shapes);
        # other draws than the calibration's.
        judged = data("random", samples, seed + 1)
    kept, judged, overlap = evaluation_data(given, judged)
    service = Calibration(kept)
    service.draw_random_for(
        original,
        lambda model: concrete_input_shapes(model, shapes, batch=batch, default_dim=default_dim),
        seed=seed,
        count=calibration_samples,
        constants=constants,
    )
    log.logger.info(
        "prepare, then %s",
        ", ".join(step.name for step in recipe.passes()) or "no passes",
    )
    model, prepared, passes, notes = _transform(
        original, recipe, service, shapes, default_dim, providers, seed, target_opset, check
    )
    label = getattr(judged, "label", "random")
    if kept is not given and not service.used:
        # No pass read the calibration data, so none of it was seen: judge on all of it (five
        # times the held-out part's reads).
        judged, label = given, f"{given.label} (all of it: no pass read the calibration data)"
    result = CompressResult(model, original, prepared, passes, notes, 0.0, service, judged, overlap)
    result.input_path = path
    if compare:
        log.logger.info("comparing with the original on %s", label)
        result.comparison = judge(
            result.original,
            result.model,
            judged,
            label=label,
            names=("original", "compressed"),
            paths=(path, None),
            providers=providers,
            threads=threads,
            batch=batch,
            runs=runs,
            shapes=shapes,
            default_dim=default_dim,
            channel_axes=channel_axes,
        )
        result.gates = gates.judged(checks, result.comparison["metrics"], verdict.DEFAULT_GATE)
        if kept is not given and service.used and verdict.weakly_read(result.comparison):
            result.gates += _seen_gates(result, kept, checks, providers, shapes, channel_axes)
    result.warnings = verdict.run_warnings(
        result.comparison,
        [r.to_dict() for r in result.reports],
        calibration=result.calibration if result.calibration.used else None,
        evaluation=judged,
        overlap=overlap,
        warn_sqnr_db=warn_sqnr_db,
    )
    result.notes += verdict.speed_hint(result.passes, result.comparison)
    for warning in result.warnings:
        log.warn(warning)
    result.blocking = verdict.blocking(result.gates, result.warnings, strict)
    if output is not None and (result.blocking is None or write_on_fail):
        written = model_io.save(
            result.model, output, input_path=path, force=force, external_data=external_data
        )
        result.output = str(written)
        if result.comparison is not None:
            result.comparison["models"][1]["size_bytes"] = model_io.file_size(written)
    result.seconds = time.perf_counter() - start
    result.report = report.build_report(
        command="compress",
        input_path=path or (source if isinstance(source, str) else None),
        output_path=result.output,
        reports=result.reports,
        notes=result.notes,
        comparison=result.comparison,
        gates=result.gates,
        warnings=result.warnings,
        calibration=result.calibration.label if result.calibration.used else None,
        evaluation=result.comparison["inputs_label"] if result.comparison else None,
        recipe=recipe.to_dict(),
        seconds=result.seconds,
        input_shapes=shapes,
    )
    return result


def _transform(
    original: ir.Model,
    recipe: Recipe,
    calibration: Calibration,
    shapes: Mapping[str, Sequence[int]] | None,
    default_dim: int | None,
    providers: tuple[str, ...],
    seed: int,
    target_opset: int | None,
    check: bool,
) -> tuple[ir.Model, PassReport, list[PassReport], list[str]]:
    """Prepare, run the passes (calibrated by ``calibration``) and finalize a clone of
    ``original``."""
    passes = recipe.passes()
    notes: list[str] = []
    model = original.clone()
    if target_opset is not None:
        model = convert_opset(model, target_opset)
        notes.append(f"converted to opset {target_opset}")
    model = _opset_for(model, passes, notes)
    if passes:
        validation.check_weights(model)
    input_problem = checker_problem(original)
    if input_problem:
        notes.append(
            f"the input model fails onnx.checker ({input_problem}); the result is not checked"
        )
    try:
        settings = PrepareSettings(**recipe.prepare)
    except TypeError as error:
        raise SettingsError(f"recipe 'prepare': {error}") from None
    model, prepare_report = prepare(model, settings)
    # The teacher is the prepared model as it was before the passes: prepare is lossless and
    # keeps value names, so a pass can match student and teacher tensors by name.
    teacher = model.clone() if passes else original
    context = PassContext(
        calibration=calibration,
        teacher=teacher,
        providers=tuple(providers),
        seed=seed,
        shapes=resolve_input_shapes(model, shapes, default_dim=default_dim),
    )
    pass_reports = [step(model, context) for step in passes]
    if flushed := finalize(model, check=check and not input_problem):
        notes.append(
            f"{flushed} subnormal weight values the passes left set to 0 (CPUs compute with "
            "them many times slower)"
        )
    return model, prepare_report, pass_reports, notes


def _aimed_at(recipe: Recipe, checks: Sequence[str]) -> Recipe:
    """The recipe with every pass that works towards a gate (a ``target`` setting: INT8's
    accuracy control, the default pruning and low-rank searches) aimed at the user's checks it
    can measure from outputs (else at the default gate), and INT8's accuracy control bounded by
    the user's ``latency_ratio<=X`` (``control_latency_ratio``), unless a step sets its own."""
    parsed = gates.parse_gates(checks)
    aims = {}
    if measurable := [g.expr for g in parsed if g.metric in accuracy_control.MEASURABLE]:
        aims["target"] = ", ".join(measurable)
    if latency := [g.threshold for g in parsed if g.metric == "latency_ratio" and "<" in g.op]:
        aims["control_latency_ratio"] = min(latency)
    steps = [
        Step(step.name, {**_settings_of(step.name, aims), **step.settings}) for step in recipe.steps
    ]
    return dataclasses.replace(recipe, steps=steps)


def _settings_of(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that the pass ``name`` has settings for."""
    settings = getattr(PASS_REGISTRY.get(name), "Settings", None)
    fields = {f.name for f in dataclasses.fields(settings)} if settings is not None else set()
    return {key: value for key, value in values.items() if key in fields}


def _opset_for(model: ir.Model, passes: Sequence[Pass], notes: list[str]) -> ir.Model:
    """``model`` at the opset its passes need: converted with onnx's version converter when
    a pass needs a newer one (opset 11/12 exports are common for detectors and OCR)."""
    opset = model_io.opset_version(model)
    needed = max(passes, key=lambda step: step.min_opset, default=None)
    if needed is None or opset >= needed.min_opset:
        return model
    try:
        converted = convert_opset(model, needed.min_opset)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(
            f"pass {needed.name!r} needs opset >= {needed.min_opset}, the model has opset "
            f"{opset}, and {error}"
        ) from None
    notes.append(
        f"converted from opset {opset} to {needed.min_opset} for pass {needed.name!r} "
        "(onnx's version converter)"
    )
    return converted


def judge(
    a: ir.Model,
    b: ir.Model,
    data: Any,
    *,
    names: tuple[str, str],
    paths: tuple[str | None, str | None] = (None, None),
    providers: Sequence[str] = ("cpu",),
    threads: Sequence[int] = (1,),
    batch: int | None = None,
    runs: int = 30,
    shapes: Mapping[str, Sequence[int]] | None = None,
    default_dim: int | None = None,
    channel_axes: Mapping[str, int | None] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Models ``a`` and ``b`` side by side on ``data`` (``label``: what the report calls it,
    by default the data's own label), as a report dict."""
    comparison = compare_models(
        a,
        b,
        feeds=data,
        inputs_label=label or getattr(data, "label", None),
        providers=tuple(providers),
        threads=tuple(threads),
        batch=batch or 1,
        runs=runs,
        shapes=shapes,
        paths=paths,
        default_dim=default_dim,
        channel_axes=channel_axes,
    ).to_dict()
    comparison["names"] = list(names)
    return comparison


def _seen_gates(
    result: CompressResult,
    seen: CalibrationSource,
    checks: Sequence[str],
    providers: Sequence[str],
    shapes: Mapping[str, Sequence[int]] | None,
    channel_axes: Mapping[str, int | None] | None,
) -> list[dict[str, Any]]:
    """The gates that fail on the data the passes saw, when the held-out data was read too few
    times to tell (:func:`verdict.weakly_read`): figures on seen data are optimistic, so a gate
    that fails even there fails the run (PP-OCRv4 INT8 read 6 of 6 held-out lines the same and
    81 % of 32 fresh ones). One disagreement among few reads is no such evidence (FP16 read
    one of PP-OCRv4's 26 seen lines otherwise and none of 134 others), so an agreement gate
    fails there only if it would with one more read agreeing (:func:`verdict.one_read_more`).
    The comparison keeps the seen data's figures."""
    label = f"{seen.label}: seen by the passes"
    log.logger.info("too few held-out reads; the gates are checked on %s too", label)
    comparison = judge(
        result.original,
        result.model,
        seen,
        names=("original", "compressed"),
        providers=providers,
        runs=0,
        shapes=shapes,
        channel_axes=channel_axes,
        label=label,
    )
    metrics = comparison["metrics"]
    result.comparison["seen"] = {"inputs_label": label, "metrics": metrics}
    reads = sum(int(f.get("reads") or 0) for f in comparison["fidelity"])
    result.notes.append(
        f"too few held-out reads: on the data the passes saw ({reads} reads), argmax_agreement "
        f"= {metrics.get('argmax_agreement', float('nan')):.4g} (optimistic: the passes fit it)"
    )
    lenient = {**metrics, **verdict.one_read_more(comparison["fidelity"])}
    return [
        {**measured, "seen": True}
        for measured, judged in zip(
            gates.judged(checks, metrics, verdict.DEFAULT_GATE),
            gates.judged(checks, lenient, verdict.DEFAULT_GATE),
            strict=True,
        )
        if not judged["passed"]
    ]


def _data_shapes(model: ir.Model, data: CalibrationSource) -> dict[str, tuple[int, ...]]:
    """The input shapes of the data's first batch (the shapes a run takes from its data): the
    source cut it on each input's batch axis, so they hold one batch there."""
    names = {value.name for value in model.graph.inputs}
    return {k: v for k, v in feed_shapes(next(iter(data))).items() if k in names}


def _same_data(first: Any, second: Any) -> bool:
    """Whether two data specs name the same data (the same object, file or folder)."""
    if first is second:
        return True
    if isinstance(first, str | os.PathLike) and isinstance(second, str | os.PathLike):
        return Path(first).resolve() == Path(second).resolve()
    return False


def evaluation_data(calibration: Any, evaluation: Any) -> tuple[Any, Any, str | None]:
    """The data the passes calibrate on, the data the result is judged on, and a warning when
    the figures will be optimistic (judged on data the passes saw).

    Given evaluation data is used as it is. Otherwise real calibration data is split: every
    ``HOLDOUT_EVERY``-th batch (20 %) is held out from the passes and judged on; data with fewer
    batches than that is judged on as a whole, with the warning. Random calibration data is not
    split (the caller draws other random data to judge on), and no data gives None.
    """
    if evaluation is not None:
        if evaluation is calibration:
            return calibration, evaluation, _SAME_DATA
        return calibration, evaluation, None
    if calibration is None or getattr(calibration, "is_random", False):
        return calibration, None, None
    kept, held = split_for_evaluation(calibration)
    if held is None:
        return (
            calibration,
            calibration,
            (
                f"{_SAME_DATA} (the calibration data has fewer than {HOLDOUT_EVERY} batches, too "
                "few to hold one out: pass --eval DATA)"
            ),
        )
    return kept, held, None


_SAME_DATA = (
    "fidelity is measured on the calibration data the passes saw: the figures are optimistic"
)


def convert_opset(model: ir.Model, version: int) -> ir.Model:
    """Convert to another default-domain opset with onnx's version converter."""
    current = model_io.opset_version(model)
    if version == current:
        return model
    try:
        converted = onnx.version_converter.convert_version(ir.to_proto(model), version)
    except Exception as error:  # the converter raises bare RuntimeErrors for unsupported ops
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to {version}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}"
        ) from None
    return ir.from_proto(converted)


def checker_problem(model: ir.Model) -> str | None:
    """The first line of onnx.checker's complaint about the model (full check), or None.

    Checked from a file with external data: the weights stay on disk, so the check costs no
    copy of them (a ResNet-50 in memory peaked 200 MB higher) and models over 2 GB are checked
    too.
    """
    with scratch.folder("check") as folder:
        path = os.path.join(folder, "checked.onnx")
        ir.save(model, path, external_data="checked.onnx.data")
        try:
            onnx.checker.check_model(path, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            text = str(error).strip()
            return text.splitlines()[0] if text else type(error).__name__
    return None


def finalize(model: ir.Model, *, check: bool = True) -> int:
    """Remove what is unused, set subnormal weights to 0 (recovery's refits leave some, which
    slow CPUs many times), sort topologically and run the full checker; returns how many
    weight values were subnormal.

    A result that fails the checker is a bug in a pass, so it raises rather than being saved.
    """
    flushed = flush_subnormals(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    common_passes.TopologicalSortPass()(model)
    if check and (problem := checker_problem(model)):
        raise RuntimeError(f"the compressed model fails onnx.checker: {problem}")
    return flushed
