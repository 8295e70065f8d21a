"""Does the default gate tell lost detections from kept ones on a detector exported with its
decode head, and do the defaults keep the detections next to onnxruntime's quantizer?

The zoo's ``yolo_detect`` is YOLOv8n as ultralytics exports it: one output concatenating pixel
boxes with Sigmoid class scores. Each default pass runs on it through the CLI, calibrated on
standard-normal images (the distribution the zoo's weights were calibrated on; random data,
labelled as such) and judged on the held-out fifth. The task judge is independent of the tool's
metrics: the share of the original's detections (best class score > 0.25, as ultralytics'
default confidence) that the result keeps with the same class, and the new ones it invents.
onnxruntime's ``quantize_static`` (QDQ, per channel, MinMax, on the same calibration batches)
runs beside INT8 twice: on all ops, and on Conv/MatMul only (its best working variant on
detectors). Every result is judged by ``compare`` on the held-out fifth, and all are timed
interleaved with the original in one process at the end (1 thread).

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

from onnx_squeeze import comparison, model_io, verdict, zoo

RESULTS = Path(__file__).parent / "results" / "detector_gate.md"
JOBS = {
    "int8": ["--int8"],
    "prune-channels 0.3 + recovery": ["--prune-channels", "0.3"],
    "prune-channels 0.5 + recovery": ["--prune-channels", "0.5"],
    "prune-weights 0.5": ["--prune-weights", "0.5"],
    "prune-weights 0.1": ["--prune-weights", "0.1"],
    "fp16": ["--fp16"],
    "none": [],
}
CONFIDENCE = 0.25
PEERS = {
    "ort quantize_static (all ops)": None,
    "ort quantize_static (Conv/MatMul only)": ["Conv", "MatMul"],
}
_ORT_STATIC = """
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
images = np.load({calib!r})["images"]
kept = [x for i, x in enumerate(images) if i % 5 != 4]  # the batches compress calibrates on
class Reader(CalibrationDataReader):
    def __init__(self):
        self.feeds = iter({{"images": x[None]}} for x in kept)
    def get_next(self):
        return next(self.feeds, None)
quantize_static({model!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                op_types_to_quantize={op_types!r})
"""


# Why no INT8 keeps this detector's task (measured at 320 px on these images, INT8 with accuracy
# control off; the per-block figures calibrated on all 20 images). Written under the table.
WHY_INT8_BREAKS = """\
**Why INT8 breaks this detector.** Its activations do not explode through depth: every backbone
and neck Conv output has an RMS of 0.57-1.7 (SPPF's 4.5) and |x| ≤ 25; the class logits span
-59…12. But the random-weight network amplifies relative noise: Gaussian noise on the *input
alone* of the float model at 40 dB SQNR (about what 8 bits give one tensor) keeps 0.885 of the
detections and invents 17 (30 dB: 0.51, +43; 50 dB: 0.906, +7; 60 dB: 0.948, +2; 80 dB: all),
because it moves the deciding logits by 1.36 RMS while the detections' median margin above the
0.25 threshold is 2.75. INT8 adds 25-45 dB of noise at each of 230 tensors, so no INT8 scheme
survives (onnxruntime's keeps 0.23 and invents 105). The damage is not in the class branch:
INT8 of one block alone loses the task at every depth (stem model.0: 0.54, +51; model.2: 0.17,
+16; model.4: 0.45, +40; SPPF: 0.55, +7; neck model.15: 0.85, +4), the whole head (box and
class branches) alone keeps 0.885 (+7), everything but the head 0.094 (+32), and the three
final class Convs left float change nothing (0.115, +31). So accuracy control cannot hold the
gate within 10 % of the MACs in float, and it says so after its first step: the worst score
channel's SQNR of one model differs by 84 dB between its two sets of 4 random batches (one
invented detection at a near-zero reference score decides it), more than any one layer gains.
"""


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


def _compress(original: Path, out: Path, flags: list[str], calib: Path) -> dict | str:
    """Our job through the CLI: its JSON report, or why it failed."""
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "onnx_squeeze", "compress", str(original), "-o", str(out)]
    command += [*flags, "--calib", str(calib), "--runs", "5", "--json", str(report)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(report.read_text())


def _peer(original: Path, out: Path, op_types: list[str] | None, calib: Path) -> dict | str:
    """onnxruntime's quantize_static, judged by our ``compare`` on the held-out fifth."""
    code = _ORT_STATIC.format(
        model=str(original), out=str(out), calib=str(calib), op_types=op_types
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    report = out.with_suffix(".json")
    held = calib.with_name("held.npz")
    command = [sys.executable, "-m", "onnx_squeeze", "compare", str(original), str(out)]
    command += ["--inputs", str(held), "--runs", "5", "--json", str(report)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        return f"compare exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--runs", type=int, default=20, help="interleaved latency runs")
    args = parser.parse_args()
    rows, timed = [], []
    with tempfile.TemporaryDirectory(prefix="detector-gate-") as scratch:
        folder = Path(scratch)
        original = folder / "yolo_detect.onnx"
        model_io.save(zoo.build("yolo_detect", image_size=args.size), original)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32)
        calib = folder / "calib.npz"
        np.savez(calib, images=images)
        held_out = images[4::5]  # compress holds out every 5th batch of --calib
        np.savez(folder / "held.npz", images=held_out)
        jobs = [(name, "ours", flags) for name, flags in JOBS.items()]
        jobs += [(name, "peer", op_types) for name, op_types in PEERS.items()]
        for index, (name, kind, spec) in enumerate(jobs):
            out = folder / f"out{index}.onnx"
            start = time.perf_counter()
            if kind == "ours":
                data = _compress(original, out, spec, calib)
            else:
                data = _peer(original, out, spec, calib)
            seconds = time.perf_counter() - start
            if isinstance(data, str):
                rows.append([name, data, *[""] * 9, f"{seconds:.0f}"])
                print(rows[-1], flush=True)
                continue
            metrics = data["comparison"]["metrics"]
            recall, count, extra = judge(original, out, held_out)
            kept = recall >= 0.9 and extra <= 0.1 * count
            gate = next(g for g in data["gates"] if g["default"])
            agrees = (
                "ok" if kept == gate["passed"] else ("MISSED" if gate["passed"] else "FALSE ALARM")
            )
            size = out.stat().st_size / original.stat().st_size
            rows.append(
                [
                    name,
                    f"{metrics['cosine']:.5f}",
                    f"{metrics['worst_channel_sqnr_db']:.1f}",
                    f"{metrics.get('score_cosine', float('nan')):.3f}",
                    f"{recall:.3f} of {count}, +{extra}",
                    "kept" if kept else "broken",
                    "PASS" if gate["passed"] else "FAIL",
                    agrees,
                    f"{size:.3f}",
                    None,  # latency ratio, timed below with every result interleaved
                    f"{seconds:.0f}",
                ]
            )
            timed.append((len(rows) - 1, out))
            print(rows[-1], flush=True)
        models = [model_io.load(original)] + [model_io.load(path) for _, path in timed]
        feed = {"images": images[:1]}
        times = comparison.latency(models, feed, provider="cpu", threads=1, runs=args.runs)
        for (row, _), timing in zip(timed, times[1:], strict=True):
            rows[row][9] = f"{timing.median_ms / times[0].median_ms:.3f}"
    table = "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    RESULTS.write_text(
        "# The zoo detector with its decode head: defaults, the default gate and onnxruntime\n\n"
        f"`python benchmarks/detector_gate.py --size {args.size} --samples {args.samples}`: "
        f"zoo `yolo_detect` at {args.size}×{args.size} (YOLOv8n layout, random weights), "
        f"calibrated on {args.samples} standard-normal images (random data), judged on the "
        f"held-out {len(held_out)}. Task: the original's detections (best class "
        f"score > {CONFIDENCE}) kept with the same class; kept when recall ≥ 0.9 and new ones "
        f"≤ 10 %. Default gate: `{verdict.DEFAULT_GATE}`. Latency: median of {args.runs} runs, "
        f"1 thread, every result interleaved with the original (FP32 "
        f"{times[0].median_ms:.1f} ms); onnxruntime {ort.__version__}.\n\n"
        "| pass | cosine | worst channel SQNR dB | score cosine | detections kept | task | "
        "default gate | agrees | size ratio | latency ratio | s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + table + "\n\n" + WHY_INT8_BREAKS
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
