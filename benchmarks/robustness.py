"""Robustness sweep: real torch-exported models through the CLI, every main job, as a user runs it.

Builds small versions of common architectures in torch (random init), exports them with the
TorchScript exporter (``dynamo=False``, opset 17) and the default dynamo exporter (opset 18), with
a dynamic batch axis, then runs ``onnx-squeeze compress MODEL -o OUT <job> --calib random ...`` and
``onnx-squeeze inspect MODEL --groups`` on each. Every cell is classified:

- ``OK``: exit 0, the output passes the full checker, keeps its dynamic batch and runs in
  onnxruntime at batch 2;
- ``ERR``: exit 1 with a one-line message (a clear user error), or exit 3 (a gate);
- ``SLOW``: no answer within ``JOB_TIMEOUT_S`` (a hang, or a machine too busy: rerun alone);
- ``BUG``: exit 2 (internal error), exit 1 with a traceback, an output that fails the
  checker, lost its dynamic batch or does not run, or a lossless job (``none``) that changed the
  outputs.

Usage: ``python benchmarks/robustness.py [--models vit,bert] [--jobs none,int8] [--exporters ts17]``

``--hostile`` runs the hostile and malformed inputs of issue 23 instead
(:mod:`benchmarks.hostile_cases`, judged by :mod:`benchmarks.hostile_judge`) and prints the
closing note's table: cases tried, handled cleanly, exit 2 left, invalid outputs, files read
outside the model's folder (``--markdown FILE`` writes it; the committed one is
``benchmarks/results/robustness.md``). Without torch: ``python -m benchmarks.hostile_judge``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional

CACHE = Path(os.environ.get("ONNX_SQUEEZE_ROBUSTNESS_CACHE", tempfile.gettempdir())) / (
    "onnx_squeeze_robustness"
)
JOB_TIMEOUT_S = 600
LOSSLESS_COSINE = 0.99999
VOCAB = 100

JOBS: dict[str, list[str]] = {
    "none": [],
    "prune": ["--prune-channels", "0.3"],
    "prune+recover": ["--prune-channels", "0.3", "--recover"],
    "prune+finetune": ["--prune-channels", "0.3", "--recover", "--finetune", "20"],
    "prune-latency": ["--prune-channels", "latency=0.3"],
    "low-rank": ["--low-rank", "macs=0.3"],
    "prune-weights": ["--prune-weights", "0.5"],
    "2:4": ["--sparsity", "2:4"],
    "int8": ["--int8"],
    "int8-entropy": ["--int8", "--int8-method", "entropy"],
    "int8-dynamic": ["--int8-dynamic"],
    "fp16": ["--fp16"],
    "fp8": ["--fp8"],
    "int4": ["--int4"],
    "codebook": ["--codebook", "kmeans"],
    "fast": ["--recipe", "fast"],
    "inspect": [],
}

# label -> (use the dynamo exporter, opset)
EXPORTERS: dict[str, tuple[bool, int]] = {"ts17": (False, 17), "dyn18": (True, 18)}


# ---------------------------------------------------------------------------- torch models


def conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                act: type[nn.Module] = nn.ReLU) -> nn.Sequential:  # fmt: skip
    """Conv without bias, BatchNorm, activation: the block every exported CNN is made of."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: pooled 1x1 convs gate the channels (MobileNetV3, EfficientNet)."""

    def __init__(self, channels: int, squeezed: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise, optional SE, project 1x1, residual when shapes allow."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int, se: bool,
                 act: type[nn.Module], gate: type[nn.Module]):  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, 3, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, max(8, expanded // 4), nn.ReLU, gate))
        layers += [nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV3Small(nn.Module):
    """torchvision-like MobileNetV3-small, narrower: hardswish, SE with hardsigmoid, depthwise."""

    def __init__(self, classes: int = 10):
        super().__init__()
        hs, relu, hsig = nn.Hardswish, nn.ReLU, nn.Hardsigmoid
        self.features = nn.Sequential(
            conv_bn_act(3, 16, 3, 2, act=hs),
            InvertedResidual(16, 16, 16, 2, True, relu, hsig),
            InvertedResidual(16, 72, 24, 2, False, relu, hsig),
            InvertedResidual(24, 88, 24, 1, False, relu, hsig),
            InvertedResidual(24, 96, 40, 2, True, hs, hsig),
            InvertedResidual(40, 120, 40, 1, True, hs, hsig),
            conv_bn_act(40, 144, 1, act=hs),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(144, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class EfficientNetLite(nn.Module):
    """EfficientNet-B0-like MBConv stack: SiLU, SE with sigmoid, stochastic depth left out."""

    def __init__(self, classes: int = 10):
        super().__init__()
        silu, sig = nn.SiLU, nn.Sigmoid
        self.features = nn.Sequential(
            conv_bn_act(3, 32, 3, 2, act=silu),
            InvertedResidual(32, 32, 16, 1, True, silu, sig),
            InvertedResidual(16, 96, 24, 2, True, silu, sig),
            InvertedResidual(24, 144, 24, 1, True, silu, sig),
            InvertedResidual(24, 144, 40, 2, True, silu, sig),
            InvertedResidual(40, 240, 40, 1, True, silu, sig),
            conv_bn_act(40, 160, 1, act=silu),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(160, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class Bottleneck(nn.Module):
    """YOLOv8 bottleneck: two 3x3 convs with a shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = conv_bn_act(channels, channels, act=nn.SiLU)
        self.cv2 = conv_bn_act(channels, channels, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv, chunk in two, a chain of bottlenecks, concat of every stage."""

    def __init__(self, cin: int, cout: int, count: int = 1):
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = conv_bn_act(cin, 2 * self.hidden, 1, act=nn.SiLU)
        self.cv2 = conv_bn_act((2 + count) * self.hidden, cout, 1, act=nn.SiLU)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max pools concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1 = conv_bn_act(cin, cin // 2, 1, act=nn.SiLU)
        self.cv2 = conv_bn_act(cin * 2, cout, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.cv1(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([y0, y1, y2, self.pool(y2)], 1))


class Detect(nn.Module):
    """YOLOv8 detect head: box (DFL over reg_max bins) and class branches per level."""

    def __init__(self, channels: tuple[int, ...], classes: int = 8, reg_max: int = 8):
        super().__init__()
        self.classes, self.reg_max = classes, reg_max
        self.box = nn.ModuleList(
            nn.Sequential(conv_bn_act(c, 32, act=nn.SiLU), nn.Conv2d(32, 4 * reg_max, 1))
            for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(conv_bn_act(c, 32, act=nn.SiLU), nn.Conv2d(32, classes, 1))
            for c in channels
        )
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        batch = levels[0].shape[0]
        outs = [
            torch.cat([b(x), c(x)], 1) for x, b, c in zip(levels, self.box, self.cls, strict=True)
        ]
        flat = torch.cat([o.view(batch, 4 * self.reg_max + self.classes, -1) for o in outs], 2)
        box, cls = flat.split((4 * self.reg_max, self.classes), 1)
        anchors = box.shape[2]
        bins = box.view(batch, 4, self.reg_max, anchors).transpose(2, 1).softmax(1)
        distances = self.dfl(bins).view(batch, 4, anchors)
        return torch.cat([distances, cls.sigmoid()], 1)


class YoloV8n(nn.Module):
    """YOLOv8n-like detector: backbone with C2f, SPPF, FPN/PAN neck with Upsample, Detect."""

    def __init__(self):
        super().__init__()
        s = nn.SiLU
        self.stem = nn.Sequential(conv_bn_act(3, 16, 3, 2, act=s), conv_bn_act(16, 32, 3, 2, act=s))
        self.p3 = nn.Sequential(C2f(32, 32), conv_bn_act(32, 64, 3, 2, act=s), C2f(64, 64))
        self.p4 = nn.Sequential(conv_bn_act(64, 96, 3, 2, act=s), C2f(96, 96))
        self.p5 = nn.Sequential(conv_bn_act(96, 128, 3, 2, act=s), C2f(128, 128), SPPF(128, 128))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(128 + 96, 96)
        self.top_down3 = C2f(96 + 64, 64)
        self.down3 = conv_bn_act(64, 64, 3, 2, act=s)
        self.bottom_up4 = C2f(64 + 96, 96)
        self.down4 = conv_bn_act(96, 96, 3, 2, act=s)
        self.bottom_up5 = C2f(96 + 128, 128)
        self.detect = Detect((64, 96, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        t3 = self.top_down3(torch.cat([self.up(t4), p3], 1))
        b4 = self.bottom_up4(torch.cat([self.down3(t3), t4], 1))
        b5 = self.bottom_up5(torch.cat([self.down4(b4), p5], 1))
        return self.detect([t3, b4, b5])


class CRNN(nn.Module):
    """OCR: conv stack to a width sequence, bidirectional LSTM then GRU, Linear, log_softmax."""

    def __init__(self, classes: int = 37):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(1, 32), nn.MaxPool2d(2),
            conv_bn_act(32, 64), nn.MaxPool2d(2),
            conv_bn_act(64, 96), nn.MaxPool2d((2, 1)),
            conv_bn_act(96, 96), nn.MaxPool2d((4, 1)),
        )  # fmt: skip
        self.lstm = nn.LSTM(96, 48, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(96, 48, bidirectional=True, batch_first=True)
        self.head = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = self.features(x).squeeze(2).permute(0, 2, 1)
        sequence, _ = self.lstm(sequence)
        sequence, _ = self.gru(sequence)
        return functional.log_softmax(self.head(sequence), dim=2)


class ViTTiny(nn.Module):
    """ViT: patch conv, class token concat, position add, nn.TransformerEncoder, LayerNorm, head."""

    def __init__(self, dim: int = 64, patch: int = 8, image: int = 64, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, 4, dim * 2, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for weight in self.encoder.parameters():  # the layers are deep copies: make them differ
            if weight.dim() > 1:
                nn.init.xavier_uniform_(weight)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        encoded = self.norm(self.encoder(tokens + self.position))
        return self.head(encoded[:, 0])


class BertLayer(nn.Module):
    """Post-norm encoder layer with explicit q/k/v Linear, scaled matmul, softmax, erf GELU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, dim * 4), nn.Linear(dim * 4, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split_heads(f(x)) for f in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask_bias
        context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3)
        context = context.reshape(x.shape[0], x.shape[1], -1)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ff2(functional.gelu(self.ff1(x))))


class BertTiny(nn.Module):
    """BERT-like: token + position embeddings, attention mask, two explicit encoder layers."""

    def __init__(self, dim: int = 64, length: int = 32, classes: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(BertLayer(dim, 4) for _ in range(2))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class UNetSmall(nn.Module):
    """UNet: two downsamplings, ConvTranspose upsampling, skip Concats, 1x1 segmentation head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn_act(3, 16), conv_bn_act(16, 16))
        self.enc2 = nn.Sequential(conv_bn_act(16, 32), conv_bn_act(32, 32))
        self.middle = nn.Sequential(conv_bn_act(32, 64), conv_bn_act(64, 64))
        self.up2 = nn.ConvTranspose2d(64, 32, 2, 2)
        self.dec2 = nn.Sequential(conv_bn_act(64, 32), conv_bn_act(32, 32))
        self.up1 = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec1 = nn.Sequential(conv_bn_act(32, 16), conv_bn_act(16, 16))
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(functional.max_pool2d(e1, 2))
        m = self.middle(functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute to channels-last, normalize, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, Linear 4x, GELU, Linear, layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(functional.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    """ConvNeXt: patchify stem, LayerNorm2d + strided conv downsampling, pooled LayerNorm head."""

    def __init__(self, dims: tuple[int, ...] = (32, 64, 128), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for index, dim in enumerate(dims):
            if index:
                layers += [
                    LayerNorm2d(dims[index - 1], eps=1e-6),
                    nn.Conv2d(dims[index - 1], dim, 2, 2),
                ]
            layers += [ConvNeXtBlock(dim), ConvNeXtBlock(dim)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (or two strided branches), 1x1-dw-1x1, concat, channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride > 1 else cin // 2
        self.branch = nn.Sequential(
            conv_bn_act(branch_in, half, 1),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            conv_bn_act(half, half, 1),
        )  # fmt: skip
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                conv_bn_act(cin, half, 1),
            )
            if stride > 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            kept, x = x.chunk(2, 1)
        else:
            kept = self.shortcut(x)
        out = torch.cat([kept, self.branch(x)], 1)
        batch, channels, height, width = out.shape
        out = out.view(batch, 2, channels // 2, height, width).transpose(1, 2)
        return out.reshape(batch, channels, height, width)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2-like: channel split, channel shuffle by Reshape/Transpose, depthwise convs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1),
            ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
            ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1),
            conv_bn_act(96, 256, 1),
        )  # fmt: skip
        self.head = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1x1, grouped 3x3 (groups 4, not depthwise), 1x1, projection shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(cin, width, 1), conv_bn_act(width, width, 3, stride, groups=4),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride > 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(self.body(x) + self.shortcut(x))


class DenseLayer(nn.Module):
    """DenseNet layer: BN-ReLU-1x1-BN-ReLU-3x3 on the concatenation of everything before it."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class ResNeXtDense(nn.Module):
    """ResNeXt stages (grouped convs) then a DenseNet block and transition (pre-activation BN)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        dense = [DenseLayer(64 + 16 * i, 16) for i in range(3)]
        self.features = nn.Sequential(
            conv_bn_act(3, 32, 3, 2), ResNeXtBlock(32, 32, 64, 1), ResNeXtBlock(64, 64, 64, 2),
            *dense, nn.BatchNorm2d(112), nn.ReLU(), nn.Conv2d(112, 64, 1, bias=False),
            nn.AvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * weight, written out (Pow, ReduceMean, Sqrt)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, the half-split form (Slice, Neg, Concat)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class LlamaLayer(nn.Module):
    """Decoder layer: RMSNorm, grouped-query causal attention with rotary, SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = (
            nn.Linear(dim, 3 * dim, bias=False),
            nn.Linear(dim, 3 * dim, bias=False),
        )
        self.down = nn.Linear(3 * dim, dim, bias=False)
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = self.norm1(x)
        q = self.q(h).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.triu(torch.full((length, length), float("-inf")), 1)
        context = (scores + causal).softmax(-1) @ v
        x = x + self.o(context.transpose(1, 2).reshape(batch, length, dim))
        h = self.norm2(x)
        return x + self.down(functional.silu(self.gate(h)) * self.up(h))


class LlamaTiny(nn.Module):
    """Llama-like causal LM: embedding tied to the output projection, rotary, GQA, SwiGLU."""

    def __init__(self, dim: int = 64, length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(LlamaLayer(dim, 4, 2) for _ in range(2))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one initializer, two consumers
        inverse = 1.0 / 10000 ** (torch.arange(0, dim // 4, 2).float() / (dim // 4))
        angles = torch.outer(torch.arange(length).float(), inverse)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        length = input_ids.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


class SpeechEncoder(nn.Module):
    """Whisper/wav2vec-like audio encoder: Conv1d frontend with GELU and GroupNorm, transformer."""

    def __init__(self, mels: int = 40, dim: int = 64, classes: int = 30):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv1d(mels, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.GELU(),
            nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.GELU(),
        )  # fmt: skip
        layer = nn.TransformerEncoderLayer(
            dim, 4, dim * 4, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for weight in self.encoder.parameters():
            if weight.dim() > 1:
                nn.init.xavier_uniform_(weight)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.frontend(x).transpose(1, 2)))


@dataclass(frozen=True)
class ModelSpec:
    """A torch model and the inputs it is exported with (shapes at batch 1)."""

    constructor: Callable[[], nn.Module]
    inputs: dict[str, tuple[int, ...]]
    integer_inputs: tuple[str, ...] = ()

    def example(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Example inputs: token ids in range, a mask of ones, images from a normal law."""
        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for name, shape in self.inputs.items():
            shape = (batch, *shape[1:])
            if name == "attention_mask":
                tensors.append(torch.ones(shape, dtype=torch.int64))
            elif name in self.integer_inputs:
                tensors.append(torch.randint(0, VOCAB, shape, generator=generator))
            else:
                tensors.append(torch.randn(shape, generator=generator))
        return tuple(tensors)


MODELS: dict[str, ModelSpec] = {
    "mobilenetv3": ModelSpec(MobileNetV3Small, {"image": (1, 3, 64, 64)}),
    "efficientnet": ModelSpec(EfficientNetLite, {"image": (1, 3, 64, 64)}),
    "yolov8n": ModelSpec(YoloV8n, {"image": (1, 3, 64, 64)}),
    "crnn": ModelSpec(CRNN, {"image": (1, 1, 32, 64)}),
    "vit": ModelSpec(ViTTiny, {"image": (1, 3, 64, 64)}),
    "bert": ModelSpec(
        BertTiny, {"input_ids": (1, 32), "attention_mask": (1, 32)}, ("input_ids", "attention_mask")
    ),
    "unet": ModelSpec(UNetSmall, {"image": (1, 3, 64, 64)}),
    "convnext": ModelSpec(ConvNeXtTiny, {"image": (1, 3, 64, 64)}),
    "shufflenet": ModelSpec(ShuffleNetV2, {"image": (1, 3, 64, 64)}),
    "resnext-dense": ModelSpec(ResNeXtDense, {"image": (1, 3, 32, 32)}),
    "llama": ModelSpec(LlamaTiny, {"input_ids": (1, 32)}, ("input_ids",)),
    "speech": ModelSpec(SpeechEncoder, {"features": (1, 40, 100)}),
}


# ---------------------------------------------------------------------------- export


def trained_statistics(spec: ModelSpec) -> nn.Module:
    """The model in eval mode with BatchNorm statistics measured on random batches.

    Default BatchNorm statistics (mean 0, variance 1) shrink the activations of a random-init
    CNN layer after layer until its outputs no longer depend on the input (1e-7 variation), which
    makes every fidelity figure meaningless; measured statistics keep them normalized.
    """
    torch.manual_seed(0)
    module = spec.constructor()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None  # a cumulative average over the batches below
    module.train()
    with torch.no_grad():
        for seed in range(4):
            module(*spec.example(batch=8, seed=seed))
    return module.eval()


def export(name: str, exporter: str, folder: Path = CACHE) -> Path:
    """Export model ``name`` once into ``folder``, with a dynamic batch axis on inputs/outputs."""
    path = folder / f"{name}-{exporter}.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    spec = MODELS[name]
    module = trained_statistics(spec)
    example = spec.example(batch=2)  # batch 1 would be specialized to a static 1 by torch.export
    use_dynamo, opset = EXPORTERS[exporter]
    kwargs: dict = {"input_names": list(spec.inputs), "output_names": ["output"]}
    if use_dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in spec.inputs)
    else:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in [*spec.inputs, "output"]}
    temporary = path.with_suffix(".tmp.onnx")
    torch.onnx.export(module, example, str(temporary), opset_version=opset, dynamo=use_dynamo,
                      external_data=False, **kwargs)  # fmt: skip
    temporary.replace(path)
    return path


# ---------------------------------------------------------------------------- the sweep


@dataclass
class Outcome:
    """One model × job cell: the status, how long it took, why, and the fidelity."""

    status: str  # OK / ERR / BUG
    seconds: float
    detail: str = ""
    cosine: float | None = None


def batch_feed(model: onnx.ModelProto, spec: ModelSpec, batch: int = 2) -> dict[str, np.ndarray]:
    """Inputs at ``batch`` in the dtypes the (possibly converted) model declares."""
    tensors = dict(zip(spec.inputs, spec.example(batch), strict=True))
    feed = {}
    for value in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = tensors[value.name].numpy().astype(dtype)
    return feed


def run_model(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``path`` in onnxruntime (CPU, graph optimizations off, so none hide a bug)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two outputs, flattened, in float64."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def validate_output(original: Path, result: Path, spec: ModelSpec) -> tuple[str, float | None]:
    """Why ``result`` is broken ('' if it is fine) and its worst cosine to ``original`` at batch 2.

    The cosine compares the difference between the two samples of the batch: random-init models
    often have outputs dominated by a bias, which makes a plain cosine near 1 whatever happened.
    """
    model = onnx.load(str(result))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # any checker failure is the finding
        return f"checker: {str(error).splitlines()[0][:200]}", None
    static = [v.name for v in model.graph.input if not v.type.tensor_type.shape.dim[0].dim_param]
    if static:
        return f"batch dim no longer dynamic on {static}", None
    try:
        outputs = run_model(result, batch_feed(model, spec))
    except Exception as error:  # failing to run at batch 2 is the finding
        return f"ort batch 2: {str(error).splitlines()[0][:200]}", None
    reference = run_model(original, batch_feed(onnx.load(str(original)), spec))
    return "", min(
        cosine(a[1] - a[0], b[1] - b[0]) for a, b in zip(reference, outputs, strict=True)
    )


def last_line(text: str) -> str:
    """The last non-empty line of a command's output (its error message)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:240] if lines else ""


def run_cli(arguments: list[str]) -> tuple[int, str, float]:
    """Run ``python -m onnx_squeeze ARGUMENTS`` as a user would: exit code, output, seconds."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "onnx_squeeze", *arguments],
            capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"timeout after {JOB_TIMEOUT_S} s", time.perf_counter() - start
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def classify_exit(code: int, text: str) -> str:
    """OK/ERR/BUG from the exit code alone (a traceback behind exit 1 is a bug too)."""
    if code == 0:
        return "OK"
    if code in (1, 3) and "Traceback" not in text:
        return "ERR"
    return "SLOW" if code == -1 else "BUG"


def run_job(model: Path, spec: ModelSpec, job: str, folder: Path) -> Outcome:
    """Run one job on one model and check what it wrote."""
    if job == "inspect":
        code, text, seconds = run_cli(["inspect", str(model), "--groups"])
        return Outcome(classify_exit(code, text), seconds, last_line(text) if code else "")
    output, report = folder / f"{model.stem}-{job}.onnx", folder / f"{model.stem}-{job}.json"
    arguments = ["compress", str(model), "-o", str(output), "--calib", "random",
                 "--calib-count", "8", "--runs", "2", "--json", str(report), *JOBS[job]]  # fmt: skip
    code, text, seconds = run_cli(arguments)
    status = classify_exit(code, text)
    if status != "OK":
        return Outcome(status, seconds, f"exit {code}: {last_line(text)}")
    problem, batch2_cosine = validate_output(model, output, spec)
    if problem:
        return Outcome("BUG", seconds, problem)
    fidelity = json.loads(report.read_text())["comparison"]["fidelity"]
    reported = min(item["cosine"] for item in fidelity) if fidelity else None
    if job == "none" and min(batch2_cosine, reported or 1.0) < LOSSLESS_COSINE:
        return Outcome("BUG", seconds, f"lossless job changed outputs (cos {batch2_cosine:.6f})")
    notes = f"dcos@b2 {batch2_cosine:.4f}" if batch2_cosine is not None else ""
    return Outcome("OK", seconds, notes, reported)


def skipped_summary(report: Path) -> str:
    """'pass: N done, M skipped' per pass of a JSON report, to spot passes that do nothing."""
    if not report.exists():
        return ""
    parts = []
    for entry in json.loads(report.read_text())["passes"][1:]:
        records = entry.get("records", [])
        skipped = sum(1 for r in records if r["action"] == "skipped")
        parts.append(f"{entry['name']} {len(records) - skipped}/{len(records)}")
    return ", ".join(parts)


def sweep(models: list[str], jobs: list[str], exporters: list[str], folder: Path) -> list[dict]:
    """Every model × exporter × job; prints each row as it finishes."""
    rows = []
    for name in models:
        for exporter in exporters:
            try:
                path = export(name, exporter)
            except Exception as error:  # an export failure is torch's, noted
                print(f"{name}-{exporter}: export failed: {error}"[:200], flush=True)
                continue
            for job in jobs:
                outcome = run_job(path, MODELS[name], job, folder)
                done = skipped_summary(folder / f"{path.stem}-{job}.json")
                row = {"model": f"{name}-{exporter}", "job": job, **outcome.__dict__,
                       "passes": done}  # fmt: skip
                rows.append(row)
                cos = f"{outcome.cosine:.5f}" if outcome.cosine is not None else "-"
                print(f"{row['model']:<20} {job:<14} {outcome.status:<4} {outcome.seconds:6.1f}s "
                      f"cos {cos:<8} {outcome.detail} [{done}]", flush=True)  # fmt: skip
    return rows


def print_table(rows: list[dict], jobs: list[str]) -> None:
    """Model × job matrix of statuses, then every BUG and ERR with its message."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    cells = {(r["model"], r["job"]): r for r in rows}
    print("\n" + " " * 20 + "".join(f"{j[:9]:>10}" for j in jobs))
    for model in models:
        statuses = [cells[(model, j)]["status"] if (model, j) in cells else "-" for j in jobs]
        print(f"{model:<20}" + "".join(f"{s:>10}" for s in statuses))
    for row in rows:
        if row["status"] != "OK":
            print(f"{row['status']} {row['model']} {row['job']}: {row['detail']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("OK", "ERR", "SLOW", "BUG")}
    print(f"\n{counts}, {sum(r['seconds'] for r in rows):.0f} s in the CLI")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--hostile", action="store_true", help="run the hostile inputs instead")
    parser.add_argument("--markdown", help="with --hostile: write the table here")
    args = parser.parse_args()
    if args.hostile:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
        from benchmarks import hostile_judge

        hostile_judge.main(["--markdown", args.markdown] if args.markdown else [])
        return
    jobs = args.jobs.split(",")
    with tempfile.TemporaryDirectory() as folder:
        rows = sweep(args.models.split(","), jobs, args.exporters.split(","), Path(folder))
    print_table(rows, jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
