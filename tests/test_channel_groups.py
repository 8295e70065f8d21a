"""Channel dependency groups: coupled structures, offsets, and frozen groups with reasons."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_squeeze import zoo
from onnx_squeeze.passes.prune_channels.groups import ChannelGroup
from onnx_squeeze.passes.prune_channels.trace import analyze_channels, build_groups, format_groups
from onnx_squeeze.prepare import PrepareSettings, prepare

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def graph_model(text: str, seed: int = 0) -> ir.Model:
    """A model from onnx text; every graph input but ``x`` becomes a random initializer
    (variances named ``v*`` are positive, ``*_split`` int64 sizes are left as written)."""
    model = ir.from_proto(onnx.parser.parse_model(_HEADER + text))
    rng = np.random.default_rng(seed)
    graph = model.graph
    for value in list(graph.inputs):
        if value.name == "x" or value.const_value is not None:
            continue
        shape = tuple(value.shape)
        array = rng.standard_normal(shape).astype(np.float32)
        if value.name.startswith("v"):
            array = np.abs(array) + 0.5
        value.const_value = ir.tensor(array, name=value.name)
        graph.inputs.remove(value)
        graph.register_initializer(value)
    return model


RESIDUAL = """
g (float[N, 8, 8, 8] x, float[16, 8, 3, 3] w1, float[16] g1, float[16] b1, float[16] m1,
   float[16] v1, float[16, 8, 1, 1] wp, float[16, 16, 3, 3] w2, float[16] bias2,
   float[4, 16, 1, 1] w3) => (float[N, 4, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
    n1 = BatchNormalization (c1, g1, b1, m1, v1)
    r1 = Relu (n1)
    p = Conv (x, wp)
    s = Add (r1, p)
    c2 = Conv <pads = [1, 1, 1, 1]> (s, w2, bias2)
    r2 = Relu (c2)
    s2 = Add (r2, s)
    y = Conv (s2, w3)
}
"""

CONCAT_SPLIT = """
g (float[N, 4, 6, 6] x, float[8, 4, 1, 1] wa, float[8, 4, 1, 1] wb, float[8, 4, 1, 1] wd,
   float[16, 4, 3, 3] wf, float[10, 6, 1, 1] wh, float[4, 34, 1, 1] wy)
   => (float[N, 4, 6, 6] y) {
    a = Conv (x, wa)
    b = Conv (x, wb)
    c = Concat <axis = 1> (a, b)
    d = Conv (x, wd)
    e = Concat <axis = 1> (c, d)
    r = Relu (e)
    f = Conv <pads = [1, 1, 1, 1]> (x, wf)
    sizes = Constant <value = int64[2] {6, 10}> ()
    f1, f2 = Split <axis = 1> (f, sizes)
    h = Conv (f1, wh)
    k = Add (h, f2)
    m = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (k)
    all = Concat <axis = 1> (r, m)
    y = Conv (all, wy)
}
"""

DEPTHWISE = """
g (float[N, 4, 8, 8] x, float[16, 4, 1, 1] w1, float[16] bias1, float[16, 1, 3, 3] wd1,
   float[16] bd1, float[16, 1, 3, 3] wd2, float[4, 16, 1, 1] w2) => (float[N, 4, 8, 8] y) {
    c1 = Conv (x, w1, bias1)
    lo = Constant <value = float {0.0}> ()
    hi = Constant <value = float {6.0}> ()
    r1 = Clip (c1, lo, hi)
    d1 = Conv <group = 16, pads = [1, 1, 1, 1]> (r1, wd1, bd1)
    r2 = Relu (d1)
    d2 = Conv <group = 16, pads = [1, 1, 1, 1]> (r2, wd2)
    y = Conv (d2, w2)
}
"""

DECODER = """
g (float[N, 4, 8, 8] x, float[16, 4, 3, 3] w1, float[16] bias1, float[16, 12, 2, 2] wt,
   float[12] bt, float[12, 1, 3, 3] wd, float[3, 12, 3, 3] w2) => (float[N, 3, 16, 16] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, bias1)
    r1 = Relu (c1)
    up = ConvTranspose <strides = [2, 2]> (r1, wt, bt)
    r2 = Relu (up)
    d = Conv <group = 12, pads = [1, 1, 1, 1]> (r2, wd)
    y = Conv <pads = [1, 1, 1, 1]> (d, w2)
}
"""

FLATTEN_GEMM = """
g (float[N, 3, 4, 4] x, float[8, 3, 3, 3] w1, float[8] bias1, float[32, 128] wg1, float[32] bg1,
   float[32, 10] wg2, float[10] bg2) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, bias1)
    r1 = Relu (c1)
    f = Flatten (r1)
    h = Gemm <transB = 1> (f, wg1, bg1)
    r2 = Relu (h)
    y = Gemm (r2, wg2, bg2)
}
"""

TRANSFORMER_MLP = """
g (float[N, S, 16] x, float[16, 64] w1, float[64] b1, float[64, 16] w2, float[16] b2)
   => (float[N, S, 16] y) {
    h = MatMul (x, w1)
    hb = Add (h, b1)
    root2 = Constant <value = float {1.4142135}> ()
    one = Constant <value = float {1.0}> ()
    half = Constant <value = float {0.5}> ()
    t = Div (hb, root2)
    e = Erf (t)
    e1 = Add (e, one)
    g1 = Mul (hb, e1)
    gelu = Mul (g1, half)
    o = MatMul (gelu, w2)
    ob = Add (o, b2)
    y = Add (ob, x)
}
"""

BAD = """
g (float[N, 4, 6, 6] x, float[8, 4, 1, 1] shared, float[8, 4, 1, 1] wo, float[8, 4, 1, 1] wu,
   float[4, 8, 1, 1] wz, float[4, 8, 1, 1] wz2) => (float[N, 8, 6, 6] out, float[N, 4, 6, 6] y) {
    a = Conv (x, shared)
    b = Conv (x, shared)
    ab = Add (a, b)
    o = Conv (x, wo)
    out = Relu (o)
    u = Conv (x, wu)
    n = LRN <size = 3> (u)
    z = Conv (n, wz)
    z2 = Conv (ab, wz2)
    y = Add (z, z2)
}
"""

SHAPE_OPS = """
g (float[N, 4, 4, 4] x, float[16, 4, 3, 3] w1, float[1, 16, 1, 1] scale, float[16, 1, 1] shift,
   float[8, 16, 1, 1] w2, float[8, 8, 1, 1] w3, float[32, 10] wm) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
    m = Mul (c1, scale)
    s = Sub (shift, m)
    r = Relu (s)
    scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    up = Resize <mode = "nearest"> (r, , scales)
    pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
    p = Pad (up, pads)
    starts = Constant <value = int64[1] {4}> ()
    ends = Constant <value = int64[1] {12}> ()
    axes = Constant <value = int64[1] {1}> ()
    sl = Slice (p, starts, ends, axes)
    c2 = Conv (p, w2)
    c3 = Conv (sl, w3)
    a = Add (c2, c3)
    pool = MaxPool <kernel_shape = [5, 5], strides = [5, 5]> (a)
    target = Constant <value = int64[2] {0, -1}> ()
    flat = Reshape (pool, target)
    y = MatMul (flat, wm)
}
"""

SHARED_CONSTANTS = """
g (float[N, 4, 4, 4] x, float[8, 4, 1, 1] wa, float[8, 4, 1, 1] wb, float[8] bias,
   float[1, 8, 1, 1] k, float[4, 8, 1, 1] wc, float[4, 8, 1, 1] wd) => (float[N, 4, 4, 4] y) {
    a = Conv (x, wa, bias)
    ka = Mul (a, k)
    ra = Relu (ka)
    b = Conv (x, wb, bias)
    kb = Mul (b, k)
    rb = Relu (kb)
    c = Conv (ra, wc)
    d = Conv (rb, wd)
    y = Add (c, d)
}
"""

UNMAPPABLE = """
g (float[N, 4, 4, 4] x, float[8, 4, 1, 1] wr, float[8, 4, 1, 1] ws, float[4, 4, 1, 1] wc,
   float[4, 4, 1, 1] wm, float[4, 4, 1, 1] wk, float[4, 25, 1, 1] wz) => (float[N, 4, 4, 4] y) {
    r = Conv (x, wr)
    shape = Constant <value = int64[5] {0, 2, 4, 4, 4}> ()
    heads = Reshape (r, shape)
    back = Constant <value = int64[4] {0, 8, 4, 4}> ()
    rr = Reshape (heads, back)
    s = Conv (x, ws)
    sm = Softmax <axis = 1> (s)
    c = Conv (x, wc)
    cc = Concat <axis = 2> (c, x)
    st = Constant <value = int64[1] {0}> ()
    en = Constant <value = int64[1] {4}> ()
    ax = Constant <value = int64[1] {2}> ()
    cs = Slice (cc, st, en, ax)
    m = Conv (x, wm)
    mm = ReduceMax <axes = [1]> (m)
    k = Conv (x, wk)
    ks = Shape (k)
    one = Constant <value = int64 {1}> ()
    kc = Gather (ks, one)
    kf = Cast <to = 1> (kc)
    kk = Mul (k, kf)
    all = Concat <axis = 1> (rr, sm, cs, mm, kk)
    y = Conv (all, wz)
}
"""

# Squeeze-and-excitation with ReduceMean, reductions that drop axes, a flatten that spells out its
# width (allowzero, as the dynamo exporter writes it), and a Concat with an untraced input whose
# batch is dynamic.
REDUCTIONS = """
g (float[N, 4, 4, 4] x, float[8, 4, 1, 1] w1, float[4, 8, 1, 1] ws1, float[8, 4, 1, 1] ws2,
   float[8, 12, 1, 1] w2, float[8, 10] wm) => (float[N, 10] y) {
    c1 = Conv (x, w1)
    r1 = Relu (c1)
    pooled = ReduceMean <axes = [2, 3]> (r1)
    s1 = Conv (pooled, ws1)
    s1r = Relu (s1)
    s2 = Conv (s1r, ws2)
    gate = Sigmoid (s2)
    m = Mul (r1, gate)
    cat = Concat <axis = 1> (m, x)
    c2 = Conv (cat, w2)
    r2 = Relu (c2)
    last = Constant <value = int64[1] {3}> ()
    rs = ReduceSum <keepdims = 0> (r2, last)
    rm = ReduceMax <axes = [-1]> (rs)
    width = Constant <value = int64[2] {-1, 8}> ()
    flat = Reshape <allowzero = 1> (rm, width)
    y = MatMul (flat, wm)
}
"""

# x.view(x.size(0), -1) as the TorchScript exporter writes it with a dynamic batch: the target is
# computed from the Shape of the tensor it flattens.
VIEW_FLATTEN = """
g (float[N, 3, 4, 4] x, float[8, 3, 3, 3] w1, float[32, 10] wm) => (float[N, 10] y) {
    c1 = Conv (x, w1)
    r1 = Relu (c1)
    shape = Shape (r1)
    zero = Constant <value = int64 {0}> ()
    batch = Gather (shape, zero)
    first = Constant <value = int64[1] {0}> ()
    batch1 = Unsqueeze (batch, first)
    rest = Constant <value = int64[1] {-1}> ()
    target = Concat <axis = 0> (batch1, rest)
    flat = Reshape (r1, target)
    y = MatMul (flat, wm)
}
"""

# Grouped convolutions: Conv with 2 groups (8 -> 12 channels), ConvTranspose with 3 (12 -> 6).
GROUPED = """
g (float[N, 4, 4, 4] x, float[8, 4, 1, 1] w0, float[8] b0, float[12, 4, 3, 3] wg, float[12] bg,
   float[12, 2, 2, 2] wt, float[4, 6, 1, 1] wz) => (float[N, 4, 8, 8] y) {
    c0 = Conv (x, w0, b0)
    r0 = Relu (c0)
    g1 = Conv <group = 2, pads = [1, 1, 1, 1]> (r0, wg, bg)
    r1 = Relu (g1)
    t = ConvTranspose <group = 3, strides = [2, 2]> (r1, wt)
    y = Conv (t, wz)
}
"""

GRAPHS = {
    "residual": RESIDUAL,
    "concat_split": CONCAT_SPLIT,
    "depthwise": DEPTHWISE,
    "flatten_gemm": FLATTEN_GEMM,
    "decoder": DECODER,
    "transformer_mlp": TRANSFORMER_MLP,
    "shape_ops": SHAPE_OPS,
    "shared_constants": SHARED_CONSTANTS,
    "bad": BAD,
    "unmappable": UNMAPPABLE,
    "reductions": REDUCTIONS,
    "grouped": GROUPED,
    "view_flatten": VIEW_FLATTEN,
}
# Graphs with nothing prunable, for the frozen-group tests.
FROZEN_GRAPHS = ("bad", "unmappable")


@functools.cache
def _zoo_model(name: str, prepared: bool) -> ir.Model:
    model = zoo.small(name)
    if prepared:  # BN folded, bn_scale kept; onnxsim left out to keep the tests fast
        model, _ = prepare(model, PrepareSettings(simplify=False))
    return model


def zoo_model(name: str, prepared: bool) -> ir.Model:
    """A small zoo model, raw or prepared (a fresh copy: passes change it in place)."""
    return _zoo_model(name, prepared).clone()


def _group_of(groups: list[ChannelGroup], producer: str):
    found = [g for g in groups if producer in {n.name for n in g.producers}]
    assert len(found) == 1, [g.to_dict() for g in found]
    return found[0]


def _by_output(model: ir.Model) -> dict[str, ir.Node]:
    return {node.outputs[0].name: node for node in model.graph}


def _named(model: ir.Model) -> ir.Model:
    """Name every node after its first output, so that groups can be looked up by name."""
    for node in model.graph:
        node.name = node.name or node.outputs[0].name
    return model


def _members(group: ChannelGroup) -> set[tuple[str, str, int, tuple[int, ...]]]:
    return {(m.slot.node.name, m.slot.role, m.slot.input, m.offsets) for m in group.members}


def test_residual_couples_every_producer_that_meets_at_the_adds():
    groups = build_groups(_named(graph_model(RESIDUAL)))
    group = _group_of(groups, "c1")
    assert {n.name for n in group.producers} == {"c1", "p", "c2"}
    assert group.frozen is None and group.channels == 16
    members = _members(group)
    assert {("n1", "param", i, (0,)) for i in (1, 2, 3, 4)} <= members  # unfused BN
    assert ("c2", "consumer", 1, (0,)) in members and ("y", "consumer", 1, (0,)) in members
    assert ("c2", "producer", 2, (0,)) in members  # bias
    assert len(groups) == 2  # and the output conv, frozen
    assert _group_of(groups, "y").frozen == "reaches graph output 'y'"


def test_concat_chains_and_split_give_offsets_and_cut_producers():
    model = _named(graph_model(CONCAT_SPLIT))
    groups = build_groups(model)
    offsets = {name: _members(_group_of(groups, name)) for name in ("a", "b", "d", "h")}
    assert ("y", "consumer", 1, (0,)) in offsets["a"]
    assert ("y", "consumer", 1, (8,)) in offsets["b"]  # Concat of Concat
    assert ("y", "consumer", 1, (16,)) in offsets["d"]
    # Split cut f's output in two groups; the second half is coupled with h through the Add
    f_groups = [g for g in groups if "f" in {n.name for n in g.producers}]
    assert sorted(g.channels for g in f_groups) == [6, 10]
    coupled = _group_of(groups, "h")
    assert {n.name for n in coupled.producers} == {"f", "h"}
    assert ("y", "consumer", 1, (24,)) in _members(coupled)
    assert ("f", "producer", 1, (6,)) in _members(coupled)
    first_half = next(g for g in f_groups if g.channels == 6)
    assert ("h", "consumer", 1, (0,)) in _members(first_half)
    assert all(g.frozen is None for g in groups if g is not _group_of(groups, "y"))


def test_depthwise_chain_passes_channels_through():
    groups = build_groups(_named(graph_model(DEPTHWISE)))
    group = _group_of(groups, "c1")
    assert [n.name for n in group.producers] == ["c1"]
    members = _members(group)
    assert {("d1", "param", 1, (0,)), ("d1", "param", 2, (0,)), ("d2", "param", 1, (0,))} <= members
    assert ("y", "consumer", 1, (0,)) in members
    assert group.frozen is None


def test_conv_transpose_consumes_on_weight_axis_0_and_produces_on_axis_1():
    groups = build_groups(_named(graph_model(DECODER)))
    assert [g.frozen is None for g in groups] == [True, True, False]  # c1, up; y is the output

    def axes(group):
        return {(m.slot.node.name, m.slot.role, m.slot.input): m.slot.axis for m in group.members}

    assert axes(_group_of(groups, "c1"))[("up", "consumer", 1)] == 0
    upsampled = axes(_group_of(groups, "up"))
    assert upsampled[("up", "producer", 1)] == 1 and upsampled[("up", "producer", 2)] == 0
    assert upsampled[("d", "param", 1)] == 0 and upsampled[("y", "consumer", 1)] == 1


def test_flatten_into_gemm_accounts_for_the_spatial_size():
    groups = build_groups(_named(graph_model(FLATTEN_GEMM)))
    conv = _group_of(groups, "c1")
    (gemm_member,) = [m for m in conv.members if m.slot.node.name == "h" and m.slot.input == 1]
    assert (gemm_member.slot.axis, gemm_member.slot.repeat) == (1, 16)  # transB: rows on axis 1
    hidden = _group_of(groups, "h")
    assert hidden.frozen is None and hidden.channels == 32
    assert ("h", "producer", 2, (0,)) in _members(hidden)
    assert ("y", "consumer", 1, (0,)) in _members(hidden)


def test_transformer_mlp_hidden_units_form_one_group():
    groups = build_groups(_named(graph_model(TRANSFORMER_MLP)))
    hidden = _group_of(groups, "h")
    assert hidden.frozen is None and hidden.channels == 64
    assert {("hb", "param", 1, (0,)), ("o", "consumer", 1, (0,))} <= _members(hidden)
    assert "not traced" in _group_of(groups, "o").frozen  # residual with the graph input


def test_bad_cases_are_frozen_with_reasons():
    groups = build_groups(_named(graph_model(BAD)))
    for producer in ("a", "b"):
        assert "shared with other nodes" in _group_of(groups, producer).frozen
    assert _group_of(groups, "o").frozen == "reaches graph output 'out'"
    assert "LRN" in _group_of(groups, "u").frozen
    rows = format_groups(groups)
    assert all(row[-1].startswith("frozen: ") for row in rows)


def test_per_channel_constants_resize_pad_slice_and_reshape_into_matmul():
    groups = build_groups(_named(graph_model(SHAPE_OPS)))
    # the Slice takes channels 4:12, so c1 is cut in three groups of 4, 8 and 4 channels
    c1_groups = sorted((g for g in groups if g.name == "c1"), key=lambda g: g.members[0].offsets)
    assert [g.channels for g in c1_groups] == [4, 8, 4]
    for group, offset in zip(c1_groups, (0, 4, 12), strict=True):
        members = _members(group)
        assert {("m", "param", 1, (offset,)), ("s", "param", 0, (offset,))} <= members
        assert ("c2", "consumer", 1, (offset,)) in members and group.frozen is None
    assert ("c3", "consumer", 1, (0,)) in _members(c1_groups[1])  # the sliced channels only
    (mul,) = [m for m in c1_groups[0].members if m.slot.node.name == "m"]
    (sub,) = [m for m in c1_groups[0].members if m.slot.node.name == "s"]
    assert (mul.slot.axis, sub.slot.axis) == (1, 0)  # shapes [1, 16, 1, 1] and [16, 1, 1]
    coupled = _group_of(groups, "c2")
    assert {n.name for n in coupled.producers} == {"c2", "c3"} and coupled.frozen is None
    (matmul,) = [m for m in coupled.members if m.slot.node.name == "y"]
    assert (matmul.slot.axis, matmul.slot.repeat) == (0, 4)  # 2 x 2 pixels per channel


def test_unmappable_axes_are_frozen_with_reasons():
    groups = build_groups(_named(graph_model(UNMAPPABLE)))
    reasons = {name: _group_of(groups, name).frozen for name in ("r", "s", "c", "m", "k")}
    assert reasons == {
        "r": "Reshape 'heads' reshapes the channel axis",
        "s": "Softmax 'sm' mixes values across the channel axis",
        "c": "Concat 'cc' joins traced and untraced tensors along another axis",
        "m": "ReduceMax 'mm' reduces over the channel axis",
        "k": "Gather 'kc' reads the channel count",
    }
    assert all(g.frozen for g in groups)


def test_reductions_over_other_axes_pass_channels_on():
    analysis = analyze_channels(_named(graph_model(REDUCTIONS)))
    groups = analysis.groups
    assert [g.name for g in groups if g.frozen] == ["y"]  # the model's output
    # the SE gate couples with the block's channels; its squeeze is a group of its own
    assert {n.name for n in _group_of(groups, "c1").producers} == {"c1", "s2"}
    assert ("s2", "consumer", 1, (0,)) in _members(_group_of(groups, "s1"))
    assert ("y", "consumer", 1, (0,)) in _members(_group_of(groups, "c2"))
    assert ("c2", "consumer", 1, (0,)) in _members(_group_of(groups, "c1"))
    values = {v.name: layout for v, layout in analysis.layouts.items()}
    assert (values["rs"].axis, values["rs"].rank) == (-2, 3)  # [N, 8, 4]: channels stay on 1
    (reshape,) = [s for s in analysis.structures if s.kind == "reshape"]
    assert (reshape.node.name, reshape.entry) == ("flat", 1)


def test_grouped_convolutions_couple_their_groups_channel_by_channel():
    groups = build_groups(_named(graph_model(GROUPED)))
    assert [g.name for g in groups if g.frozen] == ["y"]  # the model's output
    # c0's 8 channels feed 2 groups of 4: channel j of each group is one channel
    c0 = _group_of(groups, "c0")
    assert c0.channels == 4
    assert {("c0", "producer", 1, (0, 4)), ("g1", "consumer", 1, (0,))} <= _members(c0)
    # g1's 12 channels are 2 groups of 6 for g1 and 3 groups of 4 for t: coupled every 2
    g1 = _group_of(groups, "g1")
    assert g1.channels == 2 and ("g1", "producer", 1, (0, 2, 4, 6, 8, 10)) in _members(g1)
    assert ("t", "consumer", 1, (0, 2, 4, 6, 8, 10)) in _members(g1)  # ConvTranspose: axis 0
    t = _group_of(groups, "t")  # 3 groups of 2 outputs, on weight axis 1 (one group's share)
    assert t.channels == 2 and ("t", "producer", 1, (0,)) in _members(t)
    assert ("y", "consumer", 1, (0, 2, 4)) in _members(t)


def test_flatten_by_a_target_computed_from_the_batch_size():
    groups = build_groups(_named(graph_model(VIEW_FLATTEN)))
    c1 = _group_of(groups, "c1")
    assert c1.frozen is None
    (matmul,) = [m for m in c1.members if m.slot.node.name == "y"]
    assert (matmul.slot.axis, matmul.slot.repeat) == (0, 4)  # 2 x 2 pixels per channel


def test_attention_heads_couple_query_with_key_and_value_with_the_output_rows():
    model = zoo_model("transformer", True)  # 2 layers, 2 heads of 16 channels
    frozen_by_reshape = [g for g in build_groups(model) if g.frozen]
    assert any("Reshape" in g.frozen for g in frozen_by_reshape)
    groups = build_groups(model, split_heads=True)
    prefix = "encoder.layer.0.attention."
    query = _group_of(groups, prefix + "self.query")
    assert {n.name for n in query.producers} == {prefix + "self.query", prefix + "self.key"}
    assert query.frozen is None and query.channels == 16
    assert {m.offsets for m in query.members} == {(0, 16)}  # channel d of every head
    value = _group_of(groups, prefix + "self.value")
    consumers = [m for m in value.members if m.slot.role == "consumer"]
    assert [(m.slot.node.name, m.offsets) for m in consumers] == [
        (prefix + "output.dense", (0, 16))
    ]
    # the hidden size stays frozen: every residual Add meets a LayerNorm output
    assert "not traced" in _group_of(groups, prefix + "output.dense").frozen
    reshapes = [s for s in analyze_channels(model, split_heads=True).structures]
    assert {s.kind for s in reshapes} == {"reshape"} and len(reshapes) == 8  # 3 splits, 1 merge


@pytest.mark.parametrize("name", zoo.NAMES)
@pytest.mark.parametrize("prepared", [False, True], ids=["raw", "prepared"])
def test_zoo_models_have_prunable_groups(name: str, prepared: bool):
    model = zoo_model(name, prepared)
    groups = build_groups(model)
    prunable = [g for g in groups if not g.frozen]
    assert prunable and len(prunable) >= len(groups) // 4
    for group in groups:
        described = group.to_dict()
        assert described["channels"] == group.channels > 0
        assert described["producers"]
    output_groups = [g for g in groups if g.frozen and "graph output" in g.frozen]
    assert output_groups  # every zoo model ends in a layer that feeds an output
