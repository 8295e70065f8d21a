"""Peak memory and time of every pass on a full-size model, each in its own process.

The architecture goal: no pass needs more than 1 GB on ResNet-50 (a 98 MB model). Each row is
``compress`` with one recipe, calibrated on random standard-normal images (what the zoo's
BatchNorm statistics are fitted to), of the model saved to a file as a user's would be, without
the comparison; the first rows are the floor (loading the model, then preparing it). Peak RSS is read from /proc in the child
(``common.self_peak_rss_mib``). The model loaded to shape the random data is dropped before
``compress``, which loads the file itself as the CLI does.

    python benchmarks/pass_memory.py [--model resnet50] [--samples 16] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, markdown_table, meta, run_isolated, write_results

from onnx_squeeze import model_io, zoo

GOAL_MIB = 1024

# (label, recipe steps); None builds the model only.
JOBS: list[tuple[str, list | None]] = [
    ("load the model (floor)", None),
    ("prepare only", []),
    ("prune_weights", ["prune_weights"]),
    ("prune_channels 30 % MACs", [{"prune_channels": {"macs_target": 0.3}}]),
    ("low_rank 30 % MACs", [{"low_rank": {"macs_target": 0.3}}]),
    ("low_rank 30 % MACs, data-aware", [{"low_rank": {"macs_target": 0.3, "data_aware": True}}]),
    ("reconstruct after prune_weights", ["prune_weights", "reconstruct"]),
    ("quantize_int8", ["quantize_int8"]),
    ("quantize_dynamic", ["quantize_dynamic"]),
    ("fp16", ["fp16"]),
    ("fp8 (opset 19)", ["fp8"]),
    ("quantize_weights INT4", [{"quantize_weights": {"bits": 4}}]),
    ("quantize_weights INT4, GPTQ", [{"quantize_weights": {"bits": 4, "algorithm": "gptq"}}]),
    ("codebook", ["codebook"]),
    ("recipe fast", "fast"),
]

_CODE = """
import json, sys, time
sys.path.insert(0, {bench!r})
from common import self_peak_rss_mib
from onnx_squeeze import model_io
from onnx_squeeze.calibration import open_source
from onnx_squeeze.pipeline import compress
from onnx_squeeze.recipe import Recipe

start = time.perf_counter()
model = model_io.load({path!r})
steps = {steps!r}
if steps is not None:
    recipe = Recipe.load(steps) if isinstance(steps, str) else Recipe.from_dict(steps)
    data = open_source("random", model, count={samples}, seed=0)
    del model  # compress loads the file itself, as the CLI does (this copy held 262 MiB more)
    opset = 19 if any(step.name == "fp8" for step in recipe.steps) else None
    compress({path!r}, recipe, calibration=data, compare=False, target_opset=opset)
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss_mib": self_peak_rss_mib()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--samples", type=int, default=16, help="random calibration samples")
    parser.add_argument(
        "--only", nargs="*", help="labels to run (default: all); other rows kept from the last run"
    )
    args = parser.parse_args()
    measured: dict[str, list] = {}
    folder = tempfile.TemporaryDirectory(prefix="pass-memory-")
    path = str(Path(folder.name) / f"{args.model}.onnx")
    model_io.save(zoo.build(args.model), path)  # built here: the numpy build is not measured
    for label, steps in JOBS:
        if args.only and label not in args.only:
            continue
        code = _CODE.format(
            bench=str(Path(__file__).parent), path=path, steps=steps, samples=args.samples
        )
        try:
            found = run_isolated(code, timeout=3600)["result"]
        except RuntimeError as error:
            print(f"{label}: failed: {str(error).strip().splitlines()[-1]}", flush=True)
            measured[label] = [label, None, None, "failed"]
            continue
        peak = found["peak_rss_mib"]
        verdict = "yes" if peak <= GOAL_MIB else "NO"
        measured[label] = [label, round(peak), f"{found['seconds']:.1f}", verdict]
        print(f"{label}: {peak:.0f} MiB, {found['seconds']:.1f} s", flush=True)
    headers = ["job", "peak RSS MiB", "seconds", f"≤ {GOAL_MIB} MiB"]
    earlier = RESULTS / f"pass_memory_{args.model}.json"
    if args.only and earlier.exists():
        kept = {row["job"]: list(row.values()) for row in json.loads(earlier.read_text())["rows"]}
        measured = {**kept, **measured}
    rows = [measured[label] for label, _ in JOBS if label in measured]
    body = (
        f"`python benchmarks/pass_memory.py --model {args.model} --samples {args.samples}`: each "
        f"row is one `compress` (no comparison) in its own process, calibrated on {args.samples} "
        "random standard-normal images; peak RSS of that process (timing: single run).\n\n"
        + markdown_table(headers, rows)
    )
    data = {"meta": meta(1, [0]), "rows": [dict(zip(headers, r, strict=True)) for r in rows]}
    path = write_results(
        f"pass_memory_{args.model}", f"Peak memory per pass on {args.model}", body, data
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
