"""Gradient fine-tuning of the compressed model (student) against the original (teacher).

The optional complement of the closed-form ``reconstruct`` pass: when PyTorch is installed
(``pip install 'onnx-squeeze[torch]'``), the student graph is evaluated with torch functional ops
(:mod:`onnx_squeeze.torch_graph`) and its float weights are trained with AdamW for ``steps``
minibatches of calibration data to reproduce the teacher's outputs, at a rate that warms up and
then decays; its peak, unless ``learning_rate`` is given, is the one of ``LEARNING_RATES`` whose
short trial ends with the lowest held-out loss (a heavily pruned CNN and a transformer want
rates ten times apart). The loss:

- every float graph output of rank 2 (a classifier's logits) contributes the soft-target loss
  KL(teacher_T || student_T)·T² at temperature ``temperature``;
- every other float output (feature maps, hidden states, detection heads) contributes its mean
  squared error divided by the teacher output's variance, so outputs of any scale weigh alike;
- when the calibration feeds carry labels under ``labels_key`` (a key that is not a model input:
  from a reader's ``get_next()``, or an array of that name in the ``.npz`` calibration files)
  and ``label_weight`` > 0, the cross-entropy of the first rank-2 output against them is added
  with that weight; without labels it is distillation only.

Teacher outputs are computed once per calibration batch in onnxruntime and kept (only outputs,
no activations); the calibration inputs read (``samples``) are held in memory as ``reconstruct``
does. A share ``held_out`` of the batches is kept apart to measure fidelity in onnxruntime
(worst cosine and worst relative squared error over the outputs) before and after; with
``guard``, training that makes the error worse is undone. Quantized models are skipped (run
finetune before quantization), and so is a model with an op the evaluator does not know, naming
the node: the model is then left unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import feeds_in_memory
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.runtime import create_session, input_specs

Feed = dict[str, np.ndarray]

TRAIN_CHOICES = ("all", "bias_norm")
# Peak rates tried when none is given: a heavily pruned CNN wanted 1e-3 (digits: -1.3 points
# after recovery at 1e-4, -0.3 at 1e-3), while a transformer student drifts at rates that high.
LEARNING_RATES = (1e-4, 3e-4, 1e-3)
TRIAL_SHARE = 0.2  # each tried rate trains for this share of the steps
NO_TORCH_MESSAGE = (
    "finetune: gradient fine-tuning needs PyTorch; install it with pip install "
    "'onnx-squeeze[torch]' (or use the closed-form recover pass)"
)
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
}
_LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}


@dataclasses.dataclass
class FinetuneSettings:
    steps: int = 200  # optimizer steps, one minibatch each
    learning_rate: float | None = None  # peak rate; None: the best of LEARNING_RATES on trial
    batch_size: int = 16  # samples per step (a model with a fixed batch dimension uses it)
    temperature: float = 4.0  # soft targets of rank-2 outputs (logits)
    label_weight: float = 0.0  # weight of the labels' cross-entropy, when the feeds carry labels
    labels_key: str = "labels"
    weight_decay: float = 0.0
    train: str = "all"  # "all" float weights, or "bias_norm": biases and norm scales only
    samples: int = 256  # calibration samples read (training and held-out together)
    held_out: float = 0.25  # share of the calibration batches kept apart to measure fidelity
    guard: bool = True  # undo the training when held-out fidelity ends up worse
    seed: int = 0


def torch_available() -> bool:
    """True when PyTorch can be imported (it is an optional dependency)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# What trains


def _bias_add(node: ir.Node) -> int | None:
    """Index of the constant input of an Add that adds a bias to a linear layer's output."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index, value in enumerate(node.inputs):
        other = node.inputs[1 - index]
        producer = other.producer() if other is not None else None
        linear = producer is not None and producer.op_type in _LINEAR_OPS
        if value is not None and value.is_initializer() and linear:
            return index
    return None


def _trainable_inputs(node: ir.Node, train: str) -> list[int]:
    """Input indices of ``node`` whose initializers train under the ``train`` setting."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return [1, 2] if train == "all" else [2]
    if node.op_type == "Gemm":
        return [0, 1, 2] if train == "all" else [2]
    if node.op_type == "MatMul":
        return [0, 1] if train == "all" else []
    if node.op_type in _NORM_OPS:
        return [1, 2]
    bias = _bias_add(node)
    return [] if bias is None else [bias]


def trainable_names(graph: ir.Graph, train: str) -> dict[str, ir.Node]:
    """Initializers to train, by name, with the first node that uses each."""
    from onnx_squeeze.torch_graph import trainable_value

    chosen: dict[str, ir.Node] = {}
    for node in graph:
        for index in _trainable_inputs(node, train):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.name and trainable_value(value):
                chosen.setdefault(value.name, node)
    return chosen


# ---------------------------------------------------------------------------------------------
# Data: calibration batches, teacher outputs, minibatches


# A training record holds a minibatch's model inputs by name, the teacher's outputs under
# TARGET + output name and, when the feeds carry them, the labels under LABELS.
TARGET = "teacher:"
LABELS = "labels:"


def _rows(record: Feed) -> int:
    return len(next(iter(record.values())))


def _take(record: Feed, rows: Any) -> Feed:
    return {name: array[rows] for name, array in record.items()}


def _chunks(records: list[Feed], size: int) -> Iterator[Feed]:
    """Every sample of ``records`` once, in chunks of ``size``."""
    for record in records:
        for start in range(0, _rows(record), size):
            yield _take(record, slice(start, start + size))


class _HeldOut:
    """Held-out feeds and the teacher's outputs on them, to measure the student's fidelity."""

    def __init__(self, session: Any, feeds: list[Feed]) -> None:
        self.names = [o.name for o in session.get_outputs()]
        self.feeds = [{i.name: feed[i.name] for i in session.get_inputs()} for feed in feeds]
        self.outputs = [session.run(self.names, feed) for feed in self.feeds]

    @property
    def samples(self) -> int:
        return sum(_rows(feed) for feed in self.feeds)

    def records(self) -> list[Feed]:
        """The held-out feeds as training records (inputs and the teacher's outputs)."""
        return [
            {**feed, **{TARGET + n: a for n, a in zip(self.names, outputs, strict=True)}}
            for feed, outputs in zip(self.feeds, self.outputs, strict=True)
        ]

    def fidelity(self, student: ir.Model) -> tuple[float, float]:
        """Worst cosine and worst relative squared error (Σ|s - t|² / Σ|t - mean t|²) over the
        float outputs, in onnxruntime."""
        session = create_session(student)
        sums = np.zeros((len(self.names), 5))  # s·t, s·s, t·t, |s - t|², |t - mean t|²
        for feed, expected in zip(self.feeds, self.outputs, strict=True):
            for row, s, t in zip(sums, session.run(self.names, feed), expected, strict=True):
                s, t = s.astype(np.float64).ravel(), t.astype(np.float64).ravel()
                row += (s @ t, s @ s, t @ t, np.square(s - t).sum(), np.square(t - t.mean()).sum())
        cosines = sums[:, 0] / np.sqrt(np.maximum(sums[:, 1] * sums[:, 2], 1e-300))
        errors = sums[:, 3] / np.maximum(sums[:, 4], 1e-300)
        return float(cosines.min()), float(errors.max())


@dataclasses.dataclass
class _Data:
    """Training records (pooled into one when the batches agree in shape past the first axis,
    so that minibatches mix samples across batches) and the held-out feeds."""

    records: list[Feed]
    held_out: _HeldOut

    @property
    def samples(self) -> int:
        return sum(_rows(record) for record in self.records)

    def minibatches(self, size: int, rng: np.random.Generator) -> Iterator[Feed]:
        """Random minibatches of ``size`` samples, without end."""
        while True:
            record = self.records[int(rng.integers(len(self.records)))]
            count = _rows(record)
            yield _take(record, rng.choice(count, size=min(size, count), replace=False))


def _read_feeds(
    context: PassContext, teacher: ir.Model, settings: FinetuneSettings, report: PassReport
) -> list[Feed]:
    source = context.data.source if context.data.supplied else None
    if settings.label_weight > 0 and hasattr(source, "carrying"):
        try:
            source = source.carrying([settings.labels_key])
        except InputError as error:
            report.notes.append(f"no labels read: {error}")
    return feeds_in_memory(
        source,
        input_specs(teacher),
        settings.samples,
        seed=settings.seed,
        batch_size=16,
        purpose="fine-tuning",
        notes=report.notes,
        shapes=lambda: context.input_shapes(teacher),
    )


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


def _prepare_data(
    feeds: list[Feed], teacher: ir.Model, settings: FinetuneSettings, report: PassReport
) -> _Data:
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
    session = create_session(teacher)
    inputs = [value.name for value in teacher.graph.inputs]
    outputs = [o.name for o in session.get_outputs()]
    records = []
    for feed in training:
        record = {name: feed[name] for name in inputs}
        results = session.run(outputs, record)
        record.update((TARGET + name, array) for name, array in zip(outputs, results, strict=True))
        if use_labels:
            record[LABELS] = np.asarray(feed[settings.labels_key])
        records.append(record)
    return _Data(_pool(records), _HeldOut(session, held_out))


def _fixed_batch(model: ir.Model) -> int | None:
    """The first dimension of the inputs when the model fixes it."""
    for spec in input_specs(model):
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return int(spec.shape[0])
    return None


# ---------------------------------------------------------------------------------------------
# Training


def _one_cycle(step: int, steps: int) -> float:
    """The rate's factor at ``step`` of ``steps``: linear warm-up over the first tenth, then
    cosine decay towards zero."""
    warm_up = max(1, round(0.1 * steps))
    if step < warm_up:
        return (step + 1) / warm_up
    return 0.5 * (1 + math.cos(math.pi * (step - warm_up) / max(1, steps - warm_up)))


def _trial_steps(settings: FinetuneSettings) -> int:
    return max(round(settings.steps * TRIAL_SHARE), 1)


class _Trainer:
    """AdamW on the evaluator's parameters; the loss of a record as the module docstring says.
    Each training run warms the rate up over its first tenth, then decays it (one cycle): a
    peak high enough to move a heavily pruned student, an end low enough to settle."""

    def __init__(self, graph: Any, settings: FinetuneSettings) -> None:
        import torch

        self.torch = torch
        self.graph = graph
        self.settings = settings
        self.parameters = list(graph.parameters.values())

    def loss(self, record: Feed) -> Any:
        functional = self.torch.nn.functional
        outputs = self.graph(record)
        total, classifier = self.torch.zeros(()), None
        for name, student in outputs.items():
            if TARGET + name not in record or not student.is_floating_point():
                continue
            teacher = self.torch.from_numpy(record[TARGET + name]).to(student.dtype)
            if student.dim() == 2 and student.shape[1] > 1:
                t = self.settings.temperature
                soft_student = functional.log_softmax(student / t, dim=-1)
                soft_teacher = functional.log_softmax(teacher / t, dim=-1)
                divergence = functional.kl_div(
                    soft_student, soft_teacher, reduction="batchmean", log_target=True
                )
                total = total + divergence * t * t
                classifier = classifier or name
            else:
                spread = teacher.var(unbiased=False).clamp_min(1e-12)
                total = total + functional.mse_loss(student, teacher) / spread
        if LABELS in record and classifier is not None:
            labels = self.torch.from_numpy(record[LABELS]).long()
            cross_entropy = functional.cross_entropy(outputs[classifier], labels)
            total = total + self.settings.label_weight * cross_entropy
        return total

    def mean_loss(self, records: list[Feed], batch: int) -> float:
        """The loss over every sample of ``records`` (weighted by chunk size), without
        gradients."""
        total, count = 0.0, 0
        with self.torch.no_grad():
            for chunk in _chunks(records, batch):
                rows = _rows(chunk)
                total += float(self.loss(chunk)) * rows
                count += rows
        return total / max(count, 1)

    def train(self, data: _Data, batch: int, rate: float, steps: int) -> None:
        self.torch.manual_seed(self.settings.seed)
        rng = np.random.default_rng(self.settings.seed)
        minibatches = data.minibatches(batch, rng)
        optimizer = self.torch.optim.AdamW(
            self.parameters, lr=rate, weight_decay=self.settings.weight_decay
        )
        schedule = self.torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(_one_cycle, steps=steps)
        )
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            self.loss(next(minibatches)).backward()
            optimizer.step()
            schedule.step()

    def choose_rate(self, data: _Data, held_out: list[Feed], batch: int) -> dict[float, float]:
        """Held-out loss after a short training run at each of LEARNING_RATES, each from the
        same start, to which the weights return."""
        start = [p.detach().clone() for p in self.parameters]
        steps = _trial_steps(self.settings)
        losses = {}
        for rate in LEARNING_RATES:
            self.train(data, batch, rate, steps)
            losses[rate] = self.mean_loss(held_out, batch)
            with self.torch.no_grad():
                for parameter, saved in zip(self.parameters, start, strict=True):
                    parameter.copy_(saved)
        return losses


# ---------------------------------------------------------------------------------------------
# Checks and measurements


def _matched_float_outputs(student: ir.Model, teacher: ir.Model) -> list[str]:
    """Float outputs of the student that the teacher has too (the ones the loss compares)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
    names = {value.name for value in teacher.graph.outputs}
    return [v.name for v in student.graph.outputs if v.name in names and v.dtype in floats]


def _quantized_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type in _QUANTIZED_OPS or n.domain == "com.microsoft"]


def _evaluator_mismatch(graph: Any, model: ir.Model, feed: Feed) -> str | None:
    """Why the torch evaluator cannot stand for onnxruntime on this model, or None."""
    import torch

    from onnx_squeeze.torch_graph import EvaluationError

    session = create_session(model, optimization="none")
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name: feed[i.name] for i in session.get_inputs()}
    try:
        with torch.no_grad():
            computed = graph(inputs)
    except EvaluationError as error:
        return f"the torch evaluator failed: {error}"
    for name, expected in zip(names, session.run(names, inputs), strict=True):
        got = computed[name].numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-3 * scale):
            return f"the torch evaluator disagrees with onnxruntime on output {name!r}"
    return None


def _record_changes(
    graph: Any, users: dict[str, ir.Node], changes: dict[str, float], report: PassReport
) -> None:
    """One record per node whose weights trained, with their largest relative change."""
    by_node: dict[ir.Node, list[str]] = {}
    for name in changes:
        by_node.setdefault(users[name], []).append(name)
    for node, names in by_node.items():
        largest = max(changes[name] for name in names)
        detail = f"{len(names)} tensors trained, relative change up to {largest:.3g}"
        report.record(node, "finetuned", detail)


# ---------------------------------------------------------------------------------------------
# The pass


@register
class Finetune(Pass):
    """Train the student's float weights on calibration data to match the teacher's outputs."""

    name = "finetune"
    Settings = FinetuneSettings

    def validate(self) -> None:
        s = self.settings
        if not torch_available():
            raise SettingsError(NO_TORCH_MESSAGE)
        for field in ("steps", "batch_size", "samples"):
            if getattr(s, field) < 1:
                raise SettingsError(f"finetune: {field} must be at least 1")
        if s.learning_rate is not None and not s.learning_rate > 0:
            raise SettingsError("finetune: learning_rate must be > 0 (or unset: chosen on trial)")
        if not s.temperature > 0:
            raise SettingsError("finetune: temperature must be > 0")
        for field in ("label_weight", "weight_decay"):
            if not getattr(s, field) >= 0:
                raise SettingsError(f"finetune: {field} must be >= 0")
        if not 0 <= s.held_out < 1:
            raise SettingsError(f"finetune: held_out must be in [0, 1), got {s.held_out}")
        if s.train not in TRAIN_CHOICES:
            raise SettingsError(
                f"finetune: train must be one of {', '.join(TRAIN_CHOICES)}, got {s.train!r}"
            )

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        teacher = context.teacher
        if teacher is None:
            raise SettingsError(
                "finetune needs the original model as teacher: run it through compress() "
                "(onnx-squeeze compress), which provides it"
            )
        if not self._supported(model, report):
            return
        if not _matched_float_outputs(model, teacher):
            report.notes.append(
                "skipped: no float output of the model is named like one of the teacher's, "
                "so there is nothing to match"
            )
            return
        users = trainable_names(model.graph, self.settings.train)
        if not users:
            report.notes.append(
                f"nothing to train: no float32 weights for train={self.settings.train}"
            )
            return
        self._train(model, teacher, users, context, report)

    def _supported(self, model: ir.Model, report: PassReport) -> bool:
        """Skip (with records and a note) quantized models and ops the evaluator lacks."""
        from onnx_squeeze.torch_graph import unsupported_nodes

        quantized = _quantized_nodes(model.graph)
        for node in quantized:
            report.skip(node, "quantized node: run finetune before quantization")
        if quantized:
            report.notes.append(
                f"skipped: the model has {len(quantized)} quantized nodes; run finetune before "
                "quantization"
            )
            return False
        problems = unsupported_nodes(model.graph)
        for node, reason in problems:
            report.skip(node, f"{reason} is not supported by the torch evaluator")
        if problems:
            node, reason = problems[0]
            report.notes.append(
                f"skipped: node {node.name!r} ({reason}) is not supported by the torch evaluator "
                f"({len(problems)} such nodes); the model is left unchanged"
            )
        return not problems

    def _train(
        self,
        model: ir.Model,
        teacher: ir.Model,
        users: dict[str, ir.Node],
        context: PassContext,
        report: PassReport,
    ) -> None:
        from onnx_squeeze.torch_graph import TorchGraph

        settings = self.settings
        data = _prepare_data(
            _read_feeds(context, teacher, settings, report), teacher, settings, report
        )
        graph = TorchGraph(model, users)
        mismatch = _evaluator_mismatch(graph, model, data.held_out.feeds[0])
        if mismatch:
            report.notes.append(f"skipped: {mismatch}; the model is left unchanged")
            return
        batch = _fixed_batch(model) or settings.batch_size
        trainer = _Trainer(graph, settings)
        cosine_before, error_before = data.held_out.fidelity(model)
        loss_before = trainer.mean_loss(data.records, batch)
        rate = settings.learning_rate
        if rate is None:
            losses = trainer.choose_rate(data, data.held_out.records(), batch)
            rate = min(losses, key=losses.__getitem__)
            tried = ", ".join(f"{r:g}: {loss:.4g}" for r, loss in losses.items())
            report.notes.append(
                f"learning rate {rate:g}: the lowest held-out loss after "
                f"{_trial_steps(settings)}-step trials ({tried})"
            )
        trainer.train(data, batch, rate, settings.steps)
        loss_after = trainer.mean_loss(data.records, batch)
        graph.write_back(UniqueNames(model))
        cosine_after, error_after = data.held_out.fidelity(model)
        report.notes.append(
            f"loss on the training data {loss_before:.4g} -> {loss_after:.4g} after "
            f"{settings.steps} steps of {batch} samples ({data.samples} training samples, "
            f"{data.held_out.samples} held out)"
        )
        summary = (
            f"held-out fidelity to the teacher: cosine {cosine_before:.6f} -> {cosine_after:.6f}, "
            f"relative squared error {error_before:.4g} -> {error_after:.4g}"
        )
        if settings.guard and error_after > error_before:
            graph.restore()
            report.notes.append(f"{summary}: worse, so the training was undone")
            return
        report.notes.append(summary)
        _record_changes(graph, users, graph.relative_changes(), report)
