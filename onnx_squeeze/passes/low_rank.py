"""Low-rank factorization of Gemm, MatMul and Conv layers with constant weights.

Each layer is replaced by a chain of smaller layers of the same kind, so that later passes
(channel pruning, quantization) still see plain Conv/Gemm/MatMul with constant weights:

- ``svd`` (Gemm/MatMul): ``X·W → (X·A)·B``; Gemm's bias, ``beta`` and ``transA/transB`` stay on
  the right factor, ``alpha`` is folded into B; a MatMul whose constant is the first operand
  becomes ``A·(B·X)``.
- ``channel`` (Conv): the original kernel to r channels, then a 1×1 Conv.
- ``spatial`` (2-D Conv): a kh×1 Conv to r channels, then a 1×kw Conv (strides, pads, dilations
  and ``auto_pad`` split by axis, which is exact).
- ``tucker2`` (Conv): 1×1 reduce → kh×kw core → 1×1 expand (HOSVD of the channel modes).
- ``auto``: ``svd`` for Gemm/MatMul and 1×1 Convs (as ``channel``); for larger kernels the
  scheme that costs the fewest MACs at the requested energy (or, under a budget, the best trade).

Ranks come from one of: ``rank``, ``ratio`` (of full rank), ``energy`` (share of squared singular
values kept; the default, 0.95) or a whole-model ``macs_target`` / ``params_target`` (fraction to
remove), for which ranks are allocated across layers by energy lost per MAC (or parameter)
saved. A layer is factorized only when that saves MACs. With ``data_aware``, the input second
moments measured on the calibration data whiten the decomposition so that it minimises the
layer's output error rather than its weight error (see :mod:`onnx_squeeze.factorize`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze import analysis, factorize, runtime
from onnx_squeeze.blas import blas_threads
from onnx_squeeze.calibration.grams import GramSpec, Moments, collect_grams, conv_geometry
from onnx_squeeze.errors import SettingsError, ShapeUnknownError
from onnx_squeeze.graph_utils import (
    UniqueNames,
    attribute,
    constant_array,
    new_initializer,
    typed_attributes,
)
from onnx_squeeze.passes.base import Pass, register
from onnx_squeeze.prepare import infer_shapes
from onnx_squeeze.progress import track
from onnx_squeeze.records import PassContext, PassReport, mark_created

SCHEMES = ("auto", "svd", "channel", "spatial", "tucker2")
SUPPORTED_OPS = ("Gemm", "MatMul", "Conv")
SOURCE_NODE_KEY = "onnx_squeeze.source_node"
DEFAULT_ENERGY = 0.95

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)

Rank = tuple[int, ...]


@dataclasses.dataclass
class LowRankSettings:
    scheme: str = "auto"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    macs_target: float | None = None
    params_target: float | None = None
    data_aware: bool = False
    damping: float = 0.01  # data-aware: fraction of the mean input energy added to the diagonal
    round_to: int = 8
    min_macs: int = 0
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(SUPPORTED_OPS))
    shapes: list[str] = dataclasses.field(default_factory=list)  # NAME:1x128, for MAC counts


# ---------------------------------------------------------------------------------------------
# Layers and their costs


@dataclasses.dataclass(eq=False)  # hashed by identity: a key of per-layer tables
class Layer:
    """A node that can be factorized, with its weight and what its MACs are made of.

    ``positions`` is how many times the per-position cost is paid (output pixels times batch,
    rows of a MatMul); ``in_ratio`` / ``mid_ratio`` scale it for a Tucker-2 reduce Conv (input
    pixels) and a spatial first Conv (output rows times input columns).
    """

    node: ir.Node
    name: str
    kind: str  # "gemm", "matmul" (X·W), "matmul_left" (W·X), "conv"
    weight: np.ndarray
    dtype: ir.DataType
    macs: int
    positions: float
    bias_params: int = 0
    in_ratio: float = 1.0
    mid_ratio: float = 1.0

    @property
    def params(self) -> int:
        return int(self.weight.size) + self.bias_params

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else ()

    def matrix(self) -> np.ndarray:
        """The weight as the (k × n) matrix of ``y = x·W`` (Gemm/MatMul only)."""
        if self.kind == "gemm":
            return self.weight.T if attribute(self.node, "transB", 0) else self.weight
        return self.weight.T if self.kind == "matmul_left" else self.weight


def _static_spatial(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or len(value.shape) < 3:
        return None
    dims = tuple(value.shape)[2:]
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None  # type: ignore[return-value]


def _weight_problem(node: ir.Node, index: int) -> tuple[np.ndarray | None, str]:
    """The constant weight at ``index``, or None and why it cannot be used."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None, "no weight input"
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return None, "already quantized (weight comes from DequantizeLinear)"
    weight = constant_array(value)
    if weight is None:
        return None, "weight is not a constant"
    if value.dtype not in _FLOAT_TYPES:
        return None, f"weight is {value.dtype}, not floating point"
    users = {use.node for use in value.uses()}
    if len(users) > 1:
        return None, f"weight {value.name!r} is shared with {len(users) - 1} other node(s)"
    return weight, ""


def find_layer(node: ir.Node, macs: int) -> Layer | str:
    """The factorizable layer behind ``node``, or why it is not one."""
    op = node.op_type
    if op == "ConvTranspose":
        return "ConvTranspose is not factorized"
    if op == "Conv":
        return _conv_layer(node, macs)
    if op == "Gemm":
        if constant_array(node.inputs[0]) is not None and constant_array(node.inputs[1]) is None:
            return "Gemm's constant operand is A (only a constant B is factorized)"
        weight, problem = _weight_problem(node, 1)
        if weight is None:
            return problem
        return _matrix_layer(node, "gemm", weight, macs)
    if constant_array(node.inputs[1]) is not None:
        index, kind = 1, "matmul"
    elif constant_array(node.inputs[0]) is not None:
        index, kind = 0, "matmul_left"
    else:
        return "both operands are activations"
    weight, problem = _weight_problem(node, index)
    if weight is None:
        return problem
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim}; only 2-D weights are factorized (batched skipped)"
    return _matrix_layer(node, kind, weight, macs)


def _matrix_layer(node: ir.Node, kind: str, weight: np.ndarray, macs: int) -> Layer:
    bias = constant_array(node.inputs[2]) if kind == "gemm" and len(node.inputs) > 2 else None
    size = int(weight.size)
    return Layer(
        node, node.name or "", kind, weight, node.inputs[1 if kind != "matmul_left" else 0].dtype,
        macs, macs / size if macs else 1.0, bias_params=int(bias.size) if bias is not None else 0,
    )  # fmt: skip


def _conv_layer(node: ir.Node, macs: int) -> Layer | str:
    if attribute(node, "group", 1) != 1:
        channels = node.inputs[1].shape[0] if node.inputs[1].shape is not None else None
        group = attribute(node, "group", 1)
        return "depthwise Conv" if group == channels else f"grouped Conv (group={group})"
    weight, problem = _weight_problem(node, 1)
    if weight is None:
        return problem
    if weight.ndim < 3:
        return f"Conv weight has rank {weight.ndim}"
    dims = weight.ndim - 2
    geometry = conv_geometry(node, dims)
    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    in_spatial = _static_spatial(node.inputs[0])
    out_spatial = _static_spatial(node.outputs[0])
    if in_spatial is not None and out_spatial is not None:
        in_ratio = math.prod(in_spatial) / math.prod(out_spatial)
        mid_ratio = in_spatial[-1] / out_spatial[-1]
    else:
        in_ratio = float(math.prod(geometry["strides"]))
        mid_ratio = float(geometry["strides"][-1])
    return Layer(
        node, node.name or "", "conv", weight, node.inputs[1].dtype, macs,
        macs / weight.size if macs else 1.0, int(bias.size) if bias is not None else 0,
        in_ratio, mid_ratio,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Plans: one scheme applied to one layer


def _round_rank(rank: int, multiple: int, full: int) -> int:
    if multiple > 1 and rank >= multiple:
        rank = math.ceil(rank / multiple) * multiple
    return max(1, min(rank, full))


def _rank_grid(full: int, multiple: int) -> list[int]:
    """Every rank a plan may use: all below ``multiple``, then its multiples, then full."""
    ranks = set(range(1, min(multiple, full + 1)))
    ranks.update(range(multiple, full + 1, max(multiple, 1)))
    ranks.add(full)
    return sorted(ranks)


class Plan:
    """How one scheme factorizes one layer: its energies, costs per rank, and the new nodes."""

    scheme: str

    def __init__(self, layer: Layer) -> None:
        self.layer = layer

    def gram_spec(self) -> GramSpec | None:
        raise NotImplementedError

    def decompose(self, white: factorize.Whitening | None) -> None:
        raise NotImplementedError

    @property
    def full(self) -> Rank:
        raise NotImplementedError

    def energy(self, rank: Rank) -> float:
        raise NotImplementedError

    def per_position(self, rank: Rank) -> tuple[float, int]:
        """(MACs per layer position, parameters) of the factorized layer."""
        raise NotImplementedError

    def build(self, rank: Rank, builder: _Builder) -> list[ir.Node]:
        raise NotImplementedError

    def ranks(self, multiple: int) -> list[Rank]:
        raise NotImplementedError

    def fixed(self, rank: int, multiple: int) -> Rank:
        return tuple(_round_rank(min(rank, f), multiple, f) for f in self.full)

    def of_ratio(self, ratio: float, multiple: int) -> Rank:
        return tuple(_round_rank(math.ceil(ratio * f), multiple, f) for f in self.full)

    def cost(self, rank: Rank) -> tuple[int, int]:
        """(MACs, parameters) of the factorized layer, bias included."""
        per_position, params = self.per_position(rank)
        return round(per_position * self.layer.positions), params + self.layer.bias_params


class MatrixPlan(Plan):
    """Schemes that factor one matrix unfolding of the weight: ``W ≈ A·B`` at rank r."""

    def decompose(self, white: factorize.Whitening | None) -> None:
        self.factors = factorize.MatrixFactorization(self.matrix(), white)

    def matrix(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def full(self) -> Rank:
        return (self.factors.full_rank,)

    def energy(self, rank: Rank) -> float:
        return self.factors.energy(rank[0])

    def ranks(self, multiple: int) -> list[Rank]:
        return [(r,) for r in _rank_grid(self.factors.full_rank, multiple)]


class SvdPlan(MatrixPlan):
    scheme = "svd"

    def matrix(self) -> np.ndarray:
        return self.layer.matrix()

    def gram_spec(self) -> GramSpec | None:
        node, kind = self.layer.node, self.layer.kind
        features = self.matrix().shape[0]
        if kind == "matmul_left":
            return GramSpec(node.inputs[1].name, "columns", features)
        transposed = kind == "gemm" and attribute(node, "transA", 0)
        return GramSpec(node.inputs[0].name, "first" if transposed else "last", features)

    def per_position(self, rank: Rank) -> tuple[float, int]:
        k, n = self.matrix().shape
        return rank[0] * (k + n), rank[0] * (k + n)

    def build(self, rank: Rank, builder: _Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0])
        node, kind = self.layer.node, self.layer.kind
        if kind == "matmul":
            first = builder.node("lowrank_a", "MatMul", [node.inputs[0], builder.weight("a", a)])
            return [
                first,
                builder.node("lowrank_b", "MatMul", [first.outputs[0], builder.weight("b", b)]),
            ]
        if kind == "matmul_left":  # Wᵀ = A·B, so W·X = Bᵀ·(Aᵀ·X)
            first = builder.node("lowrank_a", "MatMul", [builder.weight("a", a.T), node.inputs[1]])
            return [
                first,
                builder.node("lowrank_b", "MatMul", [builder.weight("b", b.T), first.outputs[0]]),
            ]
        trans_b = attribute(node, "transB", 0)
        b = b * attribute(node, "alpha", 1.0)
        first_attrs = {"transA": attribute(node, "transA", 0), "transB": trans_b}
        first = builder.node(
            "lowrank_a",
            "Gemm",
            [node.inputs[0], builder.weight("a", a.T if trans_b else a)],
            first_attrs,
        )
        second_inputs = [first.outputs[0], builder.weight("b", b.T if trans_b else b)]
        second_inputs += list(node.inputs[2:3])
        second_attrs = {"transB": trans_b, "beta": float(attribute(node, "beta", 1.0))}
        return [first, builder.node("lowrank_b", "Gemm", second_inputs, second_attrs)]


class ChannelPlan(MatrixPlan):
    scheme = "channel"

    def matrix(self) -> np.ndarray:
        return factorize.channel_matrix(self.layer.weight)

    def gram_spec(self) -> GramSpec | None:
        node, weight = self.layer.node, self.layer.weight
        geometry = conv_geometry(node, weight.ndim - 2)
        features = weight.shape[1] * math.prod(weight.shape[2:])
        return GramSpec(node.inputs[0].name, "patches", features, self.layer.kernel, **geometry)

    def per_position(self, rank: Rank) -> tuple[float, int]:
        out_channels, in_channels = self.layer.weight.shape[:2]
        size = math.prod(self.layer.kernel)
        params = rank[0] * (in_channels * size + out_channels)
        return params, params

    def build(self, rank: Rank, builder: _Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0])
        first_kernel, second_kernel = factorize.channel_kernels(a, b, self.layer.weight.shape)
        node, dims = self.layer.node, len(self.layer.kernel)
        first = builder.conv("lowrank_a", node.inputs[0], first_kernel, conv_geometry(node, dims))
        return [first, builder.conv("lowrank_b", first.outputs[0], second_kernel, bias=True)]


class SpatialPlan(MatrixPlan):
    scheme = "spatial"

    def matrix(self) -> np.ndarray:
        return factorize.spatial_matrix(self.layer.weight)

    def _split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Conv geometry split into its vertical (first) and horizontal (second) parts."""
        g = conv_geometry(self.layer.node, 2)
        top, left, bottom, right = g["pads"]
        (sh, sw), (dh, dw), auto_pad = g["strides"], g["dilations"], g["auto_pad"]
        vertical = {"strides": (sh, 1), "dilations": (dh, 1), "pads": (top, 0, bottom, 0)}
        horizontal = {"strides": (1, sw), "dilations": (1, dw), "pads": (0, left, 0, right)}
        return {**vertical, "auto_pad": auto_pad}, {**horizontal, "auto_pad": auto_pad}

    def gram_spec(self) -> GramSpec | None:
        node, weight = self.layer.node, self.layer.weight
        features = weight.shape[1] * weight.shape[2]
        vertical, _ = self._split()
        return GramSpec(node.inputs[0].name, "patches", features, (weight.shape[2], 1), **vertical)

    def per_position(self, rank: Rank) -> tuple[float, int]:
        out_channels, in_channels, height, width = self.layer.weight.shape
        first, second = rank[0] * in_channels * height, rank[0] * out_channels * width
        return first * self.layer.mid_ratio + second, first + second

    def build(self, rank: Rank, builder: _Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0])
        first_kernel, second_kernel = factorize.spatial_kernels(a, b, self.layer.weight.shape)
        vertical, horizontal = self._split()
        first = builder.conv("lowrank_a", self.layer.node.inputs[0], first_kernel, vertical)
        return [
            first,
            builder.conv("lowrank_b", first.outputs[0], second_kernel, horizontal, bias=True),
        ]


class TuckerPlan(Plan):
    scheme = "tucker2"

    def gram_spec(self) -> GramSpec | None:
        dims = len(self.layer.kernel)
        ones = (1,) * dims
        return GramSpec(
            self.layer.node.inputs[0].name, "patches", self.layer.weight.shape[1], ones, ones, ones
        )

    def decompose(self, white: factorize.Whitening | None) -> None:
        self.factors = factorize.Tucker2(self.layer.weight, white)

    @property
    def full(self) -> Rank:
        return self.factors.full_rank

    def energy(self, rank: Rank) -> float:
        return self.factors.energy(*rank)

    def ranks(self, multiple: int) -> list[Rank]:
        """Input ranks on the grid, output ranks in proportion (both modes cut alike)."""
        full_in, full_out = self.full
        return [
            (r, _round_rank(math.ceil(r * full_out / full_in), multiple, full_out))
            for r in _rank_grid(full_in, multiple)
        ]

    def per_position(self, rank: Rank) -> tuple[float, int]:
        out_channels, in_channels = self.layer.weight.shape[:2]
        rank_in, rank_out = rank
        reduce, expand = in_channels * rank_in, rank_out * out_channels
        core = rank_out * rank_in * math.prod(self.layer.kernel)
        return reduce * self.layer.in_ratio + core + expand, reduce + core + expand

    def build(self, rank: Rank, builder: _Builder) -> list[ir.Node]:
        reduce, core, expand = self.factors.factors(*rank)
        node, dims = self.layer.node, len(self.layer.kernel)
        ones = (1,) * dims
        first = builder.conv("lowrank_a", node.inputs[0], reduce.reshape(*reduce.shape, *ones))
        middle = builder.conv("lowrank_core", first.outputs[0], core, conv_geometry(node, dims))
        last = builder.conv(
            "lowrank_b", middle.outputs[0], expand.reshape(*expand.shape, *ones), bias=True
        )
        return [first, middle, last]


def plans_for(layer: Layer, scheme: str) -> tuple[list[Plan], str]:
    """The plans to consider for ``layer`` under the ``scheme`` setting, and a note on fallback."""
    if layer.kind != "conv":
        return [SvdPlan(layer)], ""
    kernel = layer.kernel
    if all(k == 1 for k in kernel):
        note = (
            "" if scheme in ("auto", "svd", "channel") else f"1×1 kernel: channel SVD, not {scheme}"
        )
        return [ChannelPlan(layer)], note
    if scheme == "auto":
        spatial = [SpatialPlan(layer)] if len(kernel) == 2 and min(kernel) > 1 else []
        return [ChannelPlan(layer), TuckerPlan(layer), *spatial], ""
    if scheme in ("svd", "channel"):
        return [ChannelPlan(layer)], ""
    if scheme == "tucker2":
        return [TuckerPlan(layer)], ""
    if len(kernel) == 2 and min(kernel) > 1:
        return [SpatialPlan(layer)], ""
    return [ChannelPlan(layer)], f"kernel {kernel} has no two spatial axes to split: channel SVD"


# ---------------------------------------------------------------------------------------------
# Building the new nodes


class _Builder:
    """Makes the factor nodes and weights of one layer and swaps them in for the original."""

    def __init__(self, layer: Layer, graph: ir.Graph, names: UniqueNames, pass_name: str) -> None:
        self.layer, self.graph, self.names, self.pass_name = layer, graph, names, pass_name
        self.source = layer.name

    def weight(self, role: str, array: np.ndarray) -> ir.Value:
        dtype = self.layer.dtype
        array = np.ascontiguousarray(array, dtype=dtype.numpy())
        wanted = f"{self.source}/lowrank_{role}.weight"
        return new_initializer(self.graph, self.names, wanted, array, dtype)

    def node(
        self,
        role: str,
        op: str,
        inputs: Sequence[ir.Value | None],
        attrs: dict[str, Any] | None = None,
    ) -> ir.Node:
        output = ir.Value(
            name=self.names.new(f"{self.source}/{role}_output"),
            type=ir.TensorType(self.layer.dtype),
        )
        node = ir.Node(
            "",
            op,
            inputs,
            typed_attributes(attrs or {}),
            outputs=[output],
            name=f"{self.source}/{role}",
        )
        node.metadata_props[SOURCE_NODE_KEY] = self.source
        mark_created(node, self.pass_name)
        return node

    def conv(
        self, role: str, x: ir.Value, kernel: np.ndarray, geometry: dict[str, Any] | None = None,
        *, bias: bool = False,
    ) -> ir.Node:  # fmt: skip
        attrs: dict[str, Any] = {"kernel_shape": kernel.shape[2:]}
        for key, value in (geometry or {}).items():
            if key == "auto_pad":
                if value not in ("NOTSET", ""):
                    attrs["auto_pad"] = value
            elif key != "pads" or (geometry or {}).get("auto_pad", "NOTSET") in ("NOTSET", ""):
                attrs[key] = value
        inputs = [x, self.weight(role.removeprefix("lowrank_"), kernel)]
        if bias:
            inputs += list(self.layer.node.inputs[2:3])
        return self.node(role, "Conv", inputs, attrs)

    def replace(self, nodes: list[ir.Node]) -> None:
        """Swap the factor chain in; the last node takes over the original output value's name."""
        original, last = self.layer.node, nodes[-1]
        old_output, new_output = original.outputs[0], last.outputs[0]
        self.names.used.discard(new_output.name)
        metadata = dict(original.metadata_props)
        metadata.update(last.metadata_props)
        last.metadata_props.clear()
        last.metadata_props.update(metadata)
        new_output.metadata_props.update(old_output.metadata_props)
        ir.convenience.replace_nodes_and_values(
            self.graph, original, [original], nodes, [old_output], [new_output]
        )


def factorize_layer(
    model: ir.Model, plan: Plan, rank: Rank, names: UniqueNames, pass_name: str = "low_rank"
) -> list[ir.Node]:
    """Replace the plan's layer by its factors at ``rank`` (the plan must be decomposed)."""
    layer = plan.layer
    if not layer.name:
        layer.name = layer.node.name = names.new(f"{layer.node.op_type}_lowrank")
    builder = _Builder(layer, model.graph, names, pass_name)
    nodes = plan.build(rank, builder)
    builder.replace(nodes)
    return nodes


# ---------------------------------------------------------------------------------------------
# Rank selection


@dataclasses.dataclass
class Option:
    """One plan at one rank, with what it keeps and costs."""

    plan: Plan
    rank: Rank
    energy: float
    macs: int
    params: int

    @classmethod
    def of(cls, plan: Plan, rank: Rank) -> Option:
        return cls(plan, rank, plan.energy(rank), *plan.cost(rank))


def _original_cost(layer: Layer) -> tuple[int, int]:
    return layer.macs or round(layer.positions * layer.weight.size), layer.params


def _unprofitable(option: Option, why: str = "") -> str:
    rank = "/".join(map(str, option.rank))
    macs = _original_cost(option.plan.layer)[0]
    return (
        f"{why}{option.plan.scheme} rank {rank} costs {option.macs} MACs, "
        f"not fewer than the original {macs}"
    )


def _cheapest_with_energy(plans: Sequence[Plan], energy: float, multiple: int) -> Option:
    options = [Option.of(plan, rank) for plan in plans for rank in plan.ranks(multiple)]
    meeting = [option for option in options if option.energy >= energy - 1e-9]
    return min(meeting, key=lambda option: (option.macs, -option.energy))


def _allocate(
    candidates: dict[Layer, list[Option]], metric: str, goal: float, fixed: float, total: float
) -> tuple[dict[Layer, Option | None], float]:
    """Per layer the option (None: keep it whole) minimising energy lost + λ·cost, with the
    smallest λ whose total cost (plus ``fixed``) meets ``goal``; and that total."""

    def pick(weight: float) -> tuple[dict[Layer, Option | None], float]:
        chosen: dict[Layer, Option | None] = {}
        spent = fixed
        for layer, options in candidates.items():
            whole = _original_cost(layer)[0 if metric == "macs" else 1]
            best, best_score, best_cost = None, weight * whole / total, whole
            for option in options:
                cost = option.macs if metric == "macs" else option.params
                score = 1 - option.energy + weight * cost / total
                if score < best_score:
                    best, best_score, best_cost = option, score, cost
            chosen[layer] = best
            spent += best_cost
        return chosen, spent

    low, high = 0.0, 1.0
    while pick(high)[1] > goal and high < 1e9:
        low, high = high, high * 4
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if pick(middle)[1] <= goal else (middle, high)
    return pick(high)


# ---------------------------------------------------------------------------------------------
# The pass


@register
class LowRank(Pass):
    """Factorize Gemm/MatMul/Conv weights into chains of smaller layers (see the module doc)."""

    name = "low_rank"
    Settings = LowRankSettings

    def validate(self) -> None:
        s = self.settings
        if s.scheme not in SCHEMES:
            raise SettingsError(
                f"low_rank: scheme {s.scheme!r} is unknown; use one of {', '.join(SCHEMES)}"
            )
        chosen = [
            key
            for key in ("rank", "ratio", "energy", "macs_target", "params_target")
            if getattr(s, key) is not None
        ]
        if len(chosen) > 1:
            raise SettingsError(
                f"low_rank: set only one of rank, ratio, energy, macs_target, params_target "
                f"(got {', '.join(chosen)})"
            )
        checks = [
            (s.rank is None or (isinstance(s.rank, int) and s.rank >= 1), "rank must be an integer >= 1"),
            (s.ratio is None or 0 < s.ratio <= 1, "ratio must be in (0, 1] (share of full rank kept)"),
            (s.energy is None or 0 < s.energy <= 1, "energy must be in (0, 1] (share kept)"),
            (s.macs_target is None or 0 < s.macs_target < 1, "macs_target must be in (0, 1) (share of model MACs removed)"),
            (s.params_target is None or 0 < s.params_target < 1, "params_target must be in (0, 1) (share of parameters removed)"),
            (s.round_to >= 1, "round_to must be >= 1 (1: no rounding)"),
            (s.damping >= 0, "damping must be >= 0"),
            (s.min_macs >= 0, "min_macs must be >= 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise SettingsError(f"low_rank: {message}")
        unknown = sorted(set(s.op_types) - set(SUPPORTED_OPS))
        if unknown:
            raise SettingsError(
                f"low_rank: op_types {unknown} are not supported; use any of {', '.join(SUPPORTED_OPS)}"
            )
        runtime.parse_shape_overrides(s.shapes)

    @property
    def mode(self) -> str:
        s = self.settings
        for key in ("rank", "ratio", "macs_target", "params_target"):
            if getattr(s, key) is not None:
                return key
        return "energy"

    def apply(self, model: ir.Model, context: PassContext, report: PassReport) -> None:
        s = self.settings
        if s.data_aware and not context.data.supplied:
            raise SettingsError(
                "low_rank: data_aware=true needs calibration data: pass --calib (a .npz file, "
                "an image folder, or 'random' for a smoke test) or set data_aware=false"
            )
        shapes = runtime.parse_shape_overrides(s.shapes)
        if not shapes:
            try:
                shapes = context.input_shapes(model)
            except ShapeUnknownError:
                if s.macs_target is not None:
                    raise  # a MACs budget needs real MACs
        summary = analysis.analyze(model, shapes=shapes)
        node_macs = {
            id(node): cost.macs
            for node, cost in zip(
                ir.traversal.RecursiveGraphIterator(model.graph), summary.nodes, strict=True
            )
        }
        if any(graph is not model.graph for graph in model.graphs()):
            report.notes.append("nodes inside If/Loop/Scan bodies are not factorized")
        layers = self._layers(model, node_macs, report)
        plans, fallback = {}, {}
        for layer in layers:
            plans[layer], fallback[layer] = plans_for(layer, s.scheme)
        self._decompose(model, plans, context)
        if self.mode in ("macs_target", "params_target"):
            chosen = self._budget(plans, summary, report)
        else:
            chosen = {
                layer: self._per_layer(layer_plans, report) for layer, layer_plans in plans.items()
            }
        names = UniqueNames(model)
        for layer, option in chosen.items():
            if option is not None:
                factorize_layer(model, option.plan, option.rank, names, self.name)
                self._record(layer, option, fallback[layer], report)
        if report.changed:
            infer_shapes(model, report)

    def _selected(self, name: str) -> bool:
        s = self.settings
        if s.include and not any(fnmatch.fnmatchcase(name, p) for p in s.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in s.exclude)

    def _layers(
        self, model: ir.Model, node_macs: dict[int, int], report: PassReport
    ) -> list[Layer]:
        layers = []
        for node in model.graph:
            op = "Conv" if node.op_type == "ConvTranspose" else node.op_type
            if node.domain not in ("", "ai.onnx") or op not in self.settings.op_types:
                continue
            if not self._selected(node.name or ""):
                report.skip(node, "excluded by include/exclude")
                continue
            macs = node_macs.get(id(node), 0)
            found = find_layer(node, macs)
            if isinstance(found, str):
                report.skip(node, found)
            elif macs < self.settings.min_macs:
                report.skip(node, f"{macs} MACs, below min_macs={self.settings.min_macs}")
            else:
                layers.append(found)
        return layers

    def _decompose(
        self, model: ir.Model, plans: dict[Layer, list[Plan]], context: PassContext
    ) -> None:
        every = [plan for layer_plans in plans.values() for plan in layer_plans]
        grams: dict[GramSpec, Moments] = {}
        if self.settings.data_aware and every:
            specs = [plan.gram_spec() for plan in every]
            grams = collect_grams(
                model,
                [spec for spec in specs if spec is not None],
                context.calibration,
                provider=context.providers[0],
                cache=context.cache,
                label="low_rank input statistics",
            )
        whites: dict[GramSpec, factorize.Whitening | None] = {}  # layers may share an input
        for spec, moments in grams.items():
            whites[spec] = factorize.whitening(moments.gram, self.settings.damping, moments.rows)
        for plan in track(every, "low_rank decompositions"):
            white = whites[plan.gram_spec()] if self.settings.data_aware else None
            # Single-threaded: these matrices are small for BLAS, and OpenBLAS threads spinning
            # on a busy machine made each SVD hundreds of times slower.
            with blas_threads(1):
                plan.decompose(white)

    def _per_layer(self, plans: list[Plan], report: PassReport) -> Option | None:
        s = self.settings
        layer = plans[0].layer
        if self.mode == "energy":
            energy = s.energy if s.energy is not None else DEFAULT_ENERGY
            option = _cheapest_with_energy(plans, energy, s.round_to)
            why = f"energy {energy} needs "
        else:
            plan = next((p for p in plans if p.scheme == "tucker2"), plans[0])
            rank = (
                plan.fixed(s.rank, s.round_to)
                if self.mode == "rank"
                else plan.of_ratio(s.ratio, s.round_to)
            )
            option, why = Option.of(plan, rank), ""
        if option.macs >= _original_cost(layer)[0]:
            report.skip(layer.node, _unprofitable(option, why))
            return None
        return option

    def _budget(
        self, plans: dict[Layer, list[Plan]], summary: analysis.ModelSummary, report: PassReport
    ) -> dict[Layer, Option | None]:
        s = self.settings
        metric = "macs" if self.mode == "macs_target" else "params"
        target = s.macs_target if metric == "macs" else s.params_target
        total = float(summary.macs if metric == "macs" else summary.params)
        index = 0 if metric == "macs" else 1
        candidates = {}
        for layer, layer_plans in plans.items():
            whole = _original_cost(layer)
            options = [
                Option.of(plan, rank) for plan in layer_plans for rank in plan.ranks(s.round_to)
            ]
            candidates[layer] = [
                o for o in options if o.macs < whole[0] and (o.macs, o.params)[index] < whole[index]
            ]
        fixed = total - sum(_original_cost(layer)[index] for layer in candidates)
        chosen, spent = _allocate(candidates, metric, (1 - target) * total, fixed, max(total, 1.0))
        removed = 1 - spent / total if total else 0.0
        report.notes.append(
            f"{metric}_target {target}: {removed:.1%} of the model's {metric} removed"
        )
        if spent > (1 - target) * total * (1 + 1e-6):
            report.notes.append(
                f"{metric}_target {target} not reached: factorizing every layer as far as it pays "
                f"removes {removed:.1%}"
            )
        for layer, option in chosen.items():
            if option is None:
                reason = (
                    "no rank saves MACs" if not candidates[layer] else "the budget kept it whole"
                )
                report.skip(layer.node, reason)
        return chosen

    def _record(self, layer: Layer, option: Option, fallback: str, report: PassReport) -> None:
        rank = "/".join(map(str, option.rank))
        full = "/".join(map(str, option.plan.full))
        detail = f"{option.plan.scheme} rank {rank} of {full}, energy kept {option.energy:.4f}"
        if self.settings.data_aware:
            detail += " (output energy, data-aware)"
        if fallback:
            detail += f"; {fallback}"
        macs, params = _original_cost(layer)
        report.record(
            layer.node, "factorized", detail,
            params_before=params, params_after=option.params, macs_before=macs, macs_after=option.macs,
        )  # fmt: skip
