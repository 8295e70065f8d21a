"""Accuracy recovery by distillation (the ``reconstruct`` pass) on models trained on real data.

A small residual CNN and an MLP are trained with PyTorch on scikit-learn's digits (8×8 images,
10 classes), exported to ONNX, then compressed with and without recovery. Reported: test accuracy,
MACs and CPU latency ratios against the original. Needs the benchmark-only extras ``torch`` and
``scikit-learn``; rows whose pass is not installed are left out with a note.

    python benchmarks/bench_distill.py [--runs 20] [--epochs 30] [--models cnn,mlp]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from onnx_squeeze import calibration, runtime
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

RECOVER = {"reconstruct": {}}
BIAS = {"reconstruct": {"methods": ["bias"]}}
INT8 = {"quantize_int8": {}}


def _prune(share: float) -> dict[str, Any]:
    return {"prune_channels": {"macs_target": share}}


def _low_rank(share: float) -> dict[str, Any]:
    return {"low_rank": {"macs_target": share}}


# (row label, recipe steps); None is the original
ROWS: list[tuple[str, list[dict[str, Any]] | None]] = [
    ("original", None),
    ("prune 30% MACs", [_prune(0.3)]),
    ("prune 30% MACs + recovery", [_prune(0.3), RECOVER]),
    ("prune 50% MACs", [_prune(0.5)]),
    ("prune 50% MACs + recovery", [_prune(0.5), RECOVER]),
    ("low-rank 50% MACs", [_low_rank(0.5)]),
    ("low-rank 50% MACs + recovery", [_low_rank(0.5), RECOVER]),
    ("INT8", [INT8]),
    ("INT8 + bias correction", [INT8, BIAS]),
    (
        "prune 50% + low-rank + recovery + INT8 + bias",
        [_prune(0.5), _low_rank(0.3), RECOVER, INT8, BIAS],
    ),
]


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits images scaled to [-0.5, 0.5], split 2:1 into train and test (fixed seed)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0 - 0.5).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    split = len(images) * 2 // 3
    train, test = order[:split], order[split:]
    return images[train], digits.target[train], images[test], digits.target[test]


def build_torch_model(kind: str) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, channels_in: int, channels: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.shortcut = nn.Identity()
            if stride != 1 or channels_in != channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                    nn.BatchNorm2d(channels),
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(kind: str, images: np.ndarray, labels: np.ndarray, epochs: int) -> ir.Model:
    """Train with Adam and light noise augmentation; export to ONNX with a dynamic batch."""
    import torch

    torch.manual_seed(0)
    model = build_torch_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            noisy = x[batch] + 0.05 * torch.randn_like(x[batch])
            loss = torch.nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (x[:1],),
        buffer,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        dynamo=False,
    )
    return ir.from_proto(__import__("onnx").load_from_string(buffer.getvalue()))


def accuracy(model: ir.Model, images: np.ndarray, labels: np.ndarray) -> float:
    session = runtime.create_session(model)
    logits = session.run(None, {"input": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def compress_row(
    original: ir.Model, steps: list[dict[str, Any]], source: Any
) -> tuple[ir.Model | None, str]:
    """The compressed model, or None and why the row is left out."""
    try:
        result = compress(original, Recipe.from_dict(steps), calibration=source)
    except SettingsError as error:
        return None, str(error)
    notes = [n for report in result.passes for n in report.notes if n.startswith("output error")]
    return result.model, "; ".join(notes)


def run_model(kind: str, args: argparse.Namespace, data: tuple) -> list[list[Any]]:
    train_x, train_y, test_x, test_y = data
    original = train(kind, train_x, train_y, args.epochs)
    folder = tempfile.mkdtemp(prefix="bench-distill-")
    path = Path(folder) / "calibration.npz"
    np.savez(path, input=train_x[: args.calibration])
    source = calibration.open_source(str(path), original, batch_size=32)
    models, rows = [], []
    for label, steps in ROWS:
        if steps is None:
            model, note = compress(original).model, ""
        else:
            model, note = compress_row(original, steps, source)
        if model is None:
            print(f"  {kind}: {label}: left out ({note})")
            continue
        print(f"  {kind}: {label}: {note}")
        models.append(model)
        rows.append([kind, label, accuracy(model, test_x, test_y), common.cost(model)["macs"]])
    latencies = common.latency_ms(models, {"input": test_x[:1]}, threads=1, runs=args.runs)
    base_accuracy, base_macs, base_latency = rows[0][2], rows[0][3], latencies[0]
    return [
        [kind, label, 100 * acc, 100 * (acc - base_accuracy), macs / base_macs, base_latency / ms]
        for (kind, label, acc, macs), ms in zip(rows, latencies, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=256, help="calibration samples")
    parser.add_argument("--models", default="cnn,mlp")
    args = parser.parse_args()
    data = load_digits()
    rows = [row for kind in args.models.split(",") for row in run_model(kind, args, data)]
    headers = ["model", "compression", "test acc %", "Δ points", "MACs ratio", "speed-up (1 thr)"]
    table = common.markdown_table(headers, rows)
    print(table)
    body = (
        f"scikit-learn digits, {len(data[2])} test images; recovery calibrated on "
        f"{args.calibration} training images (no labels). MACs and latency relative to the "
        "original; speed-up = original latency / model latency at batch 1.\n\n" + table
    )
    data_out = {"meta": common.meta(args.runs, [1]), "rows": rows, "headers": headers}
    print(common.write_results("distill", "Distillation: accuracy recovery", body, data_out))


if __name__ == "__main__":
    main()
