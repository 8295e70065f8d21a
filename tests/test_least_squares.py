"""The two forms of a ridge regression's sums give the same fits: rows kept while they are no
more than the unknowns (solved through ``XXᵀ``), Gram sums beyond."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_squeeze.least_squares import GramAccumulator, RidgeFolds, RowAccumulator

RIDGES = [0.0, 1e-5, 1e-2, 10.0]


def _filled(groups, features, outputs, *, intercept, per_output, batches, rows, seed=0):
    """Both forms over the same batches (features with a large common offset, as activations
    after a ReLU have, so that centering matters)."""
    rng = np.random.default_rng(seed)
    forms = [
        kind(groups, features, outputs, intercept=intercept, per_output=per_output)
        for kind in (GramAccumulator, RowAccumulator)
    ]
    weight = rng.standard_normal((groups, features, outputs))
    scales = np.array([1000.0, 0.01, 1.0][:outputs] + [1.0] * max(0, outputs - 3))
    for _ in range(batches):
        x = (rng.standard_normal((groups, rows, features)) + 3).astype(np.float32)
        y = (x @ weight + rng.standard_normal((groups, rows, outputs)) + 5) * scales
        for form in forms:
            form.update(x, y.astype(np.float32))
    return forms, rng


@pytest.mark.parametrize(
    "groups, features, outputs, intercept, per_output",
    [
        (1, 40, 3, True, False),
        (2, 30, 4, True, True),
        (1, 50, 5, False, False),
        (3, 8, 2, True, False),
    ],
)
def test_row_form_fits_what_the_gram_form_fits(groups, features, outputs, intercept, per_output):
    (gram, rows), rng = _filled(
        groups,
        features,
        outputs,
        intercept=intercept,
        per_output=per_output,
        batches=2,
        rows=features // 3,
    )
    assert rows.rows == gram.rows <= rows.unknowns  # fewer rows than unknowns: regularised
    assert rows.nbytes < gram.nbytes
    prior = rng.standard_normal((groups, features + intercept, outputs))
    for ridge, from_gram, from_rows in zip(
        RIDGES, gram.solutions(RIDGES, prior), rows.solutions(RIDGES, prior), strict=True
    ):
        np.testing.assert_allclose(
            from_rows, from_gram, rtol=1e-7, atol=1e-7 * abs(from_gram).max()
        )
        # the Gram form's error cancels terms as large as the targets' energy
        energy = float(np.sum(gram.output_weights() * gram.y_squares))
        for weight in (prior, from_gram):
            error = rows.squared_error(weight)
            assert np.isclose(error, gram.squared_error(weight), rtol=1e-9, atol=1e-12 * energy)
            scale = error / rows.relative_error(weight)
            assert np.isclose(gram.squared_error(weight) / scale, error / scale, atol=1e-9)
        # every ridge pulls towards the prior, so the exact fit nearest it is ridge 0's
        assert rows.relative_error(from_rows) < rows.relative_error(prior), ridge
    if groups == 1:
        first = gram.reduced_rank(1e-3, prior, 2)
        second = rows.reduced_rank(1e-3, prior, 2)
        np.testing.assert_allclose(second[0] @ second[1], first[0] @ first[1], atol=1e-8)
        np.testing.assert_allclose(second[2], first[2], atol=1e-8)
    summed = rows.to_gram()
    np.testing.assert_allclose(summed.xtx, gram.xtx, rtol=1e-12)
    np.testing.assert_allclose(summed.xty, gram.xty, rtol=1e-12)
    assert not rows.x  # the rows went as they were added


def test_ridge_zero_is_the_exact_fit_nearest_the_prior():
    """Under-determined: among the exact fits, ridge 0 takes the one closest to the current
    weights (the limit of the ridge path), in both forms."""
    (gram, rows), rng = _filled(1, 20, 2, intercept=False, per_output=False, batches=1, rows=8)
    prior = rng.standard_normal((1, 20, 2))
    for form in (gram, rows):
        exact = form.solve(0.0, prior)
        assert form.relative_error(exact) < 1e-10
        nearly = form.solve(1e-9, prior)
        np.testing.assert_allclose(nearly, exact, atol=1e-4 * abs(exact).max())


def test_folds_keep_rows_until_they_outnumber_the_unknowns():
    rng = np.random.default_rng(1)
    folds = RidgeFolds(1, 10, 2, intercept=True)
    weight = rng.standard_normal((1, 10, 2))
    seen = []
    for _ in range(4):
        x = rng.standard_normal((1, 8, 10)).astype(np.float32)
        folds.update(x, x @ weight + 1.0)
        seen.append([type(fold).__name__ for fold in folds.folds])
    # 4 rows per half and batch, 11 unknowns: rows, rows, then sums from the third batch
    assert seen[1] == ["RowAccumulator"] * 2 and seen[2] == ["GramAccumulator"] * 2
    ridge = folds.choose_ridge(RIDGES[1:], np.zeros((1, 11, 2)))
    total = folds.total()
    assert isinstance(total, GramAccumulator) and total.rows == 32
    solution = total.solve(ridge, np.zeros((1, 11, 2)))
    np.testing.assert_allclose(solution[0, :10], weight[0], atol=1e-3)
    np.testing.assert_allclose(solution[0, 10], 1.0, atol=1e-3)


def test_small_folds_stay_rows_when_summed():
    rng = np.random.default_rng(2)
    folds = RidgeFolds(1, 30, 3, intercept=True)
    for _ in range(2):
        folds.update(rng.standard_normal((1, 6, 30)), rng.standard_normal((1, 6, 3)))
    total = folds.total()
    assert isinstance(total, RowAccumulator) and total.rows == 12


def test_gram_sums_cross_column_blocks_exactly():
    """Wider than one accumulation block (512 columns), with the intercept column last."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((2, 40, 1100)), rng.standard_normal((2, 40, 3))
    sums = GramAccumulator(2, 1100, 3, intercept=True)
    sums.update(x[:, :25], y[:, :25])
    sums.update(x[:, 25:], y[:, 25:])
    rows = np.concatenate([x, np.ones((2, 40, 1))], axis=2)
    np.testing.assert_allclose(sums.xtx, rows.transpose(0, 2, 1) @ rows, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sums.xty, rows.transpose(0, 2, 1) @ y, rtol=1e-12, atol=1e-9)
