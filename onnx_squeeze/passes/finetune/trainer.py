"""Training: AdamW on the evaluator's parameters, a one-cycle rate, and the trial that picks the
peak rate when none is given."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from onnx_squeeze.passes.finetune.data import (
    LABELS,
    TARGET,
    Data,
    Feed,
    Spread,
    chunks,
    samples_in,
)

if TYPE_CHECKING:
    from onnx_squeeze.passes.finetune import FinetuneSettings

# Peak rates tried when none is given: a heavily pruned CNN wanted 1e-3 (digits: -1.3 points
# after recovery at 1e-4, -0.3 at 1e-3), while a transformer student drifts at rates that high.
LEARNING_RATES = (1e-4, 3e-4, 1e-3)
TRIAL_SHARE = 0.2  # each tried rate trains for this share of the steps


def one_cycle(step: int, steps: int) -> float:
    """The rate's factor at ``step`` of ``steps``: linear warm-up over the first tenth, then
    cosine decay towards zero."""
    warm_up = max(1, round(0.1 * steps))
    if step < warm_up:
        return (step + 1) / warm_up
    return 0.5 * (1 + math.cos(math.pi * (step - warm_up) / max(1, steps - warm_up)))


def trial_steps(settings: FinetuneSettings) -> int:
    return max(round(settings.steps * TRIAL_SHARE), 1)


class Trainer:
    """AdamW on the evaluator's parameters; the loss of a record as the package docstring says.
    Each training run warms the rate up over its first tenth, then decays it (one cycle): a
    peak high enough to move a heavily pruned student, an end low enough to settle."""

    def __init__(self, graph: Any, settings: FinetuneSettings, spreads: dict[str, Spread]) -> None:
        import torch

        self.torch = torch
        self.graph = graph
        self.settings = settings
        self.spreads = spreads
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
                total = total + self.channel_loss(student, teacher, self.spreads[name])
        if LABELS in record and classifier is not None:
            labels = self.torch.from_numpy(record[LABELS]).long()
            cross_entropy = functional.cross_entropy(outputs[classifier], labels)
            total = total + self.settings.label_weight * cross_entropy
        return total

    def channel_loss(self, student: Any, teacher: Any, spread: Spread) -> Any:
        """Mean over the output's channels of each one's mean squared error over its spread."""
        squared = (student - teacher).square()
        if spread.axis is None:
            rows = squared.reshape(1, -1)
        else:
            rows = squared.movedim(spread.axis, 0).reshape(spread.variance.size, -1)
        variance = self.torch.from_numpy(spread.variance).to(student.dtype)
        return (rows.mean(dim=1) / variance).mean()

    def mean_loss(self, records: list[Feed], batch: int) -> float:
        """The loss over every sample of ``records`` (weighted by chunk size), without
        gradients."""
        total, count = 0.0, 0
        with self.torch.no_grad():
            for chunk in chunks(records, batch):
                size = samples_in(chunk)
                total += float(self.loss(chunk)) * size
                count += size
        return total / max(count, 1)

    def train(self, data: Data, batch: int, rate: float, steps: int) -> None:
        self.torch.manual_seed(self.settings.seed)
        rng = np.random.default_rng(self.settings.seed)
        minibatches = data.minibatches(batch, rng)
        optimizer = self.torch.optim.AdamW(
            self.parameters, lr=rate, weight_decay=self.settings.weight_decay
        )
        schedule = self.torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(one_cycle, steps=steps)
        )
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            self.loss(next(minibatches)).backward()
            optimizer.step()
            schedule.step()

    def choose_rate(self, data: Data, held_out: list[Feed], batch: int) -> dict[float, float]:
        """Held-out loss after a short training run at each of LEARNING_RATES, each from the
        same start, to which the weights return."""
        start = [p.detach().clone() for p in self.parameters]
        steps = trial_steps(self.settings)
        losses = {}
        for rate in LEARNING_RATES:
            self.train(data, batch, rate, steps)
            losses[rate] = self.mean_loss(held_out, batch)
            with self.torch.no_grad():
                for parameter, saved in zip(self.parameters, start, strict=True):
                    parameter.copy_(saved)
        return losses


# ---------------------------------------------------------------------------------------------
