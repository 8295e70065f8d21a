"""YOLOv8 as ultralytics exports it: the raw head (``yolo``) and with its decode in the graph
(``yolo_detect``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_squeeze.zoo.builder import (
    RESIDUAL_GAMMA,
    Batch,
    Builder,
    as_float,
    check_classes,
    check_common,
    image_batch,
    make_divisible,
    repeats,
)

# --------------------------------------------------------------------------------------------
# YOLOv8
# --------------------------------------------------------------------------------------------

_YOLO_BN = {"epsilon": 1e-3, "momentum": 0.97}  # ultralytics: eps 1e-3, momentum 0.03


def _yolo_conv(
    b: Builder,
    prefix: str,
    x: ir.Value,
    channels: int,
    kernel: int,
    stride: int = 1,
    *,
    scale: float = 1.0,
) -> ir.Value:
    """ultralytics ``Conv``: Conv (no bias) -> BatchNormalization -> SiLU."""
    x = b.conv(f"{prefix}.conv", x, channels, kernel, stride)
    x = b.batch_norm(f"{prefix}.bn", x, scale=scale, **_YOLO_BN)
    return b.silu(f"{prefix}.act", x)


def _c2f(b: Builder, prefix: str, x: ir.Value, channels: int, count: int, shortcut: bool):
    """ultralytics ``C2f``: 1x1 conv, Split in halves, bottlenecks on the last piece, Concat."""
    hidden = channels // 2
    y = _yolo_conv(b, f"{prefix}.cv1", x, 2 * hidden, 1)
    split = b.const(f"{prefix}.split", np.array([hidden, hidden], dtype=np.int64))
    pieces = list(b.op_multi("Split", f"{prefix}/Split", [y, split], {"axis": 1}, num_outputs=2))
    for index in range(count):
        inner = f"{prefix}.m.{index}"
        z = _yolo_conv(b, f"{inner}.cv1", pieces[-1], hidden, 3)
        z = _yolo_conv(b, f"{inner}.cv2", z, hidden, 3, scale=RESIDUAL_GAMMA if shortcut else 1)
        if shortcut:
            z = b.op("Add", f"{inner}/Add", [pieces[-1], z])
        pieces.append(z)
    y = b.op("Concat", f"{prefix}/Concat", pieces, {"axis": 1})
    return _yolo_conv(b, f"{prefix}.cv2", y, channels, 1)


def _sppf(b: Builder, prefix: str, x: ir.Value, channels: int) -> ir.Value:
    """ultralytics ``SPPF``: 1x1 conv, MaxPool k5 three times in a chain, Concat, 1x1 conv."""
    hidden = b.channels(x) // 2
    pieces = [_yolo_conv(b, f"{prefix}.cv1", x, hidden, 1)]
    pool = {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [5, 5]}
    pool |= {"pads": [2, 2, 2, 2], "strides": [1, 1]}
    for index in range(3):
        suffix = "" if index == 0 else f"_{index}"
        pieces.append(b.op("MaxPool", f"{prefix}.m{suffix}", [pieces[-1]], pool))
    y = b.op("Concat", f"{prefix}/Concat", pieces, {"axis": 1})
    return _yolo_conv(b, f"{prefix}.cv2", y, channels, 1)


def _upsample(b: Builder, prefix: str, x: ir.Value) -> ir.Value:
    scales = b.const(f"{prefix}.scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    attrs = {
        "coordinate_transformation_mode": "asymmetric",
        "cubic_coeff_a": -0.75,
        "mode": "nearest",
        "nearest_mode": "floor",
    }
    return b.op("Resize", prefix, [x, None, scales], attrs)


_REG_MAX = 16  # ultralytics' DFL bins per box side
_YOLO_STRIDES = (8, 16, 32)
# yolo_detect's class conv is calibrated so that, on standard-normal images, this fraction of
# each level's anchors has a best class score above 0.5 (about 84 of 8400 anchors at 640: a few
# objects, each covered by several anchors, as a trained detector gives before NMS), and on
# small maps at least this fraction of images has one such anchor per level ...
_DETECT_FRACTION = 0.01
_DETECT_IMAGES = 0.25
# ... with class logits spread by this standard deviation around each class's mean, so that
# most scores stay near zero and the confident ones stand out.
_DETECT_LOGIT_STD = 3.0
# yolo_detect's box conv biases fall by this much per DFL bin, so that the expected distance
# per side is about 1.5 cells (boxes of roughly 25, 60 and 90 px at 640 on strides 8, 16, 32)
# rather than the 7.5 cells of flat bins (boxes 15 strides wide, far larger than small images).
_DFL_DECAY = 0.5


def _yolo_network(
    b: Builder,
    *,
    width: float,
    depth: float,
    image_size: int,
    num_classes: int,
    batch: Batch,
    head_names: Sequence[str] | None = None,
    decoded: bool = False,
) -> list[ir.Value]:
    """YOLOv8 backbone, neck and Detect head convs, shared by ``yolo`` and ``yolo_detect``.

    Returns the raw head per level (strides 8, 16, 32), [batch, 64 + num_classes, H, W],
    named ``head_names`` if given. ``decoded`` (for ``yolo_detect``) gives the final box convs
    the ``_DFL_DECAY`` prior and calibrates the final class convs by ``_calibrate_class_conv``;
    neither changes the random draws, so all other weights are those of ``yolo``.
    """
    c1, c2, c3, c4, c5 = (make_divisible(c * width) for c in (16, 32, 64, 128, 256))
    n_small, n_large = repeats(1, depth), repeats(2, depth)
    x = image_batch(b, "images", batch, image_size)
    x = _yolo_conv(b, "model.0", x, c1, 3, 2)
    x = _yolo_conv(b, "model.1", x, c2, 3, 2)
    x = _c2f(b, "model.2", x, c2, n_small, True)
    x = _yolo_conv(b, "model.3", x, c3, 3, 2)
    p3 = _c2f(b, "model.4", x, c3, n_large, True)
    b.keep(p3)
    x = _yolo_conv(b, "model.5", p3, c4, 3, 2)
    p4 = _c2f(b, "model.6", x, c4, n_large, True)
    b.keep(p3, p4)
    x = _yolo_conv(b, "model.7", p4, c5, 3, 2)
    x = _c2f(b, "model.8", x, c5, n_small, True)
    p5 = _sppf(b, "model.9", x, c5)
    b.keep(p3, p4, p5)
    # neck: top-down then bottom-up
    x = _upsample(b, "model.10", p5)
    x = b.op("Concat", "model.11", [x, p4], {"axis": 1})
    n4 = _c2f(b, "model.12", x, c4, n_small, False)
    b.keep(p3, n4, p5)
    x = _upsample(b, "model.13", n4)
    x = b.op("Concat", "model.14", [x, p3], {"axis": 1})
    out3 = _c2f(b, "model.15", x, c3, n_small, False)
    b.keep(out3, n4, p5)
    x = _yolo_conv(b, "model.16", out3, c3, 3, 2)
    x = b.op("Concat", "model.17", [x, n4], {"axis": 1})
    out4 = _c2f(b, "model.18", x, c4, n_small, False)
    b.keep(out3, out4, p5)
    x = _yolo_conv(b, "model.19", out4, c4, 3, 2)
    x = b.op("Concat", "model.20", [x, p5], {"axis": 1})
    out5 = _c2f(b, "model.21", x, c5, n_small, False)
    b.keep(out3, out4, out5)
    # Detect head, one per level: box branch (cv2) and class branch (cv3)
    box_channels = max(16, c3 // 4, _REG_MAX * 4)
    cls_channels = max(c3, min(num_classes, 100))
    box_bias = np.ones(4 * _REG_MAX)
    if decoded:
        box_bias = np.tile(-_DFL_DECAY * np.arange(_REG_MAX), 4)
    heads: list[ir.Value] = []
    for level, (feature, stride) in enumerate(zip((out3, out4, out5), _YOLO_STRIDES, strict=True)):
        box = _yolo_conv(b, f"model.22.cv2.{level}.0", feature, box_channels, 3)
        box = _yolo_conv(b, f"model.22.cv2.{level}.1", box, box_channels, 3)
        box = b.conv(f"model.22.cv2.{level}.2", box, 4 * _REG_MAX, 1, bias_value=box_bias)
        cls = _yolo_conv(b, f"model.22.cv3.{level}.0", feature, cls_channels, 3)
        cls = _yolo_conv(b, f"model.22.cv3.{level}.1", cls, cls_channels, 3)
        # ultralytics' prior: about 5 objects per 640x640 image
        prior = math.log(5 / num_classes / (640 / stride) ** 2)
        cls_bias = np.full(num_classes, prior)
        cls = b.conv(f"model.22.cv3.{level}.2", cls, num_classes, 1, bias_value=cls_bias)
        if decoded:
            _calibrate_class_conv(b, cls)
        outputs = [head_names[level]] if head_names else None
        concat = f"model.22/Concat_{level}"
        heads.append(b.op("Concat", concat, [box, cls], {"axis": 1}, outputs=outputs))
        b.keep(out3, out4, out5, *heads)
    return heads


def _calibrate_class_conv(b: Builder, logits: ir.Value) -> None:
    """Rescale and re-bias the final class conv that produced ``logits`` (in place, numpy
    calibration data included) so that its logits are spread by ``_DETECT_LOGIT_STD`` around
    each class's calibration mean, and ``_DETECT_FRACTION`` of the anchors (and at least one
    anchor in ``_DETECT_IMAGES`` of the images) have a best class logit above 0: a few
    confident detections per image, the rest background.
    """
    conv = logits.producer()
    assert conv is not None and conv.op_type == "Conv" and len(conv.inputs) == 3
    weight, bias = conv.inputs[1], conv.inputs[2]
    assert weight is not None and bias is not None
    old_bias = b.data(bias)
    raw = b.data(logits) - old_bias[None, :, None, None]  # the conv without its bias
    mean = raw.mean(axis=(0, 2, 3))
    centred = raw - mean[None, :, None, None]
    gain = _DETECT_LOGIT_STD / max(float(centred.std()), 1e-6)
    best = (gain * centred).max(axis=1)  # [images, H, W]: each anchor's best class
    shift = float(np.quantile(best, 1 - _DETECT_FRACTION))
    # on small maps (a few anchors per image) that could leave most images without any
    # detection: lower the threshold until a quarter of the images have one on this level
    shift = min(shift, float(np.quantile(best.max(axis=(1, 2)), 1 - _DETECT_IMAGES)))
    new_bias = as_float(-gain * mean - shift)
    weight.const_value = ir.Tensor(as_float(gain * b.data(weight)), name=weight.name)
    bias.const_value = ir.Tensor(new_bias, name=bias.name)
    b.set_data(logits, as_float(gain * raw + new_bias[None, :, None, None]))


def _anchor_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """ultralytics ``make_anchors`` (cell centres, offset 0.5) as exported: points [2, A] (x
    then y, row-major over each level's cells) and strides [1, A]."""
    points, strides = [], []
    for stride in _YOLO_STRIDES:
        cells = np.arange(image_size // stride) + 0.5
        y, x = np.meshgrid(cells, cells, indexing="ij")
        points.append(np.stack([x.ravel(), y.ravel()]))
        strides.append(np.full(x.size, stride))
    return as_float(np.concatenate(points, axis=1)), as_float(np.concatenate(strides)[None])


def _yolo_decode(
    b: Builder, heads: Sequence[ir.Value], image_size: int, num_classes: int
) -> ir.Value:
    """ultralytics ``Detect._inference`` as exported: the levels flattened and concatenated,
    DFL (softmax over 16 bins, expectation by a fixed 1x1 conv), ``dist2bbox`` to centre xywh
    in grid units, times the strides (pixels), class scores by Sigmoid. Returns ``output0``,
    [batch, 4 + num_classes, anchors]."""
    channels = 4 * _REG_MAX + num_classes
    flat_shape = b.const("model.22.flat_shape", np.array([0, channels, -1], dtype=np.int64))
    flat = [
        b.op("Reshape", f"model.22/Reshape_{level}", [head, flat_shape])
        for level, head in enumerate(heads)
    ]
    x = b.op("Concat", "model.22/Concat_3", flat, {"axis": 2})
    sizes = b.const("model.22.split", np.array([4 * _REG_MAX, num_classes], dtype=np.int64))
    box, cls = b.op_multi("Split", "model.22/Split", [x, sizes], {"axis": 1}, num_outputs=2)
    # DFL: [N, 64, A] -> [N, 4, 16, A] -> [N, 16, 4, A], softmax over the bins, expectation
    bins_shape = b.const("model.22.dfl.shape", np.array([0, 4, _REG_MAX, -1], dtype=np.int64))
    y = b.op("Reshape", "model.22.dfl/Reshape", [box, bins_shape])
    y = b.op("Transpose", "model.22.dfl/Transpose", [y], {"perm": [0, 2, 1, 3]})
    y = b.op("Softmax", "model.22.dfl/Softmax", [y], {"axis": 1})
    bins = np.arange(_REG_MAX, dtype=np.float32).reshape(1, _REG_MAX, 1, 1)
    conv = {"dilations": [1, 1], "group": 1, "kernel_shape": [1, 1]}
    conv |= {"pads": [0, 0, 0, 0], "strides": [1, 1]}
    y = b.op("Conv", "model.22.dfl.conv", [y, b.const("model.22.dfl.conv.weight", bins)], conv)
    sides_shape = b.const("model.22.dfl.out_shape", np.array([0, 4, -1], dtype=np.int64))
    distance = b.op("Reshape", "model.22.dfl/Reshape_1", [y, sides_shape])
    # dist2bbox(xywh=True, dim=1): left-top and right-bottom distances around the anchor points
    points, strides = _anchor_grid(image_size)
    anchors = b.const("model.22.anchors", points)
    halves = b.const("model.22.chunk", np.array([2, 2], dtype=np.int64))
    lt, rb = b.op_multi("Split", "model.22/Split_1", [distance, halves], {"axis": 1}, num_outputs=2)
    x1y1 = b.op("Sub", "model.22/Sub", [anchors, lt])
    x2y2 = b.op("Add", "model.22/Add", [anchors, rb])
    centre = b.op("Add", "model.22/Add_1", [x1y1, x2y2])
    two = b.const("model.22.two", np.array(2.0, dtype=np.float32))
    centre = b.op("Div", "model.22/Div", [centre, two])
    size = b.op("Sub", "model.22/Sub_1", [x2y2, x1y1])
    boxes = b.op("Concat", "model.22/Concat_4", [centre, size], {"axis": 1})
    boxes = b.op("Mul", "model.22/Mul", [boxes, b.const("model.22.strides", strides)])
    scores = b.op("Sigmoid", "model.22/Sigmoid", [cls])
    return b.op("Concat", "model.22/Concat_5", [boxes, scores], {"axis": 1}, outputs=["output0"])


def yolo(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 640,
    num_classes: int = 80,
    batch: Batch = "N",
) -> ir.Model:
    """YOLOv8 detector (width=depth=1 is YOLOv8n, 3.2M params; width=2 matches YOLOv8s):
    branching with Split/Concat, residual Adds, SPPF, nearest Resize and three heads.

    Input ``images`` float [batch, 3, image_size, image_size]. Outputs ``p3``, ``p4``, ``p5``
    (strides 8, 16, 32): the raw Detect head per level, [batch, 64 + num_classes, H, W]
    (64 = 4 box sides x 16 distribution bins, then class logits), before DFL decoding.
    """
    check_common("yolo", width, depth, batch, image_size)
    check_classes("yolo", num_classes)
    b = Builder(seed)
    names = ("p3", "p4", "p5")
    heads = _yolo_network(
        b,
        width=width,
        depth=depth,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
        head_names=names,
    )
    channels = 4 * _REG_MAX + num_classes
    outputs = [
        (head, [batch, channels, image_size // stride, image_size // stride])
        for head, stride in zip(heads, _YOLO_STRIDES, strict=True)
    ]
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model(outputs, name="yolo", settings=settings)


def yolo_detect(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 640,
    num_classes: int = 80,
    batch: Batch = "N",
) -> ir.Model:
    """YOLOv8 detector as ultralytics exports it: ``yolo``'s network followed by the decode
    in the graph (DFL softmax and fixed 1x1 conv, anchor points, ``dist2bbox``, strides,
    Sigmoid), so the one output mixes pixel boxes with [0, 1] scores.

    Input ``images`` float [batch, 3, image_size, image_size]. Output ``output0``
    [batch, 4 + num_classes, anchors] (anchors = 8400 at 640): rows 0-3 are box centre x, y,
    width, height in pixels, the rest class scores.

    Unlike ``yolo``, two things are set to look like a trained detector's output (all other
    weights equal ``yolo``'s). The final class convs (``model.22.cv3.*.2``) are calibrated on
    the standard-normal build images: weights rescaled so logits spread by 3 around each
    class's mean, biases set so that about 1% of each level's anchors (on tiny maps: at least
    one in a quarter of the images) score above 0.5 and most scores are near zero (seeded
    random weights with ultralytics' prior bias alone score every anchor near zero). The final
    box convs' biases (``model.22.cv2.*.2.bias``) fall by 0.5 per DFL bin, so boxes are a few
    strides wide, on the scale of the image, instead of 15.
    """
    check_common("yolo_detect", width, depth, batch, image_size)
    check_classes("yolo_detect", num_classes)
    b = Builder(seed)
    heads = _yolo_network(
        b,
        width=width,
        depth=depth,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
        decoded=True,
    )
    output = _yolo_decode(b, heads, image_size, num_classes)
    anchors = sum((image_size // stride) ** 2 for stride in _YOLO_STRIDES)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    outputs = [(output, [batch, 4 + num_classes, anchors])]
    return b.model(outputs, name="yolo_detect", settings=settings)
