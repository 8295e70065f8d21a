"""The reconstruction-driven (ThiNet-style) channel pruning criterion, followed by ``reconstruct``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_squeeze import zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.prune_channels.rewrite import kept_channels
from onnx_squeeze.pipeline import compress, finalize
from onnx_squeeze.records import PassContext
from tests.helpers import check, run

RNG = np.random.default_rng(0)
# Channels 6 and 7 of the first Conv are exact linear combinations of channels 0-1 and 2-3.
DEPENDENT = {6: (0, 1), 7: (2, 3)}


def _dependent_channel_model() -> ir.Model:
    """x → Conv 3×3 (3→8 channels) → Conv 3×3 (8→4) → y, no activation in between, so that a
    channel that is a linear combination of others can be rebuilt by the second Conv. The
    independent channels 4 and 5 get the smallest weights, so that magnitude criteria drop
    them (and lose what only they carry)."""
    first = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = RNG.standard_normal(8).astype(np.float32)
    for channel, (a, b) in DEPENDENT.items():
        first[channel] = 3 * first[a] - 2 * first[b]
        bias[channel] = 3 * bias[a] - 2 * bias[b]
    second = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
    first[4:6] *= 0.5
    second[:, 4:6] *= 0.5
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", **conv),
            helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2", **conv),
        ],
        "dependent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [
            onnx.numpy_helper.from_array(first, "w1"),
            onnx.numpy_helper.from_array(bias, "b1"),
            onnx.numpy_helper.from_array(second, "w2"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _feeds(count: int, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _relative_error(teacher: ir.Model, student: ir.Model, feeds) -> float:
    errors = spreads = 0.0
    for feed in feeds:
        for a, b in zip(run(teacher, feed), run(student, feed), strict=True):
            errors += float(np.square(a - b).sum())
            spreads += float(np.square(a - a.mean()).sum())
    return errors / spreads


def _prune_and_recover(teacher: ir.Model, calibration, prune: dict, recover: dict) -> ir.Model:
    student = teacher.clone()
    context = PassContext(calibration=calibration, teacher=teacher)
    make_pass("prune_channels", prune)(student, context)
    make_pass("reconstruct", recover)(student, context)
    finalize(student)
    check(student)
    return student


@pytest.mark.parametrize("criterion", ["reconstruction", "l1"])
def test_channels_the_consumer_can_rebuild_are_removed_and_rebuilt_exactly(criterion: str):
    teacher = _dependent_channel_model()
    calibration, held_out = _feeds(6), _feeds(2, seed=7)
    student = _prune_and_recover(
        teacher,
        calibration,
        {"criterion": criterion, "ratio": 0.25, "round_to": 1},
        {"methods": ["lstsq"], "ridge": 0.0, "cross_validate": False, "samples": 24},
    )
    kept = set(kept_channels(student.graph.node(0).outputs[0])["kept"])
    removed = set(range(8)) - kept
    error = _relative_error(teacher, student, held_out)
    if criterion == "l1":
        assert removed == {4, 5} and error > 1e-3
        return
    # Exactly one channel of each dependent triple goes (which one of a triple is a tie: each
    # is a combination of the other two); the second Conv then rebuilds it on unseen data.
    assert len(removed) == 2
    assert all(len(removed & {channel, *pair}) == 1 for channel, pair in DEPENDENT.items())
    assert error < 1e-8


def _mlp_feeds(model: ir.Model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    name, width = model.graph.inputs[0].name, model.graph.inputs[0].shape[1]
    return [{name: rng.standard_normal((8, width)).astype(np.float32)} for _ in range(count)]


def test_beats_l1_at_the_same_macs_target_before_and_after_reconstruct():
    """Measured on the small MLP, 30% of MACs, 256 random calibration samples, error on 128
    others: pruned 0.303 (reconstruction) vs 0.459 (l1); after ``reconstruct`` 0.093 vs 0.112.
    (With 128 calibration samples the two were even after ``reconstruct``: 0.141 vs 0.135.)"""
    teacher = compress(zoo.small("mlp"), compare=False).model
    calibration, held_out = _mlp_feeds(teacher, 32, seed=0), _mlp_feeds(teacher, 16, seed=1)
    pruned, recovered = {}, {}
    for criterion in ("l1", "reconstruction"):
        student = teacher.clone()
        context = PassContext(calibration=calibration, teacher=teacher)
        settings = {"macs_target": 0.3, "allocation": "uniform", "calibration_batches": 32}
        make_pass("prune_channels", {"criterion": criterion, **settings})(student, context)
        pruned[criterion] = _relative_error(teacher, student, held_out)
        make_pass("reconstruct", {"samples": 256})(student, context)
        finalize(student)
        check(student)
        recovered[criterion] = _relative_error(teacher, student, held_out)
    assert pruned["reconstruction"] < 0.75 * pruned["l1"], pruned
    assert recovered["reconstruction"] < 0.9 * recovered["l1"], recovered


def test_calibration_data_is_required():
    model = _dependent_channel_model()
    with pytest.raises(SettingsError, match="needs calibration data"):
        make_pass("prune_channels", {"criterion": "reconstruction", "ratio": 0.25})(
            model, PassContext()
        )
