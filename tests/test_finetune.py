"""finetune pass and the torch graph evaluator: torch reproduces onnxruntime on the zoo models,
training a pruned model brings it closer to the teacher on held-out data, unknown ops and
quantized models are skipped untouched, and without PyTorch the pass says how to install it."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import zoo
from onnx_squeeze.calibration import NpzSource
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.graph_utils import constant_array
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.finetune import NO_TORCH_MESSAGE
from onnx_squeeze.pipeline import finalize
from onnx_squeeze.prepare import PrepareSettings, prepare
from onnx_squeeze.records import PassContext, PassReport
from onnx_squeeze.runtime import input_specs, random_feed
from tests.helpers import check, random_feeds, run


def _prepared(name: str) -> ir.Model:
    """A small zoo model, BN folded (onnxsim left out to keep the tests fast)."""
    model, _ = prepare(zoo.small(name), PrepareSettings(simplify=False))
    return model


def _feeds(model: ir.Model, count: int, seed: int, batch: int = 16) -> list[dict]:
    return random_feeds(model, count=count, seed=seed, batch=batch)


def _errors(model: ir.Model, teacher: ir.Model, feeds: list[dict]) -> tuple[float, float]:
    """Relative squared error and cosine of all outputs against the teacher's."""
    errors, spreads, dot, norm_s, norm_t = 0.0, 0.0, 0.0, 0.0, 0.0
    for feed in feeds:
        for t, s in zip(run(teacher, feed), run(model, feed), strict=True):
            t, s = t.astype(np.float64).ravel(), s.astype(np.float64).ravel()
            errors += float(np.square(s - t).sum())
            spreads += float(np.square(t - t.mean()).sum())
            dot, norm_s, norm_t = dot + float(s @ t), norm_s + float(s @ s), norm_t + float(t @ t)
    return errors / spreads, dot / np.sqrt(norm_s * norm_t)


def _finetune(student: ir.Model, teacher: ir.Model, feeds: list[dict], **settings) -> PassReport:
    report = make_pass("finetune", settings)(
        student, PassContext(calibration=feeds, teacher=teacher)
    )
    finalize(student)
    check(student)
    return report


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: constant_array(value) for name, value in model.graph.initializers.items()}


# ---------------------------------------------------------------------------------------------
# The evaluator


@pytest.mark.parametrize("name", zoo.NAMES)
def test_evaluator_reproduces_onnxruntime_on_zoo_models(name):
    torch = pytest.importorskip("torch")
    from onnx_squeeze.passes.finetune.torch_graph import TorchGraph

    model = zoo.small(name)
    if name == "resnet50":
        model, _ = prepare(model, PrepareSettings(simplify=False))  # the folded form, too
    specs = input_specs(model)
    shapes = {  # batch 3; other symbolic dimensions (sequence) 8
        spec.name: tuple(
            d if isinstance(d, int) else (3 if i == 0 else 8) for i, d in enumerate(spec.shape)
        )
        for spec in specs
    }
    feed = random_feed(specs, np.random.default_rng(3), shapes)
    with torch.no_grad():
        computed = TorchGraph(model)(feed)
    expected = run(model, feed)
    assert len(computed) == len(expected)
    for value, reference in zip(model.graph.outputs, expected, strict=True):
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(computed[value.name].numpy(), reference, atol=1e-4 * scale)


# Graphs whose float inputs named w* (and scale, bias) become random initializers; declared
# output shapes are placeholders.
OP_CASES = {
    "asymmetric pads, strides, dilations, groups": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4, 9, 9] x, float[6, 2, 3, 3] w) => (float[2, 6, 4, 4] y) {
            y = Conv <group = 2, pads = [0, 1, 2, 1], strides = [2, 2], dilations = [2, 1]> (x, w)
        }""",
    "SAME_UPPER conv, ceil-mode pools, count_include_pad": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 7, 7] x, float[3, 3, 2, 2] w) => (float[1, 3, 2, 2] y) {
            c = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, w)
            m = MaxPool <kernel_shape = [2, 2], ceil_mode = 1, strides = [2, 2],
                         pads = [0, 0, 1, 1]> (c)
            y = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (m)
        }""",
    "transposed conv, resize, pad, slices, gathers": """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 5, 5] x, float[4, 2, 3, 3] w) => (float[1, 2, 13, 9] y)
            <float[4] scales = {1.0, 1.0, 2.0, 2.0}, int64[8] pads = {0, 0, 1, 0, 0, 0, 1, 1},
            int64[2] starts = {-1, 0}, int64[2] ends = {-100, 9}, int64[2] axes = {2, 3},
            int64[2] steps = {-1, 1}, int64[1] index = {1}> {
            t = ConvTranspose <strides = [2, 2], pads = [1, 1, 0, 0], output_padding = [1, 1]> (x, w)
            r = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric",
                        nearest_mode = "floor"> (x, , scales)
            p = Pad <mode = "reflect"> (t, pads)
            s = Slice (p, starts, ends, axes, steps)
            u = Gather <axis = 1> (r, index)
            v = ReduceMax <keepdims = 1> (u)
            y = Add (s, v)
        }""",
    "activations, norms and shape ops": """
        <ir_version: 8, opset_import: ["" : 20]>
        g (float[2, 3, 4] x, float[4] scale, float[4] bias) => (float[2, 4, 3] y)
            <int64[1] one = {1}, int64[3] shape = {0, -1, 3}, int64[2] halves = {4, 4},
            float top = {1.0}, float[1] two = {2.0}> {
            a = LeakyRelu <alpha = 0.2> (x)
            b = HardSwish (a)
            c = HardSigmoid (x)
            d = Clip (b, , top)
            e = Gelu (c)
            f = LayerNormalization <axis = -1> (x, scale, bias)
            d_t = Transpose <perm = [0, 2, 1]> (d)
            f_t = Transpose <perm = [0, 2, 1]> (f)
            h = Softmax <axis = 1> (d_t)
            i = Unsqueeze (h, one)
            j = Squeeze (i, one)
            k = Concat <axis = 1> (j, f_t)
            m = Reshape (k, shape)
            o, p = Split <axis = 1> (m, halves)
            z = Greater (o, p)
            q = Where (z, o, p)
            e_t = Transpose <perm = [0, 2, 1]> (e)
            r = Sub (q, e_t)
            r2 = Abs (r)
            s = Pow (r2, two)
            y = LogSoftmax (s)
        }""",
}


def _with_random_weights(text: str) -> ir.Model:
    model = ir.from_proto(onnx.parser.parse_model(textwrap.dedent(text)))
    rng = np.random.default_rng(0)
    graph = model.graph
    for value in [v for v in graph.inputs if v.name.startswith("w") or v.name in ("scale", "bias")]:
        graph.inputs.remove(value)
        array = rng.normal(size=tuple(value.shape)).astype(np.float32)
        value.const_value = ir.tensor(array, name=value.name)
        graph.register_initializer(value)
    for value in graph.outputs:
        value.shape = ir.Shape([f"{value.name}{axis}" for axis in range(len(value.shape))])
    return model


@pytest.mark.parametrize("case", OP_CASES)
def test_evaluator_attribute_combinations(case):
    torch = pytest.importorskip("torch")
    from onnx_squeeze.passes.finetune.torch_graph import TorchGraph

    model = _with_random_weights(OP_CASES[case])
    check(model)
    feed = random_feeds(model, count=1, seed=1)[0]
    with torch.no_grad():
        computed = TorchGraph(model)(feed)
    expected = run(model, feed)
    for value, reference in zip(model.graph.outputs, expected, strict=True):
        assert computed[value.name].shape == reference.shape
        np.testing.assert_allclose(computed[value.name].numpy(), reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The pass


def _pruned(name: str, feeds: list[dict]) -> tuple[ir.Model, ir.Model]:
    """(teacher, student): the student has 30% of the MACs removed by L1 channel pruning."""
    teacher = _prepared(name)
    student = teacher.clone()
    context = PassContext(calibration=feeds, teacher=teacher)
    settings = {"macs_target": 0.3, "criterion": "l1", "allocation": "uniform"}
    make_pass("prune_channels", settings)(student, context)
    finalize(student)
    return teacher, student


def test_finetune_brings_a_pruned_model_closer_to_the_teacher():
    pytest.importorskip("torch")
    teacher, student = _pruned("resnet18", _feeds(zoo.small("resnet18"), 2, seed=0))
    calibration = _feeds(teacher, 4, seed=1, batch=32)
    held_out = _feeds(teacher, 2, seed=2)
    teacher_weights = _weights(teacher)
    error_before, cosine_before = _errors(student, teacher, held_out)
    shapes = [v.shape for v in student.graph.outputs]

    report = _finetune(student, teacher, calibration, steps=20, learning_rate=3e-4)

    error_after, cosine_after = _errors(student, teacher, held_out)
    assert error_after < 0.8 * error_before
    assert cosine_after > cosine_before
    assert [v.shape for v in student.graph.outputs] == shapes
    assert str(student.graph.inputs[0].shape[0]) == "N"  # dynamic batch kept
    assert run(student, _feeds(teacher, 1, seed=3, batch=3)[0])[0].shape == (3, 10)
    assert report.changed and all(r.action == "finetuned" for r in report.changed)
    assert any(note.startswith("loss on the training data") for note in report.notes)
    assert any("held-out fidelity" in note and "worse" not in note for note in report.notes)
    for name, array in _weights(teacher).items():  # the teacher's shared tensors are untouched
        np.testing.assert_array_equal(array, teacher_weights[name])


def _mlp_student() -> tuple[ir.Model, ir.Model]:
    """(teacher, student): the MLP with noise added to every weight of the student."""
    teacher = _prepared("mlp")
    student = teacher.clone()
    rng = np.random.default_rng(5)
    for name, value in student.graph.initializers.items():
        array = constant_array(value)
        value.const_value = ir.tensor(
            array + 0.3 * array.std() * rng.normal(size=array.shape).astype(np.float32), name=name
        )
    return teacher, student


def test_bias_norm_trains_biases_only():
    pytest.importorskip("torch")
    teacher, student = _mlp_student()
    before = _weights(student)
    report = _finetune(
        student,
        teacher,
        _feeds(teacher, 3, seed=1),
        train="bias_norm",
        steps=10,
        learning_rate=1e-2,
    )
    after = _weights(student)
    assert report.changed
    changed = {name for name in before if not np.array_equal(before[name], after.get(name))}
    assert changed and all(before[name].ndim == 1 for name in changed)


def test_labels_from_the_feeds_join_the_loss():
    pytest.importorskip("torch")
    teacher, student = _mlp_student()
    feeds = _feeds(teacher, 3, seed=1)
    report = _finetune(student.clone(), teacher, feeds, label_weight=1.0, steps=5)
    assert any("distillation only" in note for note in report.notes)
    rng = np.random.default_rng(0)
    labelled = [{**feed, "labels": rng.integers(0, 10, size=16)} for feed in feeds]
    report = _finetune(student, teacher, labelled, label_weight=1.0, steps=5)
    assert not any("distillation only" in note for note in report.notes)
    assert any(note.startswith("loss on the training data") for note in report.notes)


def test_labels_from_an_npz_calibration_file_join_the_loss(tmp_path):
    """An array named ``labels`` beside the inputs in the .npz changes what is trained; the
    other passes never see it."""
    pytest.importorskip("torch")
    teacher, student = _mlp_student()
    feeds = _feeds(teacher, 3, seed=1)
    name = teacher.graph.inputs[0].name
    path = tmp_path / "calib.npz"
    labels = np.random.default_rng(0).integers(0, 10, size=48)
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]), "labels": labels})
    source = NpzSource(path, input_specs(teacher), batch_size=16)
    assert all(set(feed) == {name} for feed in source)
    trained = {}
    for weight in (0.0, 1.0):
        model = student.clone()
        report = make_pass("finetune", {"label_weight": weight, "steps": 5})(
            model, PassContext(calibration=source, teacher=teacher)
        )
        assert not any("distillation only" in n or "no labels" in n for n in report.notes)
        trained[weight] = _weights(model)
    assert any(not np.array_equal(trained[0.0][k], trained[1.0][k]) for k in trained[0.0])


def test_unset_learning_rate_is_chosen_by_held_out_loss_after_trials(monkeypatch):
    """Each rate trains from the same start (trials leave the weights as they were), the lowest
    held-out loss wins, and the full run then trains at that rate."""
    pytest.importorskip("torch")
    from onnx_squeeze.passes.finetune import trainer

    teacher, student = _mlp_student()
    feeds = _feeds(teacher, 4, seed=1)
    trials, starts, full = [], [], []
    train = trainer.Trainer.train

    def recording_train(self, data, batch, rate, steps):
        starts.append([p.detach().clone() for p in self.parameters])
        (trials if steps < 10 else full).append(rate)
        train(self, data, batch, rate, steps)

    monkeypatch.setattr(trainer.Trainer, "train", recording_train)
    report = _finetune(student, teacher, feeds, steps=10)

    assert trials == list(trainer.LEARNING_RATES)
    for start in starts[1:]:
        for a, b in zip(starts[0], start, strict=True):
            assert bool((a == b).all())
    note = next(n for n in report.notes if n.startswith("learning rate"))
    losses = {
        float(k): float(v)
        for k, v in (p.split(": ") for p in note.split("(")[1].rstrip(")").split(", "))
    }
    assert full == [min(losses, key=losses.__getitem__)]
    assert note.startswith(f"learning rate {full[0]:g}: the lowest held-out loss after 2-step")


def test_given_learning_rate_skips_the_trials():
    pytest.importorskip("torch")
    teacher, student = _mlp_student()
    report = _finetune(student, teacher, _feeds(teacher, 3, seed=1), steps=5, learning_rate=1e-3)
    assert not any(n.startswith("learning rate") for n in report.notes)


def test_rate_warms_up_then_decays_to_zero():
    from onnx_squeeze.passes.finetune.trainer import one_cycle

    factors = [one_cycle(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] < 0.001
    assert one_cycle(0, 1) == 1.0  # a single step trains at the full rate


def test_guard_undoes_training_that_hurts():
    pytest.importorskip("torch")
    teacher, student = _mlp_student()
    feeds = _feeds(teacher, 3, seed=1)
    expected = run(student, feeds[0])
    report = _finetune(student, teacher, feeds, steps=5, learning_rate=50.0)
    assert any("worse, so the training was undone" in note for note in report.notes)
    assert not report.changed
    np.testing.assert_array_equal(run(student, feeds[0])[0], expected[0])


def test_shared_weight_stays_shared():
    pytest.importorskip("torch")
    teacher = _with_random_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, float[8, 8] w) => (float[N, 8] y) {
            h = MatMul (x, w)
            a = Relu (h)
            y = MatMul (a, w)
        }""")
    student = teacher.clone()
    value = student.graph.initializers["w"]
    value.const_value = ir.tensor(constant_array(value) * 1.2, name="w")
    feeds = _feeds(teacher, 3, seed=1)
    report = _finetune(student, teacher, feeds, steps=20, learning_rate=1e-2)
    assert report.changed
    assert list(student.graph.initializers) == ["w"]
    assert len(student.graph.initializers["w"].uses()) == 2


def test_unknown_op_is_skipped_and_the_model_left_unchanged():
    pytest.importorskip("torch")
    teacher = _with_random_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, float[8, 8] w) => (float[N, 8] y) {
            h = MatMul (x, w)
            y = Hardmax (h)
        }""")
    student = teacher.clone()
    before = _weights(student)
    report = make_pass("finetune")(
        student, PassContext(calibration=_feeds(teacher, 2, 0), teacher=teacher)
    )
    assert [(r.op_type, r.action) for r in report.records] == [("Hardmax", "skipped")]
    assert "Hardmax" in report.records[0].detail
    assert any("left unchanged" in note for note in report.notes)
    assert all(np.array_equal(before[name], array) for name, array in _weights(student).items())


def test_quantized_model_is_skipped():
    pytest.importorskip("torch")
    teacher = _with_random_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, float[8, 8] w) => (float[N, 8] y) <float s = {0.1}, uint8 z = {128}> {
            q = QuantizeLinear (x, s, z)
            d = DequantizeLinear (q, s, z)
            y = MatMul (d, w)
        }""")
    report = make_pass("finetune")(teacher.clone(), PassContext(teacher=teacher))
    assert {r.op_type for r in report.skipped} == {"QuantizeLinear", "DequantizeLinear"}
    assert any("run finetune before quantization" in note for note in report.notes)


def test_bad_settings_say_how_to_fix():
    pytest.importorskip("torch")
    with pytest.raises(SettingsError, match="train must be one of all, bias_norm"):
        make_pass("finetune", {"train": "weights"})
    with pytest.raises(SettingsError, match="held_out must be in"):
        make_pass("finetune", {"held_out": 1.0})
    with pytest.raises(SettingsError, match="learning_rate must be > 0"):
        make_pass("finetune", {"learning_rate": 0})
    with pytest.raises(SettingsError, match="learning_rate must be a number, got 'fast'"):
        make_pass("finetune", {"learning_rate": "fast"})
    # YAML reads 1e-3 (no dot) as text: a float setting takes it as the number
    assert make_pass("finetune", {"learning_rate": "1e-3"}).settings.learning_rate == 1e-3


def test_without_torch_the_pass_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(SettingsError) as error:
        make_pass("finetune")
    assert str(error.value) == NO_TORCH_MESSAGE


def test_the_package_and_its_passes_load_without_torch():
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from onnx_squeeze.passes import load_all; from onnx_squeeze.passes.base import make_pass\n"
        "load_all()\n"
        "try:\n    make_pass('finetune')\n"
        "except Exception as error:\n    print(type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"SettingsError {NO_TORCH_MESSAGE}"
