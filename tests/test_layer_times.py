"""Per-node times from onnxruntime's profiler, given back to the nodes of the model as written."""

from __future__ import annotations

import pytest

from onnx_squeeze import layer_times
from tests.helpers import random_feeds
from tests.test_channel_groups import graph_model, zoo_model

CHAIN = """
g (float[N, 4, 32, 32] x, float[16, 4, 3, 3] w1, float[16] b1, float[16, 16, 3, 3] w2,
   float[10, 16] wf, float[10] bf) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
    s = Add (c2, r1)
    r2 = Relu (s)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, wf, bf)
}
"""


def test_fused_activations_leave_their_time_to_the_convolution():
    """onnxruntime fuses each Relu (and the residual Add) into the Conv before it and may name
    the fused kernel after the Relu's output; the time belongs to the Conv all the same."""
    model = graph_model(CHAIN)
    times = layer_times.measure(model, random_feeds(model, 1, batch=1)[0], runs=3)
    owners = {node.op_type for node in times.nodes}
    assert {"Conv", "Gemm"} <= owners
    assert "Relu" not in owners
    assert all(time >= 0 for time in times.nodes.values())
    assert 0 <= times.unowned <= times.total
    assert all(not node.name for node in model.graph)  # names given for the measurement only


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_nearly_all_time_is_owned_by_nodes_of_the_model(name: str):
    model = zoo_model(name, True)
    times = layer_times.measure(model, random_feeds(model, 1, batch=1)[0], runs=2)
    convolutions = {node for node in model.graph if node.op_type == "Conv"}
    assert convolutions <= set(times.nodes)
    # the rest is onnxruntime's NCHWc reorders (more of them with AVX-512's 16-channel blocks)
    assert 0 <= times.layout <= times.unowned
    assert times.unowned - times.layout <= 0.05 * times.total


@pytest.mark.parametrize(
    ("profiled", "kernel", "owner"),
    [
        ("conv2", "Conv", "conv2"),  # kept its name
        ("r1_nchwc", "Conv", "conv1"),  # NCHWc kernel named after the fused Relu's output
        ("c2_token_7", "Conv", "conv2"),  # a copy named after the Conv's output
        ("relu2", "FusedConv", "conv2"),  # fused with the Add and Relu, named after the Relu
        ("pool", "GlobalAveragePool", "pool"),
        ("ReorderOutput", "ReorderOutput", None),
    ],
)
def test_profiled_names_map_to_the_node_they_derive_from(profiled, kernel, owner):
    model = graph_model(CHAIN)
    names = ["conv1", "relu1", "conv2", "add", "relu2", "pool", "flatten", "fc"]
    for node, name in zip(model.graph, names, strict=True):
        node.name = name
    nodes = {node.name: node for node in model.graph if node.name}
    producers = {v.name: node for node in model.graph for v in node.outputs}
    found = layer_times._owner(profiled, kernel, nodes, producers)
    assert (found.name if found is not None else None) == owner


def _runs(conv_times, others=()):
    """Profiler events: one model_run per entry of ``conv_times``, conv1's kernel in each,
    ``others`` (name, op, microseconds) in the first timed run only."""
    events = []
    for run, duration in enumerate(conv_times):
        events += [
            {"cat": "Session", "name": "model_run", "ts": 1000 * run, "dur": 999},
            {
                "cat": "Node",
                "name": "conv1_kernel_time",
                "ts": 1000 * run + 1,
                "dur": duration,
                "args": {"op_name": "Conv"},
            },
        ]
    events += [
        {"cat": "Node", "name": f"{n}_kernel_time", "ts": 1002, "dur": d, "args": {"op_name": op}}
        for n, op, d in others
    ]
    return events


def _named_model():
    model = graph_model(CHAIN)
    conv = next(iter(model.graph))
    conv.name = "conv1"
    return model, conv


def test_times_are_medians_without_the_warm_up_run():
    model, conv = _named_model()
    events = _runs((900, 10, 30, 20), [("Reorder", "R", 5), ("r", "ReorderOutput", 3)])
    times = layer_times._owned_times(model, events, range(1, 4))
    # a kernel absent from a run (the reorders outside run 1) took no time in it
    assert times.nodes == {conv: 20}
    assert times.total == 20 and times.unowned == 0 and times.layout == 0
    times = layer_times._owned_times(model, events, [1])
    assert times.nodes == {conv: 10}
    assert times.total == 18 and times.unowned == 8 and times.layout == 3


def test_cpu_clock_keeps_the_runs_other_jobs_interrupted_least():
    """Run 2 was preempted for 5 ms, run 4 for 1 ms: the medians are over runs 1 and 3 (the
    warm-up, run 0, never counts)."""
    model, conv = _named_model()
    interrupted = [0.0, 2.0, 5000.0, 1.0, 1000.0]
    quiet = layer_times._quiet_runs(interrupted, range(1, 5))
    assert sorted(quiet) == [1, 3]
    times = layer_times._owned_times(model, _runs((900, 10, 5010, 12, 1020)), quiet)
    assert times.nodes == {conv: 11}


def test_a_profile_on_one_cpu_thread_reads_half_the_runs(monkeypatch):
    """measure() at one CPU thread keeps the quiet half of its runs; at two threads, all."""
    model = graph_model(CHAIN)
    feed = random_feeds(model, 1, batch=1)[0]
    chosen = []
    original = layer_times._owned_times

    def owned(model, events, timed):
        chosen.append(list(timed))
        return original(model, events, timed)

    monkeypatch.setattr(layer_times, "_owned_times", owned)
    layer_times.measure(model, feed, runs=6)
    layer_times.measure(model, feed, runs=6, threads=2)
    assert len(chosen[0]) == 3 and set(chosen[0]) <= set(range(1, 7))
    assert chosen[1] == list(range(1, 7))
