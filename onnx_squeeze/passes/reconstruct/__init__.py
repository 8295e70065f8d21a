"""Distillation in closed form: refit the compressed model's layers to the original's outputs.

The original (prepared) model is the teacher, the compressed one the student; calibration data
needs no labels. Student and teacher tensors are matched by value name (passes keep the output
names of the nodes they change), and a student tensor whose channel axis was shrunk carries
``onnx_squeeze.kept_channels`` saying which teacher channels it kept.

Layers (Conv, Gemm, MatMul with a constant weight) that differ from the teacher or see inputs that
do are processed in topological order, in *waves*: the student is re-run before each wave (up to
the wave's inputs only), so a layer is fitted to the inputs that the corrected layers before it
produce; the teacher runs once per chunk of waves (:mod:`.targets`). Per layer, by method:

- ``lstsq``: ridge regression of the teacher's output on the student's actual input (im2col
  patches for Conv, per group for grouped/depthwise Conv), from Gram matrices accumulated batch
  by batch. A factorized pair (a node made by a pass feeding a pointwise partner that keeps the
  original output) is refitted jointly as the best rank-r map (reduced-rank regression).
- ``bn``: per-channel output mean and variance matched to the teacher (scale the weights, shift
  the bias); on an unfused BatchNormalization, its scale and shift.
- ``bias``: per-channel output mean matched (bias correction); works on quantized layers too,
  re-quantizing an INT32 bias.
- ``head``: the final classifier/projection refitted to the teacher's logits by ridge regression
  (soft-target distillation in closed form), even when ``lstsq`` is off.

A layer takes the first method in the order lstsq (or head), bn, bias that is enabled and applies.
With ``guard`` (default), the refit is undone when it makes the model's outputs on the
calibration data further from the teacher's than before. Output errors are judged per output
channel, each relative to its own spread, and so are the refits of the layers with no weight
layer after them (their ridge, their rank, whether they help): a detector's class scores count
as much as the pixel boxes concatenated beside them.

Modules: :mod:`.planner` (which layers, which method, which wave), :mod:`.targets` (the teacher's
side), :mod:`.waves` (the student's side and the fits), :mod:`.linear` (layers as regressions,
constants written with undo), :mod:`.settings`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnx_squeeze import fidelity
from onnx_squeeze.calibration import joined
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.passes.reconstruct.linear import Edits
from onnx_squeeze.passes.reconstruct.planner import Planner
from onnx_squeeze.passes.reconstruct.settings import ReconstructSettings
from onnx_squeeze.passes.reconstruct.targets import Targets, activation_bytes, chunks, run_shapes
from onnx_squeeze.passes.reconstruct.waves import Wave
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.shapes import samples_in
from onnx_squeeze.units import human_bytes

_BATCH = 8  # samples per onnxruntime run (feeds of one shape are joined up to it)
# Activations that one pass of the model over the recovery samples may write: every wave runs
# the student over all of them, so this bounds recovery's time on large inputs (PP-OCR's text
# detector at 736×736 writes 876 MiB per sample, a ResNet-50 at 224×224 143 MiB).
ACTIVATION_BUDGET = 4 * 2**30
_MIN_SAMPLES = 2  # recovery keeps at least this many samples, whatever their size


def _output_error(
    student: ir.Model,
    reference: list[dict[str, np.ndarray]],
    feeds: list[Feed],
    kinds: fidelity.OutputKinds,
) -> float:
    """The worst graph output's error on ``feeds``: the mean over its channels of each channel's
    1 - R² (:func:`fidelity.channel_error`, the outputs read as the final comparison reads the
    teacher's ``kinds``), so that scores beside pixel boxes count."""
    outputs = _outputs(student, list(reference[0]), feeds)
    found = fidelity.channel_error(reference, outputs, kinds=kinds)
    return max(found.values(), default=0.0)


def _outputs(model: ir.Model, names: list[str], feeds: list[Feed]) -> list[dict[str, np.ndarray]]:
    """The named tensors on every feed; the session goes once they are computed (a ResNet-50
    session and its arena for a batch of 8 are ~250 MB, not to be held through the waves)."""
    with TensorRunner(model, names) as runner:
        return [runner(feed) for feed in feeds]


def _affordable(
    feeds: list[Feed], teacher: ir.Model, context: PassContext, positions: int, report: PassReport
) -> tuple[list[Feed], int]:
    """The first feeds whose activations fit :data:`ACTIVATION_BUDGET`, and the output positions
    per sample that keep each layer's regression about as many rows as all the feeds would
    have given (sampled positions of one large image are nearly as informative as those of
    another image, and far cheaper: the image is run once per wave)."""
    counts = [samples_in(feed, context.data.axes) for feed in feeds]
    per_sample = activation_bytes(teacher, run_shapes(teacher, feeds[0])) / max(counts[0], 1)
    total = sum(counts)
    allowed = max(_MIN_SAMPLES, int(ACTIVATION_BUDGET // per_sample)) if per_sample else total
    if total <= allowed:
        return feeds, positions
    kept, count = [], 0
    for feed, samples in zip(feeds, counts, strict=True):
        if count >= allowed:
            break
        kept.append(feed)
        count += samples
    more = -(-positions * total // count)
    report.notes.append(
        f"fitted on the first {count} of {total} samples (each writes "
        f"{human_bytes(per_sample)} of activations, {human_bytes(ACTIVATION_BUDGET)} at most "
        f"per pass over them) at {more} output positions per sample and layer instead of "
        f"{positions}, so that every fit keeps about as many rows"
    )
    return kept, more


# ---------------------------------------------------------------------------------------------
# The pass


@register
class Reconstruct(Pass):
    """Refit compressed layers to the teacher's outputs on calibration data (closed form)."""

    name = "reconstruct"
    Settings = ReconstructSettings

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        teacher = context.require_teacher("reconstruct")
        TopologicalSortPass()(model)
        layers = Planner(self.settings, teacher, report).plan(model, teacher)
        if not layers:
            report.notes.append("nothing to recover: no layer differs from the teacher")
            return
        feeds = context.data.first_samples(self.settings.samples, "recovery", report.notes)
        feeds, positions = _affordable(feeds, teacher, context, self.settings.positions, report)
        feeds = joined(feeds, _BATCH, teacher)
        reference = _outputs(teacher, [v.name for v in model.graph.outputs], feeds)
        kinds = fidelity.OutputKinds.of(teacher)
        before = _output_error(model, reference, feeds, kinds)
        edits = Edits(model, teacher)
        every = self.settings.refresh_every
        waves = [
            [layer for layer in layers if layer.wave // every == wave]
            for wave in sorted({layer.wave // every for layer in layers})
        ]
        for chunk in chunks(waves, teacher, feeds, positions):
            members = [layer for wave in chunk for layer in wave]
            targets = Targets(teacher, members, feeds, positions, context.seed)
            for wave in chunk:
                Wave(wave, self.settings).fit(model, feeds, targets, edits, report)
            del targets
        after = _output_error(model, reference, feeds, kinds)
        summary = (
            "output error vs teacher (worst output's mean per-channel 1 - R², calibration data): "
            f"{before:.4g} -> {after:.4g}"
        )
        if self.settings.guard and after > before:
            edits.undo()
            report.notes.append(f"{summary}: worse, so every refit was undone")
            for record in report.records:
                if record.action == "refit":
                    record.action, record.detail = "skipped", f"undone by guard; {record.detail}"
            return
        report.notes.append(summary)
