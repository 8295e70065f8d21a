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


def test_times_are_medians_without_the_warm_up_run():
    model = graph_model(CHAIN)
    conv = next(iter(model.graph))
    conv.name = "conv1"
    events = [
        {"cat": "Node", "name": "conv1_kernel_time", "dur": dur, "args": {"op_name": "Conv"}}
        for dur in (900, 10, 30, 20)
    ] + [
        {"cat": "Node", "name": "Reorder_kernel_time", "dur": 5, "args": {"op_name": "R"}},
        {"cat": "Node", "name": "r_kernel_time", "dur": 3, "args": {"op_name": "ReorderOutput"}},
    ]
    times = layer_times._owned_times(model, events)
    assert times.nodes == {conv: 20}
    assert times.total == 28 and times.unowned == 8 and times.layout == 3
