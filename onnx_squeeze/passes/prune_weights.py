"""Magnitude weight pruning of Conv/Gemm/MatMul: unstructured (per layer, global, threshold) and N:M.

Pruning sets the smallest-magnitude weights to exactly zero and leaves the graph as it is. What
that buys, honestly:

- onnxruntime's CPU kernels are dense: a model with 90 % zeros runs as fast as the original.
- The file compresses much better (zip/gzip of the model, or any sparse storage format); the
  pass reports the deflate (gzip) size of the pruned weights before and after.
- N:M sparsity (2:4: at most 2 nonzeros in every 4 consecutive weights along the reduction axis)
  is the pattern sparse tensor cores (TensorRT on Ampere and later GPUs) can run faster.

Modes:

- ``ratio``: every layer loses the share ``ratio`` of its weights (the smallest ``|w|``).
- ``global``: one threshold over all selected layers, on ``|w| / RMS(layer)`` so that layers of
  different scale compare fairly; ``ratio`` of all selected weights are pruned, each layer losing
  as many as fall under the threshold. RMS rather than max: the max is one outlier, the RMS
  describes the whole layer.
- ``threshold``: in each layer, weights with ``|w| < threshold * max|w|`` are pruned.
- ``nm``: keep the ``n`` largest of every ``m`` consecutive weights along the reduction
  (input-channel) axis: Conv ``W[out, in, kh, kw]`` axis 1 (at each out, kh, kw), MatMul
  ``B[..., k, n]`` axis -2 (``A[..., m, k]`` axis -1 when the constant is input 0), Gemm ``B`` axis
  1 with ``transB=1`` else 0 (``A`` axis 0 with ``transA=1`` else 1).

The weight is constant input 1 of Conv/Gemm/MatMul, or input 0 of Gemm/MatMul when that is the
constant one. A weight shared by several selected nodes is pruned once and every user sees the
same pruned tensor; a weight also used by a node that is not pruned is left alone. Layers inside
If/Loop/Scan bodies are pruned like the others. In the records, parameters count the nonzero
weights (MACs are unchanged: the kernels stay dense).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.analysis import MAC_OPS
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import UniqueNames
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.base import Pass, bounded, choice, register, subset
from onnx_squeeze.passes.quantize.shared_weights import (
    Consumer,
    SharedWeight,
    skip_all,
    weight_nodes,
)
from onnx_squeeze.records import PassContext, PassReport, unselected
from onnx_squeeze.units import human_bytes

MODES = ("ratio", "global", "threshold", "nm")
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")
_GZIP_LEVEL = 6  # gzip's default


@dataclasses.dataclass
class PruneWeightsSettings:
    """Settings of :class:`PruneWeights` (see the module docstring for the modes)."""

    # ratio: per layer; global: one magnitude threshold over all layers; threshold: relative
    # to each layer's largest weight; nm: N nonzeros in every M (e.g. 2:4)
    mode: str = choice("ratio", MODES)
    # share of weights pruned per layer (ratio) or over all layers (global)
    ratio: float = bounded(0.5, low=0, below=1)
    # threshold mode: prune |w| < threshold * max|w| of the layer
    threshold: float = bounded(0.05, low=0, high=1)
    n: int = 2  # nm mode: nonzeros kept ...
    m: int = 4  # ... in every m consecutive weights along the reduction axis
    include: list[str] = dataclasses.field(default_factory=list)  # node-name globs
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: Sequence[str] = subset(SUPPORTED_OPS, SUPPORTED_OPS)
    keep_first: bool = True  # layers that see the model input before any other Conv/Gemm/MatMul
    keep_last: bool = True  # layers with no Conv/Gemm/MatMul after them (classifier, heads)
    min_params: int = bounded(1024, low=0)  # weights with fewer elements are left alone
    measure_gzip: bool = True  # report gzip sizes (costs a few seconds on large models)


@register
class PruneWeights(Pass):
    """Zero the smallest weights of Conv/Gemm/MatMul layers (unstructured or N:M)."""

    name = "prune_weights"
    Settings = PruneWeightsSettings
    reaches_subgraphs = True  # weights in If/Loop/Scan bodies too

    def validate(self) -> None:
        s = self.settings
        s.ratio, s.threshold = float(s.ratio), float(s.threshold)
        if not (isinstance(s.n, int) and isinstance(s.m, int) and 0 < s.n < s.m):
            raise SettingsError(
                f"prune_weights: need integers 0 < n < m (e.g. 2:4), got {s.n}:{s.m}"
            )
        for field in ("include", "exclude"):
            value = getattr(s, field)
            setattr(s, field, [value] if isinstance(value, str) else [str(v) for v in value])

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        weights, all_arrays = self._select(model, report)
        masks = self._masks(weights, report)
        names = UniqueNames(model)
        before, after = [], []
        for weight, keep in masks:
            pruned = weight.array.copy()
            pruned[~keep] = 0
            self._record(weight, pruned, report)
            if np.count_nonzero(pruned) != np.count_nonzero(weight.array):
                _replace_weight(weight, pruned, names)
            before.append(weight.array)
            after.append(pruned)
        report.notes.extend(self._summary(before, after, all_arrays))

    # -- selection ---------------------------------------------------------------------------

    def _select(
        self, model: ir.Model, report: PassReport
    ) -> tuple[list[SharedWeight], dict[ir.Value, np.ndarray]]:
        """The weights to prune (in the main graph and in If/Loop/Scan bodies), and the arrays
        of every constant Conv/Gemm/MatMul weight."""
        first, last = set(), set()
        for graph in model.graphs():
            ends = _boundary_layers(graph)
            first |= ends[0]
            last |= ends[1]
        chosen: dict[ir.Value, SharedWeight] = {}
        all_arrays: dict[ir.Value, np.ndarray] = {}
        for node in weight_nodes(model, SUPPORTED_OPS):
            found = _weight_layer(node)
            if found is None:
                continue
            if isinstance(found, str):
                report.skip(node, found)
                continue
            value, array = found.weight, found.array
            assert array is not None and value.dtype is not None
            all_arrays[value] = array
            if node.op_type not in self.settings.op_types:
                continue
            reason = self._selection_problem(node, array, first, last)
            if reason:
                report.skip(node, reason)
                continue
            weight = chosen.setdefault(value, SharedWeight(value, array, []))
            weight.consumers.append(_consumer(found))
        return [w for w in chosen.values() if not _sharing_problem(w, report)], all_arrays

    def _selection_problem(
        self, node: ir.Node, array: np.ndarray, first: set[ir.Node], last: set[ir.Node]
    ) -> str | None:
        s = self.settings
        reason = unselected(node.name or "", s.include, s.exclude)
        if reason:
            return reason
        if s.keep_first and node in first:
            return "first layer (sees the model input) kept; set keep_first=false to prune it"
        if s.keep_last and node in last:
            return "last layer (feeds the outputs) kept; set keep_last=false to prune it"
        if array.size < s.min_params:
            return f"weight has {array.size} elements < min_params={s.min_params}"
        return None

    # -- masks ---------------------------------------------------------------------------------

    def _masks(
        self, weights: list[SharedWeight], report: PassReport
    ) -> list[tuple[SharedWeight, np.ndarray]]:
        """For each weight, a boolean array: True where the weight is kept."""
        s = self.settings
        if s.mode == "global":
            return self._global_masks(weights, report)
        if s.mode == "nm":
            return [(w, mask) for w in weights if (mask := self._nm_mask(w, report)) is not None]
        if s.mode == "threshold":
            return [(w, _threshold_mask(_magnitude(w.array), s.threshold)) for w in weights]
        return [(w, _ratio_mask(_magnitude(w.array), s.ratio)) for w in weights]

    def _global_masks(
        self, weights: list[SharedWeight], report: PassReport
    ) -> list[tuple[SharedWeight, np.ndarray]]:
        normalized = [_rms_normalized(_magnitude(w.array)) for w in weights]
        total = sum(n.size for n in normalized)
        count = round(self.settings.ratio * total)
        if count == 0:
            return [(w, np.ones(w.array.shape, bool)) for w in weights]
        pooled = np.concatenate([n.ravel() for n in normalized])
        cut = float(np.partition(pooled, count - 1)[count - 1])
        del pooled
        report.notes.append(f"global threshold: |w| <= {cut:.4g} x the layer's RMS is pruned")
        return [(w, n > cut) for w, n in zip(weights, normalized, strict=True)]

    def _nm_mask(self, weight: SharedWeight, report: PassReport) -> np.ndarray | None:
        s = self.settings
        axes = {c.reduction_axes[0] for c in weight.consumers}
        problem = None
        if len(axes) > 1:
            problem = f"users of shared weight {weight.name!r} reduce over different axes {axes}"
        else:
            axis = axes.pop()
            size = weight.array.shape[axis]
            if size % s.m:
                problem = f"reduction dim (axis {axis}) is {size}, not divisible by m={s.m}"
        if problem:
            skip_all(report, weight.nodes, f"{s.n}:{s.m} not possible: {problem}")
            return None
        return nm_mask(_magnitude(weight.array), axis, s.n, s.m)

    # -- report --------------------------------------------------------------------------------

    def _record(self, weight: SharedWeight, pruned: np.ndarray, report: PassReport) -> None:
        s = self.settings
        nonzero_before = int(np.count_nonzero(weight.array))
        nonzero_after = int(np.count_nonzero(pruned))
        detail = (
            f"sparsity {1 - nonzero_before / pruned.size:.3f} -> "
            f"{1 - nonzero_after / pruned.size:.3f}"
        )
        if nonzero_after == nonzero_before:
            detail += " (no weight changed)"
        first, *others = weight.nodes
        if s.mode == "nm":
            axis = weight.consumers[0].reduction_axes[0]
            holds = nm_pattern_holds(pruned, axis, s.n, s.m)
            detail += f"; {s.n}:{s.m} along axis {axis}: {'holds' if holds else 'BROKEN'}"
        if others:
            detail += (
                f"; weight {weight.name!r} shared with {', '.join(n.name or '?' for n in others)}"
            )
        report.record(
            first, "pruned", detail, params_before=nonzero_before, params_after=nonzero_after
        )
        for node in others:
            report.record(
                node, "pruned", f"uses weight {weight.name!r}, pruned with {first.name!r}"
            )

    def _summary(
        self,
        before: Sequence[np.ndarray],
        after: Sequence[np.ndarray],
        all_arrays: dict[ir.Value, np.ndarray],
    ) -> list[str]:
        if not before:
            return ["no weight pruned"]
        size = sum(a.size for a in before)
        all_size = sum(a.size for a in all_arrays.values())
        all_zeros = _zeros(list(all_arrays.values()))
        added = _zeros(after) - _zeros(before)
        notes = [
            f"pruned {len(before)} weight tensors ({size} elements): sparsity "
            f"{_zeros(before) / size:.3f} -> {_zeros(after) / size:.3f}; all Conv/Gemm/MatMul "
            f"weights: {all_zeros / all_size:.3f} -> {(all_zeros + added) / all_size:.3f}",
            "zeros do not make onnxruntime's dense CPU kernels faster: the gain is compressed "
            "storage" + (" and sparse tensor cores (N:M)" if self.settings.mode == "nm" else ""),
        ]
        if self.settings.measure_gzip:
            raw = sum(a.nbytes for a in before)
            packed_before, packed_after = _gzip_size(before), _gzip_size(after)
            notes.append(
                f"pruned weights: {human_bytes(raw)} raw, gzip {human_bytes(packed_before)} -> "
                f"{human_bytes(packed_after)} ({packed_before / max(packed_after, 1):.2f}x smaller)"
            )
        return notes


# -- weights and masks ------------------------------------------------------------------------


def _weight_layer(node: ir.Node) -> Layer | str | None:
    """The layer view of a node with a constant float weight, or why it has none.

    None for a MatMul of two activations, which has no weight to prune.
    """
    layer = Layer.of(node)
    if isinstance(layer, NotLayer):
        if layer.reason == "both operands are activations":
            return None  # attention scores: nothing to prune
        return layer.reason
    if layer.quantized:
        return "weight is already quantized (DequantizeLinear); prune before quantizing"
    value = layer.weight
    if value.dtype is None or not value.dtype.is_floating_point():
        dtype = value.dtype.name if value.dtype is not None else "unknown"
        return f"weight {value.name!r} has dtype {dtype}, not floating point"
    if value.is_graph_output():
        return f"weight {value.name!r} is also a graph output"
    return layer


def _consumer(layer: Layer) -> Consumer:
    return Consumer(
        layer.node,
        layer.weight_index,
        channel_axis=layer.output_axis if layer.output_axis is not None else -1,
        reduction_axes=layer.reduction_axes,
    )


def _sharing_problem(weight: SharedWeight, report: PassReport) -> bool:
    """Skip (and say why) a weight that a node outside the selection also uses."""
    selected = {(c.node, c.index) for c in weight.consumers}
    outside = [u for u in weight.value.uses() if (u.node, u.idx) not in selected]
    if not outside:
        return False
    other = outside[0].node
    reason = (
        f"weight {weight.name!r} is shared with {other.op_type} {other.name!r}, which is not "
        "pruned (pruning would change it too)"
    )
    skip_all(report, weight.nodes, reason)
    return True


def _magnitude(array: np.ndarray) -> np.ndarray:
    return np.abs(array.astype(np.float32))


def _ratio_mask(magnitude: np.ndarray, ratio: float) -> np.ndarray:
    """Keep all but exactly ``round(ratio * size)`` smallest magnitudes."""
    count = round(ratio * magnitude.size)
    keep = np.ones(magnitude.size, bool)
    if count:
        keep[np.argpartition(magnitude.ravel(), count - 1)[:count]] = False
    return keep.reshape(magnitude.shape)


def _threshold_mask(magnitude: np.ndarray, threshold: float) -> np.ndarray:
    return magnitude >= threshold * float(magnitude.max(initial=0.0))


def _rms_normalized(magnitude: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(magnitude, dtype=np.float64))))
    return magnitude / rms if rms > 0 else magnitude


def nm_mask(magnitude: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest of every ``m`` consecutive magnitudes along ``axis``."""
    moved = np.moveaxis(magnitude, axis, -1)
    groups = moved.reshape(-1, m)
    dropped = np.argsort(groups, axis=1, kind="stable")[:, : m - n]
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, dropped, False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def nm_pattern_holds(array: np.ndarray, axis: int, n: int, m: int) -> bool:
    """Whether every ``m`` consecutive weights along ``axis`` hold at most ``n`` nonzeros."""
    if array.shape[axis] % m:
        return False
    groups = np.moveaxis(array, axis, -1).reshape(-1, m)
    return bool((np.count_nonzero(groups, axis=1) <= n).all())


def _zeros(arrays: Sequence[np.ndarray]) -> int:
    return sum(a.size - int(np.count_nonzero(a)) for a in arrays)


def _gzip_size(arrays: Sequence[np.ndarray]) -> int:
    """Size of the arrays' bytes after deflate (what gzip/zip of the model file achieves)."""
    packer = zlib.compressobj(_GZIP_LEVEL)
    size = sum(len(packer.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)
    return size + len(packer.flush())


# -- graph -----------------------------------------------------------------------------------


def _replace_weight(weight: SharedWeight, array: np.ndarray, names: UniqueNames) -> None:
    """Give every user of the weight the pruned tensor (one tensor, also when shared), in the
    graph that holds the weight (its readers may sit in bodies below it).

    The old tensor is shared with the teacher model: it is replaced, never written into.
    """
    value, graph = weight.value, weight.value.graph
    assert graph is not None
    if value.is_initializer():
        value.const_value = ir.tensor(array, dtype=value.dtype, name=value.name)
        return
    name = names.new(f"{weight.name}_pruned")
    new = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(value.dtype),
        const_value=ir.tensor(array, dtype=value.dtype, name=name),
    )
    graph.register_initializer(new)
    for consumer in weight.consumers:
        consumer.node.replace_input_with(consumer.index, new)


def _boundary_layers(graph: ir.Graph) -> tuple[set[ir.Node], set[ir.Node]]:
    """Nodes of ``graph`` with no Conv/Gemm/MatMul before them (first) and none after them
    (last).

    "Before" follows every activation input, so a residual path does not make later layers
    "first". A body counts on its own, its inputs and outputs as a model's: an exported model
    may hold all its layers in an If branch.
    """
    graph.sort()  # lossless; the pipeline sorts again when it finalizes
    nodes = list(graph)
    upstream = _flags(nodes, lambda node: [v.producer() for v in node.inputs if v is not None])
    downstream = _flags(
        nodes[::-1], lambda node: [u.node for out in node.outputs for u in out.uses()]
    )
    mac = [n for n in nodes if n.op_type in MAC_OPS]
    return {n for n in mac if not upstream[n]}, {n for n in mac if not downstream[n]}


def _flags(
    ordered: Sequence[ir.Node], neighbours: Callable[[ir.Node], list[ir.Node | None]]
) -> dict[ir.Node, bool]:
    """Whether a MAC op lies among a node's transitive neighbours (``ordered``: neighbours first)."""
    flags: dict[ir.Node, bool] = {}
    for node in ordered:
        flags[node] = any(
            other in flags and (other.op_type in MAC_OPS or flags[other])
            for other in neighbours(node)
        )
    return flags
