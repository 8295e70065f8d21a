"""The reconstruct pass's settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from onnx_squeeze.passes.base import bounded, choice, subset

METHODS = ("lstsq", "bn", "bias", "head")


@dataclasses.dataclass
class ReconstructSettings:
    # refits allowed, tried in this order per layer: lstsq (ridge regression of the weights),
    # head (the last classifier/projection), bn (per-channel mean and variance), bias (mean)
    methods: Sequence[str] = subset(METHODS, METHODS, nonempty=True)
    # relative to the mean input variance; pulls towards the current weights
    ridge: float = bounded(1e-5, low=0)
    cross_validate: bool = True  # pick the ridge among ridge × 1, 10², 10⁴, 10⁶ by 2-fold CV
    samples: int = bounded(64, low=1)  # calibration samples used
    positions: int = bounded(256, low=1)  # output positions (rows) sampled per sample and layer
    # waves of layers fitted per student run (1: strictly sequential)
    refresh_every: int = bounded(1, low=1)
    # factorized pairs: "both" (joint refit) or "last" (second only)
    factors: str = choice("both", ("both", "last"))
    include: list[str] = dataclasses.field(default_factory=list)  # node name patterns
    exclude: list[str] = dataclasses.field(default_factory=list)
    guard: bool = True  # undo everything when the outputs end up further from the teacher
