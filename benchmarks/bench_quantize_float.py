"""Float quantization: FP16 (CPU and GPU targets) and FP8 QDQ on ResNet-50 and the transformer.

    python benchmarks/bench_quantize_float.py [--runs 20] [--threads 1,2] [--models ...]

onnx-squeeze ``fp16`` side by side with ``onnxconverter_common.float16`` and
``onnxruntime.transformers.float16`` (all with FP32 inputs/outputs), and ``fp8`` (E4M3FN QDQ,
calibrated). Each row: file size and CPU latency relative to the FP32 (prepared) model, timed
interleaved in one process; Casts in the file and Casts onnxruntime's CPU EP runs after loading
it (it wraps every FP16 node without a CPU kernel in Casts); fidelity on held-out inputs.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable

import common
import onnx
import onnx_ir as ir

from onnx_squeeze import runtime
from onnx_squeeze.passes import fp8

SHAPES = {"resnet50": None, "transformer": {"input_ids": (1, 128)}}
# (label, pass name, settings, opset the model is converted to first)
VARIANTS = [
    ("fp16, CPU target", "fp16", {"provider": "cpu"}, None),
    ("fp16, GPU target", "fp16", {"provider": "cuda"}, None),
    ("bf16, GPU target", "fp16", {"provider": "cuda", "dtype": "bfloat16"}, None),
    ("fp8 E4M3FN QDQ", "fp8", {}, 19),
]


def onnxconverter_fp16(prepared: ir.Model) -> tuple[ir.Model, float]:
    """Peer: onnxconverter-common's float16 converter, FP32 inputs/outputs kept."""
    from onnxconverter_common import float16

    start = time.perf_counter()
    with warnings.catch_warnings():  # one warning per tiny weight it truncates
        warnings.simplefilter("ignore")
        proto = float16.convert_float_to_float16(ir.to_proto(prepared), keep_io_types=True)
    return ir.from_proto(proto), time.perf_counter() - start


def onnxruntime_fp16(prepared: ir.Model) -> tuple[ir.Model, float]:
    """Peer: onnxruntime.transformers' float16 converter, FP32 inputs/outputs kept."""
    from onnxruntime.transformers import float16

    start = time.perf_counter()
    proto = float16.convert_float_to_float16(ir.to_proto(prepared), keep_io_types=True)
    return ir.from_proto(proto), time.perf_counter() - start


PEERS: list[tuple[str, Callable[[ir.Model], tuple[ir.Model, float]]]] = [
    ("onnxconverter-common float16", onnxconverter_fp16),
    ("onnxruntime.transformers float16", onnxruntime_fp16),
]


def loaded_casts(model: ir.Model) -> tuple[int | None, str]:
    """Casts in the graph onnxruntime's CPU EP runs, or None and why it cannot load the model."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        try:
            runtime.create_session(model, optimized_model_path=path)
        except fp8.LOAD_ERRORS as error:
            return None, str(error).strip().splitlines()[0]
        return sum(node.op_type == "Cast" for node in onnx.load(path).graph.node), ""


def bench_model(name: str, threads: list[int], runs: int) -> list[dict]:
    _, prepared = common.prepared_zoo_model(name)
    shapes = SHAPES[name]
    held_out = common.feeds(prepared, 4, seed=0, shapes=shapes)
    calibration = common.feeds(prepared, 8, seed=1, shapes=shapes)
    candidates = [
        (label, *common.timed_pass(prepared, pass_name, settings, calibration, opset))
        for label, pass_name, settings, opset in VARIANTS
    ]
    candidates += [(label, *convert(prepared)) for label, convert in PEERS]
    loaded = {label: loaded_casts(model) for label, model, _ in candidates}
    runnable = [entry for entry in candidates if loaded[entry[0]][0] is not None]
    models = [prepared] + [model for _, model, _ in runnable]
    timings = {t: common.latency_ms(models, held_out[0], t, runs) for t in threads}
    position = {label: index for index, (label, _, _) in enumerate(runnable, start=1)}
    rows = []
    for label, model, seconds in candidates:
        rows.append(
            {
                "model": name,
                "variant": label,
                "seconds": seconds,
                "casts": sum(node.op_type == "Cast" for node in model.graph),
                "casts_loaded": loaded[label][0],
                "load_error": loaded[label][1],
                **common.variant_row(
                    prepared, model, timings, position.get(label), held_out, shapes
                ),
            }
        )
    return rows


def markdown(rows: list[dict], threads: list[int]) -> str:
    headers = ["model", "variant", "size ×smaller", "Casts in file", "Casts run (CPU)", "time s"]
    headers += [f"latency ×t{t}" for t in threads] + ["cosine", "top-1 agree", "max abs"]
    table = [
        [
            row["model"],
            row["variant"],
            row["size_ratio"],
            row["casts"],
            row["casts_loaded"],
            row["seconds"],
            *(row["latency_ratio"][f"t{t}"] for t in threads),
            row["cosine"],
            row["top1_agreement"],
            row["max_abs"],
        ]
        for row in rows
    ]
    failures = [
        f"- {row['model']}, {row['variant']}: {row['load_error']}"
        for row in rows
        if row["load_error"]
    ]
    return (
        "Size = serialized FP32 (prepared) model / converted model. Latency × = converted / FP32 "
        'on the CPU EP in the same run (lower is faster). "Casts run" counts the Casts in the '
        "graph onnxruntime's CPU EP executes after loading (it wraps FP16 nodes without a CPU "
        "kernel in Casts); – = onnxruntime cannot load it on CPU (listed below). "
        '"CPU target" keeps every op without a native CPU FP16 kernel in FP32 (on x86 almost '
        'all: a no-op); "GPU target" uses the CUDA block list (probed when CUDA is present). '
        "BF16 keeps Conv in FP32: ONNX gives Conv no bfloat16 type before opset 22. "
        "Fidelity on 4 held-out random inputs (worst output); FP8 calibrates on 8 other inputs.\n\n"
        + common.markdown_table(headers, table)
        + ("\n\nNot loadable by onnxruntime (CPU):\n" + "\n".join(failures) if failures else "")
    )


def main(argv: list[str] | None = None) -> None:
    common.run_per_model(
        argv,
        __doc__,
        SHAPES,
        "quantize_float",
        "Float quantization: FP16/BF16 and FP8",
        bench_model,
        markdown,
    )


if __name__ == "__main__":
    main()
