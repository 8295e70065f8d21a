"""Data for fine-tuning: calibration samples with the teacher's outputs as training records,
held-out feeds to measure fidelity on, and random minibatches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import fidelity
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import InputError
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.runtime import input_specs

if TYPE_CHECKING:
    from onnx_squeeze.passes.finetune import FinetuneSettings

# A training record holds a minibatch's model inputs by name, the teacher's outputs under
# TARGET + output name and, when the feeds carry them, the labels under LABELS.
TARGET = "teacher:"
LABELS = "labels:"


def samples_in(record: Feed) -> int:
    return len(next(iter(record.values())))


def _take(record: Feed, rows: Any) -> Feed:
    return {name: array[rows] for name, array in record.items()}


def chunks(records: list[Feed], size: int) -> Iterator[Feed]:
    """Every sample of ``records`` once, in chunks of ``size``."""
    for record in records:
        for start in range(0, samples_in(record), size):
            yield _take(record, slice(start, start + size))


def model_inputs(model: ir.Model) -> list[str]:
    """The inputs a feed gives (initializers listed as inputs keep their values)."""
    graph = model.graph
    return [v.name for v in graph.inputs if v.name not in graph.initializers]


@dataclasses.dataclass(frozen=True)
class Spread:
    """An output's channel axis (None: one channel) and each channel's variance over the
    training data, floored as :meth:`fidelity.OutputAccumulator.channel_spreads` floors it: the
    loss divides each channel's mean squared error by it, so scores beside pixel boxes count."""

    axis: int | None
    variance: np.ndarray


def output_spreads(records: list[Feed], kinds: fidelity.OutputKinds) -> dict[str, Spread]:
    """The :class:`Spread` of every float teacher output in ``records`` (one batch at a time;
    ``kinds``: the teacher's, whose declared shapes say which axes may be channel axes). Box
    distributions are spread as raw logits, undecoded: the loss compares those."""
    names = [key[len(TARGET) :] for key in records[0] if key.startswith(TARGET)]
    names = [n for n in names if np.issubdtype(records[0][TARGET + n].dtype, np.floating)]
    raw = dataclasses.replace(kinds, box_distributions={})
    found = fidelity.accumulators(names, kinds=raw)
    for record in records:
        for name, accumulator in found.items():
            accumulator.add(record[TARGET + name], record[TARGET + name])
    return {
        name: Spread(acc.axis if isinstance(acc.axis, int) else None, acc.channel_spreads())
        for name, acc in found.items()
    }


@dataclasses.dataclass
class HeldOut:
    """Held-out feeds and the teacher's outputs on them, to measure the student's fidelity."""

    feeds: list[Feed]
    outputs: list[dict[str, np.ndarray]]
    kinds: fidelity.OutputKinds = dataclasses.field(default_factory=fidelity.OutputKinds)

    @property
    def samples(self) -> int:
        return sum(samples_in(feed) for feed in self.feeds)

    def records(self) -> list[Feed]:
        """The held-out feeds as training records (inputs and the teacher's outputs)."""
        return [
            {**feed, **{TARGET + name: array for name, array in outputs.items()}}
            for feed, outputs in zip(self.feeds, self.outputs, strict=True)
        ]

    def fidelity(self, student: ir.Model) -> tuple[float, float]:
        """Worst cosine and worst relative squared error (the mean over an output's channels of
        each one's Σ|s - t|² / Σ|t - mean t|², :func:`fidelity.channel_error`) over the float
        outputs, in onnxruntime."""
        student_run = TensorRunner(student, list(self.outputs[0]))
        results = [student_run(feed) for feed in self.feeds]
        measured = fidelity.measure(self.outputs, results, kinds=self.kinds)
        errors = fidelity.channel_error(self.outputs, results, kinds=self.kinds)
        cosines = [output.cosine for output in measured.values()]
        return min(cosines, default=1.0), max(errors.values(), default=0.0)


@dataclasses.dataclass
class Data:
    """Training records (pooled into one when the batches agree in shape past the first axis,
    so that minibatches mix samples across batches) and the held-out feeds."""

    records: list[Feed]
    held_out: HeldOut
    spreads: dict[str, Spread]

    @property
    def samples(self) -> int:
        return sum(samples_in(record) for record in self.records)

    def minibatches(self, size: int, rng: np.random.Generator) -> Iterator[Feed]:
        """Random minibatches of ``size`` samples, without end."""
        while True:
            record = self.records[int(rng.integers(len(self.records)))]
            count = samples_in(record)
            yield _take(record, rng.choice(count, size=min(size, count), replace=False))


def read_feeds(context: PassContext, settings: FinetuneSettings, report: PassReport) -> list[Feed]:
    """The calibration samples fine-tuning holds, with labels when they are wanted and given."""
    source = context.data.source
    if settings.label_weight > 0 and hasattr(source, "carrying"):
        try:
            source = source.carrying([settings.labels_key])
        except InputError as error:
            report.notes.append(f"no labels read: {error}")
    return context.data.first_samples(settings.samples, "fine-tuning", report.notes, source)


def _pool(records: list[Feed]) -> list[Feed]:
    """One record holding every sample when the records agree in shape past the first axis."""
    shapes = {tuple((k, v.shape[1:]) for k, v in sorted(r.items())) for r in records}
    if len(shapes) != 1:
        return records
    return [{name: np.concatenate([r[name] for r in records]) for name in records[0]}]


def _split(feeds: list[Feed], share: float) -> tuple[list[Feed], list[Feed]]:
    """Training and held-out batches: ``share`` of them held out, at least one of each."""
    if len(feeds) < 2 or share <= 0:
        return feeds, []
    held = min(max(round(len(feeds) * share), 1), len(feeds) - 1)
    return feeds[:-held], feeds[-held:]


def prepare_data(
    feeds: list[Feed], teacher: ir.Model, settings: FinetuneSettings, report: PassReport
) -> Data:
    """Training records with the teacher's outputs, and the held-out part."""
    training, held_out = _split(feeds, settings.held_out)
    if not held_out:
        held_out = training
        report.notes.append("no held-out calibration batch: fidelity is measured on training data")
    use_labels = settings.label_weight > 0
    if use_labels and any(settings.labels_key not in feed for feed in training):
        report.notes.append(
            f"no {settings.labels_key!r} in the calibration feeds: distillation only"
        )
        use_labels = False
    inputs = model_inputs(teacher)
    outputs = [value.name for value in teacher.graph.outputs]
    teacher_run = TensorRunner(teacher, outputs)
    records = []
    for feed in training:
        record = {name: feed[name] for name in inputs}
        results = teacher_run(record)
        record.update((TARGET + name, results[name]) for name in outputs)
        if use_labels:
            record[LABELS] = np.asarray(feed[settings.labels_key])
        records.append(record)
    held_feeds = [{name: feed[name] for name in inputs} for feed in held_out]
    kinds = fidelity.OutputKinds.of(teacher)
    held = HeldOut(held_feeds, [teacher_run(feed) for feed in held_feeds], kinds)
    return Data(_pool(records), held, output_spreads(records, kinds))


def fixed_batch(model: ir.Model) -> int | None:
    """The first dimension of the inputs when the model fixes it."""
    for spec in input_specs(model):
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return int(spec.shape[0])
    return None
