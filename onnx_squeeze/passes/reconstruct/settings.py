"""The reconstruct pass's settings and the metadata it reads."""

from __future__ import annotations

import dataclasses

# On a student tensor whose channel axis was shrunk: which teacher channels it kept.
KEPT_CHANNELS_KEY = "onnx_squeeze.kept_channels"
METHODS = ("lstsq", "bn", "bias", "head")


@dataclasses.dataclass
class ReconstructSettings:
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    ridge: float = 1e-5  # relative to the mean input variance; pulls towards the current weights
    cross_validate: bool = True  # pick the ridge among ridge × 1, 10², 10⁴, 10⁶ by 2-fold CV
    samples: int = 64  # calibration samples used
    positions: int = 256  # output positions (rows) sampled per sample and layer
    refresh_every: int = 1  # waves of layers fitted per student run (1: strictly sequential)
    factors: str = "both"  # factorized pairs: "both" (joint refit) or "last" (second only)
    include: list[str] = dataclasses.field(default_factory=list)  # node name patterns
    exclude: list[str] = dataclasses.field(default_factory=list)
    guard: bool = True  # undo everything when the outputs end up further from the teacher
