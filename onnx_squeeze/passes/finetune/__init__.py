"""Gradient fine-tuning of the compressed model (student) against the original (teacher).

The optional complement of the closed-form ``reconstruct`` pass: when PyTorch is installed
(``pip install 'onnx-squeeze[torch]'``), the student graph is evaluated with torch functional ops
(:mod:`.torch_graph`) and its float weights are trained with AdamW for ``steps``
minibatches of calibration data to reproduce the teacher's outputs, at a rate that warms up and
then decays; its peak, unless ``learning_rate`` is given, is the one of ``LEARNING_RATES`` whose
short trial ends with the lowest held-out loss (a heavily pruned CNN and a transformer want
rates ten times apart). The loss:

- every float graph output of rank 2 (a classifier's logits) contributes the soft-target loss
  KL(teacher_T || student_T)·T² at temperature ``temperature``;
- every other float output (feature maps, hidden states, detection heads) contributes the mean
  over its channels (along the axis fidelity judges it on) of each channel's mean squared error
  divided by that channel's variance over the training data, so outputs and channels of any
  scale weigh alike (a detector's scores as much as its pixel boxes);
- when the calibration feeds carry labels under ``labels_key`` (a key that is not a model input:
  from a reader's ``get_next()``, or an array of that name in the ``.npz`` calibration files)
  and ``label_weight`` > 0, the cross-entropy of the first rank-2 output against them is added
  with that weight; without labels it is distillation only.

Teacher outputs are computed once per calibration batch in onnxruntime and kept (only outputs,
no activations); the calibration inputs read (``samples``) are held in memory as ``reconstruct``
does. A share ``held_out`` of the batches is kept apart to measure fidelity in onnxruntime
(worst cosine and worst mean per-channel relative squared error over the outputs) before and
after; with ``guard``, training that makes the error worse is undone. Quantized models are
skipped (run finetune before quantization), and so is a model with an op the evaluator does not
know, naming the node: the model is then left unchanged.

Modules: :mod:`.data` (training records, held-out feeds), :mod:`.trainer` (the optimizer, the
rate and its trial), :mod:`.torch_graph` (the evaluator).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.layers import QUANTIZED_OPS, Layer
from onnx_squeeze.passes.base import Pass, bounded, choice, register
from onnx_squeeze.passes.finetune.data import (
    Feed,
    fixed_batch,
    model_inputs,
    prepare_data,
    read_feeds,
)
from onnx_squeeze.passes.finetune.trainer import Trainer, trial_steps
from onnx_squeeze.records import PassContext, PassReport

TRAIN_CHOICES = ("all", "bias_norm")
NO_TORCH_MESSAGE = (
    "finetune: gradient fine-tuning needs PyTorch; install it with pip install "
    "'onnx-squeeze[torch]' (or use the closed-form recover pass)"
)
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization"}


@dataclasses.dataclass
class FinetuneSettings:
    steps: int = bounded(200, low=1)  # optimizer steps, one minibatch each
    # peak rate; None: the best of LEARNING_RATES on trial
    learning_rate: float | None = bounded(None, above=0)
    # samples per step (a model with a fixed batch dimension uses it)
    batch_size: int = bounded(16, low=1)
    temperature: float = bounded(4.0, above=0)  # soft targets of rank-2 outputs (logits)
    # weight of the labels' cross-entropy, when the feeds carry labels
    label_weight: float = bounded(0.0, low=0)
    labels_key: str = "labels"  # the feeds' key holding labels (not a model input)
    weight_decay: float = bounded(0.0, low=0)  # AdamW's decoupled weight decay
    # "all" float weights, or "bias_norm": biases and norm scales only
    train: str = choice("all", TRAIN_CHOICES)
    # calibration samples read (training and held-out together)
    samples: int = bounded(256, low=1)
    # share of the calibration batches kept apart to measure fidelity
    held_out: float = bounded(0.25, low=0, below=1)
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
    layer = Layer.of(node)
    if isinstance(layer, Layer):
        bias = [2] if layer.bias is not None else []
        return [layer.weight_index, *bias] if train == "all" else bias
    if node.op_type in _NORM_OPS:
        return [1, 2]
    bias = _bias_add(node)
    return [] if bias is None else [bias]


def trainable_names(graph: ir.Graph, train: str) -> dict[str, ir.Node]:
    """Initializers to train, by name, with the first node that uses each."""
    from onnx_squeeze.passes.finetune.torch_graph import trainable_value

    chosen: dict[str, ir.Node] = {}
    for node in graph:
        for index in _trainable_inputs(node, train):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.name and trainable_value(value):
                chosen.setdefault(value.name, node)
    return chosen


# ---------------------------------------------------------------------------------------------
# Checks and measurements


def _matched_float_outputs(student: ir.Model, teacher: ir.Model) -> list[str]:
    """Float outputs of the student that the teacher has too (the ones the loss compares)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
    names = {value.name for value in teacher.graph.outputs}
    return [v.name for v in student.graph.outputs if v.name in names and v.dtype in floats]


def _quantized_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [
        n
        for n in graph
        if n.op_type in _QDQ_OPS or n.op_type in QUANTIZED_OPS or n.domain == "com.microsoft"
    ]


def _evaluator_mismatch(graph: Any, model: ir.Model, feed: Feed) -> str | None:
    """Why the torch evaluator cannot stand for onnxruntime on this model, or None."""
    import torch

    from onnx_squeeze.passes.finetune.torch_graph import EvaluationError

    names = [value.name for value in model.graph.outputs]
    inputs = {name: feed[name] for name in model_inputs(model)}
    try:
        with torch.no_grad():
            computed = graph(inputs)
    except EvaluationError as error:
        return f"the torch evaluator failed: {error}"
    results = TensorRunner(model, names)(inputs)
    for name in names:
        expected = results[name]
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
        if not torch_available():
            raise SettingsError(NO_TORCH_MESSAGE)

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        teacher = context.require_teacher("finetune")
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
        from onnx_squeeze.passes.finetune.torch_graph import unsupported_nodes

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
        from onnx_squeeze.passes.finetune.torch_graph import TorchGraph

        settings = self.settings
        data = prepare_data(read_feeds(context, settings, report), teacher, settings, report)
        graph = TorchGraph(model, users)
        mismatch = _evaluator_mismatch(graph, model, data.held_out.feeds[0])
        if mismatch:
            report.notes.append(f"skipped: {mismatch}; the model is left unchanged")
            return
        batch = fixed_batch(model) or settings.batch_size
        trainer = Trainer(graph, settings, data.spreads)
        cosine_before, error_before = data.held_out.fidelity(model)
        loss_before = trainer.mean_loss(data.records, batch)
        rate = settings.learning_rate
        if rate is None:
            losses = trainer.choose_rate(data, data.held_out.records(), batch)
            rate = min(losses, key=losses.__getitem__)
            tried = ", ".join(f"{r:g}: {loss:.4g}" for r, loss in losses.items())
            report.notes.append(
                f"learning rate {rate:g}: the lowest held-out loss after "
                f"{trial_steps(settings)}-step trials ({tried})"
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
