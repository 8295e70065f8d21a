"""The teacher's side of the regressions: what each layer is fitted to.

The teacher never changes, so it need not run again for every wave: one teacher run covers a
chunk of consecutive waves, keeping per least-squares layer only the sampled output rows (and
where they were sampled, for the student's inputs a run later) and per per-channel layer only
its output statistics. Chunks are as long as the tensors fetched per run and the rows kept fit
a budget. On the demo's ResNet-18 (17 waves) the teacher ran 17 times before, once now.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib

import numpy as np
import onnx_ir as ir

from onnx_squeeze.analysis import value_shapes
from onnx_squeeze.calibration import ChannelStatistics
from onnx_squeeze.calibration.runner import TensorRunner
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.passes.reconstruct.planner import Target
from onnx_squeeze.records import KEPT_CHANNELS_KEY

# Teacher tensors fetched in one run plus the target rows kept for a chunk of waves.
BUDGET_BYTES = 128 * 2**20

FITTED = ("lstsq", "lowrank")  # methods fitted by least squares; the others match statistics


def channel_axis(layer: Target) -> int:
    return 1 if layer.node.op_type in ("Conv", "BatchNormalization") else -1


def teacher_target(array: np.ndarray, value: ir.Value) -> np.ndarray:
    """The teacher's tensor restricted to the channels the student kept."""
    kept = value.metadata_props.get(KEPT_CHANNELS_KEY)
    if kept is None:
        return array
    entry = json.loads(kept)
    return np.take(array, entry["kept"], axis=entry["axis"])


@dataclasses.dataclass
class LayerTargets:
    """One layer's side from the teacher: per feed, the picked rows and their targets (least
    squares; None for a feed whose channels do not match the layer), or the output statistics
    and channel count (per-channel methods)."""

    picks: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    rows: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    statistics: ChannelStatistics | None = None


class Targets:
    """The teacher's side for a chunk of layers, from one teacher run over the feeds."""

    def __init__(
        self, teacher: ir.Model, layers: list[Target], feeds: list[Feed], positions: int, seed: int
    ) -> None:
        self.layers: dict[str, LayerTargets] = {layer.name: LayerTargets() for layer in layers}
        self.positions = positions
        rngs = {
            layer.name: np.random.default_rng([seed, zlib.crc32(layer.name.encode())])
            for layer in layers
        }
        with TensorRunner(teacher, [layer.output.name for layer in layers]) as run:
            for feed in feeds:
                found = run(feed)
                for layer in layers:
                    target = teacher_target(found[layer.output.name], layer.output)
                    self._add(layer, target, rngs[layer.name])
                del found

    def _add(self, layer: Target, target: np.ndarray, rng: np.random.Generator) -> None:
        """One feed's teacher tensor for ``layer``: its statistics, or its sampled rows."""
        side = self.layers[layer.name]
        if layer.method not in FITTED:
            side.statistics = side.statistics or ChannelStatistics(channel_axis(layer))
            side.statistics.update(target)
        elif target.shape[channel_axis(layer)] != layer.linear.outputs:
            side.picks.append(None)
            side.rows.append(None)
        else:
            fitted = layer.first or layer.linear
            picked = fitted.pick(target.shape, rng, self.positions)
            side.picks.append(picked)
            side.rows.append(fitted.targets(target, picked))

    def __getitem__(self, layer: Target) -> LayerTargets:
        return self.layers[layer.name]


def run_shapes(model: ir.Model, feed: Feed) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``model`` in a run on ``feed`` (those fully known): onnx
    shape inference with the feed's input shapes, so that free dimensions (a detector's height
    and width) do not leave the sizes unknown."""
    try:
        inferred = value_shapes(model, {name: array.shape for name, array in feed.items()})
    except Exception:  # onnx raises several types; the sizes then stay unknown
        return {}
    return {name: shape for name, shape in inferred.items() if None not in shape}  # type: ignore[misc]


def activation_bytes(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of every node output in a run whose shapes are ``shapes`` (unknown ones left out)."""
    total = 0
    for node in model.graph:
        for value in node.outputs:
            shape = shapes.get(value.name)
            if shape is not None and value.dtype is not None:
                total += math.prod(shape) * value.dtype.itemsize
    return total


def chunks(
    waves: list[list[Target]], teacher: ir.Model, feeds: list[Feed], positions: int
) -> list[list[list[Target]]]:
    """Consecutive waves grouped so that one teacher run serves each group within
    :data:`BUDGET_BYTES`, sized with the shapes of a run on the first (largest) feed; a wave
    whose size stays unknown is a group alone. (With the sizes read from the model, a detector
    with free height and width ran its teacher once per wave: 16 times instead of 4.)"""
    shapes = run_shapes(teacher, feeds[0])
    groups: list[list[list[Target]]] = []
    used = BUDGET_BYTES + 1
    for wave in waves:
        sizes = [
            _bytes(layer, shapes.get(layer.output.name), len(feeds), positions) for layer in wave
        ]
        size = None if None in sizes else sum(sizes)
        if size is None or used + size > BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(wave)
        used = BUDGET_BYTES + 1 if size is None else used + size
    return groups


def _bytes(layer: Target, shape: tuple[int, ...] | None, feeds: int, positions: int) -> int | None:
    """What a layer's teacher side costs: its tensor fetched per run (of ``shape``) and its
    target rows kept over all feeds (None when the shape is unknown)."""
    if shape is None or not shape or layer.output.dtype is None:
        return None
    itemsize = layer.output.dtype.itemsize
    fetched = math.prod(shape) * itemsize
    if layer.method not in FITTED:
        return fetched
    first = shape[0]
    if layer.node.op_type == "Conv":
        rows = first * min(positions, math.prod(shape[2:]))
    else:
        rows = min(positions * first, first * math.prod(shape[1:-1]))
    return fetched + feeds * rows * layer.linear.outputs * itemsize
