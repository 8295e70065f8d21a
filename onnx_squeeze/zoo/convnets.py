"""ResNet-18/50 and MobileNetV2 as torchvision exports them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnx_squeeze.zoo.builder import (
    RESIDUAL_GAMMA,
    Batch,
    Builder,
    check_classes,
    check_common,
    image_batch,
    make_divisible,
    repeats,
)

# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


def _basic_block(b: Builder, prefix: str, x: ir.Value, planes: int, stride: int) -> ir.Value:
    out = b.conv(f"{prefix}.conv1", x, planes, 3, stride)
    out = b.batch_norm(f"{prefix}.bn1", out)
    out = b.op("Relu", f"{prefix}.relu", [out])
    out = b.conv(f"{prefix}.conv2", out, planes, 3)
    out = b.batch_norm(f"{prefix}.bn2", out, scale=RESIDUAL_GAMMA)
    identity = _shortcut(b, prefix, x, planes, stride)
    out = b.op("Add", f"{prefix}/Add", [out, identity])
    out = b.op("Relu", f"{prefix}.relu_1", [out])
    b.keep(out)
    return out


def _bottleneck(b: Builder, prefix: str, x: ir.Value, planes: int, stride: int) -> ir.Value:
    out = b.conv(f"{prefix}.conv1", x, planes, 1)
    out = b.batch_norm(f"{prefix}.bn1", out)
    out = b.op("Relu", f"{prefix}.relu", [out])
    out = b.conv(f"{prefix}.conv2", out, planes, 3, stride)  # stride on the 3x3 (ResNet v1.5)
    out = b.batch_norm(f"{prefix}.bn2", out)
    out = b.op("Relu", f"{prefix}.relu_1", [out])
    out = b.conv(f"{prefix}.conv3", out, planes * 4, 1)
    out = b.batch_norm(f"{prefix}.bn3", out, scale=RESIDUAL_GAMMA)
    identity = _shortcut(b, prefix, x, planes * 4, stride)
    out = b.op("Add", f"{prefix}/Add", [out, identity])
    out = b.op("Relu", f"{prefix}.relu_2", [out])
    b.keep(out)
    return out


def _shortcut(b: Builder, prefix: str, x: ir.Value, channels: int, stride: int) -> ir.Value:
    if stride == 1 and b.channels(x) == channels:
        return x
    down = b.conv(f"{prefix}.downsample.0", x, channels, 1, stride)
    return b.batch_norm(f"{prefix}.downsample.1", down)


def _resnet(
    name: str,
    block: Callable[[Builder, str, ir.Value, int, int], ir.Value],
    layers: Sequence[int],
    *,
    width: float,
    depth: float,
    seed: int,
    image_size: int,
    num_classes: int,
    batch: Batch,
) -> ir.Model:
    check_common(name, width, depth, batch, image_size)
    check_classes(name, num_classes)
    b = Builder(seed)
    x = image_batch(b, "input", batch, image_size)
    x = b.conv("conv1", x, make_divisible(64 * width), 7, 2)
    x = b.batch_norm("bn1", x)
    x = b.op("Relu", "relu", [x])
    pool = {"ceil_mode": 0, "dilations": [1, 1], "kernel_shape": [3, 3]}
    x = b.op("MaxPool", "maxpool", [x], {**pool, "pads": [1, 1, 1, 1], "strides": [2, 2]})
    for stage, (count, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
        for index in range(repeats(count, depth)):
            stride = 2 if stage > 0 and index == 0 else 1
            x = block(b, f"layer{stage + 1}.{index}", x, make_divisible(planes * width), stride)
    x = b.op("GlobalAveragePool", "avgpool", [x])
    x = b.op("Flatten", "flatten", [x], {"axis": 1})
    logits = b.linear("fc", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name=name, settings=settings)


def resnet18(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision ResNet-18 (BasicBlock, [2, 2, 2, 2]): the common CNN baseline, 11.7M params.

    Input ``input`` float [batch, 3, image_size, image_size], output ``logits``.
    """
    return _resnet(
        "resnet18",
        _basic_block,
        (2, 2, 2, 2),
        width=width,
        depth=depth,
        seed=seed,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
    )


def resnet50(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision ResNet-50 (Bottleneck v1.5, [3, 4, 6, 3]): 1x1-3x3-1x1 blocks, 25.6M params.

    Input ``input`` float [batch, 3, image_size, image_size], output ``logits``.
    """
    return _resnet(
        "resnet50",
        _bottleneck,
        (3, 4, 6, 3),
        width=width,
        depth=depth,
        seed=seed,
        image_size=image_size,
        num_classes=num_classes,
        batch=batch,
    )


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------

# expansion t, channels c, repeats n, first stride s (torchvision's table)
_MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _inverted_residual(
    b: Builder, prefix: str, x: ir.Value, out_channels: int, stride: int, expansion: int
) -> ir.Value:
    in_channels = b.channels(x)
    hidden = in_channels * expansion
    residual = stride == 1 and in_channels == out_channels
    out, layer = x, 0
    if expansion != 1:
        out = b.conv(f"{prefix}.conv.0.0", out, hidden, 1)
        out = b.batch_norm(f"{prefix}.conv.0.1", out)
        out = b.relu6(f"{prefix}.conv.0.2", out)
        layer = 1
    out = b.conv(f"{prefix}.conv.{layer}.0", out, hidden, 3, stride, group=hidden)
    out = b.batch_norm(f"{prefix}.conv.{layer}.1", out)
    out = b.relu6(f"{prefix}.conv.{layer}.2", out)
    out = b.conv(f"{prefix}.conv.{layer + 1}", out, out_channels, 1)
    scale = RESIDUAL_GAMMA if residual else 1.0
    out = b.batch_norm(f"{prefix}.conv.{layer + 2}", out, scale=scale)
    if residual:
        out = b.op("Add", f"{prefix}/Add", [x, out])
    b.keep(out)
    return out


def mobilenetv2(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    image_size: int = 224,
    num_classes: int = 1000,
    batch: Batch = "N",
) -> ir.Model:
    """torchvision MobileNetV2: inverted residuals with depthwise convs and ReLU6 (``Clip``),
    the case where depthwise groups and linear bottlenecks matter. 3.5M params.

    ``width`` also scales the final 1x1 conv (1280 channels at width 1).
    """
    check_common("mobilenetv2", width, depth, batch, image_size)
    check_classes("mobilenetv2", num_classes)
    b = Builder(seed)
    x = image_batch(b, "input", batch, image_size)
    x = b.conv("features.0.0", x, make_divisible(32 * width), 3, 2)
    x = b.batch_norm("features.0.1", x)
    x = b.relu6("features.0.2", x)
    index = 1
    for expansion, channels, count, first_stride in _MOBILENETV2_SETTINGS:
        for repeat in range(repeats(count, depth)):
            stride = first_stride if repeat == 0 else 1
            out_channels = make_divisible(channels * width)
            x = _inverted_residual(b, f"features.{index}", x, out_channels, stride, expansion)
            index += 1
    x = b.conv(f"features.{index}.0", x, make_divisible(1280 * width), 1)
    x = b.batch_norm(f"features.{index}.1", x)
    x = b.relu6(f"features.{index}.2", x)
    x = b.op("GlobalAveragePool", "avgpool", [x])
    x = b.op("Flatten", "flatten", [x], {"axis": 1})
    logits = b.linear("classifier.1", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, image_size=image_size, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name="mobilenetv2", settings=settings)
