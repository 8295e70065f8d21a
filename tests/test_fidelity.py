"""Per-output-channel fidelity: a small-range slice cannot hide behind a large one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnx_squeeze import comparison, fidelity, sequences
from onnx_squeeze.gates import evaluate_gates
from onnx_squeeze.gates import judged as judged_gates
from onnx_squeeze.verdict import DEFAULT_GATE
from tests.helpers import run

# A detector-like head: 4 box rows in pixels (0…640) concatenated with 6 Sigmoid score rows over
# 50 anchors, as YOLO exports ship it: [N, 4 + 6, 50].
DETECTOR = """
<ir_version: 8, opset_import: ["" : 17]>
det (float[N, 8, 50] x) => (float[N, 10, 50] out) {
  raw_boxes = Einsum <equation = "oc,nca->noa"> (wb, x)
  boxes = Sigmoid (raw_boxes)
  pixels = Mul (boxes, px)
  logits = Einsum <equation = "oc,nca->noa"> (ws, x)
  shifted = Add (logits, bias)
  scores = Sigmoid (shifted)
  out = Concat <axis = 1> (pixels, scores)
}
"""


def _detector(score_bias: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(DETECTOR)
    rng = np.random.default_rng(0)
    arrays = {
        "wb": rng.standard_normal((4, 8)).astype(np.float32),
        "px": np.array(640.0, dtype=np.float32),
        "ws": (2.0 * rng.standard_normal((6, 8))).astype(np.float32),
        "bias": score_bias.astype(np.float32).reshape(6, 1),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    return model


def _feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 8, 50)).astype(np.float32)} for _ in range(count)]


def _compare(b: onnx.ModelProto, bias: np.ndarray | None = None) -> comparison.Comparison:
    reference = _detector(np.full(6, -2.0) if bias is None else bias)
    return comparison.compare(reference, b, feeds=_feeds(), runs=0)


def _sparse_bias() -> np.ndarray:
    """Score biases at which each class reaches 0.5 at about 2 % of the anchors (two standard
    deviations of its logit), as a detector's classes do; at -2 they reach it at about a
    third, and their decisions are not events (``fidelity.DENSE_DECISIONS``)."""
    rng = np.random.default_rng(0)
    rng.standard_normal((4, 8))  # the box weights, drawn first in _detector
    return -2.0 * np.linalg.norm(2.0 * rng.standard_normal((6, 8)), axis=1)


def test_collapsed_scores_fail_the_channel_metrics_while_the_whole_cosine_passes():
    # The scores drop to a third of their logit: most detections below any threshold.
    collapsed = _compare(_detector(np.full(6, -5.0)))
    metrics = collapsed.metrics()
    assert metrics["cosine"] > 0.999  # boxes carry the energy: the old check passes
    assert metrics["worst_channel_sqnr_db"] < 10
    assert metrics["score_cosine"] < 0.95
    failed = evaluate_gates(["worst_channel_sqnr_db>=20", "score_cosine>=0.99"], metrics)
    assert not any(result.passed for result in failed)
    (output,) = collapsed.fidelity
    assert output.channel_axis == 1 and output.channels == 10
    assert output.score_channels == 6  # the pixel rows are not probabilities
    assert output.worst_sqnr_channel >= 4  # a score row, not a box row
    assert output.argmax_agreement is None  # boxes and scores mixed: no class axis


def test_a_small_error_on_every_channel_passes():
    near = _compare(_detector(np.full(6, -2.0) + 1e-3))
    metrics = near.metrics()
    assert metrics["worst_channel_sqnr_db"] > 40
    assert metrics["score_cosine"] > 0.9999


def test_identical_outputs_score_the_identical_ceiling():
    same = _compare(_detector(np.full(6, -2.0)))
    metrics = same.metrics()
    assert metrics["worst_channel_sqnr_db"] == fidelity.IDENTICAL_DB
    assert metrics["sqnr_db"] == fidelity.IDENTICAL_DB
    assert metrics["score_cosine"] == 1.0


def test_the_channel_axis_is_the_one_whose_slices_differ_most_in_scale():
    values = np.ones((2, 5, 7))
    values[:, 0] = 300.0  # one channel on axis 1 far larger than the rest
    assert fidelity.channel_axis(values) == 1
    assert fidelity.channel_axis(values, fixed=[False, False, True]) == 2
    assert fidelity.channel_axis(np.ones((4, 1))) is None  # no axis but the batch


def test_probability_outputs_follow_data_movement_to_sigmoid():
    from onnx_squeeze import model_io

    assert fidelity.probability_outputs(model_io.load(_detector(np.zeros(6)))) == {"out"}


def test_channel_axis_override_and_whole_output():
    a, b = _detector(np.full(6, -2.0)), _detector(np.full(6, -5.0))
    whole = comparison.compare(a, b, feeds=_feeds(), runs=0, channel_axes={"out": None})
    (output,) = whole.fidelity
    assert output.channel_axis is None and output.channels == 1
    assert output.worst_channel_sqnr_db == pytest.approx(output.sqnr_db)
    anchors = comparison.compare(a, b, feeds=_feeds(), runs=0, channel_axes={"out": 2})
    assert anchors.fidelity[0].channels == 50


def _one_hot_steps(rows: list[list[int]], classes: int = 6) -> np.ndarray:
    """[sequences, steps, classes] scores whose top class per step is ``rows``."""
    steps = np.array(rows)
    return (np.arange(classes) == steps[..., None]).astype(np.float32)


def test_tagger_sequence_agreement_is_per_step():
    # A tagger (no class fills half the steps): every step is read, one of four differs.
    a = _one_hot_steps([[0, 1, 2, 3]])
    b = _one_hot_steps([[0, 1, 2, 2]])
    acc = fidelity.OutputAccumulator("logits", axis=2)
    acc.add(a, b)
    result = acc.result()
    assert result.argmax_agreement == pytest.approx(0.75)
    assert result.ctc_blank is None and result.position_agreement is None
    assert result.token_agreement is None


def test_ctc_sequence_is_judged_on_its_decoded_strings():
    # Blank 0 fills most steps. Moving a character's edge by a step (blank <-> character)
    # keeps the strings: agreement 1 though 2 of 16 steps differ. A changed character in one
    # string and an extra one in the other: no string reads the same, 2 of 6 tokens differ.
    a = _one_hot_steps([[0, 1, 1, 0, 0, 2, 0, 0], [0, 3, 0, 0, 4, 0, 0, 5]])
    edges = _one_hot_steps([[0, 0, 1, 0, 0, 2, 2, 0], [0, 3, 0, 0, 4, 0, 0, 5]])
    wrong = _one_hot_steps([[0, 1, 1, 0, 0, 3, 0, 0], [0, 3, 0, 0, 4, 0, 2, 5]])
    for b, strings, tokens in ((edges, 1.0, 1.0), (wrong, 0.0, 1 - 2 / 6)):
        acc = fidelity.OutputAccumulator("probs", axis=2)
        acc.add(a, b)
        result = acc.result()
        assert result.ctc_blank == 0
        assert result.argmax_agreement == pytest.approx(strings)
        assert result.token_agreement == pytest.approx(tokens)
        assert result.position_agreement == pytest.approx(14 / 16)
        metrics = fidelity.gate_metrics([result])
        assert metrics["argmax_agreement"] == pytest.approx(strings)
        assert metrics["token_agreement"] == pytest.approx(tokens)


def test_ctc_time_axis_of_time_major_outputs():
    # T×N×C (captcha CRNNs, ddddocr): time is the fixed axis beside a symbolic batch, or the
    # axis beside a batch of one; decoding across the batch would read other strings.
    a = np.moveaxis(_one_hot_steps([[0, 1, 0, 2, 0, 0], [0, 0, 3, 0, 4, 0]]), 0, 1)
    b = np.moveaxis(_one_hot_steps([[1, 1, 0, 2, 0, 0], [0, 3, 3, 0, 4, 0]]), 0, 1)
    acc = fidelity.OutputAccumulator("logits", fixed=[True, False, True], axis=2)
    acc.add(a, b)
    assert acc.result().argmax_agreement == 1.0  # edges moved, strings kept
    assert sequences.time_axis((22, 1, 8210), 2, [True, False]) == 0
    assert sequences.time_axis((1, 40, 6625), 2, None) == 1
    assert sequences.time_axis((4, 40, 6625), 2, [False, False, True]) == 1


def test_edit_distance_counts_insertions_deletions_substitutions():
    assert sequences.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert sequences.edit_distance([1, 2, 3], [1, 3]) == 1
    assert sequences.edit_distance([1, 2, 3], [1, 4, 3, 5]) == 2
    assert sequences.edit_distance([], [7, 7]) == 2


def test_mismatched_nonfinite_values_fail_the_channel_metrics():
    acc = fidelity.OutputAccumulator("y", axis=1)
    a = np.ones((2, 3), dtype=np.float32)
    b = a.copy()
    b[0, 1] = np.nan
    acc.add(a, b)
    result = acc.result()
    assert math.isnan(result.worst_channel_sqnr_db) and result.worst_sqnr_channel == 1
    assert math.isnan(result.cosine)


def test_a_channel_count_that_changes_between_feeds_is_judged_whole():
    acc = fidelity.OutputAccumulator("y", fixed=None)
    first = np.ones((1, 3, 2))
    first[:, 0] = 100.0
    acc.add(first, first)
    acc.add(np.ones((1, 5, 2)), np.ones((1, 5, 2)) * 1.01)
    result = acc.result()
    assert result.channel_axis is None and result.channels == 1
    assert 30 < result.worst_channel_sqnr_db < fidelity.IDENTICAL_DB


def test_a_softmax_written_as_exp_over_its_sum_is_a_probability_output():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    clf (float[N, 5] x) => (float[N, 5] p) {
      e = Exp (x)
      s = ReduceSum <keepdims = 1> (e, axes)
      p = Div (e, s)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    from onnx_squeeze import model_io

    assert fidelity.probability_outputs(model_io.load(model)) == {"p"}


def test_measure_gives_the_share_of_variance_missed():
    """``relative_error`` is Σ|b - a|² / Σ|a - mean a|² over all batches (1 - R²): an offset
    copy misses none of the variance only when the offset is zero, and a constant is judged by
    its spread, not by its magnitude."""
    from onnx_squeeze.fidelity import measure

    rng = np.random.default_rng(0)
    a = [{"y": (rng.normal(size=(4, 8)) + 3).astype(np.float32)} for _ in range(3)]
    b = [{"y": x["y"] + rng.normal(scale=0.1, size=(4, 8)).astype(np.float32)} for x in a]
    t = np.concatenate([x["y"] for x in a]).astype(np.float64)
    s = np.concatenate([x["y"] for x in b]).astype(np.float64)
    expected = np.square(s - t).sum() / np.square(t - t.mean()).sum()
    found = measure(a, b)["y"]
    assert found.relative_error == pytest.approx(expected, rel=1e-9)
    assert measure(a, a)["y"].relative_error == 0.0
    assert measure(a, [{"y": x["y"] + 1} for x in a])["y"].relative_error > 0.9


def test_declared_shapes_keep_a_masks_height_and_width_from_being_classes():
    """A text detector's probability map [1, 1, H, W] with symbolic H and W: the comparison
    judges it as one channel, read per pixel where it crosses 0.5; a measurement inside a pass,
    given the model's declared shapes, judges it the same way (without them, W was taken for
    16 classes)."""
    rng = np.random.default_rng(0)
    mask = [{"m": rng.uniform(size=(1, 1, 8, 16)).astype(np.float32)} for _ in range(2)]
    moved = [{"m": np.clip(f["m"] + rng.normal(0, 0.05, f["m"].shape), 0, 1)} for f in mask]
    kinds = fidelity.OutputKinds(shapes={"m": [1, 1, None, None]}, probabilities=frozenset({"m"}))
    declared = fidelity.measure(mask, moved, kinds=kinds)["m"]
    pixels = np.concatenate(
        [(f["m"] >= 0.5) == (g["m"] >= 0.5) for f, g in zip(mask, moved, strict=True)]
    )
    assert declared.channel_axis is None and declared.reads == pixels.size
    assert declared.argmax_agreement == pytest.approx(pixels.mean())
    assert not declared.class_probabilities  # its values are still judged
    guessed = fidelity.measure(mask, moved, kinds=dataclasses.replace(kinds, shapes={}))["m"]
    assert guessed.channel_axis == 3  # what the in-pass checks used to see


def test_a_single_sigmoid_is_read_where_it_crosses_one_half():
    # Voice activity: one probability per chunk. Moving 0.45 to 0.55 flips a decision; moving
    # 0.9 to 0.7 does not. Outputs that are not probabilities get no such reading.
    a = np.array([[0.45], [0.9], [0.1], [0.8]], dtype=np.float32)
    b = np.array([[0.55], [0.7], [0.1], [0.8]], dtype=np.float32)
    kinds = fidelity.OutputKinds(probabilities=frozenset({"p"}))
    speech = fidelity.measure([{"p": a}], [{"p": b}], kinds=kinds)["p"]
    assert speech.argmax_agreement == pytest.approx(0.75) and speech.reads == 4
    assert not speech.class_probabilities
    values = fidelity.measure([{"p": a}], [{"p": b}])["p"]
    assert values.argmax_agreement is None


def test_probabilities_are_traced_through_if_branches_and_means():
    # silero-vad's output: the mean over frames of a sigmoid computed inside an If's branches.
    def branch(name: str) -> onnx.GraphProto:
        nodes = [
            onnx.helper.make_node("Sigmoid", ["x"], [f"{name}_s"]),
            onnx.helper.make_node("ReduceMean", [f"{name}_s"], [f"{name}_out"], keepdims=1),
        ]
        out = onnx.helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, None)
        return onnx.helper.make_graph(nodes, name, [], [out])

    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "If", ["c"], ["p"], then_branch=branch("then"), else_branch=branch("else")
            ),
            onnx.helper.make_node("Identity", ["x"], ["raw"]),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
        ],
        [
            onnx.helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None),
            onnx.helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, [1, 4]),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert fidelity.probability_outputs(ir.from_proto(model)) == {"p"}


def test_a_rare_class_deciding_the_worst_channel_is_flagged_as_too_few_to_tell():
    from onnx_squeeze import verdict

    def warnings(shift: float, rare: float) -> tuple[fidelity.OutputFidelity, list[str]]:
        bias = np.full(6, -2.0)
        bias[5] = rare
        moved = bias.copy()
        moved[5] += shift
        result = comparison.compare(_detector(bias), _detector(moved), feeds=_feeds(), runs=0)
        (output,) = result.fidelity
        return output, verdict.run_warnings({"fidelity": [output.to_dict()]})

    # The rare class fires on a few of 400 anchors; its scores halve.
    output, said = warnings(-0.7, -15.0)
    assert output.worst_sqnr_channel == 9 and output.worst_channel_reads < verdict.ENOUGH_READS
    assert len(said) == 1 and "too few to tell" in said[0]
    # The same loss on a class that fires often is judged on enough values: no caveat.
    output, said = warnings(-0.7, -2.0)
    assert output.worst_channel_reads >= verdict.ENOUGH_READS
    assert len(said) == 1 and "too few to tell" not in said[0]


def test_score_decisions_flip_where_the_scores_sqnr_still_passes():
    """Every score logit moved by 0.5: the scores' SQNR stays above the default gate's 12 dB,
    while a fifth of the scores above some threshold in either model are no longer above it in
    both, and the default gate fails; a shift of 0.0001 keeps them. Dense decisions (a third of
    the anchors at 0.5) are not read."""
    bias = _sparse_bias()
    shifted = _compare(_detector(bias + 0.5), bias)
    metrics = shifted.metrics()
    assert metrics["worst_value_channel_sqnr_db"] > 12
    assert metrics["score_agreement"] < 0.875
    judged = {g["expr"].split(">")[0]: g["passed"] for g in judged_gates([], metrics, DEFAULT_GATE)}
    # the SQNR holds, the decisions do not (the mixed output has no argmax to read)
    assert judged == {"worst_value_channel_sqnr_db": True, "score_agreement": False}
    (output,) = shifted.fidelity
    assert (
        output.score_threshold in fidelity.SCORE_THRESHOLDS and output.dense_score_channel is None
    )
    assert output.score_reads >= fidelity.ENOUGH_READS
    assert _compare(_detector(bias + 1e-4), bias).metrics()["score_agreement"] > 0.99
    assert _compare(_detector(bias), bias).metrics()["score_agreement"] == 1.0
    (dense,) = _compare(_detector(np.full(6, -2.0) + 0.5)).fidelity
    assert dense.score_agreement is None and dense.dense_score_channel is not None


def test_score_decisions_need_scores_along_a_channel_axis_outside_a_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5))
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = fidelity.OutputAccumulator("p", axis=1, probabilities=True)
    classes.add(softmax, softmax * 0.9)
    assert classes.result().class_probabilities and classes.result().score_agreement is None
    values = fidelity.OutputAccumulator("y", axis=1)  # not a probability output
    values.add(softmax, softmax * 0.9)
    assert values.result().score_agreement is None
    labels = fidelity.OutputAccumulator("s", axis=1, probabilities=True)
    sparse = 1 / (1 + np.exp(4 - np.random.default_rng(1).standard_normal((400, 5))))
    labels.add(sparse, sparse)  # multi-label scores that are events: read against thresholds
    assert labels.result().score_agreement == 1.0
    # ... and not by their top channel, which a distribution over classes is read by
    assert labels.result().argmax_agreement is None
    assert classes.result().argmax_agreement == 1.0


def test_decisions_that_move_together_count_as_fewer_reads():
    """An object lights several anchors of one class in one image, and they keep or lose their
    decision together: 40 images of 10 such anchors each, a fifth of the images losing theirs,
    count as about 40 reads, not 400 (the bound a search aims at widens); anchors that decide
    one by one count as many reads as they are. The same for a segmentation map's pixels."""
    rng = np.random.default_rng(0)
    grouped = fidelity.OutputAccumulator("s", axis=1, probabilities=True)
    alone = fidelity.OutputAccumulator("s", axis=1, probabilities=True)
    pixels = fidelity.OutputAccumulator("p", axis=1)
    for image in range(40):
        scores = np.full((1, 3, 100), 0.01)
        scores[0, image % 3, :10] = 0.9  # one object, 10 anchors of its class
        lost = scores.copy()
        if image % 5 == 0:  # a fifth of the images lose their object
            lost[0, image % 3, :10] = 0.01
        grouped.add(scores, lost)
        single = scores.copy()
        single[0, image % 3, 10:] = 0.01
        flip = single.copy()
        flip[0, image % 3, rng.choice(10, 2, replace=False)] = 0.01  # 2 of 10 at random
        alone.add(single, flip)
        classes = np.zeros((1, 2, 20, 20))
        classes[0, 1] = 1.0
        pixels.add(classes, classes[:, ::-1] if image % 5 == 0 else classes)
    together, apart, maps = grouped.result(), alone.result(), pixels.result()
    assert together.score_agreement == pytest.approx(0.8) and together.score_reads == 400
    assert 30 <= together.score_independent_reads <= 50
    assert apart.score_agreement == pytest.approx(0.8)
    assert apart.score_independent_reads >= 0.8 * apart.score_reads
    assert maps.argmax_agreement == pytest.approx(0.8) and maps.reads == 40 * 400
    assert 30 <= maps.independent_reads <= 50
    assert fidelity.counted_reads([together], "score_agreement") == pytest.approx(
        together.score_independent_reads
    )


def test_score_decisions_fail_where_the_result_is_not_finite():
    scores = 1 / (1 + np.exp(3 - np.random.default_rng(0).standard_normal((4, 6, 50))))
    acc = fidelity.OutputAccumulator("s", axis=1, probabilities=True)
    acc.add(scores, np.full_like(scores, np.nan))
    assert math.isnan(acc.result().score_agreement)
    same = fidelity.OutputAccumulator("s", axis=1, probabilities=True)
    same.add(scores, scores)
    # ties: read at the highest threshold that enough scores reach (the fewest reads)
    enough = [t for t in fidelity.SCORE_THRESHOLDS if (scores >= t).sum() >= fidelity.ENOUGH_READS]
    assert same.result().score_threshold == max(enough) < 0.9


def test_score_decisions_on_few_scores_are_flagged_as_too_few_to_tell():
    from onnx_squeeze import verdict

    bias = _sparse_bias()
    few = comparison.compare(_detector(bias), _detector(bias + 0.5), feeds=_feeds(1), runs=0)
    (output,) = few.fidelity
    assert 0 < output.score_reads < verdict.ENOUGH_READS
    said = verdict.run_warnings({"fidelity": [output.to_dict()]})
    assert any("score decisions were compared on only" in line for line in said), said
    (enough,) = _compare(_detector(bias + 0.5), bias).fidelity
    said = verdict.run_warnings({"fidelity": [enough.to_dict()]})
    assert not any("score decisions" in line for line in said)


def test_pooled_and_normalized_outputs_are_read_by_value_not_by_argmax():
    """A sentence encoder's outputs: token embeddings out of a LayerNormalization, and their
    mean over the tokens; logits of a MatMul beside them. An argmax over an embedding's
    channels reads near-ties (and an outlier dimension on top of most tokens passes for a CTC
    blank): the embeddings are judged by their values only, the logits keep their argmax."""
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        enc (float[N, T, 8] x) => (float[N, T, 8] tokens, float[N, 8] pooled, float[N, T, 8] logits) {
          normed = LayerNormalization <axis = -1> (x, gamma, beta)
          tokens = Mul (normed, scale)
          pooled = ReduceMean <axes = [1], keepdims = 0> (tokens)
          logits = MatMul (x, w)
        }"""
    )
    rng = np.random.default_rng(0)
    arrays = {
        "gamma": np.ones(8, np.float32),
        "beta": np.zeros(8, np.float32),
        "scale": np.full(8, 2.0, np.float32),
        "w": rng.standard_normal((8, 8)).astype(np.float32),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    assert fidelity.feature_outputs(ir.from_proto(model)) == {"tokens", "pooled"}
    x = rng.standard_normal((16, 6, 8)).astype(np.float32)
    x[..., 3] += 4.0  # an outlier dimension on top of every token
    feeds = [{"x": x}]
    moved = [{"x": x + 1e-3 * rng.standard_normal(x.shape).astype(np.float32)}]
    reference = [
        dict(zip(("tokens", "pooled", "logits"), run(model, f), strict=True)) for f in feeds
    ]
    result = [dict(zip(("tokens", "pooled", "logits"), run(model, f), strict=True)) for f in moved]
    kinds = fidelity.OutputKinds.of(ir.from_proto(model))
    judged = fidelity.measure(reference, result, kinds=kinds)
    for name in ("tokens", "pooled"):
        assert judged[name].argmax_agreement is None and judged[name].top1_agreement is None
        assert judged[name].ctc_blank is None and judged[name].worst_channel_sqnr_db > 30
    assert judged["logits"].argmax_agreement is not None
    plain = fidelity.measure(  # without: argmax read
        reference, result, kinds=dataclasses.replace(kinds, features=frozenset())
    )
    assert plain["pooled"].top1_agreement is not None
    # the pooled vectors are read as a similarity search reads them: nearest neighbours
    assert judged["pooled"].neighbour_agreement == 1.0 and judged["pooled"].neighbour_reads == 16
    assert judged["tokens"].neighbour_agreement is None  # one vector per token, not per sample
    noisy = [{"x": x + 0.5 * rng.standard_normal(x.shape).astype(np.float32)}]
    far = [dict(zip(("tokens", "pooled", "logits"), run(model, f), strict=True)) for f in noisy]
    moved = fidelity.measure(reference, far, kinds=kinds)
    assert moved["pooled"].neighbour_agreement < 0.98
    metrics = fidelity.gate_metrics(moved.values())
    gates = {g["expr"].split(">")[0]: g["passed"] for g in judged_gates([], metrics, DEFAULT_GATE)}
    assert gates["neighbour_agreement"] is False


# A GFL detector head as PP-PicoDet exports it: one Conv gives 3 class logits and 4 sides × 8
# bins of box logits per position; the scores get a Sigmoid, the box distributions leave the
# model as logits (decoded outside it: a softmax per side and its expectation), and YOLACT-like
# mask coefficients (a Tanh of 32 values per position) sit beside them.
GFL_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[1, 8, 4, 4] x) => (float[1, 16, 3] scores, float[1, 16, 32] boxes, float[1, 16, 32] masks) {
  logits = Conv (x, w)
  cls, reg = Split <axis = 1> (logits, sizes)
  probabilities = Sigmoid (cls)
  flat_scores = Reshape (probabilities, score_shape)
  scores = Transpose <perm = [0, 2, 1]> (flat_scores)
  flat_boxes = Reshape (reg, box_shape)
  boxes = Transpose <perm = [0, 2, 1]> (flat_boxes)
  mask_logits = Conv (x, wm)
  bounded = Tanh (mask_logits)
  flat_masks = Reshape (bounded, box_shape)
  masks = Transpose <perm = [0, 2, 1]> (flat_masks)
}
"""


def _gfl_head() -> onnx.ModelProto:
    model = onnx.parser.parse_model(GFL_HEAD)
    rng = np.random.default_rng(0)
    arrays = {
        "w": (2.0 * rng.standard_normal((35, 8, 1, 1))).astype(np.float32),
        "wm": rng.standard_normal((32, 8, 1, 1)).astype(np.float32),
        "sizes": np.array([3, 32], np.int64),
        "score_shape": np.array([1, 3, 16], np.int64),
        "box_shape": np.array([1, 32, 16], np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    return model


def test_box_distributions_are_read_as_their_decoder_reads_them():
    """The box logits are judged by each side's expected bin, not by an argmax over 4 sides ×
    8 bins (nor over the anchors, which differ more in scale): a shift of a side's logits,
    which the softmax does not see, leaves them identical; bins swapped within a side, which
    move the box, fail them; the mask coefficients (after a Tanh) are no box distribution."""
    model = _gfl_head()
    loaded = ir.from_proto(model)
    assert fidelity.box_distribution_outputs(loaded) == {"boxes": 8}
    names = ("scores", "boxes", "masks")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8, 4, 4)).astype(np.float32)} for _ in range(4)]
    reference = [dict(zip(names, run(model, feed), strict=True)) for feed in feeds]
    shifted = [{**r, "boxes": r["boxes"] + np.repeat(rng.normal(0, 3, 4), 8)} for r in reference]
    swapped = [
        {**r, "boxes": r["boxes"].reshape(1, 16, 4, 8)[..., ::-1].reshape(1, 16, 32)}
        for r in reference
    ]
    kinds = fidelity.OutputKinds.of(loaded)
    assert kinds.probabilities == {"scores"} and kinds.box_distributions == {"boxes": 8}
    same = fidelity.measure(reference, shifted, kinds=kinds)["boxes"]
    assert same.box_bins == 8 and same.channel_axis == 2 and same.channels == 4
    assert same.argmax_agreement is None
    assert same.worst_channel_sqnr_db > 100.0
    moved = fidelity.measure(reference, swapped, kinds=kinds)["boxes"]
    assert moved.worst_channel_sqnr_db < 12.0  # below the default gate's bar
    decoded = fidelity.expected_bins(reference[0]["boxes"], 8)
    assert decoded.shape == (1, 16, 4) and np.all((decoded >= 0) & (decoded <= 7))
    # without the decoding the logits' shift reads as an error
    raw = fidelity.measure(reference, shifted, kinds=fidelity.OutputKinds(shapes=kinds.shapes))
    assert raw["boxes"].worst_channel_sqnr_db < 20.0


def test_the_comparison_reads_box_distributions_decoded():
    """compare() reads the reference's output kinds, box distributions among them: the boxes
    are judged by their 4 decoded sides."""
    model = _gfl_head()
    found = {f.name: f for f in comparison.compare(model, model, runs=0).fidelity}
    assert found["boxes"].box_bins == 8 and found["boxes"].channels == 4
    assert found["masks"].box_bins is None and found["scores"].box_bins is None


def test_a_map_of_scores_only_is_judged_by_its_decisions_not_by_value():
    """A detector's score map beside its boxes: a new detection at one anchor is a lost
    decision (score_agreement), while the per-channel SQNR of a map of near-zero scores
    swings on it; the value gate reads the boxes alone, the score map by its decisions."""
    rng = np.random.default_rng(0)
    scores = (rng.random((1, 300, 4)) * 0.03).astype(np.float32)
    scores[0, 10:14, 1], scores[0, 100:103, 2], scores[0, 200, 0] = 0.9, 0.8, 0.7
    moved = scores.copy()
    moved[0, 50, 3] = 0.6  # a detection only the result makes
    boxes = (rng.random((1, 300, 4)) * 100).astype(np.float32)
    kinds = fidelity.OutputKinds(probabilities=frozenset({"scores"}))
    measured = fidelity.measure(
        [{"scores": scores, "boxes": boxes}] * 4,
        [{"scores": moved, "boxes": boxes + 0.01}] * 4,
        kinds=kinds,
    )
    assert not measured["scores"].read_by_value and measured["boxes"].read_by_value
    assert measured["scores"].to_dict()["read_by_value"] is False
    metrics = fidelity.gate_metrics(measured.values())
    assert metrics["worst_channel_sqnr_db"] < 0  # the score map's, read by value
    assert metrics["worst_value_channel_sqnr_db"] == measured["boxes"].worst_channel_sqnr_db
    assert metrics["score_agreement"] < 0.9


def test_a_rectified_feature_map_is_read_by_value_not_by_its_top_channel():
    """A YOLO segmentation head's mask prototypes come out of a SiLU (``x * Sigmoid(x)``): a
    feature map, whose top channel per pixel is no class. Segmentation logits straight out of
    a Conv are still read by their argmax."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        heads (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] protos, float[1, 4, 8, 8] logits) {
            p = Conv (x, w)
            s = Sigmoid (p)
            protos = Mul (p, s)
            logits = Conv (x, w)
        }
    """
    proto = onnx.parser.parse_model(text)
    weight = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    model = ir.from_proto(proto)
    assert fidelity.feature_outputs(model) == {"protos"}
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.3  # top channels move
    kinds = fidelity.OutputKinds.of(model)
    measured = fidelity.measure(
        [{"protos": a, "logits": a}], [{"protos": b, "logits": b}], kinds=kinds
    )
    assert measured["protos"].argmax_agreement is None
    assert measured["logits"].argmax_agreement is not None
