"""The model flow: load, prepare, run the recipe's passes, finalize.

The original model is kept unchanged (passes work on a clone that shares weight tensors, so a
pass must replace a tensor rather than write into it) and is handed to passes as the teacher.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnx_squeeze import model_io
from onnx_squeeze.analysis import feed_shapes, resolve_input_shapes
from onnx_squeeze.calibration import HOLDOUT_EVERY, split_for_evaluation
from onnx_squeeze.errors import SettingsError, UnsupportedModelError
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.records import PassContext, PassReport

# Above this size the checker cannot take the model as one protobuf; it is checked from a file.
_CHECKER_INLINE_LIMIT = 1_800_000_000


@dataclasses.dataclass
class CompressResult:
    """The compressed model, the untouched original, and what every step did; the data the
    passes calibrated on and the data to judge the result on (see :func:`evaluation_data`)."""

    model: ir.Model
    original: ir.Model
    prepare: PassReport
    passes: list[PassReport]
    notes: list[str]
    seconds: float
    calibration: Any = None
    evaluation: Any = None
    evaluation_warning: str | None = None

    @property
    def reports(self) -> list[PassReport]:
        return [self.prepare, *self.passes]


def compress(
    source: model_io.ModelSource,
    recipe: Recipe | None = None,
    *,
    calibration: Any = None,
    evaluation: Any = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    default_dim: int | None = None,
    providers: tuple[str, ...] = ("cpu",),
    seed: int = 0,
    target_opset: int | None = None,
    check: bool = True,
) -> CompressResult:
    """Run the whole flow on a model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).

    ``calibration`` is a calibration source (:func:`onnx_squeeze.calibration.open_source`) for
    passes that need data; ``evaluation`` is held-out data for judging the result. Without it,
    every 5th batch of real calibration data is held out from the passes
    (:func:`evaluation_data`); the result's ``evaluation`` is what to compare on (None: no data
    was given). Input shapes come from ``shapes``, else the calibration data, else the model
    (``default_dim`` for dimensions none gives, only when asked). The input model object is not
    modified.
    """
    start = time.perf_counter()
    recipe = recipe or Recipe()
    passes = recipe.passes()
    calibration, evaluation, evaluation_warning = evaluation_data(calibration, evaluation)
    original = model_io.load(source)
    model_io.check_runnable(original)
    notes: list[str] = []
    model = original.clone()
    if target_opset is not None:
        model = convert_opset(model, target_opset)
        notes.append(f"converted to opset {target_opset}")
    opset = model_io.opset_version(model)
    for step in passes:
        if opset < step.min_opset:
            raise UnsupportedModelError(
                f"pass {step.name!r} needs opset >= {step.min_opset}, the model has opset {opset}; "
                f"rerun with --target-opset {step.min_opset}"
            )
    input_problem = checker_problem(original)
    if input_problem:
        notes.append(
            f"the input model fails onnx.checker ({input_problem}); the result is not checked"
        )
    if model_io.has_subgraphs(model):
        notes.append("the model has If/Loop/Scan subgraphs: only the main graph is compressed")
    try:
        settings = PrepareSettings(**recipe.prepare)
    except TypeError as error:
        raise SettingsError(f"recipe 'prepare': {error}") from None
    model, prepare_report = prepare(model, settings)
    # The teacher is the prepared model as it was before the passes: prepare is lossless and
    # keeps value names, so a pass can match student and teacher tensors by name.
    teacher = model.clone() if passes else original
    if shapes is None and calibration is not None:
        names = {value.name for value in model.graph.inputs}
        first = next(iter(calibration))
        shapes = {k: v for k, v in feed_shapes(first).items() if k in names}
    context = PassContext(
        calibration=calibration,
        teacher=teacher,
        providers=tuple(providers),
        seed=seed,
        shapes=resolve_input_shapes(model, shapes, default_dim=default_dim),
    )
    pass_reports = [step(model, context) for step in passes]
    finalize(model, notes, check=check and not input_problem)
    return CompressResult(
        model,
        original,
        prepare_report,
        pass_reports,
        notes,
        time.perf_counter() - start,
        calibration,
        evaluation,
        evaluation_warning,
    )


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
    """The first line of onnx.checker's complaint about the model (full check), or None."""
    if model_io.initializer_bytes(model) > _CHECKER_INLINE_LIMIT:
        return None  # too big for one protobuf; onnxruntime validates it when it loads
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
    return None


def finalize(model: ir.Model, notes: list[str], *, check: bool = True) -> None:
    """Remove what is unused, sort topologically and run the full checker where the size allows.

    A result that fails the checker is a bug in a pass, so it raises rather than being saved.
    """
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    common_passes.TopologicalSortPass()(model)
    if not check:
        return
    if model_io.initializer_bytes(model) > _CHECKER_INLINE_LIMIT:
        notes.append("full checker skipped: the model is over 2 GB")
        return
    problem = checker_problem(model)
    if problem:
        raise RuntimeError(f"the compressed model fails onnx.checker: {problem}")
