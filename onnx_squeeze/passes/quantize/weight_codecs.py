"""Weight-only codecs in pure numpy: block-wise integer quantization (round-to-nearest and
GPTQ), codebooks (k-means and power-of-two levels), and the bit packing onnxruntime reads.

No graph code here, so the arithmetic can be tested on its own and reused by any pass.

Block quantization works on a weight laid out ``[N, K]`` (output channels by the reduction
axis, the layout of ``com.microsoft.MatMulNBits``): each row is cut into blocks of
``block_size`` along K, and each block gets a scale and a zero point. Codes are unsigned,
``w ≈ (code - zero_point) * scale``; symmetric blocks use the fixed zero point
``2^(bits-1)``, which is what MatMulNBits assumes when it has no zero-point input.

A codebook stores one small index per weight into a sorted list of levels. Levels are either
fitted by 1-D k-means or fixed at ``0, ±2^-j`` (logarithmic, "power-of-two") and are shared by
the whole tensor; with per-channel scaling each output channel multiplies them by its own scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "BlockQuantized",
    "Codebook",
    "fit_codebook",
    "kmeans_levels",
    "nearest_level",
    "pack_blocks",
    "pack_low_first",
    "power_of_two_levels",
    "quantize_blocks",
    "quantize_blocks_gptq",
]

# ---------------------------------------------------------------------------------------------
# block quantization


@dataclasses.dataclass
class BlockQuantized:
    """Codes ``[N, K_padded]`` (uint8, one code per byte), scales and zero points
    ``[N, n_blocks]``; K_padded is K rounded up to whole blocks (padding codes decode to 0)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int
    symmetric: bool

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """The float weight ``[N, K]`` the codes stand for."""
        n = self.codes.shape[0]
        blocks = self.codes.reshape(n, self.n_blocks, self.block_size).astype(np.float32)
        blocks -= self.zero_points[..., None].astype(np.float32)
        blocks *= self.scales[..., None]
        return blocks.reshape(n, -1)[:, : self.k]


def _block_parameters(
    blocks: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (last axis holds a block's values).

    Symmetric: the value of largest magnitude maps to code 0 (``-2^(bits-1)`` after the zero
    point), as onnxruntime and llama.cpp's q4_0 do, so all ``2^bits`` codes are used.
    Asymmetric: the range ``[min(x, 0), max(x, 0)]`` maps onto all codes.
    """
    levels = (1 << bits) - 1
    half = 1 << (bits - 1)
    if symmetric:
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]
        scales = extreme / -half
        zero_points = np.full(scales.shape, half, dtype=np.uint8)
    else:
        low = np.minimum(blocks.min(axis=-1), 0.0)
        high = np.maximum(blocks.max(axis=-1), 0.0)
        scales = (high - low) / levels
        safe = np.where(scales == 0, 1.0, scales)
        zero_points = np.clip(np.round(-low / safe), 0, levels).astype(np.uint8)
    return scales.astype(np.float32), zero_points


def _encode(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int):
    """Codes of ``values`` with scales/zero points broadcast against them."""
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.round(values / safe) + zero_points
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)


def _pad_columns(weight: np.ndarray, block_size: int) -> np.ndarray:
    pad = -weight.shape[1] % block_size
    return np.pad(weight, ((0, 0), (0, pad))) if pad else weight


def quantize_blocks(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> BlockQuantized:
    """Round-to-nearest block quantization of ``weight`` ``[N, K]``."""
    n, k = weight.shape
    blocks = _pad_columns(weight.astype(np.float32), block_size).reshape(n, -1, block_size)
    scales, zero_points = _block_parameters(blocks, bits, symmetric)
    codes = _encode(blocks, scales[..., None], zero_points[..., None], bits)
    return BlockQuantized(codes.reshape(n, -1), scales, zero_points, bits, block_size, k, symmetric)


def _inverse_hessian_factor(hessian: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor of ``H^-1`` after dampening the diagonal (GPTQ); the damping is
    raised tenfold until the factorization succeeds."""
    mean_diagonal = float(np.mean(np.diag(hessian))) or 1.0
    for attempt in range(6):
        damped = hessian + np.eye(len(hessian)) * damping * 10**attempt * mean_diagonal
        try:
            return np.linalg.cholesky(np.linalg.inv(damped)).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the Hessian stays singular after dampening")


def quantize_blocks_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    *,
    damping: float = 0.01,
    lazy_columns: int = 128,
) -> BlockQuantized:
    """GPTQ (Frantar et al. 2022): quantize ``weight`` ``[N, K]`` column by column, spreading
    each column's rounding error over the columns not yet quantized, weighted by the inverse of
    the input Hessian ``H = 2 XᵀX`` ``[K, K]``.

    Block parameters are computed from the error-updated weights when a block starts; updates
    are applied lazily in groups of ``lazy_columns`` (a multiple of ``block_size``). Inputs that
    never fire (zero diagonal) get their weights zeroed, as they cannot affect the output.
    """
    n, k = weight.shape
    work = weight.astype(np.float64)
    hessian = np.array(hessian, dtype=np.float64)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    factor = _inverse_hessian_factor(hessian, damping)
    n_blocks = -(-k // block_size)
    codes = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zero_points = np.zeros((n, n_blocks), dtype=np.uint8)
    lazy_columns = max(block_size, lazy_columns // block_size * block_size)
    for start in range(0, k, lazy_columns):
        stop = min(start + lazy_columns, k)
        chunk = work[:, start:stop].copy()
        errors = np.zeros_like(chunk)
        local = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            block = column // block_size
            if column % block_size == 0:
                group = chunk[:, i : i + block_size][:, None, :]
                block_scales, block_zeros = _block_parameters(group, bits, symmetric)
                scales[:, block], zero_points[:, block] = block_scales[:, 0], block_zeros[:, 0]
            scale, zero = scales[:, block], zero_points[:, block]
            code = _encode(chunk[:, i], scale, zero, bits)
            codes[:, column] = code
            error = (chunk[:, i] - (code.astype(np.float64) - zero) * scale) / local[i, i]
            chunk[:, i:] -= np.outer(error, local[i, i:])
            errors[:, i] = error
        work[:, stop:] -= errors @ factor[start:stop, stop:]
    codes[:, k:] = zero_points[:, -1:]  # padding decodes to 0
    return BlockQuantized(codes, scales, zero_points, bits, block_size, k, symmetric)


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis into bytes, first code in the low
    bits (the last axis is padded with zeros to whole bytes)."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte, dtype=np.uint16) * bits
    return (grouped << shifts).sum(axis=-1).astype(np.uint8)


def pack_blocks(quantized: BlockQuantized) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits inputs B ``uint8 [N, n_blocks, blob_size]`` and zero points
    ``uint8 [N, ceil(n_blocks * bits / 8)]``, codes packed low bits first."""
    n = quantized.codes.shape[0]
    blocks = quantized.codes.reshape(n, quantized.n_blocks, quantized.block_size)
    return pack_low_first(blocks, quantized.bits), pack_low_first(
        quantized.zero_points, quantized.bits
    )


# ---------------------------------------------------------------------------------------------
# codebooks


@dataclasses.dataclass
class Codebook:
    """Indices ``[C, R]`` into sorted ``levels`` ``[L]``; with ``scales`` ``[C]``, row ``c``
    decodes to ``levels[indices[c]] * scales[c]``, otherwise to ``levels[indices[c]]``."""

    indices: np.ndarray
    levels: np.ndarray
    scales: np.ndarray | None

    def decode(self) -> np.ndarray:
        rows = self.levels[self.indices]
        return rows if self.scales is None else rows * self.scales[:, None]


def power_of_two_levels(bits: int) -> np.ndarray:
    """``0`` and ``±2^-j`` for ``j = 0 .. 2^(bits-1) - 2``: ``2^bits - 1`` sorted levels in
    ``[-1, 1]`` (logarithmic quantization; one code stays unused so zero is exact)."""
    magnitudes = 2.0 ** -np.arange((1 << (bits - 1)) - 1)
    return np.concatenate([-magnitudes, [0.0], magnitudes[::-1]]).astype(np.float32)


class _SortedValues:
    """Sorted values with prefix sums of values and squares: the members of a cluster are a
    range of the sorted values, so its mean and squared error cost O(1)."""

    def __init__(self, values: np.ndarray) -> None:
        self.ordered = np.sort(values.ravel().astype(np.float64))
        self.sums = np.concatenate([[0.0], np.cumsum(self.ordered)])
        self.squares = np.concatenate([[0.0], np.cumsum(self.ordered**2)])

    def clusters(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sizes, sums and sums of squares of the values nearest to each sorted centroid."""
        bounds = np.searchsorted(self.ordered, (centroids[1:] + centroids[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [len(self.ordered)]])
        return (
            np.diff(edges),
            self.sums[edges[1:]] - self.sums[edges[:-1]],
            self.squares[edges[1:]] - self.squares[edges[:-1]],
        )

    def lloyd(self, centroids: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
        """Lloyd's iterations from ``centroids``; the result and its total squared error."""
        for _ in range(iterations):
            sizes, sums, _ = self.clusters(centroids)
            updated = np.sort(np.where(sizes > 0, sums / np.maximum(sizes, 1), centroids))
            converged = np.allclose(updated, centroids, rtol=0, atol=1e-12)
            centroids = updated
            if converged:
                break
        sizes, sums, squares = self.clusters(centroids)
        return centroids, float((squares - 2 * centroids * sums + sizes * centroids**2).sum())


def kmeans_levels(values: np.ndarray, count: int, iterations: int = 30) -> np.ndarray:
    """Sorted 1-D k-means centroids of ``values``.

    Lloyd's algorithm runs from two starts, a uniform grid (so the result is never worse than
    uniform levels) and the quantiles (better for few levels on peaked distributions), and the
    one with the lower squared error is kept. Values are sorted once; an iteration then costs
    ``O(count log n)`` whatever the tensor size.
    """
    data = _SortedValues(values)
    distinct = data.ordered[np.concatenate([[True], np.diff(data.ordered) > 0])]
    if len(distinct) <= count:
        return distinct.astype(np.float32)
    starts = (
        np.linspace(data.ordered[0], data.ordered[-1], count),
        np.quantile(data.ordered, (np.arange(count) + 0.5) / count),
    )
    fits = [data.lloyd(start, iterations) for start in starts]
    best, _ = min(fits, key=lambda fit: fit[1])
    return np.unique(best.astype(np.float32))


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``levels`` for every value (uint8)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(midpoints, values).astype(np.uint8)


def fit_codebook(rows: np.ndarray, kind: str, bits: int, per_channel: bool) -> Codebook:
    """A codebook of at most ``2^bits`` levels for ``rows`` ``[C, R]``.

    ``kind`` is ``kmeans`` or ``pow2``. With ``per_channel``, each row is first divided by its
    largest magnitude (its scale) and the levels are fitted to the normalized values; otherwise
    the levels are in the weight's own units.
    """
    rows = rows.astype(np.float32)
    if per_channel:
        scales = np.abs(rows).max(axis=1)
        scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
        normalized = rows / scales[:, None]
    else:
        scales, normalized = None, rows
    if kind == "pow2":
        largest = 1.0 if per_channel else float(np.abs(rows).max()) or 1.0
        levels = power_of_two_levels(bits) * np.float32(largest)
    else:
        levels = kmeans_levels(normalized, 1 << bits)
    return Codebook(nearest_level(normalized, levels), levels, scales)
