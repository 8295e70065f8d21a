"""Stop reading calibration data once the activation ranges have settled.

Every calibration batch costs a model run, and the ranges a quantizer picks usually stop
moving long before the data runs out. The ranges are taken at 32 batches, then at 64, 128 ...;
at each of those checks, the ranges chosen from the first half of the batches read are scored
against the ranges chosen from all of them, by the expected quantization noise on the
histogram of all of them. When the half would have been no worse, on average over the tensors,
than ``tolerance_db``, and would have doubled no tensor's noise, reading the second half gained
nothing that matters, and reading stops. (Tensors with few values per sample, such as a
detector's smallest head, have ranges that wander the most: one tensor is allowed more than the
average.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

from onnx_squeeze.calibration import TensorStatistics
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.params import IntType

FIRST_RANGES = 32  # batches read when the ranges are first taken; the first check is at 64
DOUBLED_NOISE_DB = 10 * math.log10(2)  # what no single tensor may lose


class RangeSettling:
    """A ``stop`` callback for :meth:`StatisticsCollector.collect`.

    ``range_of`` gives the range a tensor is quantized to from its statistics (it may raise
    ValueError, e.g. for non-finite values: such a tensor is left to the quantizer to report);
    only the ``tensors`` named are judged (all when None).
    ``tolerance_db`` 0 never stops. ``checks`` holds each check as (batches, average loss in
    dB, worst loss in dB, the tensor with the worst); ``stopped_at`` the batches read when it
    stopped, None while it has not.
    """

    def __init__(
        self,
        range_of: Callable[[TensorStatistics], tuple[float, float]],
        qtype: IntType,
        tolerance_db: float,
        tensors: Collection[str] | None = None,
    ) -> None:
        self.range_of = range_of
        self.tensors = tensors
        self.qtype = qtype
        self.tolerance_db = tolerance_db
        self.stopped_at: int | None = None
        self.checks: list[tuple[int, float, float, str]] = []
        self._next = FIRST_RANGES
        self._ranges: dict[str, tuple[float, float]] = {}

    def _current(self, statistics: Mapping[str, TensorStatistics]) -> dict[str, tuple]:
        ranges = {}
        for name, kept in statistics.items():
            if self.tensors is not None and name not in self.tensors:
                continue
            try:
                ranges[name] = self.range_of(kept)
            except ValueError:
                continue
        return ranges

    def __call__(self, batches: int, statistics: Mapping[str, TensorStatistics]) -> bool:
        if self.tolerance_db <= 0 or batches < self._next:
            return False
        self._next = 2 * batches
        ranges = self._current(statistics)
        halves, self._ranges = self._ranges, ranges
        if not halves or not ranges:
            return False
        losses = {
            name: quant_params.noise_loss_db(
                statistics[name].histogram, halves.get(name), current, self.qtype
            )
            for name, current in ranges.items()
        }
        average = 10 * math.log10(sum(10 ** (v / 10) for v in losses.values()) / len(losses))
        worst_name = max(losses, key=losses.__getitem__)
        self.checks.append((batches, average, losses[worst_name], worst_name))
        worst_allowed = max(DOUBLED_NOISE_DB, self.tolerance_db)
        if average > self.tolerance_db or losses[worst_name] > worst_allowed:
            return False
        self.stopped_at = batches
        return True
