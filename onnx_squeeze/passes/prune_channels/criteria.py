"""Importance criteria: a registry of name -> function of a group, the model and what was
measured on calibration data, giving one score per channel (higher is more important).

Scores are normalised per member (divided by the member's mean) before they are averaged over a
group's members, so that layers of different scale count alike and scores of different groups
are comparable when ranked globally.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration import TensorStatistics
from onnx_squeeze.calibration.grams import GramSpec, Moments
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.least_squares import reconstruction_importance
from onnx_squeeze.passes.prune_channels.groups import ChannelAnalysis, ChannelGroup, Member, Slot
from onnx_squeeze.records import bn_scale

_EPSILON = 1e-12
# Ridge (relative to the mean input variance) of the refits that rank channels for the
# reconstruction criterion where a layer sees no more calibration rows than inputs, less in
# proportion where it sees more: on held-out data, 1e-3 generalised better than a bare fit.
_SELECTION_RIDGE = 1e-3

Statistics = Mapping[str, TensorStatistics]
# What a criterion reads beside the weights: activation statistics by tensor name, or the input
# Gram matrix of each consumer layer by node name.
Measurements = Mapping[str, "TensorStatistics | Moments"]
Criterion = Callable[[ChannelGroup, ir.Model, "Measurements | None"], np.ndarray]
NEEDS = ("statistics", "grams")


@dataclasses.dataclass(frozen=True)
class _CriterionEntry:
    function: Criterion
    needs: str | None


CRITERIA: dict[str, _CriterionEntry] = {}


def criterion(name: str, *, needs: str | None = None) -> Callable[[Criterion], Criterion]:
    """Register an importance criterion: ``function(group, model, measured) -> scores``, one
    score per channel of the group (higher is more important). ``needs`` says what ``measured``
    holds, from calibration data: ``statistics`` (tensor name -> activation statistics of the
    consumers' inputs), ``grams`` (consumer node name -> :class:`Moments` of what its weight
    multiplies) or None (``measured`` is None)."""
    if needs not in (None, *NEEDS):
        raise ValueError(f"needs must be one of {NEEDS} or None, got {needs!r}")

    def register_criterion(function: Criterion) -> Criterion:
        CRITERIA[name] = _CriterionEntry(function, needs)
        return function

    return register_criterion


def _normalised(scores: np.ndarray) -> np.ndarray:
    return scores / max(float(np.mean(scores)), _EPSILON)


def _mean_of(parts: list[np.ndarray], channels: int) -> np.ndarray:
    """Member scores normalised and averaged; all ones when the group has none."""
    if not parts:
        return np.ones(channels)
    return np.mean([_normalised(p) for p in parts], axis=0)


def _channel_rows(array: np.ndarray, slot: Slot, offset: int, channels: int) -> np.ndarray:
    """Entries of ``channels`` channels from ``offset`` along the slot's axis, one row each."""
    moved = np.moveaxis(array, slot.axis, 0)
    rows = moved[offset * slot.repeat : (offset + channels) * slot.repeat]
    return rows.reshape(channels, -1).astype(np.float64)


def _weight_norms(group: ChannelGroup, order: int) -> list[np.ndarray]:
    parts = []
    for member in group.members:
        if not member.slot.weight:
            continue
        array = constant_array(member.slot.node.inputs[member.slot.input])
        if array is None:
            continue
        for offset in member.offsets:
            rows = _channel_rows(array, member.slot, offset, group.channels)
            parts.append(np.linalg.norm(rows, ord=order, axis=1))
    return parts


@criterion("l1")
def l1_norm(group: ChannelGroup, model: ir.Model, stats: Statistics | None) -> np.ndarray:
    """Sum of absolute weights of every producer, consumer and depthwise slice of a channel."""
    return _mean_of(_weight_norms(group, 1), group.channels)


@criterion("l2")
def l2_norm(group: ChannelGroup, model: ir.Model, stats: Statistics | None) -> np.ndarray:
    """Euclidean norm of the same slices as ``l1``."""
    return _mean_of(_weight_norms(group, 2), group.channels)


@criterion("bn_scale")
def bn_scale_criterion(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """Network slimming: ``|gamma| / sqrt(var + eps)`` of the group's BatchNormalizations, or
    the scale kept on producers where prepare folded them; groups without BN use ``l2``."""
    parts = []
    for atom in group.atoms:
        scale = bn_scale(atom.producer) if atom.producer is not None else None
        if scale is not None:
            parts.append(np.abs(scale[atom.start : atom.start + atom.length]).astype(np.float64))
    for member in group.members:
        node = member.slot.node
        if node.op_type != "BatchNormalization" or member.slot.input != 1:
            continue
        gamma, var = (constant_array(node.inputs[i]) for i in (1, 4))
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        scale = np.abs(gamma) / np.sqrt(var.astype(np.float64) + epsilon)
        parts.extend(scale[o : o + group.channels] for o in member.offsets)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


def _consumer_statistics(group: ChannelGroup, stats: Statistics, pick) -> list[np.ndarray]:
    parts = []
    for member in group.members:
        if member.slot.role != "consumer" or member.slot.repeat != 1:
            continue
        found = stats.get(member.slot.node.inputs[0].name or "")
        if found is not None and found.channels is not None:
            values = pick(found.channels)
            parts.extend(values[o : o + group.channels] for o in member.offsets)
    return parts


@criterion("activation", needs="statistics")
def mean_activation(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """Mean absolute activation entering the group's consumers (calibration data)."""
    parts = _consumer_statistics(group, stats or {}, lambda c: c.abs_mean)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


@criterion("apoz", needs="statistics")
def apoz(group: ChannelGroup, model: ir.Model, stats: Statistics | None):
    """One minus the average percentage of zeros (after ReLU) entering the consumers."""
    parts = _consumer_statistics(group, stats or {}, lambda c: 1.0 - c.zero_fraction + 1e-3)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, stats)


@dataclasses.dataclass(frozen=True)
class _Consumer:
    """A member whose weight multiplies the group's channels on its reduction axis: the weight
    as (input features, outputs), features channel-major, how many features each channel spans
    (Conv kernel taps, or ``repeat`` after a Flatten), and the input Gram it needs."""

    member: Member
    matrix: np.ndarray
    taps: int
    spec: GramSpec


def _consumer(member: Member) -> _Consumer | None:
    """The member as a :class:`_Consumer` when it is a one-group Conv, a Gemm or a MatMul
    reading the channels with its constant weight (named, so that its Gram can be kept)."""
    slot = member.slot
    layer = Layer.of(slot.node)
    if slot.role != "consumer" or not slot.node.name or isinstance(layer, NotLayer):
        return None
    spec = layer.gram_spec()
    if spec is None or layer.array is None or layer.weight_index != slot.input:
        return None
    if layer.reduction_axes[0] != slot.axis:
        return None
    if layer.op_type == "Conv" and slot.repeat == 1:
        matrix = layer.array.reshape(layer.shape[0], -1).T
        return _Consumer(member, matrix, math.prod(layer.kernel), spec)
    if layer.op_type in ("Gemm", "MatMul"):
        return _Consumer(member, layer.matrix(), slot.repeat, spec)
    return None


def _compensating_consumers(group: ChannelGroup) -> list[_Consumer]:
    return [c for c in map(_consumer, group.members) if c is not None]


def gram_specs(groups: list[ChannelGroup]) -> dict[str, GramSpec]:
    """Consumer node name -> the input Gram the ``reconstruction`` criterion reads."""
    return {
        consumer.member.slot.node.name: consumer.spec
        for group in groups
        for consumer in _compensating_consumers(group)
    }


@criterion("reconstruction", needs="grams")
def reconstruction(group: ChannelGroup, model: ir.Model, grams: Measurements | None):
    """ThiNet with compensation: channels in the order greedy elimination on each consumer's
    input Gram removes them (the one whose loss the consumer can best make up by refitting the
    rest first, :func:`~onnx_squeeze.least_squares.reconstruction_importance`); pair with the
    ``reconstruct`` pass, which does that refit. Groups without such a consumer use ``l2``."""
    parts = []
    for consumer in _compensating_consumers(group):
        moments = (grams or {}).get(consumer.member.slot.node.name)
        if moments is None:
            continue
        ridge = _SELECTION_RIDGE * min(1.0, len(consumer.matrix) / max(moments.rows, 1))
        scores = reconstruction_importance(
            moments.gram, consumer.matrix, taps=consumer.taps, ridge=ridge
        )
        parts.extend(scores[o : o + group.channels] for o in consumer.member.offsets)
    return _mean_of(parts, group.channels) if parts else l2_norm(group, model, grams)


def statistics_tensors(groups: list[ChannelGroup], channels: ChannelAnalysis) -> dict[str, int]:
    """Tensor name -> channel axis of the consumer inputs the activation criteria read."""
    wanted: dict[str, int] = {}
    for group in groups:
        for member in group.members:
            value = member.slot.node.inputs[0]
            layout = channels.layouts.get(value) if value is not None else None
            if member.slot.role == "consumer" and layout and layout.repeat == 1 and value.name:
                wanted[value.name] = layout.axis
    return wanted
