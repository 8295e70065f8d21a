"""Fidelity, latency and side-by-side comparison on small models built in code."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnx_squeeze import clocks
from onnx_squeeze import comparison as cmp
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.gates import evaluate_gates
from onnx_squeeze.runtime import create_session, provider_available

TEMPLATE = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6] x) => (float[N, 5] LOGITS, float[N, FEAT_SHAPE] feat) {
  h = MatMul (x, w)
  scaled = Mul (h, scale)
  LOGITS = Add (scaled, offset)
  r = Reshape (x, feat_shape)
  feat = Mul (r, feat_scale)
}
"""


def _net(
    scale: float = 1.0,
    offset: float = 0.0,
    feat_scale: float = 1.0,
    *,
    logits_name: str = "logits",
    feat_shape: tuple[int, int] = (2, 3),
) -> onnx.ModelProto:
    text = TEMPLATE.replace("LOGITS", logits_name).replace(
        "FEAT_SHAPE", ", ".join(map(str, feat_shape))
    )
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(42)
    for name, array in {
        "w": rng.standard_normal((6, 5)).astype(np.float32),
        "scale": np.array(scale, dtype=np.float32),
        "offset": np.array(offset, dtype=np.float32),
        "feat_shape": np.array([-1, *feat_shape], dtype=np.int64),
        "feat_scale": np.array(feat_scale, dtype=np.float32),
    }.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _feeds(batches=(1, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 6)).astype(np.float32)} for n in batches]


def _by_name(results):
    return {r.name: r for r in results}


def test_identical_models_agree_exactly():
    results = _by_name(cmp.fidelity(_net(), ir.from_proto(_net()), _feeds()))
    logits, feat = results["logits"], results["feat"]
    for result in (logits, feat):
        assert result.max_abs == 0.0
        assert result.mean_abs == 0.0
        assert result.cosine == pytest.approx(1.0, abs=1e-12)
        assert result.nonfinite_a == result.nonfinite_b == 0
        assert result.samples == 3
    assert logits.top1_agreement == 1.0
    assert logits.elements == 6 * 5
    # A rank-3 output is not classifier-shaped.
    assert feat.top1_agreement is None


def test_output_scaled_by_two_gives_known_errors():
    feeds = _feeds()
    reference = create_session(_net(), optimization="none")
    logits = np.concatenate([reference.run(["logits"], f)[0].ravel() for f in feeds])
    results = _by_name(cmp.fidelity(_net(), _net(scale=2.0), feeds))
    # |2L - L| = |L|; 2L is parallel to L; argmax unchanged.
    assert results["logits"].max_abs == pytest.approx(np.abs(logits).max(), rel=1e-6)
    assert results["logits"].mean_abs == pytest.approx(np.abs(logits).mean(), rel=1e-6)
    assert results["logits"].cosine == pytest.approx(1.0, abs=1e-9)
    assert results["logits"].top1_agreement == 1.0
    assert results["feat"].max_abs == 0.0


def test_negated_output_has_cosine_minus_one_and_no_top1_agreement():
    results = _by_name(cmp.fidelity(_net(), _net(scale=-1.0, feat_scale=-1.0), _feeds()))
    assert results["logits"].cosine == pytest.approx(-1.0, abs=1e-9)
    assert results["logits"].top1_agreement == 0.0
    assert results["feat"].cosine == pytest.approx(-1.0, abs=1e-9)


def test_streaming_equals_numpy_over_concatenated_outputs():
    feeds = _feeds(batches=(1, 4, 2, 3), seed=7)
    a, b = _net(), _net(scale=1.3, offset=0.25, feat_scale=0.9)
    session_a, session_b = create_session(a), create_session(b)
    results = _by_name(cmp.fidelity(a, b, iter(feeds)))  # a one-shot iterator is enough
    for name in ("logits", "feat"):
        x = np.concatenate([session_a.run([name], f)[0].ravel() for f in feeds]).astype(np.float64)
        y = np.concatenate([session_b.run([name], f)[0].ravel() for f in feeds]).astype(np.float64)
        expected_cosine = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
        assert results[name].max_abs == pytest.approx(np.abs(x - y).max(), rel=1e-12)
        assert results[name].mean_abs == pytest.approx(np.abs(x - y).mean(), rel=1e-12)
        assert results[name].cosine == pytest.approx(expected_cosine, rel=1e-12)
    rows_a = np.concatenate([session_a.run(["logits"], f)[0] for f in feeds])
    rows_b = np.concatenate([session_b.run(["logits"], f)[0] for f in feeds])
    agreement = np.mean(rows_a.argmax(axis=1) == rows_b.argmax(axis=1))
    assert results["logits"].top1_agreement == pytest.approx(agreement)


def test_data_reader_protocol_is_accepted():
    class Reader:
        def __init__(self):
            self.items = iter(_feeds())

        def get_next(self):
            return next(self.items, None)

    results = cmp.fidelity(_net(), _net(), Reader())
    assert all(r.samples == 3 for r in results)


def test_mismatched_output_names_are_named():
    with pytest.raises(InputError, match=r"only in A: 'logits'.*only in B: 'scores'"):
        cmp.fidelity(_net(), _net(logits_name="scores"), _feeds())


def test_mismatched_output_shapes_are_named():
    with pytest.raises(InputError, match=r"'feat' has shape \[1, 2, 3\] in A but \[1, 3, 2\]"):
        cmp.fidelity(_net(), _net(feat_shape=(3, 2)), _feeds())


def test_missing_input_is_named():
    with pytest.raises(InputError, match="lack 'x'"):
        cmp.fidelity(_net(), _net(), [{"y": np.zeros((1, 6), np.float32)}])


def test_nonfinite_outputs_fail_every_error_metric():
    results = _by_name(cmp.fidelity(_net(), _net(offset=math.inf), _feeds()))
    logits = results["logits"]
    assert logits.nonfinite_a == 0
    assert logits.nonfinite_b == 6 * 5
    assert logits.max_abs == math.inf
    assert math.isnan(logits.cosine)
    assert results["feat"].nonfinite_b == 0
    assert json.loads(json.dumps(logits.to_dict()))["cosine"] == "nan"
    # Identical non-finite values in both models are not errors.
    same = _by_name(cmp.fidelity(_net(offset=math.inf), _net(offset=math.inf), _feeds()))
    assert same["logits"].max_abs == 0.0
    assert same["logits"].nonfinite_a == same["logits"].nonfinite_b == 30


def test_latency_measures_every_model_interleaved_or_not():
    feed = _feeds(batches=(2,))[0]
    for interleaved in (True, False):
        timings = cmp.latency(
            [_net(), _net(scale=2.0)], feed, runs=5, warmup=1, interleaved=interleaved
        )
        assert timings is not None and len(timings) == 2
        for timing in timings:
            assert timing.runs == 5
            assert timing.provider == "cpu" and timing.threads == 1
            assert 0 < timing.min_ms <= timing.median_ms <= timing.p90_ms
            assert timing.mean_ms > 0
            # every timed run is kept (the HTML report draws their distribution)
            assert len(timing.times_ms) == 5 and timing.to_dict()["times_ms"] == timing.times_ms
            assert min(timing.times_ms) == timing.min_ms
            assert np.median(timing.times_ms) == pytest.approx(timing.median_ms)
    with pytest.raises(SettingsError, match="runs"):
        cmp.latency([_net()], feed, runs=0)


def test_fast_models_are_timed_in_warm_bursts(monkeypatch):
    """A model faster than clocks.BURST_S runs back to back within each timed sample (the
    first call is the single probe run that sizes the burst); with no burst time, every sample
    is one run."""
    counts: list[int] = []
    real = clocks._run_ms
    monkeypatch.setattr(
        clocks, "_run_ms", lambda s, d, n, clock: counts.append(n) or real(s, d, n, clock)
    )
    feed = _feeds(batches=(1,))[0]
    monkeypatch.setattr(clocks, "BURST_S", 0.05)
    timing = cmp.latency([_net()], feed, runs=3, warmup=1)
    assert timing is not None and timing[0].runs == 3
    assert counts[0] == 1 and len(counts) == 4
    assert len(set(counts[1:])) == 1 and counts[1] > 1
    counts.clear()
    monkeypatch.setattr(clocks, "BURST_S", 0.0)
    cmp.latency([_net()], feed, runs=3, warmup=1)
    assert counts == [1, 1, 1, 1]


@pytest.mark.skipif(provider_available("cuda"), reason="this onnxruntime build has CUDA")
def test_latency_skips_unavailable_provider_with_reason():
    skipped: list[str] = []
    feed = _feeds(batches=(1,))[0]
    assert cmp.latency([_net()], feed, provider="cuda", runs=2, skipped=skipped) is None
    assert skipped and skipped[0].startswith(
        "cuda: CUDAExecutionProvider not available in this onnxruntime build"
    )
    assert cmp.provider_unavailable_reason("cpu") is None
    with pytest.raises(SettingsError, match="not available"):
        cmp.fidelity(_net(), _net(), _feeds(), provider="tensorrt")


def test_compare_reports_fidelity_latency_and_ratios():
    comparison = cmp.compare(
        _net(),
        _net(scale=2.0),
        providers=("cpu", "cuda", "tensorrt"),
        threads=(1,),
        runs=3,
        warmup=1,
        batch=2,
        samples=3,
    )
    assert comparison.inputs_label == "random"
    assert [f.samples for f in comparison.fidelity] == [3, 3]
    assert "cpu/t1" in comparison.latency
    assert len(comparison.latency["cpu/t1"]) == 2
    if not provider_available("cuda"):
        assert any(s.startswith("cuda: CUDAExecutionProvider") for s in comparison.skipped)
    if not provider_available("tensorrt"):
        assert any(s.startswith("tensorrt: TensorrtExecutionProvider") for s in comparison.skipped)
    summary_a, summary_b = comparison.summaries
    assert summary_b.params == summary_a.params
    assert summary_a.input_shapes == {"x": (2, 6)}
    assert summary_a.macs == 2 * 6 * 5
    metrics = comparison.metrics()
    assert metrics["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_error"] > 0
    assert metrics["nonfinite"] == 0
    assert metrics["params_ratio"] == 1.0
    assert metrics["macs_ratio"] == 1.0
    assert metrics["size_ratio"] == 1.0
    assert metrics["latency_ratio"] == pytest.approx(1 / metrics["speedup"])
    results = {
        r.expr: r.passed for r in evaluate_gates(["cosine>=0.999,max_abs_error<1e-6"], metrics)
    }
    assert results == {"cosine>=0.999": True, "max_abs_error<1e-6": False}


def test_compare_with_given_feeds_and_no_latency():
    comparison = cmp.compare(_net(), _net(), feeds=_feeds(), inputs_label="three batches", runs=0)
    assert comparison.inputs_label == "three batches"
    assert comparison.latency == {}
    assert "latency_ratio" not in comparison.metrics()
    assert comparison.metrics()["max_abs_error"] == 0.0
    with pytest.raises(InputError, match="no feeds"):
        cmp.compare(_net(), _net(), feeds=[], runs=0)


def test_a_macs_ratio_needs_both_counts_whole():
    """A count that misses a layer (shapes unknown past an op onnx cannot infer) gives no ratio:
    tashkeel's second LSTM, after a DynamicQuantizeLSTM, was counted in neither model."""
    comparison = cmp.compare(_net(), _net(), runs=0, batch=2, samples=3)
    assert comparison.metrics()["macs_ratio"] == 1.0
    a, b = comparison.summaries
    partial = dataclasses.replace(b, unknown_macs=["MatMul_0"])
    metrics = dataclasses.replace(comparison, summaries=(a, partial)).metrics()
    assert "macs_ratio" not in metrics and metrics["params_ratio"] == 1.0


def test_comparison_to_dict_fits_the_report_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from onnx_squeeze.report import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    comparison = cmp.compare(_net(), _net(offset=math.inf), runs=2, warmup=0, samples=2)
    data = json.loads(json.dumps(comparison.to_dict()))
    jsonschema.validate(
        data["fidelity"], schema["properties"]["comparison"]["properties"]["fidelity"]
    )
    jsonschema.validate(
        data["latency"], schema["properties"]["comparison"]["properties"]["latency"]
    )
    jsonschema.validate(data["models"], schema["properties"]["comparison"]["properties"]["models"])
    assert "nodes" not in data["models"][0]


def test_bench_rows_and_skipped_providers(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save_model(_net(), path)
    rows = cmp.bench(
        {"a": _net(), str(path): ir.load(str(path))},
        providers=("cpu", "tensorrt"),
        threads=(1, 2),
        runs=3,
        warmup=1,
    )
    measured = [r for r in rows if r["skipped"] is None]
    assert [(r["model"], r["threads"]) for r in measured] == [
        ("a", 1),
        (str(path), 1),
        ("a", 2),
        (str(path), 2),
    ]
    for row in measured:
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        assert row["params"] == 30 + 3 + 3  # w, three scalars, the int64 shape
        assert row["macs"] == 30
    assert measured[0]["size_bytes"] is None
    assert measured[1]["size_bytes"] == path.stat().st_size
    if not provider_available("tensorrt"):
        skipped = [r for r in rows if r["provider"] == "tensorrt"]
        assert len(skipped) == 2
        assert all("TensorrtExecutionProvider not available" in r["skipped"] for r in skipped)
        assert all(r["median_ms"] is None for r in skipped)


@pytest.mark.skipif(not provider_available("cuda"), reason="CUDA execution provider not available")
def test_compare_on_cuda():
    comparison = cmp.compare(
        _net(), _net(), providers=("cuda", "cpu"), threads=(1,), runs=3, warmup=1
    )
    if comparison.skipped:  # offered by the build but failed to load (no GPU/driver)
        assert comparison.skipped[0].startswith("cuda:")
        return
    assert comparison.fidelity_provider == "cuda"
    assert {"cuda/t1", "cpu/t1"} <= set(comparison.latency)
    assert comparison.metrics()["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_a_scalar_bool_input_is_never_drawn_at_random_but_takes_a_set_value():
    """Random data would invent the flag (it used to be drawn): refused with one line naming
    it; given as a constant, every feed takes it (the models run and agree)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    pick (bool flag, float[N, 3] x) => (float[N, 3] y) {
      minus = Neg (x)
      y = Where (flag, x, minus)
    }
    """
    proto = onnx.parser.parse_model(text)
    with pytest.raises(InputError, match=r"input 'flag' is a bool scalar: .*--set flag=VALUE"):
        cmp.compare(proto, proto, runs=1, warmup=0, samples=2)
    comparison = cmp.compare(proto, proto, runs=1, warmup=0, samples=2, constants={"flag": "false"})
    assert comparison.metrics()["max_abs_error"] == 0.0
    assert comparison.input_shapes == {"flag": [], "x": [1, 3]}


def test_layers_pair_each_weight_layer_with_its_pruned_and_factorized_versions():
    """comparison["layers"]: params/MACs per weight layer of A beside B's, matched by name, or
    by the source-node metadata a pass leaves on the nodes it makes (the two factors of a
    low-rank MatMul count together); None where B has no such layer."""
    from onnx_squeeze.records import mark_created

    a, b = ir.from_proto(_net()), ir.from_proto(_net())
    for model in (a, b):
        next(n for n in model.graph if n.op_type == "MatMul").name = "proj"
    node = next(n for n in b.graph if n.op_type == "MatMul")
    w = node.inputs[1].const_value.numpy()
    u, v = ir.Value(name="u"), ir.Value(name="v")
    u.const_value, v.const_value = (
        ir.tensor(w[:, :2].copy()),
        ir.tensor(np.eye(2, 5, dtype=np.float32)),
    )
    b.graph.initializers["u"], b.graph.initializers["v"] = u, v
    first = ir.node("MatMul", [node.inputs[0], u], name="mm_a")
    second = ir.node("MatMul", [first.outputs[0], v], name="mm_b")
    for made in (first, second):
        mark_created(made, "low_rank", node)
    b.graph.insert_before(node, [first, second])
    node.outputs[0].replace_all_uses_with(second.outputs[0])
    b.graph.remove(node, safe=True)
    node_name = "proj"
    result = cmp.compare(a, b, runs=0, shapes={"x": (3, 6)}, batch=3).to_dict()
    layers = {layer["node"]: layer for layer in result["layers"]}
    assert list(layers) == [node_name] and layers[node_name]["op_type"] == "MatMul"
    assert layers[node_name]["params"] == [30, 6 * 2 + 2 * 5]
    assert layers[node_name]["macs"] == [3 * 6 * 5, 3 * 6 * 2 + 3 * 2 * 5]
    assert "time_ms" not in layers[node_name]  # no timed runs, no profile
    # with timed runs, each layer's time from onnxruntime's profiler, B's two factors together
    timed = cmp.compare(a, b, runs=2, warmup=0, shapes={"x": (3, 6)}, batch=3).to_dict()
    time_a, time_b = timed["layers"][0]["time_ms"]
    assert 0 < time_a < 1000 and 0 < time_b < 1000
    # without provenance, the layer has no counterpart in B
    for made in (first, second):
        made.metadata_props.clear()
    unmatched = cmp.compare(a, b, runs=0, shapes={"x": (3, 6)}, batch=3).to_dict()["layers"]
    assert unmatched[0]["params"] == [30, None]
