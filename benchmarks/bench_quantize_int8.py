"""INT8 quantization against onnxruntime.quantization, side by side in one run.

Per model: our static QDQ (``quantize_int8``) vs ``quantize_static`` (QDQ, per-channel, same
calibration data and method; our defaults as a third row), and our ``quantize_dynamic`` vs
onnxruntime's. Each quantizer runs in its own subprocess (wall time and peak RSS at each
calibration size, and the samples it read: ours stops once its ranges settle); latency ratios vs FP32
are timed interleaved at 1 and 2 threads; cosine and top-1 agreement vs FP32 on 64 held-out inputs.

    python benchmarks/bench_quantize_int8.py --models resnet18 --samples 64 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap

import onnx_ir as ir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # children import from here
MODELS = ["resnet18", "resnet50", "mobilenetv2", "yolo", "transformer"]
SHAPES = {"transformer": {"input_ids": (1, 128)}}
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# Runs in a fresh interpreter: quantize MODEL into OUT with calibration data from CALIB (.npz).
_CHILD = """
import json, time, numpy as np

def peak_rss_mib():
    # VmHWM restarts at exec; ru_maxrss keeps the parent's peak across it on Linux
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")

start = time.perf_counter()
read = None  # calibration samples the quantizer read, where it says
{body}
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
                  "read": read}}))
"""
_OURS_STATIC = """
import onnx_ir as ir
from onnx_squeeze.calibration import NpzSource
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.records import PassContext
from onnx_squeeze.runtime import input_specs
model = ir.load({model!r})
source = NpzSource({calib!r}, input_specs(model), batch_size=1)
report = make_pass("quantize_int8", {settings!r})(model, PassContext(calibration=source))
ir.save(model, {out!r})
stopped = [n for n in report.notes if n.startswith("calibration read")]
read = int(stopped[0].split()[2]) if stopped else len(source)
"""
_OURS_DYNAMIC = """
import onnx_ir as ir
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.records import PassContext
model = ir.load({model!r})
make_pass("quantize_dynamic")(model, PassContext())
ir.save(model, {out!r})
"""
_ORT_STATIC = """
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat
from onnxruntime.quantization import quantize_static
from onnx_squeeze.calibration import NpzSource
from onnx_squeeze.runtime import input_specs
# the same streaming reader ours gets: one sample at a time from the file (indexing an NpzFile
# would read and copy a whole member for every sample, slowing onnxruntime down unfairly)
source = NpzSource({calib!r}, input_specs(ir.load({model!r})), batch_size=1)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.feeds = iter(source)
    def get_next(self):
        return next(self.feeds, None)
quantize_static({model!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                calibrate_method=CalibrationMethod.{ort_method})
read = len(source)
"""
_ORT_DYNAMIC = """
from onnxruntime.quantization import quantize_dynamic
quantize_dynamic({model!r}, {out!r})
"""


def _quantize(template: str, **fields: object) -> dict:
    code = _CHILD.format(body=textwrap.dedent(template.format(**fields)))
    result = common.run_isolated(f"import sys; sys.path.insert(0, {ROOT!r})\n" + code)
    return result["result"]


def _calibration_file(model: ir.Model, samples: int, name: str, folder: str) -> str:
    import numpy as np

    feeds = common.feeds(model, samples, seed=1, shapes=SHAPES.get(name))
    path = os.path.join(folder, f"calib_{samples}.npz")
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return path


def bench_model(name: str, samples: list[int], method: str, runs: int, folder: str) -> list:
    """Rows for one model: both static quantizers at each calibration size, both dynamic ones."""
    _, prepared = common.prepared_zoo_model(name)
    model_path = os.path.join(folder, f"{name}.onnx")
    ir.save(prepared, model_path)
    runs_done = []  # (quantizer, calibration samples, stats, output path)
    for count in samples:
        calib = _calibration_file(prepared, count, name, folder)
        static = [
            ("onnxruntime static", _ORT_STATIC, {}),
            (f"ours static ({method})", _OURS_STATIC, {"method": method}),
            ("ours static (defaults)", _OURS_STATIC, {}),
        ]
        for index, (label, template, settings) in enumerate(static):
            out = os.path.join(folder, f"{name}_static{index}_{count}.onnx")
            fields = {"ort_method": ORT_METHODS[method], "settings": settings}
            stats = _quantize(template, model=model_path, out=out, calib=calib, **fields)
            runs_done.append((label, count, stats, out))
    for label, template in (("onnxruntime dynamic", _ORT_DYNAMIC), ("ours dynamic", _OURS_DYNAMIC)):
        out = os.path.join(folder, f"{name}_{label.replace(' ', '_')}.onnx")
        runs_done.append((label, 0, _quantize(template, model=model_path, out=out), out))
    quality = _quality(name, prepared, [out for *_, out in runs_done], runs)
    return [
        [name, label, count, stats["read"], stats["seconds"], stats["peak_rss_mib"], *quality[out]]
        for label, count, stats, out in runs_done
    ]


def _quality(name: str, prepared: ir.Model, paths: list[str], runs: int) -> dict[str, list]:
    """Latency ratios vs FP32 (threads 1 and 2, interleaved), cosine and top-1 per model file."""
    models = [ir.load(path) for path in paths]
    test = common.feeds(prepared, 64, seed=7, shapes=SHAPES.get(name))
    ratios = []
    for threads in (1, 2):
        times = common.latency_ms([prepared, *models], test[0], threads, runs)
        ratios.append([t / times[0] for t in times[1:]])
    result = {}
    for index, (path, model) in enumerate(zip(paths, models, strict=True)):
        fidelity = common.fidelity(prepared, model, test)
        result[path] = [
            ratios[0][index],
            ratios[1][index],
            fidelity["cosine"],
            fidelity["top1_agreement"],
        ]
    return result


def _failure_row(name: str, error: Exception) -> list:
    """A row saying a model failed, so one broken model does not lose the others' figures."""
    message = str(error).strip().splitlines()[-1][:80] if str(error).strip() else repr(error)
    return [name, f"FAILED: {message}", None, None, None, None, None, None, None, None]


HEADERS = [
    "model",
    "quantizer",
    "calib samples",
    "samples read",
    "quantize s",
    "peak RSS MiB",
    "latency/FP32 t1",
    "latency/FP32 t2",
    "cosine",
    "top-1 agree",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--samples", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--method", default="minmax", choices=list(ORT_METHODS))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    rows = []
    meta = {"meta": common.meta(args.runs, [1, 2]), "method": args.method}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as folder:
        for name in args.models:
            try:
                rows += bench_model(name, args.samples, args.method, args.runs, folder)
            except Exception as error:  # report it and go on with the other models
                print(f"{name} failed: {error}", file=sys.stderr)
                rows.append(_failure_row(name, error))
            # written after every model, so a long run interrupted late keeps what it measured
            table = common.markdown_table(HEADERS, rows)
            common.write_results(
                "quantize_int8",
                "INT8 quantization vs onnxruntime.quantization",
                table,
                {**meta, "rows": rows},
            )
    print(table)
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
