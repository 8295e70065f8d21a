"""Outputs that concatenate a large-range slice (pixel boxes) with a small-range one (scores):
pruning's sensitivity allocation and recovery judge each output channel against its own spread,
so the small slice is kept, where a whole-tensor error let the large slice decide alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_squeeze import fidelity, runtime
from onnx_squeeze.calibration import RandomSource
from onnx_squeeze.least_squares import GramAccumulator
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.finetune.data import output_spreads
from onnx_squeeze.passes.prune_channels import PruneChannels
from onnx_squeeze.records import PassContext
from onnx_squeeze.shapes import resolve_input_shapes
from tests.helpers import check, random_feeds, run
from tests.test_channel_groups import graph_model
from tests.test_reconstruct import factorize

# Two equal branches whose read-outs are concatenated: y[:, :8] spans about ±100, y[:, 8:] ±0.1.
CONCAT_BRANCHES = """
g (float[N, 8, 8, 8] x, float[32, 8, 1, 1] wa, float[32, 8, 1, 1] wb, float[8, 32, 1, 1] wc,
   float[8, 32, 1, 1] wd) => (float[N, 16, 8, 8] y) {
    a = Conv (x, wa)
    ra = Relu (a)
    c = Conv (ra, wc)
    b = Conv (x, wb)
    rb = Relu (b)
    d = Conv (rb, wd)
    y = Concat <axis = 1> (c, d)
}
"""

# An MLP whose head writes 2 large outputs (independent) and 4 small ones (one direction).
HEAD = """
g (float[N, 16] x, float[32, 16] w1, float[32] b1, float[6, 32] w2, float[6] b2)
    => (float[N, 6] y) {
    h = Gemm <transB = 1> (x, w1, b1)
    r = Relu (h)
    y = Gemm <transB = 1> (r, w2, b2)
}
"""


def _channel_errors(reference: ir.Model, model: ir.Model, feeds) -> np.ndarray:
    """Each output channel's error relative to its spread (1 - R²), on ``feeds``."""
    expected = [{"y": run(reference, feed)[0]} for feed in feeds]
    actual = [{"y": run(model, feed)[0]} for feed in feeds]
    accumulator = fidelity.accumulators(["y"], channel_axes={"y": 1})["y"]
    for a, b in zip(expected, actual, strict=True):
        accumulator.add(a["y"], b["y"])
    return accumulator.channel_errors()


def test_sensitivity_allocation_keeps_the_small_range_slice():
    """Pruning a quarter of the MACs: a whole-tensor error sees the small branch as free and
    took all of it from there (its channels' 1 - R² up to 1.5); judged per channel, the small
    slice stays within 0.35 (0.16 measured) and no worse than the large one."""
    model = graph_model(CONCAT_BRANCHES, seed=1)
    for name, scale in (("wc", 10.0), ("wd", 0.01)):
        weight = model.graph.initializers[name]
        weight.const_value = ir.tensor(weight.const_value.numpy() * scale, name=name)
    source = RandomSource(runtime.input_specs(model), count=4, batch_size=2, seed=3)
    context = PassContext(calibration=source, shapes=resolve_input_shapes(model, batch=2))
    pruned = model.clone()
    PruneChannels(macs_target=0.25, sensitivity_rounds=1)(pruned, context)
    check(pruned)
    errors = _channel_errors(model, pruned, random_feeds(model, 2, seed=5, batch=4))
    large, small = errors[:8], errors[8:]
    assert small.max() < 0.35, errors
    assert small.mean() <= large.mean() + 0.05, errors


def _head_model() -> ir.Model:
    model = graph_model(HEAD, seed=2)
    for node in model.graph:
        node.name = node.outputs[0].name
    rng = np.random.default_rng(4)
    w2 = np.empty((6, 32), np.float32)
    w2[:2] = 100 * rng.standard_normal((2, 32))  # two independent large outputs
    w2[2:] = 0.01 * np.outer(rng.uniform(0.5, 1.5, 4), rng.standard_normal(32))  # one small
    model.graph.initializers["w2"].const_value = ir.tensor(w2, name="w2")
    return model


def test_joint_low_rank_refit_keeps_the_small_range_outputs():
    """The head factorized to rank 2 by a plain SVD keeps the two large directions and loses
    the small outputs. The joint refit judged per output spends one rank on the small
    outputs' direction (all four back within 1 % of their spread) and the other on the large
    ones (which now share the loss of one of their two directions)."""
    teacher = _head_model()
    student = teacher.clone()
    factorize(student, "y", 2)
    feeds = random_feeds(teacher, 8, seed=1, batch=16)
    before = _channel_errors(teacher, student, feeds)
    assert before[2:].min() > 0.5  # the small outputs lost by the plain factorization
    context = PassContext(calibration=feeds, teacher=teacher)
    report = make_pass("reconstruct", {"methods": ["lstsq"]})(student, context)
    check(student)
    assert [r.detail.split(":")[0] for r in report.records if r.action == "refit"] == [
        "joint low-rank"
    ]
    after = _channel_errors(teacher, student, random_feeds(teacher, 4, seed=7, batch=16))
    assert after[2:].max() < 0.01, after
    assert after[:2].sum() < 1.0, after


def test_per_output_weights_change_only_what_is_judged():
    """Per-output weighting leaves a full-rank least-squares solution as it is (each output
    is its own regression) and makes the error the mean of each output's 1 - R²."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 200, 5))
    y = x @ rng.standard_normal((1, 5, 2)) * np.array([1000.0, 0.001])
    y += rng.standard_normal(y.shape) * np.array([100.0, 0.0001])
    sums = {}
    for per_output in (False, True):
        sums[per_output] = GramAccumulator(1, 5, 2, intercept=True, per_output=per_output)
        sums[per_output].update(x, y)
    prior = np.zeros((1, 6, 2))
    whole, each = sums[False].solve(1e-6, prior), sums[True].solve(1e-6, prior)
    np.testing.assert_allclose(whole, each)
    residual = y[0] - x[0] @ whole[0, :5] - whole[0, 5]
    shares = (residual**2).sum(0) / ((y[0] - y[0].mean(0)) ** 2).sum(0)
    assert np.isclose(sums[True].relative_error(each), shares.mean())
    assert np.isclose(sums[False].relative_error(whole), shares[0], rtol=1e-3)


def test_finetune_divides_each_channel_by_its_own_spread():
    """Fine-tuning's loss weights: per channel of the axis fidelity judges (boxes ±100 and
    scores in [0, 1] on axis 1), each channel's variance over all the records, a never-firing
    score floored at SCORE_ACTIVE²."""
    rng = np.random.default_rng(0)
    records = []
    for _ in range(3):
        boxes = 100 * rng.standard_normal((4, 2, 50))
        scores = np.concatenate([rng.uniform(0, 1, (4, 1, 50)), np.full((4, 1, 50), 1e-4)], 1)
        records.append({"teacher:y": np.concatenate([boxes, scores], 1), "x": boxes})
    spreads = output_spreads(records, fidelity.OutputKinds(probabilities=frozenset({"y"})))
    assert list(spreads) == ["y"] and spreads["y"].axis == 1
    stacked = np.concatenate([r["teacher:y"] for r in records])
    expected = stacked.transpose(1, 0, 2).reshape(4, -1).var(axis=1)
    expected[3] = fidelity.SCORE_ACTIVE**2
    np.testing.assert_allclose(spreads["y"].variance, expected, rtol=1e-9)


def test_finetune_spreads_box_distributions_as_the_raw_logits_its_loss_compares():
    """A box distribution is measured decoded (4 sides), but the loss compares its raw 4 × 8
    logits: their spreads are per raw channel, as many as the logits have along the axis."""
    rng = np.random.default_rng(0)
    scale = np.geomspace(0.1, 10, 32)  # the last axis differs most in scale: the channel axis
    records = [{"teacher:boxes": scale * rng.standard_normal((2, 16, 32))} for _ in range(2)]
    kinds = fidelity.OutputKinds(box_distributions={"boxes": 8})
    spreads = output_spreads(records, kinds)["boxes"]
    assert spreads.axis == 2 and spreads.variance.size == 32
    stacked = np.concatenate([r["teacher:boxes"] for r in records]).reshape(-1, 32)
    np.testing.assert_allclose(spreads.variance, stacked.var(axis=0), rtol=1e-9)
    decoded = fidelity.accumulators(["boxes"], kinds=kinds)["boxes"]
    decoded.add(records[0]["teacher:boxes"], records[0]["teacher:boxes"])
    assert decoded.channel_spreads().size == 4  # what a measure reads instead
