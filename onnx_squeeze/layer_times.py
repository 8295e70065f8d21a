"""Where a model spends its time, per node of the model as given, measured by onnxruntime.

MACs misprice layers at small batches: a first convolution with one input channel, or any
layer with few channels on a large feature map, is bound by memory and per-call overhead, and
on a 32x32 digits CNN the stem held 2% of the MACs but 5% of the time. Pruning steered by
measured time removes channels where the time goes, and the comparison shows, layer by layer,
where the time went before and after.

onnxruntime's profiler times the nodes of the graph it optimized, whose names are derived from
the original ones: fused nodes keep the name of the node they start from, layout-changed ones
are named after their output tensor with a ``_nchwc`` suffix, and copies get ``_token_N``. Each
timed node is mapped back to the original node of that name, or to the producer of that tensor;
a convolution or matrix product fused with the activation after it may carry the activation's
name, so a kernel of that kind is given to the nearest such node upstream. The rest (layout
reorders, fusions named after no original node) is time no node of the model owns.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import re
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_squeeze import clocks, runtime
from onnx_squeeze.graph_utils import UniqueNames

# suffixes onnxruntime's optimizer appends to the names of the nodes it rewrites
_DERIVED_NAME = re.compile(r"(_nchwc|_token_\d+)+$")
_KERNEL_SUFFIX = "_kernel_time"
# kernels that compute a convolution or matrix product, whatever they fused after it
_PRODUCT_KERNELS = frozenset(
    {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "QLinearConv", "ConvInteger"}
    | {"Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger"}
)
_PRODUCTS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_LAYOUT_KERNELS = frozenset({"ReorderInput", "ReorderOutput"})
_FUSION_DEPTH = 3  # activation, residual Add, activation


@dataclasses.dataclass(frozen=True)
class LayerTimes:
    """Median microseconds per run of each original node and of the whole model's kernels;
    ``unowned`` is the part of ``total`` mapped to no node of the model, ``layout`` the part of
    it that onnxruntime's own layout changes (NCHWc reorders, which no node owns) took."""

    nodes: dict[ir.Node, float]
    total: float
    layout: float = 0.0

    @property
    def unowned(self) -> float:
        return self.total - sum(self.nodes.values())


def _product_upstream(node: ir.Node) -> ir.Node | None:
    """The nearest Conv/Gemm/MatMul a fused kernel that carries ``node``'s name started from."""
    frontier = [node]
    for _ in range(_FUSION_DEPTH):
        frontier = [v.producer() for n in frontier for v in n.inputs if v is not None]
        frontier = [n for n in frontier if n is not None]
        for candidate in frontier:
            if candidate.op_type in _PRODUCTS and candidate.domain == "":
                return candidate
    return None


def _owner(
    name: str, kernel: str, nodes: Mapping[str, ir.Node], producers: Mapping[str, ir.Node]
) -> ir.Node | None:
    """The original node a profiled node derives from, or None."""
    base = _DERIVED_NAME.sub("", name)
    node = next(
        (
            found
            for key in (name, base)
            for found in (nodes.get(key), producers.get(key))
            if found is not None
        ),
        None,
    )
    if node is not None and kernel in _PRODUCT_KERNELS and node.op_type not in _PRODUCTS:
        return _product_upstream(node) or node
    return node


def _kernel_times(events: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
    """Per profiled node (name, kernel), its kernel time (microseconds) in each run, by the
    run's index (a node run several times in one run, inside a loop, counts its sum)."""
    starts = sorted(
        e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"
    )
    times: dict[tuple[str, str], dict[int, float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith(_KERNEL_SUFFIX):
            key = (event["name"][: -len(_KERNEL_SUFFIX)], event["args"].get("op_name", ""))
            run = max(bisect.bisect_right(starts, event["ts"]) - 1, 0)
            runs = times.setdefault(key, {})
            runs[run] = runs.get(run, 0.0) + float(event["dur"])
    return times


def measure(
    model: ir.Model,
    feed: Mapping[str, np.ndarray],
    *,
    provider: str = "cpu",
    threads: int = 1,
    runs: int = 20,
) -> LayerTimes:
    """Kernel time per node of ``model`` on ``feed``: medians over ``runs`` runs after one
    warm-up, with the graph optimizations deployment runs with (level "all"). At one thread on
    the CPU (:mod:`onnx_squeeze.clocks`) the medians are over the half of the runs that other
    jobs interrupted least, so that a kernel's time is its own and not a share of the load.
    Unnamed nodes are named for the measurement only, so that their times can be told apart."""
    unnamed = [(node, node.name) for node in model.graph if not node.name]
    names = UniqueNames(model)
    names.used.update(node.name for node in model.graph if node.name)
    for node, _ in unnamed:
        node.name = names.new(f"{node.op_type}_timed")
    try:
        events, interrupted = _profile(model, feed, provider, threads, runs)
        timed = range(1, len(interrupted))  # run 0 warms up
        if clocks.cpu_clock([provider], [threads]):
            timed = _quiet_runs(interrupted, timed)
        return _owned_times(model, events, timed)
    finally:
        for node, name in unnamed:  # as it was: "" and None differ to onnx-ir's naming
            node.name = name


def _profile(
    model: ir.Model, feed: Mapping[str, np.ndarray], provider: str, threads: int, runs: int
) -> tuple[list[dict], list[float]]:
    """The profiler's events of ``runs`` runs after one warm-up, and how long each run was
    interrupted (microseconds)."""
    with tempfile.TemporaryDirectory(prefix="onnx-squeeze-") as folder:
        prefix = os.path.join(folder, "profile")
        # Profiling needs a plain session at the chosen thread count, with its profiler on.
        session = runtime.create_session(model, provider, threads=threads, profile_prefix=prefix)
        interrupted = [clocks.interrupted_us(session, feed) for _ in range(runs + 1)]
        return json.loads(Path(session.end_profiling()).read_text()), interrupted


def _quiet_runs(interrupted: list[float], timed: Sequence[int]) -> list[int]:
    """The half of the ``timed`` runs that other jobs interrupted least."""
    quiet = sorted(timed, key=lambda run: interrupted[run])
    return quiet[: max(1, math.ceil(len(quiet) / 2))]


def _owned_times(model: ir.Model, events: list[dict], timed: Sequence[int]) -> LayerTimes:
    """Median time over the ``timed`` runs of each profiled node (absent from a run, a branch
    not taken: no time in it), given to the original node it derives from."""
    per_node = {
        key: statistics.median(by_run.get(run, 0.0) for run in timed)
        for key, by_run in _kernel_times(events).items()
    }
    graph_nodes = {node.name: node for node in model.graph if node.name}
    producers = {value.name: node for node in model.graph for value in node.outputs if value.name}
    owned: dict[ir.Node, float] = {}
    for (name, kernel), median in per_node.items():
        owner = _owner(name, kernel, graph_nodes, producers)
        if owner is not None:
            owned[owner] = owned.get(owner, 0.0) + median
    layout = sum(t for (_, kernel), t in per_node.items() if kernel in _LAYOUT_KERNELS)
    return LayerTimes(nodes=owned, total=sum(per_node.values()), layout=layout)
