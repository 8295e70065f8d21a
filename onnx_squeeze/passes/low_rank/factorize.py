"""Low-rank decompositions of weight matrices and Conv kernels (numpy only).

A layer computes ``y = Wᵀ x`` for input vectors ``x`` (a row of a MatMul input, an im2col patch of
a Conv). Plain SVD keeps the directions of largest *weight* energy. Data-aware (whitened) SVD
keeps those of largest *output* energy: with the input's second moment ``E[x xᵀ] = L Lᵀ``, the
output error ``E|(W - W')ᵀ x|²`` equals ``|Lᵀ (W - W')|²``, so truncating the SVD of ``Lᵀ W`` and
undoing ``Lᵀ`` minimises it (SVD-LLM / ASVD).

Each output channel's error counts relative to that channel's own energy (its output's second
moment in data-aware mode, its weight's squared norm otherwise), as the project judges outputs
(:func:`onnx_squeeze.fidelity.channel_error`): the columns of the (whitened) weight are scaled to
unit norm before truncation and back after, which is exact for a diagonal scaling. Truncating a
plain SVD would spend the rank on the few channels of largest values and let small-valued ones
beside them (scores beside box coordinates, a quiet feature map) lose most of their signal.
Energies are fractions of the squared Frobenius norm in that metric, so "energy kept" is one
minus the mean over output channels of each channel's relative error.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_squeeze.fidelity import SPREAD_FLOOR


class Whitening:
    """The damped input second moment ``G = E[x xᵀ] + damping``, and on demand its Cholesky
    root ``L`` (``L Lᵀ = G``).

    A tall unfolding (features ≥ output channels, as every large Gram is: a 3×3 Conv over 512
    channels has 4608 features and a 170 MB Gram) needs no root: the SVD of ``Lᵀ W`` comes from
    ``Wᵀ G W`` and its left factor from ``W`` itself (:class:`MatrixFactorization`). The root is
    made only for the small Grams of wide unfoldings and Tucker-2's channel mode, and no inverse
    ever is: undoing ``Lᵀ`` is a solve."""

    def __init__(self, gram: np.ndarray) -> None:
        self.gram = gram
        self._root: np.ndarray | None = None

    @property
    def root(self) -> np.ndarray:
        if self._root is None:
            # Cholesky reads one triangle, so the Gram (symmetric to rounding) is not
            # symmetrized first; it is several times cheaper than eigh.
            self._root = np.linalg.cholesky(self.gram)
        return self._root

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
    return Whitening(gram)


def channel_scales(energies: np.ndarray, group: int = 1) -> np.ndarray:
    """Per column, ``1/√e`` of its output channel's energy ``e``, from the columns' own energies
    (the columns come in runs of ``group`` per channel), floored at ``SPREAD_FLOOR`` of the mean
    energy."""
    energy = energies.reshape(-1, group).sum(axis=1)
    mean = float(energy.mean()) if energy.size else 0.0
    if not mean > 0 or not math.isfinite(mean):
        return np.ones(len(energies))
    return np.repeat(1 / np.sqrt(np.maximum(energy, SPREAD_FLOOR * mean)), group)


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
    left = (inner @ right) * _inverse(singular)
    return (left, singular, right.T) if tall else (right, singular, left.T)


def _inverse(singular: np.ndarray) -> np.ndarray:
    """``1/s``, 0 for singular values below 1e-12 of the largest (directions with no energy)."""
    floor = singular[0] * 1e-12 if len(singular) and singular[0] > 0 else np.inf
    return np.where(singular > floor, 1 / np.where(singular > floor, singular, 1), 0.0)


def _spectrum(
    weight: np.ndarray, white: Whitening | None, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column scales D, singular values, right singular vectors V as columns) of the scaled
    target ``T = Lᵀ·W·D`` (``W·D`` unwhitened), whose columns have unit norm per channel."""
    rows, columns = weight.shape
    if white is not None and columns <= rows:  # Tᵀ·T = D·Wᵀ·G·W·D: no root needed
        moment = weight.T @ (white.gram @ weight)
        scales = channel_scales(np.diag(moment).copy(), group)
        values, vectors = np.linalg.eigh(moment * scales[:, None] * scales[None, :])
        order = np.argsort(values)[::-1]
        return scales, np.sqrt(np.maximum(values[order], 0.0)), vectors[:, order]
    target = weight if white is None else white.root.T @ weight
    scales = channel_scales(np.square(target).sum(axis=0), group)
    _, singular, vt = thin_svd(target * scales)
    return scales, singular, vt.T


def _cumulative(squares: np.ndarray) -> np.ndarray:
    total = float(squares.sum())
    if total <= 0:
        return np.ones(len(squares))
    return np.cumsum(squares) / total


class MatrixFactorization:
    """``W (k×n) ≈ A (k×r) @ B (r×n)`` by truncated (whitened, per-channel scaled) SVD; singular
    values are split evenly between the factors (``√S`` each) so both have similar ranges for
    quantization. The n columns are output channels in runs of ``group`` (a spatial unfolding
    has one per kernel column). Energies are those of the full spectrum.

    Only the right singular vectors are held, and of them the first ``keep`` (the ranks that can
    be chosen): the left factor is made from W when the factors are asked for, since
    ``T·V = U·S`` for the scaled target ``T = Lᵀ·W·D`` gives ``L⁻ᵀ·U = W·D·V·S⁻¹`` without L.
    Every plan of every layer holds its decomposition until ranks are chosen, and the left
    factor of a Conv's channel unfolding is as large as its weight."""

    def __init__(
        self,
        weight: np.ndarray,
        white: Whitening | None = None,
        *,
        group: int = 1,
        keep: int | None = None,
    ) -> None:
        scales, singular, right = _spectrum(np.asarray(weight, dtype=np.float64), white, group)
        keep = len(singular) if keep is None else max(1, min(keep, len(singular)))
        self._scales = scales
        self._singular = singular
        self._right = right[:, :keep].astype(np.float32)  # the precision factors are written in
        self.cumulative = _cumulative(singular**2)

    @property
    def full_rank(self) -> int:
        return len(self._singular)

    def energy(self, rank: int) -> float:
        return float(self.cumulative[rank - 1]) if rank > 0 else 0.0

    def factors(self, rank: int, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) at ``rank`` (at most ``keep``); ``weight`` is the matrix decomposed."""
        right = self._right[:, : min(rank, self._right.shape[1])].astype(np.float64)
        singular = self._singular[: right.shape[1]]
        root = np.sqrt(singular)
        left = (np.asarray(weight, dtype=np.float64) * self._scales) @ right
        left *= _inverse(singular) * root
        return left.astype(np.float32), (root[:, None] * (right.T / self._scales)).astype(
            np.float32
        )


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
    input second moment in data-aware mode, and the output mode scaled so that each output
    channel counts relative to its own energy (the module doc).

    Energies use the full rotated core, so the energy of any rank pair is a table lookup. Only
    the channel bases are held; the core, as large as the kernel, is made from W when the
    factors are asked for (``core = uₒᵀ·D·W ×₁ (L·uᵢ)``).
    """

    def __init__(self, weight: np.ndarray, white: Whitening | None = None) -> None:
        weight = np.asarray(weight, dtype=np.float64)
        if white is not None:  # Ŵ[o, c', ...] = Σ_c W[o, c, ...] L[c, c']
            weight = np.moveaxis(np.tensordot(weight, white.root, axes=([1], [0])), -1, 1)
        scales = channel_scales(np.square(_unfold(weight, 0)).sum(axis=1))
        weight = weight * scales.reshape(-1, *[1] * (weight.ndim - 1))
        u_in, s_in = _left_singular(_unfold(weight, 1))
        u_out, s_out = _left_singular(_unfold(weight, 0))
        core = np.tensordot(u_out.T, weight, axes=([1], [0]))  # (R_out, C, *k)
        core = np.moveaxis(np.tensordot(core, u_in, axes=([1], [0])), -1, 1)  # (R_out, R_in, *k)
        squares = np.square(core).reshape(core.shape[0], core.shape[1], -1).sum(axis=2)
        total = float(squares.sum())
        self._table = np.cumsum(np.cumsum(squares, axis=0), axis=1) / (total if total > 0 else 1)
        self.cumulative_in = _cumulative(s_in**2)
        self.cumulative_out = _cumulative(s_out**2)
        # float32, the precision factors are written in
        self._reduce = (u_in if white is None else white.unwhiten(u_in)).T.astype(np.float32)
        self._in_basis = (u_in if white is None else white.root @ u_in).astype(np.float32)
        self._u_out, self._scales = u_out.astype(np.float32), scales

    @property
    def full_rank(self) -> tuple[int, int]:
        """(input rank, output rank) at which the decomposition is exact."""
        return self._reduce.shape[0], self._u_out.shape[1]

    def energy(self, rank_in: int, rank_out: int) -> float:
        if rank_in <= 0 or rank_out <= 0:
            return 0.0
        return float(self._table[rank_out - 1, rank_in - 1]) if self._table.size else 1.0

    def factors(
        self, rank_in: int, rank_out: int, weight: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reduce (r_in, C), core (r_out, r_in, *k), expand (O, r_out)); ``weight`` is the
        kernel decomposed."""
        u_out = self._u_out[:, :rank_out].astype(np.float64)
        scaled = np.asarray(weight, dtype=np.float64)
        scaled = scaled * self._scales.reshape(-1, *[1] * (scaled.ndim - 1))
        core = np.tensordot(u_out.T, scaled, axes=([1], [0]))  # (r_out, C, *k)
        basis = self._in_basis[:, :rank_in].astype(np.float64)
        core = np.moveaxis(np.tensordot(core, basis, axes=([1], [0])), -1, 1)
        expand = u_out / self._scales[:, None]
        return self._reduce[:rank_in], core.astype(np.float32), expand.astype(np.float32)


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
