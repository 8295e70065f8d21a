"""Weight-only quantization: INT4 blocks on the transformer, codebooks on ResNet-50.

    python benchmarks/bench_quantize_weights.py [--runs 20] [--threads 1,2] [--models ...]

Transformer (input 1x128): onnx-squeeze ``quantize_weights`` (MatMulNBits, RTN and GPTQ) side by
side with onnxruntime's ``MatMulNBitsQuantizer`` at the same bits, block size and symmetry.
ResNet-50: ``codebook`` with k-means and power-of-two levels. Every row gives the file size and
latency relative to the FP32 (prepared) model, timed interleaved in one process, and fidelity
on held-out inputs (GPTQ calibrates on other inputs).
"""

from __future__ import annotations

import time

import common
import onnx_ir as ir
from onnxruntime.quantization import matmul_nbits_quantizer

SHAPES = {"transformer": {"input_ids": (1, 128)}, "resnet50": None}
BLOCK_SIZE = 32
# (label, pass name, settings) per model
VARIANTS = {
    "transformer": [
        ("int4 rtn", "quantize_weights", {"bits": 4, "block_size": BLOCK_SIZE}),
        (
            "int4 gptq",
            "quantize_weights",
            {"bits": 4, "block_size": BLOCK_SIZE, "algorithm": "gptq"},
        ),
        ("int8 rtn", "quantize_weights", {"bits": 8, "block_size": BLOCK_SIZE}),
        ("codebook kmeans 4-bit", "codebook", {"levels": "kmeans", "bits": 4}),
    ],
    "resnet50": [
        ("codebook kmeans 8-bit", "codebook", {"levels": "kmeans", "bits": 8}),
        ("codebook kmeans 4-bit", "codebook", {"levels": "kmeans", "bits": 4}),
        ("codebook pow2 4-bit", "codebook", {"levels": "pow2", "bits": 4}),
    ],
}


def onnxruntime_int4(prepared: ir.Model) -> tuple[ir.Model, float]:
    """The peer: onnxruntime's MatMulNBitsQuantizer, RTN, asymmetric, same block size."""
    start = time.perf_counter()
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(
        ir.to_proto(prepared), bits=4, block_size=BLOCK_SIZE, is_symmetric=False
    )
    quantizer.process()
    return ir.from_proto(quantizer.model.model), time.perf_counter() - start


def bench_model(name: str, threads: list[int], runs: int) -> list[dict]:
    _, prepared = common.prepared_zoo_model(name)
    shapes = SHAPES[name]
    held_out = common.feeds(prepared, 4, seed=0, shapes=shapes)
    calibration = common.feeds(prepared, 16, seed=1, shapes=shapes)
    candidates = [
        (label, *common.timed_pass(prepared, pass_name, settings, calibration))
        for label, pass_name, settings in VARIANTS[name]
    ]
    if name == "transformer":
        candidates.append(("onnxruntime MatMulNBitsQuantizer int4", *onnxruntime_int4(prepared)))
    models = [prepared] + [model for _, model, _ in candidates]
    timings = {t: common.latency_ms(models, held_out[0], t, runs) for t in threads}
    rows = []
    for index, (label, model, seconds) in enumerate(candidates, start=1):
        rows.append(
            {
                "model": name,
                "variant": label,
                "seconds": seconds,
                **common.variant_row(prepared, model, timings, index, held_out, shapes),
            }
        )
    return rows


def markdown(rows: list[dict], threads: list[int]) -> str:
    headers = ["model", "variant", "size ×smaller", "time s"]
    headers += [f"latency ×t{t}" for t in threads] + ["cosine", "top-1 agree", "max abs"]
    table = [
        [
            row["model"],
            row["variant"],
            row["size_ratio"],
            row["seconds"],
            *(row["latency_ratio"][f"t{t}"] for t in threads),
            row["cosine"],
            row["top1_agreement"],
            row["max_abs"],
        ]
        for row in rows
    ]
    return (
        "Size = serialized FP32 (prepared) model / quantized model. Latency × = quantized / FP32 "
        "in the same run (lower is faster). Fidelity on 4 held-out random inputs (worst output); "
        "GPTQ calibrates on 16 other inputs. onnx-squeeze INT4 also quantizes the Gemm pooler "
        "and classifier, which onnxruntime's quantizer leaves in FP32. Codebook weights are "
        "decoded by a constant subgraph that onnxruntime folds at load: float speed.\n\n"
        + common.markdown_table(headers, table)
    )


def main(argv: list[str] | None = None) -> None:
    common.run_per_model(
        argv,
        __doc__,
        VARIANTS,
        "quantize_weights",
        "Weight-only quantization: INT4/INT8 blocks and codebooks",
        bench_model,
        markdown,
    )


if __name__ == "__main__":
    main()
