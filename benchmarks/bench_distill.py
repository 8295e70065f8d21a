"""Accuracy recovery by distillation (the ``reconstruct`` pass) on models trained on real data.

A residual CNN and an MLP are trained with PyTorch on scikit-learn's digits (8×8 images upsampled
to 32×32 for the CNN, 10 classes), exported to ONNX, then compressed through the public API
(``compress`` with a recipe, as users run it) with and without recovery; onnxsim 0.8's structured
pruning at the same MACs reduction stands beside ours. Reported: test accuracy, MACs and CPU
latency ratios against the original at batch 1 and at a throughput batch, 1 thread. Needs the
benchmark-only extras ``torch`` and ``scikit-learn``; rows whose pass is not installed are left
out with a note. ``--profile`` prints where the original and the combined pipeline spend time.

    python benchmarks/bench_distill.py [--runs 20] [--epochs 8] [--models cnn,mlp]
        [--rows combined,30%] [--profile]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.bench_prune_channels import onnxsim_for
from onnx_squeeze import calibration, runtime
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

IMAGE_SIZE = 32  # digits upsampled from 8×8: feature maps large enough for MACs to show
CNN_WIDTHS = (32, 64, 128)  # one stride-2 residual block per stage, after a stem at full size
TRAIN_THREADS = 2  # fixed so that the trained weights (and accuracies) are reproducible
THROUGHPUT_BATCH = 64

RECOVER = {"reconstruct": {}}
BIAS = {"reconstruct": {"methods": ["bias"]}}
INT8 = {"quantize_int8": {}}  # with its built-in bias correction
INT8_PLAIN = {"quantize_int8": {"bias_correction": False}}
INT8_TIMED = {"quantize_int8": {"speed_check": True}}  # layers float where INT8 times slower
# every calibration image, and more steps than the default 200: recovery from 70-80% pruning
FINETUNE = {"finetune": {"samples": 2048, "steps": 800}}
COMBINED_LABEL = "combined: prune 75% (reconstruction criterion) + recovery + finetune + INT8"
LATENCY_LABEL = (
    "combined, latency-steered: prune 70% of the time (timed) + recovery + finetune + INT8 "
    "speed-checked"
)


def _prune(share: float, **settings: Any) -> dict[str, Any]:
    return {"prune_channels": {"macs_target": share, **settings}}


def _low_rank(share: float) -> dict[str, Any]:
    return {"low_rank": {"macs_target": share}}


# (row label, recipe steps); None is the original, a float onnxsim at that MACs reduction
ROWS: list[tuple[str, list[dict[str, Any]] | float | None]] = [
    ("original", None),
    ("prune 30% MACs", [_prune(0.3)]),
    ("prune 30% MACs + recovery", [_prune(0.3), RECOVER]),
    ("onnxsim 0.8 pruning, 30% MACs", 0.3),
    ("prune 50% MACs", [_prune(0.5)]),
    ("prune 50% MACs + recovery", [_prune(0.5), RECOVER]),
    (
        "prune 50% (reconstruction criterion) + recovery",
        [_prune(0.5, criterion="reconstruction"), RECOVER],
    ),
    ("prune 50% MACs + recovery + finetune", [_prune(0.5), RECOVER, FINETUNE]),
    ("onnxsim 0.8 pruning, 50% MACs", 0.5),
    ("low-rank 50% MACs", [_low_rank(0.5)]),
    ("low-rank 50% MACs + recovery", [_low_rank(0.5), RECOVER]),
    ("INT8, no bias correction", [INT8_PLAIN]),
    ("INT8 + bias correction", [INT8]),
    (COMBINED_LABEL, [_prune(0.75, criterion="reconstruction"), RECOVER, FINETUNE, INT8]),
    (
        "combined, INT8 speed-checked at batch 1 (layers float where INT8 times slower)",
        [_prune(0.75, criterion="reconstruction"), RECOVER, FINETUNE, INT8_TIMED],
    ),
    (
        LATENCY_LABEL,
        [
            {"prune_channels": {"latency_target": 0.7, "criterion": "reconstruction"}},
            RECOVER,
            FINETUNE,
            INT8_TIMED,
        ],
    ),
    (
        "combined + low-rank: prune 75% + recovery + low-rank 20% + recovery + finetune + INT8",
        [
            _prune(0.75, criterion="reconstruction"),
            RECOVER,
            _low_rank(0.2),
            RECOVER,
            FINETUNE,
            INT8,
        ],
    ),
]


def load_digits(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [-0.5, 0.5] and resized to ``size`` (bilinear), split 2:1 into train and
    test with a fixed seed."""
    import torch
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy((digits.images / 16.0 - 0.5).astype(np.float32)[:, None])
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear")
    images = images.numpy()
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
    stem = CNN_WIDTHS[0]
    stages = [Block(a, b, 2) for a, b in zip((stem, *CNN_WIDTHS), CNN_WIDTHS, strict=False)]
    return nn.Sequential(
        nn.Conv2d(1, stem, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(CNN_WIDTHS[-1], 10),
    )


def train(kind: str, images: np.ndarray, labels: np.ndarray, epochs: int) -> ir.Model:
    """Train with Adam (one-cycle schedule) and light noise augmentation, seeded and on a fixed
    thread count; export to ONNX with a dynamic batch."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(TRAIN_THREADS)
    model = build_torch_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    batches = x.split(64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * len(batches)
    )
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            noisy = x[batch] + 0.05 * torch.randn_like(x[batch])
            loss = torch.nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
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
    return ir.from_proto(onnx.load_from_string(buffer.getvalue()))


def accuracy(model: ir.Model, images: np.ndarray, labels: np.ndarray) -> float:
    session = runtime.create_session(model)
    logits = session.run(None, {"input": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def compress_row(
    original: ir.Model, steps: list[dict[str, Any]], source: Any
) -> tuple[ir.Model | None, str]:
    """The compressed model, or None and why the row is left out (a pass not installed yet, or
    a backend it needs missing)."""
    try:
        result = compress(original, Recipe.from_dict(steps), calibration=source, compare=False)
    except SettingsError as error:
        return None, str(error).splitlines()[0]
    notes = [n for report in result.passes for n in report.notes if n.startswith("output error")]
    return result.model, "; ".join(notes)


def build_row(
    steps: list[dict[str, Any]] | float | None, original: ir.Model, prepared: ir.Model, source: Any
) -> tuple[ir.Model | None, str]:
    if steps is None:
        return prepared, ""
    if isinstance(steps, float):
        return onnxsim_for(prepared, steps, None, common.cost(prepared)["macs"]), ""
    return compress_row(original, steps, source)


def op_profile(model: ir.Model, feed: dict, runs: int = 20) -> list[tuple[str, float]]:
    """Share of kernel time per operator type, from onnxruntime's profiler (1 thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernels[event["args"]["op_name"]] += event["dur"]
    total = sum(kernels.values())
    return [(op, share / total) for op, share in kernels.most_common(6)]


def print_profiles(models: dict[str, ir.Model], feeds: dict[int, dict]) -> None:
    for label, model in models.items():
        for batch, feed in feeds.items():
            shares = ", ".join(f"{op} {share:.0%}" for op, share in op_profile(model, feed))
            print(f"  profile, {label}, batch {batch}: {shares}")


def run_model(kind: str, args: argparse.Namespace) -> list[list[Any]]:
    train_x, train_y, test_x, test_y = load_digits(IMAGE_SIZE if kind == "cnn" else 8)
    original = train(kind, train_x, train_y, args.epochs)
    prepared = compress(original, compare=False).model
    folder = tempfile.mkdtemp(prefix="bench-distill-")
    path = Path(folder) / "calibration.npz"
    np.savez(path, input=train_x[: args.calibration or None])
    source = calibration.open_source(str(path), original, batch_size=32)
    models, rows = {}, []
    for label, steps in ROWS:
        if label != "original" and not any(part in label for part in args.rows.split(",")):
            continue
        model, note = build_row(steps, original, prepared, source)
        print(f"  {kind}: {label}: {'left out, ' if model is None else ''}{note}", flush=True)
        if model is not None:
            models[label] = model
            rows.append([kind, label, accuracy(model, test_x, test_y), common.cost(model)["macs"]])
    feeds = {1: {"input": test_x[:1]}, THROUGHPUT_BATCH: {"input": test_x[:THROUGHPUT_BATCH]}}
    if args.profile:
        profiled = ("original", COMBINED_LABEL, LATENCY_LABEL)
        print_profiles({k: models[k] for k in profiled if k in models}, feeds)
    latencies = [
        common.latency_ms(list(models.values()), feed, threads=1, runs=args.runs)
        for feed in feeds.values()
    ]
    base_accuracy, base_macs = rows[0][2], rows[0][3]
    return [
        [kind, label, 100 * acc, 100 * (acc - base_accuracy), macs / base_macs]
        + [times[0] / times[index] for times in latencies]
        for index, (kind, label, acc, macs) in enumerate(rows)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--calibration", type=int, default=0, help="calibration samples (0: every training image)"
    )
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument(
        "--rows", default="", help="only rows whose label has one of these (printed, not saved)"
    )
    parser.add_argument("--profile", action="store_true", help="operator time shares")
    args = parser.parse_args()
    rows = [row for kind in args.models.split(",") for row in run_model(kind, args)]
    headers = [
        "model",
        "compression",
        "test acc %",
        "Δ points",
        "MACs ratio",
        "speed-up batch 1",
        f"speed-up batch {THROUGHPUT_BATCH}",
    ]
    table = common.markdown_table(headers, rows)
    print(table)
    if args.rows:  # a partial run would replace the committed table with its few rows
        return
    body = (
        f"scikit-learn digits (CNN on images upsampled to {IMAGE_SIZE}×{IMAGE_SIZE}), 599 test "
        f"images; recovery calibrated on {args.calibration or 'all'} training images (no labels). MACs "
        "relative to the original; speed-up = original latency / model latency, 1 thread, at "
        f"batch 1 and batch {THROUGHPUT_BATCH}. onnxsim's sparsity is searched for the same MACs "
        "reduction on the prepared (BatchNorm-folded) model; it has no recovery. Goals: ≤ 1 point "
        "lost at 30% MACs removed, ≤ 3 at 50%, combined ≥ 3× faster within 1 point.\n\n" + table
    )
    data_out = {"meta": common.meta(args.runs, [1]), "rows": rows, "headers": headers}
    print(common.write_results("distill", "Distillation: accuracy recovery", body, data_out))


if __name__ == "__main__":
    main()
