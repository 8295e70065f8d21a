"""Does the default gate tell lost detections from kept ones on a detector exported with its
decode head?

The zoo's ``yolo_detect`` is YOLOv8n as ultralytics exports it: one output concatenating pixel
boxes with Sigmoid class scores. Each default pass runs on it through the CLI, calibrated on
standard-normal images (the distribution the zoo's weights were calibrated on; random data,
labelled as such) and judged on the held-out fifth. The task judge is independent of the tool's
metrics: the share of the original's detections (best class score > 0.25, as ultralytics'
default confidence) that the result keeps with the same class, and the new ones it invents.

    python benchmarks/detector_gate.py [--size 640] [--samples 40]

Writes ``benchmarks/results/detector_gate.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_squeeze import model_io, verdict, zoo

RESULTS = Path(__file__).parent / "results" / "detector_gate.md"
JOBS = {
    "int8": ["--int8"],
    "prune-channels 0.3": ["--prune-channels", "0.3"],
    "prune-weights 0.5": ["--prune-weights", "0.5"],
    "prune-weights 0.1": ["--prune-weights", "0.1"],
    "fp16": ["--fp16"],
    "none": [],
}
CONFIDENCE = 0.25


def detections(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and anchor: whether the best class scores above CONFIDENCE, and that class."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = np.concatenate([session.run(None, {"images": x[None]})[0] for x in images])[:, 4:]
    return scores.max(axis=1) > CONFIDENCE, scores.argmax(axis=1)


def judge(original: Path, result: Path, images: np.ndarray) -> tuple[float, int, int]:
    """Recall of the original's detections, their count, and the result's new ones."""
    (found, label), (kept, kept_label) = detections(original, images), detections(result, images)
    same = found & kept & (label == kept_label)
    return same.sum() / max(found.sum(), 1), int(found.sum()), int((kept & ~found).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="detector-gate-") as scratch:
        folder = Path(scratch)
        original = folder / "yolo_detect.onnx"
        model_io.save(zoo.build("yolo_detect", image_size=args.size), original)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
        np.savez(folder / "calib.npz", images=images)
        held_out = images[4::5]  # compress holds out every 5th batch of --calib
        for name, flags in JOBS.items():
            out, report = folder / "out.onnx", folder / "report.json"
            start = time.perf_counter()
            command = [sys.executable, "-m", "onnx_squeeze", "compress", str(original)]
            command += ["-o", str(out), *flags, "--calib", str(folder / "calib.npz")]
            command += ["--runs", "5", "--json", str(report)]
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                rows.append(f"| {name} | exit {done.returncode} | | | | | | | {seconds:.0f} |")
                continue
            data = json.loads(report.read_text())
            metrics = data["comparison"]["metrics"]
            recall, count, extra = judge(original, out, held_out)
            kept = recall >= 0.9 and extra <= 0.1 * count
            gate = next(g for g in data["gates"] if g["default"])
            agrees = (
                "ok" if kept == gate["passed"] else ("MISSED" if gate["passed"] else "FALSE ALARM")
            )
            rows.append(
                f"| {name} | {metrics['cosine']:.5f} | {metrics['worst_channel_sqnr_db']:.1f} | "
                f"{metrics.get('score_cosine', float('nan')):.3f} | {recall:.3f} of {count}, "
                f"+{extra} | {'kept' if kept else 'broken'} | "
                f"{'PASS' if gate['passed'] else 'FAIL'} | {agrees} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
    RESULTS.write_text(
        "# Default gate on the zoo detector with its decode head\n\n"
        f"`python benchmarks/detector_gate.py --size {args.size} --samples {args.samples}`: "
        f"zoo `yolo_detect` at {args.size}×{args.size} (YOLOv8n layout, random weights), "
        f"calibrated on {args.samples} standard-normal images (random data), judged on the "
        f"held-out {len(range(4, args.samples, 5))}. Task: the original's detections (best class "
        f"score > {CONFIDENCE}) kept with the same class; kept when recall ≥ 0.9 and new ones "
        f"≤ 10 %. Default gate: `{verdict.DEFAULT_GATE}`.\n\n"
        "| pass | cosine | worst channel SQNR dB | score cosine | detections kept | task | "
        "default gate | agrees | s |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
