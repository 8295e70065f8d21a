"""What low-rank factorization can do to one layer: the candidate layer and its costs, and one
plan per scheme (its decomposition, energies and costs per rank, and the factor nodes)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_squeeze.calibration.grams import GramSpec
from onnx_squeeze.graph_utils import attribute, constant_array
from onnx_squeeze.layers import Layer, NotLayer
from onnx_squeeze.passes.low_rank import factorize

if TYPE_CHECKING:
    from onnx_squeeze.passes.low_rank.rewrite import Builder

Rank = tuple[int, ...]

# ---------------------------------------------------------------------------------------------
# Layers and their costs


@dataclasses.dataclass(eq=False)  # hashed by identity: a key of per-layer tables
class Candidate:
    """A layer that can be factorized, with what its MACs are made of.

    ``positions`` is how many times the per-position cost is paid (output pixels times batch,
    rows of a MatMul); ``in_ratio`` / ``mid_ratio`` scale it for a Tucker-2 reduce Conv (input
    pixels) and a spatial first Conv (output rows times input columns).
    """

    layer: Layer
    macs: int
    positions: float
    bias_params: int = 0
    in_ratio: float = 1.0
    mid_ratio: float = 1.0

    @property
    def node(self) -> ir.Node:
        return self.layer.node

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def weight(self) -> np.ndarray:
        assert self.layer.array is not None
        return self.layer.array

    @property
    def dtype(self) -> ir.DataType:
        dtype = self.layer.weight.dtype
        assert dtype is not None
        return dtype

    @property
    def kind(self) -> str:
        """ "gemm", "matmul" (X·W), "matmul_left" (W·X) or "conv"."""
        if self.layer.op_type == "MatMul" and self.layer.left:
            return "matmul_left"
        return self.layer.op_type.lower()

    @property
    def params(self) -> int:
        return int(self.weight.size) + self.bias_params

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.layer.kernel

    def matrix(self) -> np.ndarray:
        """The weight as the (k × n) matrix of ``y = x·W`` (Gemm/MatMul only)."""
        return self.layer.matrix()


def original_cost(layer: Candidate) -> tuple[int, int]:
    """(MACs, parameters) of the layer as it is."""
    return layer.macs or round(layer.positions * layer.weight.size), layer.params


def _static_spatial(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or len(value.shape) < 3:
        return None
    dims = tuple(value.shape)[2:]
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None  # type: ignore[return-value]


def find_candidate(node: ir.Node, macs: int) -> Candidate | str:
    """The factorizable layer behind ``node``, or why it is not one."""
    if node.op_type == "ConvTranspose":
        return "ConvTranspose is not factorized"
    layer = Layer.of(node)
    if isinstance(layer, NotLayer):
        return layer.reason
    problem = _problem(layer)
    if problem:
        return problem
    if layer.op_type == "Conv":
        return _conv_candidate(layer, macs)
    size = math.prod(layer.shape)
    bias = constant_array(layer.bias) if layer.op_type == "Gemm" else None
    return Candidate(
        layer, macs, macs / size if macs else 1.0, int(bias.size) if bias is not None else 0
    )


def _problem(layer: Layer) -> str | None:
    """Why ``layer`` cannot be factorized, or None."""
    if layer.op_type == "Conv" and layer.groups != 1:
        depthwise = layer.groups == layer.shape[0]
        return "depthwise Conv" if depthwise else f"grouped Conv (group={layer.groups})"
    if layer.op_type == "Gemm" and layer.left:
        return "Gemm's constant operand is A (only a constant B is factorized)"
    if layer.quantized:
        return "already quantized (weight comes from DequantizeLinear)"
    if not layer.weight.dtype.is_floating_point():
        return f"weight is {layer.weight.dtype}, not floating point"
    if layer.shared:
        count = len(layer.other_users)
        return f"weight {layer.weight.name!r} is shared with {count} other node(s)"
    ndim = len(layer.shape)
    if layer.op_type == "MatMul" and ndim != 2:
        return f"weight has rank {ndim}; only 2-D weights are factorized (batched skipped)"
    if layer.op_type == "Conv" and ndim < 3:
        return f"Conv weight has rank {ndim}"
    return None


def _conv_candidate(layer: Layer, macs: int) -> Candidate:
    bias = constant_array(layer.bias)
    in_spatial = _static_spatial(layer.node.inputs[0])
    out_spatial = _static_spatial(layer.node.outputs[0])
    if in_spatial is not None and out_spatial is not None:
        in_ratio = math.prod(in_spatial) / math.prod(out_spatial)
        mid_ratio = in_spatial[-1] / out_spatial[-1]
    else:
        strides = layer.geometry()["strides"]
        in_ratio, mid_ratio = float(math.prod(strides)), float(strides[-1])
    size = math.prod(layer.shape)
    return Candidate(
        layer, macs, macs / size if macs else 1.0, int(bias.size) if bias is not None else 0,
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

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate

    def gram_spec(self) -> GramSpec | None:
        raise NotImplementedError

    def decompose(self, white: factorize.Whitening | None, *, paying_only: bool = False) -> None:
        """Decompose the weight (whitened by ``white``); ``paying_only``: keep no factors
        beyond the ranks that save MACs, which are never written."""
        raise NotImplementedError

    @property
    def full(self) -> Rank:
        raise NotImplementedError

    def energy(self, rank: Rank) -> float:
        raise NotImplementedError

    def per_position(self, rank: Rank) -> tuple[float, int]:
        """(MACs per layer position, parameters) of the factorized layer."""
        raise NotImplementedError

    def build(self, rank: Rank, builder: Builder) -> list[ir.Node]:
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
        return round(per_position * self.candidate.positions), params + self.candidate.bias_params


class MatrixPlan(Plan):
    """Schemes that factor one matrix unfolding of the weight: ``W ≈ A·B`` at rank r."""

    group = 1  # columns of the matrix per output channel

    def decompose(self, white: factorize.Whitening | None, *, paying_only: bool = False) -> None:
        keep = self.paying() if paying_only else None
        self.factors = factorize.MatrixFactorization(
            self.matrix(), white, group=self.group, keep=keep
        )

    def matrix(self) -> np.ndarray:
        raise NotImplementedError

    def paying(self) -> int:
        """The largest rank whose factors cost fewer MACs than the layer (at least 1)."""
        whole = original_cost(self.candidate)[0]
        ranks = range(1, min(self.matrix().shape) + 1)
        return max((r for r in ranks if self.cost((r,))[0] < whole), default=1)

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
        return self.candidate.matrix()

    def gram_spec(self) -> GramSpec | None:
        return self.candidate.layer.gram_spec()

    def per_position(self, rank: Rank) -> tuple[float, int]:
        k, n = self.matrix().shape
        return rank[0] * (k + n), rank[0] * (k + n)

    def build(self, rank: Rank, builder: Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0], self.matrix())
        node, kind = self.candidate.node, self.candidate.kind
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
        return factorize.channel_matrix(self.candidate.weight)

    def gram_spec(self) -> GramSpec | None:
        return self.candidate.layer.gram_spec()

    def per_position(self, rank: Rank) -> tuple[float, int]:
        out_channels, in_channels = self.candidate.weight.shape[:2]
        size = math.prod(self.candidate.kernel)
        params = rank[0] * (in_channels * size + out_channels)
        return params, params

    def build(self, rank: Rank, builder: Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0], self.matrix())
        first_kernel, second_kernel = factorize.channel_kernels(a, b, self.candidate.weight.shape)
        geometry = self.candidate.layer.geometry()
        first = builder.conv("lowrank_a", self.candidate.node.inputs[0], first_kernel, geometry)
        return [first, builder.conv("lowrank_b", first.outputs[0], second_kernel, bias=True)]


class SpatialPlan(MatrixPlan):
    scheme = "spatial"

    @property
    def group(self) -> int:  # type: ignore[override]
        return self.candidate.weight.shape[3]

    def matrix(self) -> np.ndarray:
        return factorize.spatial_matrix(self.candidate.weight)

    def _split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Conv geometry split into its vertical (first) and horizontal (second) parts."""
        g = self.candidate.layer.geometry()
        top, left, bottom, right = g["pads"]
        (sh, sw), (dh, dw), auto_pad = g["strides"], g["dilations"], g["auto_pad"]
        vertical = {"strides": (sh, 1), "dilations": (dh, 1), "pads": (top, 0, bottom, 0)}
        horizontal = {"strides": (1, sw), "dilations": (1, dw), "pads": (0, left, 0, right)}
        return {**vertical, "auto_pad": auto_pad}, {**horizontal, "auto_pad": auto_pad}

    def gram_spec(self) -> GramSpec | None:
        node, weight = self.candidate.node, self.candidate.weight
        features = weight.shape[1] * weight.shape[2]
        vertical, _ = self._split()
        return GramSpec(node.inputs[0].name, "patches", features, (weight.shape[2], 1), **vertical)

    def per_position(self, rank: Rank) -> tuple[float, int]:
        out_channels, in_channels, height, width = self.candidate.weight.shape
        first, second = rank[0] * in_channels * height, rank[0] * out_channels * width
        return first * self.candidate.mid_ratio + second, first + second

    def build(self, rank: Rank, builder: Builder) -> list[ir.Node]:
        a, b = self.factors.factors(rank[0], self.matrix())
        first_kernel, second_kernel = factorize.spatial_kernels(a, b, self.candidate.weight.shape)
        vertical, horizontal = self._split()
        first = builder.conv("lowrank_a", self.candidate.node.inputs[0], first_kernel, vertical)
        return [
            first,
            builder.conv("lowrank_b", first.outputs[0], second_kernel, horizontal, bias=True),
        ]


class TuckerPlan(Plan):
    scheme = "tucker2"

    def gram_spec(self) -> GramSpec | None:
        dims = len(self.candidate.kernel)
        ones = (1,) * dims
        return GramSpec(
            self.candidate.node.inputs[0].name,
            "patches",
            self.candidate.weight.shape[1],
            ones,
            ones,
            ones,
        )

    def decompose(self, white: factorize.Whitening | None, *, paying_only: bool = False) -> None:
        self.factors = factorize.Tucker2(self.candidate.weight, white)

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
        out_channels, in_channels = self.candidate.weight.shape[:2]
        rank_in, rank_out = rank
        reduce, expand = in_channels * rank_in, rank_out * out_channels
        core = rank_out * rank_in * math.prod(self.candidate.kernel)
        return reduce * self.candidate.in_ratio + core + expand, reduce + core + expand

    def build(self, rank: Rank, builder: Builder) -> list[ir.Node]:
        reduce, core, expand = self.factors.factors(*rank, self.candidate.weight)
        node, ones = self.candidate.node, (1,) * len(self.candidate.kernel)
        first = builder.conv("lowrank_a", node.inputs[0], reduce.reshape(*reduce.shape, *ones))
        geometry = self.candidate.layer.geometry()
        middle = builder.conv("lowrank_core", first.outputs[0], core, geometry)
        last = builder.conv(
            "lowrank_b", middle.outputs[0], expand.reshape(*expand.shape, *ones), bias=True
        )
        return [first, middle, last]


def plans_for(candidate: Candidate, scheme: str) -> tuple[list[Plan], str]:
    """The plans to consider for ``candidate`` under the ``scheme`` setting, and a note on fallback."""
    if candidate.kind != "conv":
        return [SvdPlan(candidate)], ""
    kernel = candidate.kernel
    if all(k == 1 for k in kernel):
        note = (
            "" if scheme in ("auto", "svd", "channel") else f"1×1 kernel: channel SVD, not {scheme}"
        )
        return [ChannelPlan(candidate)], note
    if scheme == "auto":
        spatial = [SpatialPlan(candidate)] if len(kernel) == 2 and min(kernel) > 1 else []
        return [ChannelPlan(candidate), TuckerPlan(candidate), *spatial], ""
    if scheme in ("svd", "channel"):
        return [ChannelPlan(candidate)], ""
    if scheme == "tucker2":
        return [TuckerPlan(candidate)], ""
    if len(kernel) == 2 and min(kernel) > 1:
        return [SpatialPlan(candidate)], ""
    return [
        ChannelPlan(candidate)
    ], f"kernel {kernel} has no two spatial axes to split: channel SVD"
