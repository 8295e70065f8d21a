"""Channel pruning, checked numerically in onnxruntime against the original and the masked
model: removing channels that are already zero must not change any output."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from onnx_squeeze import analysis, latency_search, layer_times, runtime, zoo
from onnx_squeeze.calibration import RandomSource, StatisticsCollector
from onnx_squeeze.errors import SettingsError, ShapeUnknownError
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.passes.prune_channels import PruneChannels
from onnx_squeeze.passes.prune_channels.rewrite import kept_channels
from onnx_squeeze.passes.prune_channels.sensitivity import Sensitivity
from onnx_squeeze.passes.prune_channels.trace import build_groups
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe
from onnx_squeeze.records import PassContext
from onnx_squeeze.shapes import resolve_input_shapes
from tests.helpers import assert_same_outputs, check, random_feeds, run
from tests.test_channel_groups import FROZEN_GRAPHS, GRAPHS, graph_model, zoo_model


def _prune(model: ir.Model, context: PassContext | None = None, **settings):
    """Prune a copy; symbolic dimensions (a transformer's sequence) are set to 8 explicitly."""
    pruned = model.clone()
    context = context or PassContext(shapes=resolve_input_shapes(model, default_dim=8))
    report = PruneChannels(**settings)(pruned, context)
    return pruned, report


def _counted(monkeypatch, owner: type, method: str) -> list[tuple]:
    """The calls of ``owner.method`` from now on (it still runs)."""
    calls, original = [], getattr(owner, method)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, counting)
    return calls


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _assert_removal_is_lossless(model: ir.Model, **settings) -> ir.Model:
    """Mask channels (zero mode), then remove the masked ones: the outputs must not change,
    the result must be valid and smaller."""
    masked, _ = _prune(model, mode="zero", **settings)
    removed, report = _prune(masked, mode="remove", **settings)
    check(removed)
    assert report.changed, report.notes
    assert analysis.analyze(removed).params < analysis.analyze(model).params
    assert_same_outputs(masked, removed, random_feeds(model, 2, batch=3))
    return removed


@pytest.mark.parametrize("graph", sorted(set(GRAPHS) - set(FROZEN_GRAPHS)))
def test_removing_zero_channels_is_lossless_on_coupled_structures(graph: str):
    _assert_removal_is_lossless(graph_model(GRAPHS[graph]), ratio=0.5)


@pytest.mark.parametrize("name", zoo.NAMES)
@pytest.mark.parametrize("prepared", [False, True], ids=["raw", "prepared"])
def test_removing_zero_channels_is_lossless_on_zoo_models(name: str, prepared: bool):
    model = zoo_model(name, prepared)
    removed = _assert_removal_is_lossless(model, ratio=0.4)
    assert runtime.input_specs(removed)[0].shape[0] == runtime.input_specs(model)[0].shape[0]


def test_remove_mode_shrinks_shapes_and_records_kept_channels():
    model = graph_model(GRAPHS["concat_split"])
    ShapeInferencePass()(model)
    pruned, report = _prune(model, ratio=0.5)
    weights = _initializers(pruned)
    assert weights["wa"].shape == (4, 4, 1, 1) and weights["wy"].shape == (4, 17, 1, 1)
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [3, 5]
    values = {v.name: v for n in pruned.graph for v in n.outputs}
    record = kept_channels(values["e"])
    assert record["axis"] == 1 and len(record["kept"]) == 12 and values["e"].shape[1] == 12
    assert max(record["kept"]) < 24
    assert {r.action for r in report.changed} == {"pruned"} and len(report.changed) == 6  # 6 Convs
    check(pruned)


def test_remove_mode_moves_slice_bounds_and_shrinks_rows_after_reshape():
    model = graph_model(GRAPHS["shape_ops"])
    ShapeInferencePass()(model)
    pruned, _ = _prune(model, ratio=0.5)
    weights = _initializers(pruned)
    assert weights["w1"].shape[0] == 8 and weights["scale"].shape == (1, 8, 1, 1)
    assert weights["shift"].shape == (8, 1, 1) and weights["w3"].shape == (4, 4, 1, 1)
    assert weights["wm"].shape == (16, 10)  # 4 channels x 2 x 2 pixels
    (slice_node,) = [n for n in pruned.graph if n.op_type == "Slice"]
    bounds = [slice_node.inputs[i].const_value.numpy().tolist() for i in (1, 2)]
    assert bounds == [[2], [6]]  # 2 of the 4 channels before it kept, 4 of 8 taken
    values = {v.name: v for n in pruned.graph for v in n.outputs}
    assert values["sl"].shape[1] == 4 and values["flat"].shape[1] == 16
    check(pruned)


def _prune_expecting_no_change(model: ir.Model, **settings):
    """Prune a copy that the pass must leave as it was: no change reported, every initializer
    and every output the same."""
    pruned, report = _prune(model, **settings)
    before, after = _initializers(model), _initializers(pruned)
    assert not report.changed
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert_same_outputs(model, pruned, random_feeds(model, 1))
    return pruned, report


def test_ratio_zero_is_the_identity():
    _prune_expecting_no_change(zoo_model("resnet18", True), ratio=0.0)


@pytest.mark.parametrize(
    ("graph", "reasons"),
    [
        ("bad", ("shared with other nodes", "graph output", "LRN")),
        (
            "unmappable",
            ("reduces over the channel axis", "reshapes the channel axis", "mixes values"),
        ),
    ],
)
def test_frozen_groups_are_untouched_and_reported(graph: str, reasons: tuple[str, ...]):
    pruned, report = _prune_expecting_no_change(graph_model(GRAPHS[graph]), ratio=0.5)
    skipped = " ".join(r.detail for r in report.skipped)
    assert all(reason in skipped for reason in reasons), skipped
    check(pruned)


def test_constants_shared_by_two_groups_are_copied_not_half_pruned():
    """One bias and one Mul constant serve two independent groups: each node gets its own
    sliced copy and the shared originals keep every channel."""
    model = graph_model(GRAPHS["shared_constants"])
    pruned, _ = _prune(model, ratio=0.5)
    nodes = {node.outputs[0].name: node for node in pruned.graph}
    shared = _initializers(model)
    for name, index in (("a", 2), ("b", 2), ("ka", 1), ("kb", 1)):
        value = nodes[name].inputs[index]
        assert value.const_value.numpy().size == 4, name
        original = shared["bias" if index == 2 else "k"].reshape(-1)
        assert set(value.const_value.numpy().reshape(-1)) <= set(original), name
    assert {shared["bias"].size, shared["k"].size} == {8}


def test_weights_shared_with_the_teacher_are_not_written_into():
    model = zoo_model("mobilenetv2", True)
    teacher = model.clone()  # shares tensors, as the pipeline's teacher does
    before = _initializers(teacher)
    PruneChannels(ratio=0.5)(model, PassContext(teacher=teacher))
    PruneChannels(ratio=0.5, mode="zero")(teacher.clone(), PassContext())
    after = _initializers(teacher)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_rounding_keeps_multiples_of_eight_and_min_channels():
    model = zoo_model("mlp", True)  # hidden layers of 128, 64 and 32 units
    pruned, _ = _prune(model, ratio=0.3)
    gemms = [n for n in pruned.graph if n.op_type == "Gemm"][:3]
    kept = [n.inputs[1].const_value.shape[0] for n in gemms]  # transB: units on axis 0
    assert kept == [88, 48, 24]
    pruned, _ = _prune(model, ratio=0.9, min_channels=16, round_to=1)
    kept = [n.inputs[1].const_value.shape[0] for n in pruned.graph if n.op_type == "Gemm"][:3]
    assert kept == [16, 16, 16]


def test_macs_target_removes_at_least_the_share_asked():
    model = zoo_model("resnet50", True)
    pruned, report = _prune(model, macs_target=0.4)
    ratio = analysis.analyze(pruned).macs / analysis.analyze(model).macs
    assert 0.5 <= ratio <= 0.6, ratio
    assert any("MACs target" in note for note in report.notes)
    check(pruned)


TWO_BRANCHES = """
g (float[N, 8, 8, 8] x, float[32, 8, 1, 1] wa, float[32, 8, 1, 1] wb, float[8, 32, 1, 1] wc,
   float[8, 32, 1, 1] wd) => (float[N, 8, 8, 8] y) {
    a = Conv (x, wa)
    ra = Relu (a)
    c = Conv (ra, wc)
    b = Conv (x, wb)
    rb = Relu (b)
    d = Conv (rb, wd)
    y = Add (c, d)
}
"""


def test_sensitivity_allocation_prunes_the_branch_that_matters_least(monkeypatch):
    """Two branches of equal MACs: the one read through weights 100x smaller costs far less
    output error per MAC, so a 25% MACs target is taken from it alone."""
    model = graph_model(TWO_BRANCHES)
    quiet = model.graph.initializers["wd"]
    quiet.const_value = ir.tensor(quiet.const_value.numpy() * 0.01, name="wd")
    measured = _counted(monkeypatch, Sensitivity, "curves")
    context = PassContext()
    pruned, report = _prune(model, context, macs_target=0.25, sensitivity_rounds=1)
    _prune(model, context, macs_target=0.1, sensitivity_rounds=1)
    assert len(measured) == 1  # the second target reuses the measured sensitivities
    shapes = _initializers(pruned)
    assert shapes["wa"].shape[0] == 32 and shapes["wc"].shape[1] == 32
    assert shapes["wb"].shape[0] == 16 and shapes["wd"].shape[1] == 16
    assert any("by sensitivity" in note for note in report.notes)
    uniform, _ = _prune(model, macs_target=0.25, allocation="uniform")
    assert _initializers(uniform)["wa"].shape[0] < 32  # one ratio for both: worse here
    feeds = random_feeds(model, 2, batch=2)
    reference = run(model, feeds[0])[0]
    errors = [np.linalg.norm(run(m, feeds[0])[0] - reference) for m in (pruned, uniform)]
    assert errors[0] < errors[1] / 3


def _fake_timing(monkeypatch, model: ir.Model, slow: set[str], fixed: float):
    """Times of the TWO_BRANCHES Convs: 10 for the branch reading ``slow`` weights, 1 for the
    other, of which ``fixed`` does not shrink with the kept channels; both the per-node
    profile and the timing of whole models follow them."""
    sizes = {name: array.size for name, array in _initializers(model).items()}

    def measure(model, feed, **_):
        times = {}
        for node in (n for n in model.graph if n.op_type == "Conv"):
            weight = node.inputs[1].name
            kept = node.inputs[1].const_value.numpy().size / sizes[weight]
            times[node] = (10.0 if weight in slow else 1.0) * (fixed + (1 - fixed) * kept)
        return layer_times.LayerTimes(nodes=times, total=sum(times.values()))

    def median_times(models, feed, provider="cpu"):  # a session stands for the original
        return [measure(m if isinstance(m, ir.Model) else model, feed).total for m in models]

    monkeypatch.setattr(layer_times, "measure", measure)
    monkeypatch.setattr(latency_search, "median_times", median_times)
    return measure


def test_latency_target_prices_channels_by_measured_time(monkeypatch):
    """Two branches of equal MACs, one timed 10x slower (as a memory-bound layer is): a
    latency target is taken from the slow branch, which a MACs target would not prefer."""
    model = graph_model(TWO_BRANCHES)
    _fake_timing(monkeypatch, model, {"wb", "wd"}, fixed=0.0)
    pruned, report = _prune(model, latency_target=0.4, sensitivity_rounds=1)
    shapes = _initializers(pruned)
    assert shapes["wa"].shape[0] == 32 and shapes["wb"].shape[0] == 16
    note = "latency target 40% by sensitivity: 1 groups pruned, 50%-50% of their channels"
    assert any(n.startswith(note) and "removes 45.5%, 25.0% of MACs" in n for n in report.notes)
    assert "the pruned model takes 45.5% less time" in report.notes[-1]
    check(pruned)


def test_latency_target_is_planned_again_until_the_pruned_model_saves_it(monkeypatch):
    """Times that fall less than linearly with channels (a fixed share per call, as narrow
    layers keep): the first plan, priced linearly, saves too little when timed; the target is
    corrected until the pruned model, timed, saves what was asked."""
    model = graph_model(TWO_BRANCHES)
    measure = _fake_timing(monkeypatch, model, {"wb", "wd"}, fixed=0.4)
    pruned, report = _prune(model, latency_target=0.3, allocation="uniform", round_to=1)
    check(pruned)
    saved = 1 - measure(pruned, None).total / measure(model, None).total
    assert 0.29 <= saved <= 0.33
    note = next(n for n in report.notes if "the pruned model takes" in n)
    assert f"{saved:.1%} less time" in note and "planned for" in note, note


def test_latency_target_on_a_measured_model():
    model = zoo_model("mobilenetv2", True)
    pruned, report = _prune(model, latency_target=0.3, allocation="uniform")
    note = next(n for n in report.notes if n.startswith("latency target 30%"))
    removed = float(note.split("removes ")[1].split("%")[0])
    assert removed >= 30, note
    assert "of MACs" in note
    check(pruned)
    assert run(pruned, random_feeds(model, 1, batch=2)[0])[0].shape[0] == 2


def test_sensitivity_allocation_uses_calibration_data_and_beats_one_ratio():
    model = zoo_model("resnet50", True)
    source = RandomSource(runtime.input_specs(model), count=4, batch_size=1, seed=3)
    feeds = random_feeds(model, 2, batch=2)
    reference = run(model, feeds[0])[0]
    errors = {}
    for allocation in ("sensitivity", "uniform"):
        pruned, report = _prune(
            model, PassContext(calibration=source), macs_target=0.4, allocation=allocation
        )
        ratio = analysis.analyze(pruned).macs / analysis.analyze(model).macs
        assert 0.5 <= ratio <= 0.6, (allocation, ratio)
        assert not any("random inputs" in note for note in report.notes)
        errors[allocation] = np.linalg.norm(run(pruned, feeds[0])[0] - reference)
    check(pruned)
    assert errors["sensitivity"] < errors["uniform"]


def test_a_second_pruning_in_one_run_measures_the_pruned_model(monkeypatch):
    """The pruned model keeps its tensor names with fewer channels: a second prune_channels on
    the same context collects its statistics again, never reusing the first pass's."""
    model = zoo_model("resnet18", True)
    collected = _counted(monkeypatch, StatisticsCollector, "collect")
    source = RandomSource(runtime.input_specs(model), count=4, batch_size=2)
    context = PassContext(calibration=source)
    reports = [PruneChannels(ratio=0.25, criterion="activation")(model, context) for _ in "ab"]
    assert all(report.changed for report in reports) and len(collected) == 2
    check(model)


def test_global_ranking_prunes_unevenly_but_to_the_overall_share():
    model = zoo_model("resnet50", True)
    groups = [g for g in build_groups(model) if not g.frozen]
    pruned, _ = _prune(model, ratio=0.5, global_ranking=True, round_to=1)
    out_channels = {
        n.name: n.inputs[1].const_value.shape[0] for n in pruned.graph if n.op_type == "Conv"
    }
    kept = {g.id: out_channels[g.producers[0].name] for g in groups}
    shares = {round(kept[g.id] / g.channels, 3) for g in groups}
    assert len(shares) > 3  # not one uniform ratio
    removed = sum(g.channels - kept[g.id] for g in groups) / sum(g.channels for g in groups)
    assert removed == pytest.approx(0.5, abs=0.02)


def test_protected_layers_keep_their_channels():
    model = zoo_model("resnet18", True)
    pruned, report = _prune(model, ratio=0.5, protect=["layer2.0.conv1"])
    weights = {n.name: n.inputs[1].const_value.shape for n in pruned.graph if n.op_type == "Conv"}
    original = {n.name: n.inputs[1].const_value.shape for n in model.graph if n.op_type == "Conv"}
    assert weights["layer2.0.conv1"][0] == original["layer2.0.conv1"][0]
    assert weights["layer2.0.conv2"][1] == original["layer2.0.conv2"][1]
    assert any("protected (layer2.0.conv1)" in r.detail for r in report.skipped)
    with pytest.raises(SettingsError, match="not nodes"):
        _prune(model, ratio=0.5, protect=["no.such.layer"])


def test_bn_scale_criterion_drops_the_smallest_batchnorm_scales():
    for prepared in (False, True):  # unfused BN node, or the scale prepare kept on the Conv
        model = graph_model(GRAPHS["residual"])
        if prepared:
            from onnx_squeeze.prepare import PrepareSettings, prepare

            model, _ = prepare(model, PrepareSettings(simplify=False))
        gamma = np.abs(graph_model(GRAPHS["residual"]).graph.initializers["g1"].const_value.numpy())
        var = graph_model(GRAPHS["residual"]).graph.initializers["v1"].const_value.numpy()
        pruned, _ = _prune(model, ratio=0.5, criterion="bn_scale")
        values = {v.name: v for n in pruned.graph for v in n.outputs}
        kept = kept_channels(values["s"])["kept"]
        expected = np.sort(np.argsort(-(gamma / np.sqrt(var + 1e-5)))[:8])
        assert kept == expected.tolist(), prepared


@pytest.mark.parametrize("criterion", ["activation", "apoz"])
def test_activation_criteria_use_calibration_data(criterion: str, monkeypatch):
    model = zoo_model("resnet18", True)
    with pytest.raises(SettingsError, match="needs calibration data"):
        _prune(model, ratio=0.5, criterion=criterion)
    collected = _counted(monkeypatch, StatisticsCollector, "collect")
    source = RandomSource(runtime.input_specs(model), count=4, batch_size=2)
    context = PassContext(calibration=source)
    masked, _ = _prune(model, context, ratio=0.5, criterion=criterion, mode="zero")
    removed, report = _prune(model, context, ratio=0.5, criterion=criterion)
    assert report.changed and len(collected) == 1  # measured once for both
    assert_same_outputs(masked, removed, random_feeds(model, 1))


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "drop"},
        {"criterion": "taylor"},
        {"ratio": 1.0},
        {"ratio": 0.3, "macs_target": 0.3},
        {"macs_target": 0.3, "latency_target": 0.3},
        {"latency_target": 0.3, "latency_batch": 0},
        {"min_channels": 0},
        {"allocation": "greedy"},
        {"sensitivity_batches": 0},
        {"sensitivity_rounds": 0},
        {"colour": 1},
    ],
)
def test_bad_settings_say_how_to_fix(settings):
    with pytest.raises(SettingsError):
        PruneChannels(**settings)


def test_dynamic_batch_is_preserved_and_runs_at_other_batch_sizes():
    model = zoo_model("yolo", True)
    pruned, _ = _prune(model, ratio=0.5)
    assert not isinstance(pruned.graph.inputs[0].shape[0], int)
    (spec,) = runtime.input_specs(pruned)
    for batch in (1, 3):
        shape = (batch, *spec.concrete_shape()[1:])
        feed = runtime.random_feed([spec], np.random.default_rng(0), {spec.name: shape})
        assert all(output.shape[0] == batch for output in run(pruned, feed))


@pytest.mark.parametrize("prepared", [False, True], ids=["raw", "prepared"])
def test_removing_zero_head_channels_is_lossless(prepared: bool):
    model = zoo_model("transformer", prepared)  # hidden 32: 2 heads of 16 channels
    removed = _assert_removal_is_lossless(model, ratio=0.5)
    targets = {
        node.name: constant_array(node.inputs[1]).tolist()
        for node in removed.graph
        if node.op_type == "Reshape" and "attention" in node.name
    }
    prefix = "encoder.layer.0.attention.self"
    assert targets[f"{prefix}.query/Reshape"] == [0, -1, 2, 8]
    assert targets[f"{prefix}.value/Reshape"] == [0, -1, 2, 8]
    assert targets[f"{prefix}/Reshape"] == [0, -1, 16]
    weights = _initializers(removed)
    assert (
        weights[f"{prefix}.key.weight"].shape == weights[f"{prefix}.value.weight"].shape == (32, 16)
    )
    assert weights["encoder.layer.0.attention.output.dense.weight"].shape == (16, 32)


SYMBOLIC_SPATIAL = """
g (float[N, 8, H, W] x, float[32, 8, 3, 3] wa, float[4, 32, 1, 1] wc) => (float[N, 4, H, W] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, wa)
    ra = Relu (a)
    y = Conv (ra, wc)
}
"""


def test_macs_are_counted_at_the_datas_shapes_never_at_invented_ones(tmp_path):
    """A MACs target on a model with symbolic height and width: MACs are those of the
    calibration data's 12×10 maps; with no data and no --shape the pass stops and says so."""
    model = graph_model(SYMBOLIC_SPATIAL)
    for node in model.graph:
        node.name = node.outputs[0].name
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((5, 8, 12, 10)).astype(np.float32))
    recipe = Recipe.from_cli(["prune_channels:macs_target=0.3,allocation=uniform"])
    result = compress(model, recipe, calibration=str(tmp_path / "calib.npz"), compare=False)
    records = {r.node: r for r in result.reports[-1].records if r.action == "pruned"}
    assert records["a"].macs_before == 32 * 8 * 9 * 12 * 10
    assert records["y"].macs_before == 4 * 32 * 12 * 10
    with pytest.raises(ShapeUnknownError, match="never guessed"):
        PruneChannels(macs_target=0.3, allocation="uniform")(model.clone(), PassContext())
