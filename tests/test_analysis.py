"""Parameters, MACs and sparsity on small graphs whose costs are computed by hand."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnx_squeeze.analysis import analyze
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.shapes import concrete_input_shapes


def _model(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return proto


def _weights(*shape: int, seed: int = 0) -> np.ndarray:
    # Values in [0.5, 1.5) with random signs: never exactly zero.
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(0.5, 1.5, size=shape)
    return (magnitude * rng.choice([-1.0, 1.0], size=shape)).astype(np.float32)


CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N, 8, 10, 10] x, float[N, 5, 6] t) => (float[N, 4] y, float[N, 5, 5] s,
                                                  float[N, 5, 7] m, float[N, 5, 7] m2) {
  c1 = Conv <group = 2, strides = [2, 2], pads = [1, 1, 1, 1]> (x, w1, b1)
  r = Relu (c1)
  d = Conv <group = 16, pads = [1, 1, 1, 1], dilations = [2, 2]> (r, wd)
  ct = ConvTranspose <group = 2, strides = [2, 2]> (d, wt)
  p = GlobalAveragePool (ct)
  f = Flatten (p)
  y = Gemm <transB = 1> (f, wg, bg)
  tt = Transpose <perm = [0, 2, 1]> (t)
  s = MatMul (t, tt)
  m = MatMul (t, wm)
  m2 = MatMul (t, wm)
}
"""


def _cnn(zero_rows: int = 0) -> onnx.ModelProto:
    w1 = _weights(16, 4, 3, 3, seed=1)
    w1[:zero_rows] = 0.0
    return _model(
        CNN,
        w1=w1,
        b1=_weights(16, seed=2),
        wd=_weights(16, 1, 3, 3, seed=3),
        wt=_weights(16, 4, 2, 2, seed=4),
        wg=_weights(4, 8, seed=5),
        bg=_weights(4, seed=6),
        wm=_weights(6, 7, seed=7),
    )


def _by_name(summary):
    return {node.name: node for node in summary.nodes}


def _by_output(proto: onnx.ModelProto, summary) -> dict[str, object]:
    names = [node.output[0] for node in proto.graph.node]
    return dict(zip(names, summary.nodes, strict=True))


def test_conv_gemm_matmul_costs_match_hand_computation():
    proto = _cnn()
    summary = analyze(proto)
    nodes = _by_output(proto, summary)
    # Conv groups=2, stride 2, pads 1: out 16x5x5 = 400 elements, each 4 (=8/2) x 3 x 3 MACs.
    assert nodes["c1"].macs == 400 * 4 * 9
    assert nodes["c1"].params == 16 * 4 * 9 + 16
    assert nodes["c1"].weight == "w1"
    assert nodes["c1"].weight_shape == (16, 4, 3, 3)
    # Depthwise, dilation 2, pads 1: out spatial (5 + 2 - 5) + 1 = 3 -> 16x3x3, 9 MACs each.
    assert nodes["d"].macs == 16 * 3 * 3 * 9
    assert nodes["d"].params == 16 * 9
    # ConvTranspose groups=2: every input element (16x3x3) meets Cout/groups=4 x 2x2 weights.
    assert nodes["ct"].macs == 16 * 3 * 3 * 4 * 4
    assert nodes["ct"].params == 16 * 4 * 4
    # Gemm transB: M=1, N=4, K=8.
    assert nodes["y"].macs == 1 * 4 * 8
    assert nodes["y"].params == 4 * 8 + 4
    # Activation x activation (attention scores): 5x6 @ 6x5.
    assert nodes["s"].macs == 5 * 5 * 6
    assert nodes["s"].params == 0
    assert nodes["s"].weight is None
    # Constant weight MatMul, the weight shared by two nodes.
    assert nodes["m"].macs == nodes["m2"].macs == 5 * 7 * 6
    assert nodes["m"].params == nodes["m2"].params == 42
    assert nodes["r"].macs == 0 and nodes["r"].params == 0
    assert summary.macs == 14400 + 1296 + 2304 + 32 + 150 + 2 * 210
    # The shared weight wm counts once.
    assert summary.params == 576 + 16 + 144 + 256 + 32 + 4 + 42
    assert summary.initializer_bytes == 4 * summary.params
    assert summary.unknown_macs == []
    assert summary.op_histogram == {
        "Conv": 2,
        "MatMul": 3,
        "ConvTranspose": 1,
        "Flatten": 1,
        "Gemm": 1,
        "GlobalAveragePool": 1,
        "Relu": 1,
        "Transpose": 1,
    }
    assert summary.inputs == [("x", "float32", ("N", 8, 10, 10)), ("t", "float32", ("N", 5, 6))]
    assert summary.outputs[0] == ("y", "float32", ("N", 4))
    assert summary.opsets == {"": 17}
    assert summary.input_shapes == {"x": (1, 8, 10, 10), "t": (1, 5, 6)}


def test_ir_model_gives_the_same_summary_as_proto():
    proto = _cnn()
    assert analyze(ir.from_proto(proto)).to_dict() == analyze(proto).to_dict()


def test_symbolic_batch_follows_shapes_and_batch():
    proto = _cnn()
    base = analyze(proto)
    # The batch dim N learnt from x applies to t as well.
    doubled = analyze(proto, shapes={"x": [2, 8, 10, 10]})
    assert doubled.input_shapes == {"x": (2, 8, 10, 10), "t": (2, 5, 6)}
    assert doubled.macs == 2 * base.macs
    assert analyze(proto, batch=3).macs == 3 * base.macs
    assert doubled.params == base.params


def test_bad_shapes_are_settings_errors():
    model = ir.from_proto(_cnn())
    with pytest.raises(SettingsError, match=r"'z'.*inputs are 'x', 't'"):
        concrete_input_shapes(model, {"z": [1]})
    with pytest.raises(SettingsError, match="got 2 dims"):
        concrete_input_shapes(model, {"x": [1, 8]})


def test_sparsity_per_node_and_over_weights():
    summary = analyze(_cnn(zero_rows=8))
    nodes = {node.weight: node for node in summary.nodes if node.weight}
    assert nodes["w1"].sparsity == pytest.approx(0.5)
    assert nodes["wd"].sparsity == 0.0
    # Over the unique weights of Conv/ConvTranspose/Gemm/MatMul: wm counted once.
    assert summary.sparsity == pytest.approx(288 / (576 + 144 + 256 + 32 + 42))
    relu = next(node for node in summary.nodes if node.op_type == "Relu")
    assert relu.sparsity is None


def test_analyze_does_not_modify_the_model():
    model = ir.from_proto(_cnn())
    before = ir.to_proto(model).SerializeToString()
    shapes_before = [(v.name, v.shape) for node in model.graph for v in node.outputs]
    initializers_before = list(model.graph.initializers)
    analyze(model, shapes={"x": [4, 8, 10, 10]})
    assert ir.to_proto(model).SerializeToString() == before
    assert [(v.name, v.shape) for node in model.graph for v in node.outputs] == shapes_before
    assert list(model.graph.initializers) == initializers_before
    assert [v.name for v in model.graph.inputs] == ["x", "t"]


def test_qdq_weight_counts_the_quantized_initializer():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    qdq (float[1, 8, 6, 6] x) => (float[1, 16, 4, 4] y) {
      w = DequantizeLinear <axis = 0> (wq, ws, wz)
      y = Conv (x, w, b)
    }
    """
    wq = np.arange(16 * 8 * 3 * 3, dtype=np.int64).reshape(16, 8, 3, 3) % 7 - 3
    zero_point = np.zeros(16, dtype=np.int8)
    zero_point[1] = 1  # channel 1's zeros are the values equal to 1
    proto = _model(
        text,
        wq=wq.astype(np.int8),
        ws=np.full(16, 0.1, dtype=np.float32),
        wz=zero_point,
        b=np.zeros(16, dtype=np.float32),
    )
    summary = analyze(proto)
    conv = next(node for node in summary.nodes if node.op_type == "Conv")
    assert conv.weight == "wq"
    assert conv.weight_shape == (16, 8, 3, 3)
    assert conv.params == 16 * 8 * 9 + 16
    assert conv.macs == 16 * 4 * 4 * 8 * 9
    expected_zeros = np.count_nonzero(wq == zero_point.reshape(16, 1, 1, 1))
    assert conv.sparsity == pytest.approx(expected_zeros / wq.size)
    dequantize = next(node for node in summary.nodes if node.op_type == "DequantizeLinear")
    assert dequantize.params == 0
    assert summary.params == 16 * 8 * 9 + 16 + 16 + 16


def test_constant_node_weights_and_batched_attention():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    attn (float[B, 2, 5, 4] q, float[B, 2, 7, 4] k) => (float[B, 2, 5, 3] o) {
      kt = Transpose <perm = [0, 1, 3, 2]> (k)
      scores = MatMul (q, kt)
      v = Constant <value = float[7, 3] {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}> ()
      o = MatMul (scores, v)
    }
    """
    summary = analyze(_model(text), shapes={"q": [3, 2, 5, 4], "k": [3, 2, 7, 4]})
    scores, output = (node for node in summary.nodes if node.op_type == "MatMul")
    assert scores.macs == 3 * 2 * 5 * 7 * 4
    assert output.macs == 3 * 2 * 5 * 3 * 7
    assert output.params == 21
    assert output.sparsity == pytest.approx(20 / 21)
    assert summary.params == 21


def test_unknown_shapes_are_listed_not_fatal():
    text = """
    <ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>
    odd (float[1, 8] x) => (float[1, 4] y) {
      h = custom.domain.Mystery (x)
      y = MatMul (h, w)
    }
    """
    summary = analyze(_model(text, w=_weights(8, 4)))
    matmul = next(node for node in summary.nodes if node.op_type == "MatMul")
    assert matmul.macs == 0
    assert matmul.params == 32
    assert summary.unknown_macs == [matmul.name]


def test_matmul_nbits_and_einsum():
    text = """
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    nbits (float[1, 4, 32] a, float[2, 3, 5] e) => (float[1, 4, 16] y, float[2, 3, 7] f) {
      y = com.microsoft.MatMulNBits <K = 32, N = 16, bits = 4, block_size = 32> (a, packed, scales)
      f = Einsum <equation = "bij,jk->bik"> (e, we)
    }
    """
    proto = _model(
        text,
        packed=np.zeros((16, 1, 16), dtype=np.uint8),
        scales=np.ones(16, dtype=np.float32),
        we=_weights(5, 7),
    )
    summary = analyze(proto)
    nbits, einsum = summary.nodes
    assert nbits.macs == 4 * 16 * 32
    assert nbits.params == 16 * 32
    assert einsum.macs == 2 * 3 * 5 * 7
    # Packed 4-bit weights count as N*K parameters.
    assert summary.params == 16 * 32 + 16 + 35


def test_recurrent_layers_count_each_gates_products_per_step():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    rnn (float[7, 2, 5] x) => (float[7, 2, 2, 3] y, float[7, 1, 2, 4] g) {
      y, h, c = LSTM <hidden_size = 3, direction = "bidirectional"> (x, w, r)
      g, hg = GRU <hidden_size = 4, layout = 0> (x, wg, rg)
    }
    """
    proto = _model(
        text,
        w=_weights(2, 12, 5),
        r=_weights(2, 12, 3),
        wg=_weights(1, 12, 5),
        rg=_weights(1, 12, 4),
    )
    lstm, gru = analyze(proto).nodes
    # steps x batch x directions x gates x hidden x (input + hidden)
    assert lstm.macs == 7 * 2 * 2 * 4 * 3 * (5 + 3)
    assert gru.macs == 7 * 2 * 1 * 3 * 4 * (5 + 4)
    # without hidden_size, R's last axis gives it; onnxruntime's quantized LSTM keeps the
    # attribute and stores R transposed
    rnn = onnx.helper.make_node("RNN", ["x", "wr", "rr"], ["yr"])
    quantized = onnx.helper.make_node(
        "DynamicQuantizeLSTM",
        ["x", "wq", "rq", "", "", "", "", "", "ws", "wz", "rs", "rz"],
        ["yq"],
        domain="com.microsoft",
        hidden_size=3,
    )
    graph = onnx.helper.make_graph(
        [rnn, quantized],
        "recurrent",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [7, 2, 5])],
        [
            onnx.helper.make_tensor_value_info("yr", onnx.TensorProto.FLOAT, None),
            onnx.helper.make_tensor_value_info("yq", onnx.TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(_weights(1, 6, 5), "wr"),
            numpy_helper.from_array(_weights(1, 6, 6), "rr"),
            numpy_helper.from_array(np.ones((1, 5, 12), np.int8), "wq"),
            numpy_helper.from_array(np.ones((1, 3, 12), np.int8), "rq"),
            numpy_helper.from_array(np.ones((1, 12), np.float32), "ws"),
            numpy_helper.from_array(np.zeros((1, 12), np.int8), "wz"),
            numpy_helper.from_array(np.ones((1, 12), np.float32), "rs"),
            numpy_helper.from_array(np.zeros((1, 12), np.int8), "rz"),
        ],
    )
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    plain, packed = analyze(onnx.helper.make_model(graph, opset_imports=opsets)).nodes
    assert plain.macs == 7 * 2 * 1 * 1 * 6 * (5 + 6)
    assert packed.macs == 7 * 2 * 1 * 4 * 3 * (5 + 3)


def test_size_on_disk_includes_external_data(tmp_path):
    proto = _cnn()
    path = tmp_path / "model.onnx"
    onnx.save_model(
        _cnn(),  # save_model moves the tensors of the proto it gets to external data
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        size_threshold=0,
        location="model.onnx.data",
    )
    summary = analyze(str(path))
    expected = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    assert summary.size_bytes == expected
    assert summary.params == analyze(proto).params
    assert analyze(proto).size_bytes is None


def test_to_dict_is_json_ready():
    import json

    data = analyze(_cnn()).to_dict()
    text = json.dumps(data)
    assert json.loads(text)["nodes"][0]["weight_shape"] == [16, 4, 3, 3]


def test_any_kernel_rank_gemm_trans_a_and_attention():
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    mixed (float[2, 5, 8] q, float[2, 7, 8] k, float[2, 7, 4] v, float[1, 3, 9] x1,
           float[1, 2, 4, 4, 4] x3) => (o, y1, y3, g) {
      o = Attention <q_num_heads = 4, kv_num_heads = 2> (q, k, v)
      y1 = Conv <pads = [1, 1]> (x1, w1)
      y3 = Conv (x3, w3)
      g = Gemm <transA = 1> (a, b)
    }
    """
    proto = _model(
        text,
        w1=_weights(6, 3, 3),
        w3=_weights(5, 2, 3, 3, 3),
        a=_weights(3, 2),
        b=_weights(3, 4),
    )
    attention, conv1d, conv3d, gemm = analyze(proto).nodes
    # 4 query heads share 2 kv heads: per query position and key position, 8 (q·k) + 4*2 (·v).
    assert attention.macs == 2 * 5 * 7 * (8 + 4 * 4 // 2)
    assert conv1d.macs == 6 * 9 * 3 * 3
    assert conv3d.macs == 5 * 2 * 2 * 2 * 2 * 27
    assert gemm.macs == 2 * 4 * 3


def test_a_dimension_declared_as_minus_one_is_unknown():
    """Paddle's exporters declare a dimension they do not know as -1: a size of -1 gave
    recovery a negative memory size per sample and an internal error on ppocr_cls."""
    from onnx_squeeze.analysis import value_shapes

    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, int64[2] s) => (float[M, 8] y) {
          r = Reshape (x, s)
          y = Relu (r)
        }
        """
    )
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r", 1, [-1, 8]))
    shapes = value_shapes(ir.from_proto(model), {"x": [2, 4], "s": [2]})
    assert shapes["r"] == (None, 8)
