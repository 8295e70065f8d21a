"""Streaming least squares for layer-wise reconstruction (numpy only).

A layer computes ``y = Wᵀ x + b`` for input rows ``x`` (a row of a Gemm/MatMul input, an im2col
patch of a Conv). Refitting ``W`` so that the student's inputs reproduce the teacher's outputs is
a ridge regression whose normal equations need only ``XᵀX``, ``XᵀY`` and a few per-output sums,
accumulated batch by batch (:class:`GramAccumulator`): memory depends on the layer's size, never
on the number of samples. Grouped Convs are independent regressions, one per group, kept side by
side on a leading group axis. A layer whose outputs are the model's (a detector's pixel boxes
beside its class logits) is judged per output, each output's error relative to its own spread
(``per_output``), so that large-valued outputs do not decide the ridge or the rank for all.

:func:`select_channels` is the reconstruction-driven (ThiNet / He et al. 2017) channel selection:
greedily drop the input channel whose removal the layer can best compensate by refitting the
others, using an Optimal-Brain-Surgeon block update of the inverse Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnx_squeeze.fidelity import SPREAD_FLOOR

# Rows handed to one float64 Gram update, to bound the temporary copies.
_GRAM_BLOCK = 512  # Gram columns accumulated at a time
_CHUNK_ROWS = 4096
# Features of kept rows widened to float64 at once (4096 rows × 1024 features: 32 MB).
_CHUNK_FEATURES = 1024
_TINY = np.finfo(np.float64).tiny
# Greedy elimination removes at most this share (1/n) of the remaining channels per step.
_BATCH_DIVISOR = 32


def conv_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str = "NOTSET",
) -> list[tuple[int, int]]:
    """(begin, end) padding of every spatial axis, with ONNX's auto_pad rules."""
    rank = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        result = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            result.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return result
    if auto_pad == "VALID" or not pads:
        return [(0, 0)] * rank
    return [(int(pads[i]), int(pads[i + rank])) for i in range(rank)]


def im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[tuple[int, int]],
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Patches of an N-d Conv input ``x`` (N, C, *spatial): shape (N, P, C * prod(kernel)).

    Features are channel-major (channel, then kernel taps in order), matching a Conv weight
    reshaped to (Cout, Cin * taps). ``positions`` picks flat output positions (all when None);
    only the picked patches are ever copied out of the strided view.
    """
    rank = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + rank)))
    steps = [slice(None, None, s) for s in strides] + [slice(None, None, d) for d in dilations]
    windows = windows[(slice(None), slice(None), *steps)]  # N, C, *out, *kernel
    out_shape = windows.shape[2 : 2 + rank]
    if positions is None:
        positions = np.arange(math.prod(out_shape))
    coordinates = np.unravel_index(positions, out_shape)
    picked = windows[(slice(None), slice(None), *coordinates)]  # N, C, P, *kernel
    picked = np.moveaxis(picked, 2, 1)  # N, P, C, *kernel
    return picked.reshape(picked.shape[0], picked.shape[1], -1)


class Regression:
    """What the two forms of the sums share: the errors, their weights per output and the
    reduced-rank map, from hooks that read either the Gram sums or the rows themselves.

    A layer computes ``y = Wᵀ x + b``; the sums are for ridge regressions of ``groups``
    independent layers (one per Conv group) with ``features`` inputs and ``outputs`` outputs.
    With ``intercept`` the bias is an unknown too, stored after the features. With
    ``per_output`` each output's squared error counts relative to its targets' spread (floored
    at ``fidelity.SPREAD_FLOOR`` of its mean square); otherwise all count alike.
    """

    def __init__(
        self, groups: int, features: int, outputs: int, *, intercept: bool, per_output: bool = False
    ) -> None:
        self.intercept = intercept
        self.per_output = per_output
        self.features = features
        self.y_sum = np.zeros((groups, outputs))
        self.y_squares = np.zeros((groups, outputs))
        self.rows = 0

    @property
    def unknowns(self) -> int:
        """Unknowns per output and group: the features, and the bias with ``intercept``."""
        return self.features + int(self.intercept)

    def _output_errors(self, weight: np.ndarray) -> np.ndarray:
        """Sum of squared residuals of ``weight`` (groups, features [+1], outputs), per output."""
        raise NotImplementedError

    def _x_mean(self) -> np.ndarray:
        """Each feature's mean (groups, features), zero without intercept."""
        raise NotImplementedError

    def _covariance_of(self, matrix: np.ndarray) -> np.ndarray:
        """``Mᵀ Σ M`` for group 0, Σ the features' second moment (about their means with
        intercept)."""
        raise NotImplementedError

    def solutions(self, ridges: Sequence[float], prior: np.ndarray) -> Iterator[np.ndarray]:
        """Weights minimising ``|XW + b - Y|² + λ|W - prior|²`` for each ridge (the bias free),
        one at a time: a Gemm head over 2048 features holds one 16 MB solution, not four.

        λ is ``ridge`` × the mean feature variance of the group. Pulling towards the current
        weights rather than zero keeps directions that the calibration data never excited
        where they were. Ridge 0 gives the least-squares solution nearest the current weights
        (the limit of the others), which exists even when ``XᵀX`` is singular.
        """
        raise NotImplementedError

    def _y_mean(self) -> np.ndarray:
        if not self.intercept or self.rows == 0:
            return np.zeros(self.y_sum.shape)
        return self.y_sum / self.rows

    def _spreads(self) -> np.ndarray:
        """Each output's sum of squares about its mean (groups, outputs)."""
        return self.y_squares - np.square(self.y_sum) / max(self.rows, 1)

    def output_weights(self) -> np.ndarray:
        """What one unit of squared error weighs per output (groups, outputs): one, or with
        ``per_output`` one over the output's floored spread (0 for outputs that are zero)."""
        if not self.per_output:
            return np.ones_like(self.y_sum)
        spread = np.maximum(self._spreads(), SPREAD_FLOOR * self.y_squares)
        return np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 0.0)

    def squared_error(self, weight: np.ndarray) -> float:
        """Sum of squared residuals of ``weight`` (groups, features [+1], outputs), each output's
        weighed by :meth:`output_weights`."""
        return float(np.sum(self.output_weights() * self._output_errors(weight)))

    def relative_error(self, weight: np.ndarray) -> float:
        """Squared error over the targets' variance (1 - R²), or with ``per_output`` the mean of
        each output's; 0 when the targets are constant."""
        if self.per_output:
            return self.squared_error(weight) / self.y_sum.size
        spread = float(self._spreads().sum())
        return self.squared_error(weight) / spread if spread > 0 else 0.0

    def _with_bias(self, weight: np.ndarray) -> np.ndarray:
        """``weight`` (groups, features, outputs) with the bias that goes with it appended."""
        if not self.intercept:
            return weight
        bias = self._y_mean() - np.einsum("gd,gde->ge", self._x_mean(), weight)
        return np.concatenate([weight, bias[:, None]], axis=1)

    def solve(self, ridge: float, prior: np.ndarray) -> np.ndarray:
        return next(self.solutions([ridge], prior))

    def reduced_rank(
        self, ridge: float, prior: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The best map of rank ``rank`` (reduced-rank regression) as two factors and a bias.

        The full solution is projected on the ``rank`` output directions that carry the most
        fitted variance; the bias is refitted to the projected map. One group only. Returns
        ``first`` (features, rank), ``second`` (rank, outputs) with balanced column norms, and
        the bias (outputs,).
        """
        features = self.solve(ridge, prior)[0, : self.features]
        # the projection that keeps the most fitted variance, measured with the outputs'
        # weights (for per_output: in units of each output's spread)
        scale = np.sqrt(self.output_weights()[0])
        fitted = self._covariance_of(features * scale)
        _, vectors = np.linalg.eigh((fitted + fitted.T) / 2)
        top = vectors[:, ::-1][:, :rank]
        unscale = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
        first, second = (features * scale) @ top, top.T * unscale
        balance = np.sqrt(np.linalg.norm(first, axis=0) + _TINY)
        first, second = first / balance, second * balance[:, None]
        bias = self._y_mean()[0] - self._x_mean()[0] @ first @ second
        return first, second, bias


class GramAccumulator(Regression):
    """The regression's sums ``XᵀX``, ``XᵀY`` and per-output sums, batch by batch.

    ``update(x, y)`` takes rows ``x`` (groups, n, features) and targets ``y`` (groups, n,
    outputs); with ``intercept`` a constant feature is appended (the bias), stored last. The
    arrays are allocated once, so :attr:`nbytes` does not grow with the number of batches.
    """

    def __init__(
        self, groups: int, features: int, outputs: int, *, intercept: bool, per_output: bool = False
    ) -> None:
        super().__init__(groups, features, outputs, intercept=intercept, per_output=per_output)
        width = features + int(intercept)
        self.xtx = np.zeros((groups, width, width))
        self.xty = np.zeros((groups, width, outputs))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.xtx, self.xty, self.y_sum, self.y_squares))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        for start in range(0, x.shape[1], _CHUNK_ROWS):
            rows = x[:, start : start + _CHUNK_ROWS].astype(np.float64)
            targets = y[:, start : start + _CHUNK_ROWS].astype(np.float64)
            if self.intercept:
                ones = np.ones((*rows.shape[:2], 1))
                rows = np.concatenate([rows, ones], axis=2)
            # matmul reaches BLAS; einsum here ran its own loops, 36x slower at 2305 features
            columns = rows.transpose(0, 2, 1)
            # in column blocks: a full-size temporary beside the Gram would double its memory
            # (a 3x3 Conv over 512 channels: 162 MiB more; data-aware ResNet-50 1043 -> 978 MiB)
            for first in range(0, rows.shape[2], _GRAM_BLOCK):
                block = slice(first, first + _GRAM_BLOCK)
                self.xtx[:, :, block] += columns @ rows[:, :, block]
            self.xty += columns @ targets
            self.y_sum += targets.sum(axis=1)
            self.y_squares += np.square(targets).sum(axis=1)
            self.rows += rows.shape[1]

    def add(self, other: GramAccumulator) -> None:
        """Add ``other``'s sums to these."""
        for name in ("xtx", "xty", "y_sum", "y_squares"):
            np.add(getattr(self, name), getattr(other, name), out=getattr(self, name))
        self.rows += other.rows

    def _output_errors(self, weight: np.ndarray) -> np.ndarray:
        fitted = np.einsum("gdo,gdo->go", weight, self.xtx @ weight)
        cross = np.einsum("gdo,gdo->go", weight, self.xty)
        return np.maximum(fitted - 2 * cross + self.y_squares, 0.0)

    def _x_mean(self) -> np.ndarray:
        d = self.features
        if not self.intercept or self.rows == 0:
            return np.zeros((len(self.xtx), d))
        return self.xtx[:, d, :d] / self.rows  # the ones column sums each feature

    def _centered(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature covariance and cross sums about the means (as they are without intercept):
        a ridge on centered sums leaves the bias free."""
        d = self.features
        gram, cross = self.xtx[:, :d, :d], self.xty[:, :d]
        if not self.intercept or self.rows == 0:
            return gram, cross
        x_mean = self._x_mean()
        return (
            _minus_outer(gram, x_mean, x_mean, self.rows),
            _minus_outer(cross, x_mean, self._y_mean(), self.rows),
        )

    def _covariance_of(self, matrix: np.ndarray) -> np.ndarray:
        gram, _ = self._centered()
        return matrix.T @ gram[0] @ matrix

    def solutions(self, ridges: Sequence[float], prior: np.ndarray) -> Iterator[np.ndarray]:
        gram, cross = self._centered()
        scale = np.maximum(np.trace(gram, axis1=1, axis2=2) / self.features, _TINY)
        prior_features = prior[:, : self.features]
        # The ridge goes on the Gram's own diagonal, restored after each solve: no copy of a
        # Gram that is 170 MB for a 3×3 Conv over 512 channels (np.linalg.solve copies it once).
        diagonal = np.arange(self.features)
        saved = gram[:, diagonal, diagonal]
        for ridge in ridges:
            strength = ridge * scale
            if ridge > 0:
                gram[:, diagonal, diagonal] = saved + strength[:, None]
                target = cross + strength[:, None, None] * prior_features
                try:
                    weight = np.linalg.solve(gram, target)
                finally:
                    gram[:, diagonal, diagonal] = saved
                del target
            else:
                residual = cross - gram @ prior_features
                weight = prior_features + np.stack(
                    [
                        np.linalg.lstsq(g, r, rcond=None)[0]
                        for g, r in zip(gram, residual, strict=True)
                    ]
                )
            yield self._with_bias(weight)


class RowAccumulator(Regression):
    """The same regression kept as its rows while they are no more than its unknowns.

    Then ``XXᵀ`` (rows × rows) is smaller than ``XᵀX`` and the ridge solutions come from it
    (``W = P + Xᵀ(XXᵀ + λI)⁻¹(Y - XP)``, the same weights): on the demo's ResNet-18, the last
    stage's layers have 784 rows for up to 4609 unknowns, and their nine solves of 4609
    unknowns were half of recovery's time. Rows are kept as given (float32 activations) and
    widened to float64 a block of features at a time.
    """

    def __init__(
        self, groups: int, features: int, outputs: int, *, intercept: bool, per_output: bool = False
    ) -> None:
        super().__init__(groups, features, outputs, intercept=intercept, per_output=per_output)
        self.outputs = outputs
        self.x: list[np.ndarray] = []  # (groups, n, features) per batch
        self.y: list[np.ndarray] = []  # (groups, n, outputs) per batch
        self.x_sum = np.zeros((groups, features))

    @property
    def nbytes(self) -> int:
        arrays = (*self.x, *self.y, self.x_sum, self.y_sum, self.y_squares)
        return sum(a.nbytes for a in arrays)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x.append(np.ascontiguousarray(x))
        self.y.append(np.ascontiguousarray(y))
        self.x_sum += x.sum(axis=1, dtype=np.float64)
        targets = y.astype(np.float64)
        self.y_sum += targets.sum(axis=1)
        self.y_squares += np.square(targets).sum(axis=1)
        self.rows += x.shape[1]

    def add(self, other: RowAccumulator) -> None:
        """Take ``other``'s rows beside these."""
        self.x += other.x
        self.y += other.y
        for name in ("x_sum", "y_sum", "y_squares"):
            np.add(getattr(self, name), getattr(other, name), out=getattr(self, name))
        self.rows += other.rows

    def to_gram(self) -> GramAccumulator:
        """The sums of these rows (which are freed as they are added)."""
        sums = GramAccumulator(
            len(self.x_sum),
            self.features,
            self.outputs,
            intercept=self.intercept,
            per_output=self.per_output,
        )
        while self.x:
            sums.update(self.x.pop(0), self.y.pop(0))
        return sums

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows (groups, rows, features) and targets (groups, rows, outputs)."""
        if len(self.x) > 1:
            self.x, self.y = [np.concatenate(self.x, axis=1)], [np.concatenate(self.y, axis=1)]
        return self.x[0], self.y[0]

    def _x_mean(self) -> np.ndarray:
        if not self.intercept or self.rows == 0:
            return np.zeros(self.x_sum.shape)
        return self.x_sum / self.rows

    def _blocks(self, centered: bool = True) -> Iterator[tuple[slice, np.ndarray]]:
        """The rows a block of features at a time, in float64 (about their means when
        ``centered`` and with intercept)."""
        x, _ = self._stacked()
        mean = self._x_mean()
        for start in range(0, self.features, _CHUNK_FEATURES):
            block = slice(start, start + _CHUNK_FEATURES)
            values = x[:, :, block].astype(np.float64)
            if centered:
                values -= mean[:, None, block]
            yield block, values

    def _times(self, matrix: np.ndarray, centered: bool = True) -> np.ndarray:
        """``X M`` (groups, rows, columns) for ``M`` (groups, features, columns)."""
        product = np.zeros((len(self.x_sum), self.rows, matrix.shape[2]))
        for block, values in self._blocks(centered):
            product += values @ matrix[:, block]
        return product

    def _output_errors(self, weight: np.ndarray) -> np.ndarray:
        _, y = self._stacked()
        residual = self._times(weight[:, : self.features], centered=False)
        if self.intercept:
            residual += weight[:, self.features][:, None, :]
        residual -= y
        return np.square(residual).sum(axis=1)

    def _covariance_of(self, matrix: np.ndarray) -> np.ndarray:
        projected = self._times(matrix[None])[0]
        return projected.T @ projected

    def solutions(self, ridges: Sequence[float], prior: np.ndarray) -> Iterator[np.ndarray]:
        _, y = self._stacked()
        kernel = np.zeros((len(self.x_sum), self.rows, self.rows))
        for _, values in self._blocks():
            kernel += values @ values.transpose(0, 2, 1)
        prior_features = prior[:, : self.features]
        residual = y - self._y_mean()[:, None, :] - self._times(prior_features)
        # the trace of XXᵀ is that of XᵀX: the same λ as the Gram form
        scale = np.maximum(np.trace(kernel, axis1=1, axis2=2) / self.features, _TINY)
        diagonal = np.arange(self.rows)
        saved = kernel[:, diagonal, diagonal]
        for ridge in ridges:
            if ridge > 0:
                kernel[:, diagonal, diagonal] = saved + (ridge * scale)[:, None]
                try:
                    dual = np.linalg.solve(kernel, residual)
                finally:
                    kernel[:, diagonal, diagonal] = saved
            else:
                dual = np.stack(
                    [
                        np.linalg.lstsq(k, r, rcond=None)[0]
                        for k, r in zip(kernel, residual, strict=True)
                    ]
                )
            weight = prior_features.copy()
            for block, values in self._blocks():
                weight[:, block] += values.transpose(0, 2, 1) @ dual
            yield self._with_bias(weight)


class RidgeFolds:
    """Two halves of the data, to choose the ridge by cross-validation.

    Each batch's rows are split in a first and a second half (rows are sample-major, so halves
    hold different samples where the batch has several). A ridge that fits one half and
    predicts the other best is then used on both together; this keeps layers with few rows
    per unknown from fitting the calibration samples instead of the function. Each half keeps
    its rows (:class:`RowAccumulator`) until they outnumber the unknowns, then their sums
    (:class:`GramAccumulator`): the smaller of the two, and the cheaper to solve.
    """

    def __init__(
        self, groups: int, features: int, outputs: int, *, intercept: bool, per_output: bool = False
    ) -> None:
        self.folds: list[RowAccumulator | GramAccumulator] = [
            RowAccumulator(groups, features, outputs, intercept=intercept, per_output=per_output)
            for _ in range(2)
        ]

    @property
    def nbytes(self) -> int:
        return sum(fold.nbytes for fold in self.folds)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        half = x.shape[1] // 2
        if half == 0:
            self._add(0, x, y)
            return
        self._add(0, x[:, :half], y[:, :half])
        self._add(1, x[:, half:], y[:, half:])

    def _add(self, index: int, x: np.ndarray, y: np.ndarray) -> None:
        fold = self.folds[index]
        if isinstance(fold, RowAccumulator) and fold.rows + x.shape[1] > fold.unknowns:
            fold = self.folds[index] = fold.to_gram()
        fold.update(x, y)

    def total(self) -> RowAccumulator | GramAccumulator:
        """Both halves as one, in the first (the smaller form for all the rows); the second
        half's rows or sums are freed."""
        first, second = self.folds
        rows = isinstance(first, RowAccumulator) and isinstance(second, RowAccumulator)
        if rows and first.rows + second.rows <= first.unknowns:
            first.add(second)
            self.folds = [first]
            return first
        first, second = (
            f.to_gram() if isinstance(f, RowAccumulator) else f for f in (first, second)
        )
        first.add(second)
        self.folds = [first]
        return first

    def choose_ridge(self, candidates: Sequence[float], prior: np.ndarray) -> float:
        """The candidate with the smallest error on the half it was not fitted on."""
        first, second = self.folds
        if min(first.rows, second.rows) == 0:
            return max(candidates)
        errors = np.zeros(len(candidates))
        for fit, held_out in ((first, second), (second, first)):
            for index, weight in enumerate(fit.solutions(candidates, prior)):
                errors[index] += held_out.squared_error(weight)
        return float(candidates[int(np.argmin(errors))])


def _minus_outer(sums: np.ndarray, a: np.ndarray, b: np.ndarray, rows: int) -> np.ndarray:
    """``sums - rows * aᵀb`` per group, in one new array (the same values as written out)."""
    outer = np.einsum("gd,ge->gde", a, b)
    outer *= rows
    return np.subtract(sums, outer, out=outer)


def _diagonal_blocks(matrix: np.ndarray, taps: int) -> np.ndarray:
    """The diagonal ``taps``×``taps`` blocks of ``matrix``, one per channel: (channels, taps, taps)."""
    channels = matrix.shape[0] // taps
    index = np.arange(channels)
    return matrix.reshape(channels, taps, channels, taps)[index, :, index, :]


def _elimination_order(
    gram: np.ndarray, weight: np.ndarray, taps: int, ridge: float, stop: int
) -> tuple[list[int], list[float]]:
    """Channels in the order greedy backward elimination removes them, and the output error
    reached when each goes (the remaining channels refitted each time), until ``stop`` remain.

    Each step removes the channels with the smallest cost (``wᵀ (H⁻¹)_cc⁻¹ w``, the loss after
    refitting the others) and downdates ``H⁻¹`` and the refitted weights (Optimal Brain Surgeon).
    While many channels are left, a step removes ``alive // _BATCH_DIVISOR`` of them at once,
    which keeps large layers (a 3×3 Conv over 512 channels) to a few hundred matrix updates;
    the last ``2 × _BATCH_DIVISOR`` go one at a time, in exact greedy order.
    """
    gram = np.asarray(gram, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64).reshape(gram.shape[0], -1)
    strength = ridge * max(float(np.trace(gram)) / gram.shape[0], _TINY)
    inverse = np.linalg.inv(gram + strength * np.eye(gram.shape[0]))
    alive = np.arange(gram.shape[0] // taps)
    order: list[int] = []
    errors: list[float] = []
    error = 0.0
    while len(alive) > stop:
        blocks = weight.reshape(len(alive), taps, -1)
        solved = np.linalg.solve(_diagonal_blocks(inverse, taps), blocks)
        costs = np.einsum("ctm,ctm->c", blocks, solved)
        count = min(max(1, len(alive) // _BATCH_DIVISOR), len(alive) - stop)
        picked = np.sort(np.argpartition(costs, count - 1)[:count])
        picked = picked[np.argsort(costs[picked], kind="stable")]
        order.extend(int(c) for c in alive[picked])
        errors.extend(error + float(c) for c in costs[picked])
        rows = (picked[:, None] * taps + np.arange(taps)).reshape(-1)
        rest = np.setdiff1d(np.arange(inverse.shape[0]), rows)
        joint = np.linalg.inv(inverse[np.ix_(rows, rows)])
        removed_weight = weight[rows]
        error += float(np.sum(removed_weight * (joint @ removed_weight)))
        cross = inverse.take(rows, axis=0).take(rest, axis=1)  # H⁻¹ is symmetric
        coupling = cross.T @ joint
        weight = weight[rest] - coupling @ removed_weight
        inverse = inverse.take(rest, axis=0).take(rest, axis=1)
        inverse -= coupling @ cross
        alive = np.delete(alive, picked)
    return order, errors


def select_channels(
    gram: np.ndarray, weight: np.ndarray, keep: int, *, taps: int = 1, ridge: float = 1e-6
) -> np.ndarray:
    """Input channels to keep so that refitting the layer on them loses the least output.

    ``gram``: the second moment ``XᵀX`` of the layer's input features (channels × taps,
    channel-major, as :func:`im2col` and a Conv weight reshaped to (Cout, Cin·taps) order them);
    ``weight``: the layer's weights as (channels·taps, outputs); ``keep``: how many channels to
    keep. Greedy backward elimination: each step removes the channel whose loss, after the others
    are refitted by least squares, is smallest (ThiNet's criterion with compensation). Returns
    the kept channel indices, sorted.
    """
    channels = np.asarray(gram).shape[0] // taps
    if not 0 < keep <= channels:
        raise ValueError(f"keep must be in 1..{channels}, got {keep}")
    removed, _ = _elimination_order(gram, weight, taps, ridge, keep)
    return np.setdiff1d(np.arange(channels), removed)


def reconstruction_importance(
    gram: np.ndarray, weight: np.ndarray, *, taps: int = 1, ridge: float = 1e-6
) -> np.ndarray:
    """A score per input channel for pruning criteria that threshold or sum scores.

    The score of a channel is the output error (relative to the layer's output energy) reached
    when greedy elimination removes it, so keeping the highest scores reproduces
    :func:`select_channels`; the last channel left gets the largest score. Scores of layers
    fed by the same channels (a dependency group) can be added.
    """
    gram = np.asarray(gram, dtype=np.float64)
    matrix = np.asarray(weight, dtype=np.float64).reshape(gram.shape[0], -1)
    order, errors = _elimination_order(gram, matrix, taps, ridge, 1)
    energy = max(float(np.einsum("dm,de,em->", matrix, gram, matrix)), _TINY)
    scores = np.empty(gram.shape[0] // taps)
    scores[order] = np.asarray(errors) / energy
    last = np.setdiff1d(np.arange(scores.size), order)
    scores[last] = (errors[-1] / energy if errors else 0.0) + 1.0
    return scores
