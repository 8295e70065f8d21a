"""Low-rank decompositions of weight matrices and Conv kernels (numpy only).

A layer computes ``y = Wᵀ x`` for input vectors ``x`` (a row of a MatMul input, an im2col patch of
a Conv). Plain SVD keeps the directions of largest *weight* energy. Data-aware (whitened) SVD
keeps those of largest *output* energy: with the input's second moment ``E[x xᵀ] = L Lᵀ``, the
output error ``E|(W - W')ᵀ x|²`` equals ``|Lᵀ (W - W')|²``, so truncating the SVD of ``Lᵀ W`` and
undoing ``Lᵀ`` minimises it (SVD-LLM / ASVD). Energies are fractions of the squared Frobenius
norm in the metric used, so "energy kept" is the share of output energy in data-aware mode.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Whitening:
    """``root`` L (the Cholesky factor) with ``L Lᵀ = gram + damping``.

    No inverse is kept: undoing ``Lᵀ`` is a solve, which needs one copy of L for its duration
    where an inverse would hold one for the plan's life and two more while it is computed (a
    4608-feature Gram, a 3×3 Conv over 512 channels, is 170 MB)."""

    root: np.ndarray

    def unwhiten(self, matrix: np.ndarray) -> np.ndarray:
        """``L⁻ᵀ · matrix``."""
        return np.linalg.solve(self.root.T, matrix)


def whitening(
    gram: np.ndarray, damping: float, samples: int | None = None, *, overwrite: bool = False
) -> Whitening | None:
    """The whitening of an input second-moment matrix, None when it holds no information.

    ``damping`` (a fraction of the mean eigenvalue, added to the diagonal) keeps directions the
    calibration data never excited from being ignored entirely, as GPTQ's ``percdamp`` does.
    With ``samples`` (input vectors summed into ``gram``) below the number of features, the
    estimate is poor and the damping grows as ``(features / samples)²``, shrinking toward plain
    SVD rather than overfitting the few samples seen. ``overwrite``: the damping is added to
    ``gram`` itself, which the caller then drops, rather than to a copy.
    """
    if samples:
        damping = max(damping, (gram.shape[0] / samples) ** 2)
    gram = np.asarray(gram, dtype=np.float64) if overwrite else np.array(gram, dtype=np.float64)
    mean = float(np.trace(gram)) / gram.shape[0]
    if not mean > 0 or not math.isfinite(mean):
        return None
    gram[np.diag_indices_from(gram)] += max(damping, 1e-9) * mean
    # Cholesky reads one triangle, so the Gram (symmetric to rounding) is not symmetrized
    # first; it is several times cheaper than eigh.
    return Whitening(np.linalg.cholesky(gram))


def rank_for_energy(cumulative: np.ndarray, energy: float) -> int:
    """The smallest rank whose cumulative energy fraction reaches ``energy``."""
    return min(int(np.searchsorted(cumulative, energy - 1e-12)) + 1, len(cumulative))


def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, s, Vᵀ`` of a float64 matrix through the eigendecomposition of its smaller Gram matrix.

    Several times faster than LAPACK's SVD on the tall unfoldings of Conv kernels; singular values
    below ~1e-8 of the largest lose relative accuracy, which no truncation we make can see.
    """
    tall = matrix.shape[0] >= matrix.shape[1]
    inner = matrix if tall else matrix.T
    values, vectors = np.linalg.eigh(inner.T @ inner)
    order = np.argsort(values)[::-1]
    singular = np.sqrt(np.maximum(values[order], 0.0))
    right = vectors[:, order]
    floor = singular[0] * 1e-12 if len(singular) and singular[0] > 0 else np.inf
    scale = np.where(singular > floor, 1 / np.where(singular > floor, singular, 1), 0.0)
    left = (inner @ right) * scale
    return (left, singular, right.T) if tall else (right, singular, left.T)


def _cumulative(squares: np.ndarray) -> np.ndarray:
    total = float(squares.sum())
    if total <= 0:
        return np.ones(len(squares))
    return np.cumsum(squares) / total


class MatrixFactorization:
    """``W (k×n) ≈ A (k×r) @ B (r×n)`` by truncated (whitened) SVD; singular values are split
    evenly between the factors (``√S`` each) so both have similar ranges for quantization."""

    def __init__(self, weight: np.ndarray, white: Whitening | None = None) -> None:
        weight = np.asarray(weight, dtype=np.float64)
        target = weight if white is None else white.root.T @ weight
        u, singular, vt = thin_svd(target)
        # Factors are kept in float32 (the precision they are written in): every plan of every
        # layer holds its factors until ranks are chosen, twice the memory in float64.
        self._left = (u if white is None else white.unwhiten(u)).astype(np.float32)
        self._singular = singular
        self._right = vt.astype(np.float32)
        self.cumulative = _cumulative(singular**2)
        self.shape = weight.shape

    @property
    def full_rank(self) -> int:
        return len(self._singular)

    def energy(self, rank: int) -> float:
        return float(self.cumulative[rank - 1]) if rank > 0 else 0.0

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self._singular[:rank])
        return self._left[:, :rank] * root, root[:, None] * self._right[:rank]


def _left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values (rank ≤ rows) from ``M Mᵀ``."""
    values, vectors = np.linalg.eigh(matrix @ matrix.T)
    keep = np.argsort(values)[::-1][: min(matrix.shape)]
    return vectors[:, keep], np.sqrt(np.maximum(values[keep], 0.0))


def _unfold(tensor: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(tensor, axis, 0).reshape(tensor.shape[axis], -1)


class Tucker2:
    """Conv kernel ``W (O, C, *k) ≈ expand (O×r_out) · core (r_out, r_in, *k) · reduce (r_in×C)``
    by truncated HOSVD of the two channel modes; the input mode is whitened by the per-channel
    input second moment in data-aware mode.

    Energies use the full rotated core, so the energy of any rank pair is a table lookup.
    """

    def __init__(self, weight: np.ndarray, white: Whitening | None = None) -> None:
        weight = np.asarray(weight, dtype=np.float64)
        if white is not None:  # Ŵ[o, c', ...] = Σ_c W[o, c, ...] L[c, c']
            weight = np.moveaxis(np.tensordot(weight, white.root, axes=([1], [0])), -1, 1)
        self._white = white
        u_in, s_in = _left_singular(_unfold(weight, 1))
        u_out, s_out = _left_singular(_unfold(weight, 0))
        core = np.tensordot(u_out.T, weight, axes=([1], [0]))  # (R_out, C, *k)
        core = np.moveaxis(np.tensordot(core, u_in, axes=([1], [0])), -1, 1)  # (R_out, R_in, *k)
        self._u_in, self._u_out = u_in.astype(np.float32), u_out.astype(np.float32)
        self._core = core.astype(np.float32)  # float32, as MatrixFactorization's factors
        squares = np.square(core).reshape(core.shape[0], core.shape[1], -1).sum(axis=2)
        total = float(squares.sum())
        self._table = np.cumsum(np.cumsum(squares, axis=0), axis=1) / (total if total > 0 else 1)
        self.cumulative_in = _cumulative(s_in**2)
        self.cumulative_out = _cumulative(s_out**2)

    @property
    def full_rank(self) -> tuple[int, int]:
        """(input rank, output rank) at which the decomposition is exact."""
        return self._u_in.shape[1], self._u_out.shape[1]

    def energy(self, rank_in: int, rank_out: int) -> float:
        if rank_in <= 0 or rank_out <= 0:
            return 0.0
        return float(self._table[rank_out - 1, rank_in - 1]) if self._table.size else 1.0

    def factors(self, rank_in: int, rank_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reduce (r_in, C), core (r_out, r_in, *k), expand (O, r_out))."""
        reduce = self._u_in[:, :rank_in].T
        if self._white is not None:
            reduce = self._white.unwhiten(reduce.T).T
        return reduce, self._core[:rank_out, :rank_in], self._u_out[:, :rank_out]


# Conv kernel unfoldings: the matrix (k × n) whose rows are what the first factor reads.


def channel_matrix(weight: np.ndarray) -> np.ndarray:
    """(C·∏k) × O: the first factor is a Conv with the original kernel and r output channels."""
    return weight.reshape(weight.shape[0], -1).T


def channel_kernels(a: np.ndarray, b: np.ndarray, weight_shape: tuple[int, ...]) -> tuple:
    """Kernels of the two Convs of channel SVD from the factors of :func:`channel_matrix`."""
    out_channels, in_channels, *kernel = weight_shape
    rank = a.shape[1]
    first = a.T.reshape(rank, in_channels, *kernel)
    second = b.T.reshape(out_channels, rank, *[1] * len(kernel))
    return first, second


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """(C·kh) × (O·kw): the first factor is a kh×1 Conv, the second a 1×kw Conv."""
    out_channels, in_channels, height, width = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(in_channels * height, out_channels * width)


def spatial_kernels(a: np.ndarray, b: np.ndarray, weight_shape: tuple[int, ...]) -> tuple:
    """Kernels (r, C, kh, 1) and (O, r, 1, kw) from the factors of :func:`spatial_matrix`."""
    out_channels, in_channels, height, width = weight_shape
    rank = a.shape[1]
    first = a.T.reshape(rank, in_channels, height)[..., None]
    second = b.reshape(rank, out_channels, width).transpose(1, 0, 2)[:, :, None, :]
    return first, second
