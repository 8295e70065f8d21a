"""What a search aims at: the targets (``--target latency=0.5``) and the accuracy budget
(``--metric`` with ``--max-drop``), and how one trial's measurements are judged against them.

A target is a ratio of the compressed model to the original, measured on the machine that runs
the trial; the budget is a floor on the metric, set from the original's own value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from onnx_squeeze import gates
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.verdict import DEFAULT_GATE

# target name -> (the comparison metric it reads, whether the target is an upper bound)
TARGETS: dict[str, tuple[str, bool]] = {
    "latency": ("latency_ratio", True),
    "speedup": ("speedup", False),
    "size": ("size_ratio", True),
    "macs": ("macs_ratio", True),
}
# ``agreement`` reads a model as the default gate does: the lowest share kept of the decisions
# its outputs hold (a class per position or CTC line, score decisions, an embedding's nearest
# neighbours), and none kept where the outputs it reads by value (box coordinates) fall below
# the gate's floor for them; all kept while they do where the outputs hold no decisions
# (ddddocr_det's raw grid). top1_agreement reads [N, classes] outputs only: the default metric
# stopped tune on 6 of the first 6 corpus models (CTC lines, detectors, a VAD).
AGREEMENTS = tuple(m for m in gates.AGREEMENT_METRICS if m != "top1_agreement")
VALUE_GATES = tuple(
    g.expr for g in gates.parse_gates(DEFAULT_GATE) if g.metric not in gates.AGREEMENT_METRICS
)
# Metrics the comparison with the original measures: the original's own value is perfect.
FIDELITY_METRICS: dict[str, float] = {
    "agreement": 1.0,
    "top1_agreement": 1.0,
    "cosine": 1.0,
    "worst_channel_sqnr_db": math.inf,
}
# Metrics that need the trial's model run on labelled data (or a user function).
TASK_METRICS = ("top1",)


@dataclasses.dataclass(frozen=True)
class Target:
    """``name=value``: latency/size/macs at most ``value`` of the original's, speedup at least."""

    name: str
    value: float

    @property
    def metric(self) -> str:
        return TARGETS[self.name][0]

    @property
    def upper(self) -> bool:
        return TARGETS[self.name][1]

    def shortfall(self, metrics: Mapping[str, float]) -> float:
        """How far a trial is from this target, as a log ratio (0: met; inf: not measured)."""
        value = metrics.get(self.metric)
        if value is None or not value > 0 or not math.isfinite(value):
            return math.inf
        ratio = value / self.value if self.upper else self.value / value
        return max(0.0, math.log(ratio))

    def __str__(self) -> str:
        return f"{self.name}={self.value:g}"


def parse_targets(items: Sequence[str]) -> list[Target]:
    """``--target`` values (each may hold several, comma-separated) into targets."""
    targets = []
    for item in items:
        for part in item.split(","):
            name, sep, value = part.strip().partition("=")
            name = name.strip().lower()
            if not sep or name not in TARGETS:
                raise SettingsError(
                    f"bad --target {part.strip()!r}: write NAME=VALUE with NAME one of "
                    f"{', '.join(TARGETS)} (e.g. latency=0.5, speedup=2)"
                )
            try:
                number = float(value)
            except ValueError:
                raise SettingsError(
                    f"bad --target {part.strip()!r}: {value!r} is not a number"
                ) from None
            if (
                not number > 0
                or (TARGETS[name][1] and number > 1)
                or (name == "speedup" and number < 1)
            ):
                raise SettingsError(
                    f"bad --target {part.strip()!r}: latency, size and macs are fractions of the "
                    "original in (0, 1], speedup a factor of at least 1"
                )
            targets.append(Target(name, number))
    if not targets:
        raise SettingsError("tune needs a --target, e.g. --target latency=0.5 or --target size=0.3")
    if len({t.metric for t in targets}) < len(targets) or {"latency", "speedup"} <= {
        t.name for t in targets
    }:
        raise SettingsError("give each --target once (latency and speedup are the same target)")
    return targets


@dataclasses.dataclass(frozen=True)
class Budget:
    """The metric a trial must keep: ``metric >= floor``, the floor being the original's value
    less ``max_drop`` (absolute in the metric's units, or ``relative`` to the original's)."""

    metric: str
    max_drop: float
    relative: bool = False
    floor_value: float | None = None  # given directly (--min-metric), overrides the drop

    def floor(self, baseline: float) -> float:
        if self.floor_value is not None:
            return self.floor_value
        if not math.isfinite(baseline):
            raise SettingsError(
                f"--max-drop needs a finite original {self.metric} (the original's is {baseline}); "
                f"give a floor instead: --min-metric VALUE (e.g. 30 dB)"
            )
        return baseline - (abs(baseline) * self.max_drop if self.relative else self.max_drop)

    @property
    def gate(self) -> str | None:
        """The accuracy-control target INT8 can aim at for this budget (None: no fidelity
        metric stands for it); :func:`measured_gate` keeps the parts the model has."""
        if self.metric == "agreement":  # the original's is 1: a relative drop is as absolute
            level = 1 - self.max_drop if self.floor_value is None else self.floor_value
            return ", ".join([*(f"{m}>={level:g}" for m in AGREEMENTS), *VALUE_GATES])
        if self.metric in FIDELITY_METRICS and self.floor_value is not None:
            return f"{self.metric}>={self.floor_value:g}"
        if (
            self.metric in FIDELITY_METRICS
            and not self.relative
            and self.metric != "worst_channel_sqnr_db"
        ):
            return f"{self.metric}>={FIDELITY_METRICS[self.metric] - self.max_drop:g}"
        if self.metric == "top1" and not self.relative:
            # top-1 on labels is at worst as far from the original's as the agreement with it
            return f"top1_agreement>={1 - self.max_drop:g}"
        return None

    def __str__(self) -> str:
        if self.floor_value is not None:
            return f"{self.metric} >= {self.floor_value:g}"
        drop = f"{self.max_drop * 100:g}%" if self.relative else f"{self.max_drop:g}"
        return f"{self.metric} drop <= {drop}"


def parse_budget(metric: str, max_drop: str | None, min_metric: float | None) -> Budget:
    """``--metric``, ``--max-drop`` (``0.01`` or ``1%``) and ``--min-metric`` into a budget."""
    if ":" not in metric and metric not in FIDELITY_METRICS and metric not in TASK_METRICS:
        raise SettingsError(
            f"unknown --metric {metric!r}: use one of {', '.join([*TASK_METRICS, *FIDELITY_METRICS])} "
            "or module:function (called as function(model_path, eval_data) -> float)"
        )
    if min_metric is not None:
        return Budget(metric, 0.0, floor_value=float(min_metric))
    if max_drop is None:
        raise SettingsError(
            "tune needs an accuracy budget: --max-drop 0.01 (or 1%) or --min-metric VALUE"
        )
    text = str(max_drop).strip()
    relative = text.endswith("%")
    try:
        drop = float(text.rstrip("%")) / (100 if relative else 1)
    except ValueError:
        raise SettingsError(f"bad --max-drop {text!r}: write 0.01 or 1%") from None
    if drop < 0:
        raise SettingsError(f"bad --max-drop {text!r}: a drop is not negative")
    return Budget(metric, drop, relative)


def measured_gate(gate: str | None, metrics: Mapping[str, float]) -> str | None:
    """The parts of ``gate`` whose metric the comparison ``metrics`` holds (a gate on a metric
    a model lacks fails: a detector has no argmax_agreement)."""
    return ", ".join(gates.applicable(gate or "", metrics)) or None


def agreement(metrics: Mapping[str, float]) -> float | None:
    """``agreement`` of a comparison's ``metrics`` (see :data:`AGREEMENTS`); None where the
    gate reads nothing in them."""
    shares = [float(metrics[m]) for m in AGREEMENTS if metrics.get(m) is not None]
    values = [g for g in gates.parse_gates(VALUE_GATES) if metrics.get(g.metric) is not None]
    if not shares and not values:
        return None
    if any(math.isnan(share) for share in shares):
        return math.nan
    return 0.0 if any(not g.passes(metrics[g.metric]) for g in values) else min(shares, default=1.0)


def distance(
    metrics: Mapping[str, float] | None,
    value: float | None,
    targets: Sequence[Target],
    floor: float,
    scale: float,
) -> tuple[float, float]:
    """(how far the targets are missed, how far below the floor the metric is in units of
    ``scale``): (0, 0) for a trial that meets everything."""
    if metrics is None or value is None or math.isnan(value):
        return math.inf, math.inf  # +inf is a value: the SQNR of identical outputs
    missed = sum(target.shortfall(metrics) for target in targets)
    below = max(0.0, (floor - value) / scale) if scale > 0 else float(value < floor)
    return missed, below
