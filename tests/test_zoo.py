"""The reference models: valid, runnable with a dynamic batch, seeded, realistic where it matters."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import runtime, zoo
from onnx_squeeze.errors import SettingsError

CLASSIFIERS = ("resnet18", "resnet50", "mobilenetv2", "transformer", "mlp")
CONV_NETS = ("resnet18", "resnet50", "mobilenetv2", "yolo")
# every model, the exported-style ones too (only in this file: they are cheap to build small)
ALL = zoo.NAMES + zoo.EXPORTED
SEQUENCE = 16

_cache: dict[str, ir.Model] = {}


def small(name: str) -> ir.Model:
    """``zoo.small(name)``, built once per test session (tests only read it)."""
    if name not in _cache:
        _cache[name] = zoo.small(name)
    return _cache[name]


def parameter_count(model: ir.Model) -> int:
    """Trainable parameters as PyTorch counts them: weights and biases, not BN running stats."""
    return sum(
        value.const_value.size
        for name, value in model.graph.initializers.items()
        if name.endswith((".weight", ".bias"))
    )


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def feed(model: ir.Model, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    overrides = {}
    for spec in runtime.input_specs(model):
        rest = tuple(SEQUENCE if isinstance(d, str) else d for d in spec.shape[1:])
        overrides[spec.name] = (batch, *rest)
    return runtime.random_feed(runtime.input_specs(model), rng, overrides)


def expected_shape(value: ir.Value, batch: int) -> tuple[int, ...]:
    dims = value.shape.dims
    return (batch, *(SEQUENCE if not isinstance(d, int) else d for d in dims[1:]))


def run_with_intermediates(model: ir.Model, names: list[str], inputs: dict[str, np.ndarray]):
    """Run the model in onnxruntime (no graph optimizations) exposing intermediate values."""
    proto = ir.to_proto(model)
    infos = {info.name: info for info in proto.graph.value_info}
    proto.graph.output.extend(infos[name] for name in names)
    session = runtime.create_session(proto, "cpu", optimization="none")
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(None, inputs), strict=True))


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def test_names_have_builders_and_small_versions():
    assert zoo.NAMES == ("resnet18", "resnet50", "mobilenetv2", "yolo", "transformer", "mlp")
    for name in zoo.NAMES:
        assert callable(getattr(zoo, name))
        assert name in zoo._SMALL


def test_exported_models_are_buildable_but_kept_out_of_names():
    assert zoo.EXPORTED == ("yolo_detect",)
    assert not set(zoo.EXPORTED) & set(zoo.NAMES)
    for name in zoo.EXPORTED:
        assert callable(getattr(zoo, name))
        assert name in zoo._SMALL and name in zoo._BUILDERS


@pytest.mark.parametrize("call", [lambda: zoo.build("vgg16"), lambda: zoo.small("vgg16")])
def test_unknown_name_lists_the_known_ones(call):
    with pytest.raises(SettingsError, match="vgg16") as error:
        call()
    for name in ALL:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0.0},
        {"depth": -1.0},
        {"image_size": 33},
        {"num_classes": 0},
        {"batch": 0},
        {"batch": ""},
        {"no_such_knob": 1},
    ],
)
def test_invalid_settings_raise_settings_error(kwargs):
    with pytest.raises(SettingsError):
        zoo.build("resnet18", **{**zoo._SMALL["resnet18"], **kwargs})


# --------------------------------------------------------------------------------------------
# every model (small versions)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_full_checker_passes_and_opset_17(name):
    model = small(name)
    assert model.opset_imports == {"": 17}
    assert model.ir_version in (8, 9)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


@pytest.mark.parametrize("name", ALL)
def test_inputs_and_outputs_are_typed_with_symbolic_batch(name):
    model = small(name)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        assert value.dtype is not None and value.shape is not None
        assert str(value.shape.dims[0]) == "N"
    for node in model.graph:  # intermediate shapes are recorded, as exporters do
        for value in node.outputs:
            assert value.dtype is not None and value.shape is not None, value.name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch", [1, 3])
def test_runs_in_onnxruntime_with_dynamic_batch(name, batch):
    model = small(name)
    session = runtime.create_session(model, "cpu", optimization="none")
    expected_names = {
        "transformer": ["logits", "last_hidden_state"],
        "yolo": ["p3", "p4", "p5"],
        "yolo_detect": ["output0"],
    }.get(name, ["logits"])
    assert [o.name for o in session.get_outputs()] == expected_names
    outputs = session.run(None, feed(model, batch, np.random.default_rng(batch)))
    for value, array in zip(model.graph.outputs, outputs, strict=True):
        assert array.shape == expected_shape(value, batch)
        assert np.isfinite(array).all()


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_predictions_vary_with_the_input(name):
    model = small(name)
    session = runtime.create_session(model, "cpu", optimization="none")
    logits = session.run(["logits"], feed(model, 16, np.random.default_rng(7)))[0]
    assert len(set(logits.argmax(axis=1).tolist())) >= 3
    assert 0.3 < logits.std() < 10


@pytest.mark.parametrize("name", ALL)
def test_names_are_unique_and_follow_the_module_path(name):
    model = small(name)
    node_names = [node.name for node in model.graph]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "BatchNormalization", "LayerNormalization"):
            assert node.inputs[1].name == f"{node.name}.weight"


def test_resnet18_matches_torchvision_naming():
    model = small("resnet18")
    nodes = {node.name: node for node in model.graph}
    assert nodes["conv1"].op_type == "Conv"
    assert nodes["layer1.0.conv1"].inputs[1].name == "layer1.0.conv1.weight"
    assert nodes["layer2.0.downsample.1"].op_type == "BatchNormalization"
    assert nodes["fc"].op_type == "Gemm" and nodes["fc"].attributes["transB"].value == 1
    assert [n.op_type for n in model.graph][-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]


@pytest.mark.parametrize("name", ALL)
def test_seed_determines_the_weights(name):
    same = weights(zoo.small(name, seed=0))
    reference = weights(small(name))
    assert same.keys() == reference.keys()
    assert all(np.array_equal(same[k], reference[k]) for k in same)
    other = weights(zoo.small(name, seed=1))
    changed = [k for k in other if not np.array_equal(other[k], reference[k])]
    assert any(k.endswith(".weight") for k in changed)


# --------------------------------------------------------------------------------------------
# structure that compression passes rely on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONV_NETS)
def test_batchnorm_is_kept_after_bias_free_conv(name):
    model = small(name)
    norms = [node for node in model.graph if node.op_type == "BatchNormalization"]
    assert len(norms) >= 10
    for node in norms:
        producer = node.inputs[0].producer()
        assert producer is not None and producer.op_type == "Conv"
        assert len(producer.inputs) == 2, f"{producer.name} has a bias next to its BN"
        assert [v.name.rsplit(".", 1)[1] for v in node.inputs[1:]] == [
            "weight",
            "bias",
            "running_mean",
            "running_var",
        ]


def test_model_specific_structure():
    ops = {name: [node.op_type for node in small(name).graph] for name in zoo.NAMES}
    depthwise = [
        n
        for n in small("mobilenetv2").graph
        if n.op_type == "Conv" and n.attributes["group"].value > 1
    ]
    assert depthwise and all(n.attributes["group"].value == n.inputs[1].shape[0] for n in depthwise)
    assert "Clip" in ops["mobilenetv2"] and "Relu" not in ops["mobilenetv2"]
    for op in ("Split", "Concat", "Resize", "MaxPool", "Sigmoid", "Mul", "Add"):
        assert op in ops["yolo"], op
    for op in ("Gather", "Slice", "LayerNormalization", "Softmax", "Erf", "MatMul", "Transpose"):
        assert op in ops["transformer"], op
    assert set(ops["mlp"]) == {"Gemm", "Relu"}


@pytest.mark.parametrize("name", CONV_NETS)
def test_batchnorm_statistics_match_the_activations(name):
    """Running mean/var are what each conv produces on standard-normal images.

    Per-layer bounds are loose: on tiny feature maps (small YOLO's 2x2 stride-32 level)
    image-to-image variation dominates and 64 images estimate it only roughly.
    """
    model = small(name)
    norms = [node for node in model.graph if node.op_type == "BatchNormalization"]
    adds = [node.outputs[0].name for node in model.graph if node.op_type == "Add"]
    names = sorted({node.inputs[0].name for node in norms}) + adds
    values = run_with_intermediates(model, names, feed(model, 64, np.random.default_rng(3)))
    variances = []
    for node in norms:
        x = values[node.inputs[0].name]
        mean = node.inputs[3].const_value.numpy()[None, :, None, None]
        var = node.inputs[4].const_value.numpy()[None, :, None, None]
        z = (x - mean) / np.sqrt(var)
        assert np.abs(z.mean(axis=(0, 2, 3))).mean() < 0.3, node.name
        variances.append(np.median(z.var(axis=(0, 2, 3))))
        assert 0.4 < variances[-1] < 2.5, node.name
    assert 0.75 < np.mean(variances) < 1.33
    for add in adds:  # residual streams neither explode nor vanish
        assert 0.2 < np.sqrt(np.mean(values[add] ** 2)) < 5, add


@pytest.mark.parametrize("name", CONV_NETS)
def test_batchnorm_scales_vary_across_channels(name):
    model = small(name)
    for node in model.graph:
        gamma = node.inputs[1].const_value.numpy() if node.op_type == "BatchNormalization" else None
        if gamma is not None and gamma.size >= 32:
            magnitude = np.abs(gamma)
            assert magnitude.max() / magnitude.min() > 3, node.name
            assert np.abs(node.inputs[2].const_value.numpy()).max() < 1, node.name


# --------------------------------------------------------------------------------------------
# yolo_detect: the YOLOv8 network with ultralytics' in-graph decode
# --------------------------------------------------------------------------------------------

DECODE_OPS = [
    *["Reshape"] * 3,
    "Concat",
    "Split",
    "Reshape",  # DFL: [N, 64, A] -> [N, 4, 16, A]
    "Transpose",
    "Softmax",
    "Conv",
    "Reshape",
    "Split",  # dist2bbox: lt, rb
    "Sub",
    "Add",
    "Add",
    "Div",
    "Sub",
    "Concat",
    "Mul",  # strides
    "Sigmoid",
    "Concat",
]


def yolo_decode(heads: list[np.ndarray], image_size: int) -> np.ndarray:
    """ultralytics ``Detect._inference`` (DFL, make_anchors, dist2bbox xywh) in numpy."""
    x = np.concatenate([h.reshape(h.shape[0], h.shape[1], -1) for h in heads], axis=2)
    n, _, anchors = x.shape
    bins = x[:, :64].reshape(n, 4, 16, anchors).astype(np.float64)
    probs = np.exp(bins - bins.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    distance = (probs * np.arange(16)[None, None, :, None]).sum(axis=2)
    points, strides = [], []
    for stride in (8, 16, 32):
        cells = image_size // stride
        rows, cols = np.divmod(np.arange(cells * cells), cells)
        points.append(np.stack([cols + 0.5, rows + 0.5]))
        strides.append(np.full(cells * cells, stride))
    point, stride = np.concatenate(points, axis=1), np.concatenate(strides)
    x1y1, x2y2 = point - distance[:, :2], point + distance[:, 2:]
    boxes = np.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=1) * stride
    scores = 1 / (1 + np.exp(-x[:, 64:].astype(np.float64)))
    return np.concatenate([boxes, scores], axis=1)


def test_yolo_detect_is_yolo_followed_by_the_exported_decode():
    model, raw = small("yolo_detect"), small("yolo")
    ops = [node.op_type for node in model.graph]
    assert ops == [node.op_type for node in raw.graph] + DECODE_OPS
    (output,) = model.graph.outputs
    assert output.name == "output0"
    assert output.shape.dims[1:] == (4 + 4, 64 + 16 + 4)  # 4 classes; anchors at 64 px
    nodes = {node.name: node for node in model.graph}
    dfl = nodes["model.22.dfl.conv"].inputs[1].const_value.numpy()
    assert np.array_equal(dfl.ravel(), np.arange(16)) and dfl.shape == (1, 16, 1, 1)
    assert nodes["model.22.dfl/Softmax"].attributes["axis"].value == 1
    # the same seeded network: only the final box biases and class convs are set differently
    ours, theirs = weights(model), weights(raw)
    assert set(theirs) < set(ours)
    changed = {name for name in theirs if not np.array_equal(ours[name], theirs[name])}
    expected = {f"model.22.cv2.{level}.2.bias" for level in range(3)}
    expected |= {
        f"model.22.cv3.{level}.2.{part}" for level in range(3) for part in ("weight", "bias")
    }
    assert changed == expected


def test_yolo_detect_output_is_the_decode_of_its_heads():
    model = small("yolo_detect")
    heads = [f"model.22/Concat_{level}_output_0" for level in range(3)]
    values = run_with_intermediates(model, heads, feed(model, 2, np.random.default_rng(5)))
    expected = yolo_decode([values[name] for name in heads], image_size=64)
    np.testing.assert_allclose(values["output0"], expected, rtol=1e-5, atol=1e-4)


def test_yolo_detect_mixes_pixel_boxes_with_mostly_background_scores():
    model = small("yolo_detect")
    session = runtime.create_session(model, "cpu", optimization="none")
    (output,) = session.run(None, feed(model, 4, np.random.default_rng(0)))
    assert output.shape == (4, 8, 84)
    boxes, scores = output[:, :4], output[:, 4:]
    # boxes: pixels, centres mostly inside the 64 x 64 image, sizes at most 30 strides (DFL)
    strides = np.repeat([8, 16, 32], [64, 16, 4])
    centres, sizes = boxes[:, :2], boxes[:, 2:]
    assert np.mean((centres >= 0) & (centres <= 64)) > 0.9
    assert (sizes > 0).all() and np.mean(sizes > 4) > 0.9
    assert (sizes <= 30 * strides + 1e-3).all()
    assert 4 < np.median(np.abs(boxes)) < 64
    # scores: probabilities, most anchors background, a few confident detections
    assert (scores >= 0).all() and (scores <= 1).all()
    assert np.mean(scores < 0.05) > 0.9
    assert scores.max() > 0.25
    best = scores.max(axis=1)  # per anchor
    assert 0 < np.mean(best > 0.25) < 0.2


# --------------------------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.NAMES)
def test_width_scales_parameters(name):
    settings = zoo._SMALL[name]
    base = parameter_count(small(name))
    wider = parameter_count(zoo.build(name, **{**settings, "width": 2 * settings["width"]}))
    assert 1.8 < wider / base < 4.5


@pytest.mark.parametrize("name", zoo.NAMES)
def test_depth_scales_blocks(name):
    settings = zoo._SMALL[name]
    base = small(name)
    deeper = zoo.build(name, **{**settings, "depth": 3 * settings["depth"]})
    assert parameter_count(deeper) > parameter_count(base)
    assert len(list(deeper.graph)) > len(list(base.graph))
    shallowest = zoo.build(name, **{**settings, "depth": 0.01})  # at least one block per stage
    assert parameter_count(shallowest) <= parameter_count(base)


def test_resnet_blocks_follow_depth():
    def blocks(model):
        return sum(node.name.endswith(".conv1") for node in model.graph)

    settings = zoo._SMALL["resnet18"]
    assert blocks(small("resnet18")) == 4
    assert blocks(zoo.build("resnet18", **{**settings, "depth": 1.0})) == 8


def test_fixed_batch_and_other_sizes():
    model = zoo.build("resnet18", **{**zoo._SMALL["resnet18"], "batch": 2, "image_size": 64})
    assert model.graph.inputs[0].shape.dims == (2, 3, 64, 64)
    session = runtime.create_session(model, "cpu", optimization="none")
    feed_ = runtime.random_feed(runtime.input_specs(model), np.random.default_rng(0))
    assert session.run(None, feed_)[0].shape == (2, 10)


# --------------------------------------------------------------------------------------------
# full-size models
# --------------------------------------------------------------------------------------------


def test_full_resnet18_has_torchvision_parameter_count():
    model = zoo.resnet18()
    assert parameter_count(model) == 11_689_512  # torchvision.models.resnet18()
    session = runtime.create_session(model, "cpu", optimization="none")
    (logits,) = session.run(None, feed(model, 1, np.random.default_rng(0)))
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("resnet50", 25_557_032),  # torchvision.models.resnet50()
        ("mobilenetv2", 3_504_872),  # torchvision.models.mobilenet_v2()
        ("yolo", 3_157_192),  # YOLOv8n without the (fixed) DFL conv
        ("transformer", None),
    ],
)
def test_full_size_parameter_counts(name, count):
    model = zoo.build(name)
    if count is None:  # BERT-style: embeddings, 6 layers of d=384, pooler, classifier
        d, vocab, positions, layers, classes = 384, 1000, 128, 6, 10
        per_layer = 4 * (d * d + d) + 2 * 4 * d * d + 5 * d + 2 * 2 * d
        count = (vocab + positions) * d + 2 * d + layers * per_layer + d * d + d + d * classes
        count += classes
    assert parameter_count(model) == count
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    session = runtime.create_session(model, "cpu", optimization="none")
    outputs = session.run(None, feed(model, 1, np.random.default_rng(0)))
    assert all(np.isfinite(array).all() for array in outputs)
