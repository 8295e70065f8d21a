"""A BERT-style transformer encoder and an MLP classifier."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnx_squeeze.errors import SettingsError
from onnx_squeeze.zoo.builder import (
    Batch,
    Builder,
    check_classes,
    check_common,
    make_divisible,
    repeats,
)

# --------------------------------------------------------------------------------------------
# Transformer encoder
# --------------------------------------------------------------------------------------------


def _attention(b: Builder, prefix: str, x: ir.Value, heads: int, head_dim: int) -> ir.Value:
    hidden = heads * head_dim
    split_shape = np.array([0, -1, heads, head_dim], dtype=np.int64)
    projected = {}
    for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
        name = f"{prefix}.attention.self.{part}"
        y = b.linear_3d(name, x, hidden)
        y = b.op("Reshape", f"{name}/Reshape", [y, b.const(f"{name}.heads_shape", split_shape)])
        projected[part] = b.op("Transpose", f"{name}/Transpose", [y], {"perm": perm})
    attn = f"{prefix}.attention.self"
    scores = b.op("MatMul", f"{attn}/MatMul", [projected["query"], projected["key"]])
    scale = b.const(f"{attn}.scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    scores = b.op("Div", f"{attn}/Div", [scores, scale])
    probs = b.op("Softmax", f"{attn}/Softmax", [scores], {"axis": -1})
    context = b.op("MatMul", f"{attn}/MatMul_1", [probs, projected["value"]])
    context = b.op("Transpose", f"{attn}/Transpose", [context], {"perm": [0, 2, 1, 3]})
    merge_shape = b.const(f"{attn}.merge_shape", np.array([0, -1, hidden], dtype=np.int64))
    context = b.op("Reshape", f"{attn}/Reshape", [context, merge_shape])
    out = b.linear_3d(f"{prefix}.attention.output.dense", context, hidden)
    out = b.op("Add", f"{prefix}.attention.output/Add", [out, x])
    return b.layer_norm(f"{prefix}.attention.output.LayerNorm", out)


def _feed_forward(
    b: Builder, prefix: str, x: ir.Value, intermediate: int, output: str | None
) -> ir.Value:
    name = f"{prefix}.intermediate.dense"
    y = b.linear_3d(name, x, intermediate, gain=2.0)
    # GELU(y) = y * 0.5 * (1 + erf(y / sqrt(2))), in the node order torch exports it
    act = f"{prefix}.intermediate.intermediate_act_fn"
    z = b.op("Div", f"{act}/Div", [y, b.const(f"{act}.sqrt2", np.array(math.sqrt(2), "f4"))])
    z = b.op("Erf", f"{act}/Erf", [z])
    z = b.op("Add", f"{act}/Add", [z, b.const(f"{act}.one", np.array(1.0, "f4"))])
    z = b.op("Mul", f"{act}/Mul", [y, z])
    z = b.op("Mul", f"{act}/Mul_1", [z, b.const(f"{act}.half", np.array(0.5, "f4"))])
    out = b.linear_3d(f"{prefix}.output.dense", z, b.channels(x), gain=1.0)
    out = b.op("Add", f"{prefix}.output/Add", [out, x])
    return b.layer_norm(f"{prefix}.output.LayerNorm", out, output=output)


def transformer(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    num_classes: int = 10,
    vocab_size: int = 1000,
    max_length: int = 128,
    num_heads: int = 6,
    batch: Batch = "N",
    sequence: Batch = "sequence",
) -> ir.Model:
    """BERT-style post-LayerNorm encoder (hidden 384 = 6 heads x 64, 6 layers, MLP 4x) with a
    pooler and classifier on token 0: the MatMul/attention/GELU/LayerNorm case. 11.7M params.

    ``width`` scales the head size (hidden = num_heads x round8(64 x width)), ``depth`` the
    layer count. Input ``input_ids`` int64 [batch, sequence] (sequence <= max_length).
    Outputs ``logits`` [batch, num_classes] and ``last_hidden_state`` [batch, sequence, hidden].
    """
    check_common("transformer", width, depth, batch)
    check_classes("transformer", num_classes)
    if num_heads < 1 or vocab_size < 8 or max_length < 1:
        raise SettingsError(
            "zoo.transformer: need num_heads >= 1, vocab_size >= 8 (random feeds use ids "
            "0..7) and max_length >= 1"
        )
    b = Builder(seed)
    head_dim = make_divisible(64 * width)
    hidden = num_heads * head_dim
    # Calibration tokens: half drawn like runtime.random_feed (ids 0..7), half from the vocab.
    length = min(16, max_length)
    ids = np.concatenate(
        [b.rng.integers(0, 8, (16, length)), b.rng.integers(0, vocab_size, (16, length))]
    ).astype(np.int64)
    input_ids = b.input("input_ids", ir.DataType.INT64, [batch, sequence], ids)
    # embeddings (token, then position sliced to the dynamic sequence length)
    word_table = b.weight((vocab_size, hidden), fan=1, gain=1.0)
    words = b.const("embeddings.word_embeddings.weight", word_table)
    x = b.op("Gather", "embeddings.word_embeddings", [words, input_ids], {"axis": 0})
    shape = b.op("Shape", "embeddings/Shape", [input_ids])
    seq_axis = b.const("embeddings.seq_axis", np.array(1, dtype=np.int64))
    seq_len = b.op("Gather", "embeddings/Gather", [shape, seq_axis], {"axis": 0})
    axes0 = b.const("embeddings.unsqueeze_axes", np.array([0], dtype=np.int64))
    seq_len = b.op("Unsqueeze", "embeddings/Unsqueeze", [seq_len, axes0])
    position_ids = b.const("embeddings.position_ids", np.arange(max_length)[None].astype("i8"))
    starts = b.const("embeddings.slice_starts", np.array([0], dtype=np.int64))
    axes1 = b.const("embeddings.slice_axes", np.array([1], dtype=np.int64))
    position_ids = b.op("Slice", "embeddings/Slice", [position_ids, starts, seq_len, axes1])
    position_table = b.weight((max_length, hidden), fan=1, gain=0.25)
    positions = b.const("embeddings.position_embeddings.weight", position_table)
    pos = b.op("Gather", "embeddings.position_embeddings", [positions, position_ids], {"axis": 0})
    x = b.op("Add", "embeddings/Add", [x, pos])
    x = b.layer_norm("embeddings.LayerNorm", x)
    layers = repeats(6, depth)
    for index in range(layers):
        prefix = f"encoder.layer.{index}"
        x = _attention(b, prefix, x, num_heads, head_dim)
        last = "last_hidden_state" if index == layers - 1 else None
        x = _feed_forward(b, prefix, x, 4 * hidden, last)
        b.keep(x)
    first_token = b.const("pooler.first_token", np.array(0, dtype=np.int64))
    first = b.op("Gather", "pooler/Gather", [x, first_token], {"axis": 1})
    pooled = b.linear("pooler.dense", first, hidden)
    pooled = b.op("Tanh", "pooler.activation", [pooled])
    logits = b.linear("classifier", pooled, num_classes, output="logits", center=True)
    settings = dict(
        width=width,
        depth=depth,
        seed=seed,
        num_classes=num_classes,
        vocab_size=vocab_size,
        max_length=max_length,
        num_heads=num_heads,
    )
    outputs = [(logits, [batch, num_classes]), (x, [batch, sequence, hidden])]
    return b.model(outputs, name="transformer", settings=settings)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


def mlp(
    *,
    width: float = 1.0,
    depth: float = 1.0,
    seed: int = 0,
    in_features: int = 64,
    num_classes: int = 10,
    batch: Batch = "N",
) -> ir.Model:
    """A Gemm-only classifier for 8x8 digits (64 -> 256 -> 128 -> 64 -> 10 at width 1):
    the smallest model that still has every linear-layer case.

    ``depth`` scales the number of hidden layers (3 at depth 1; later ones keep the last width).
    Input ``input`` float [batch, in_features], output ``logits``.
    """
    check_common("mlp", width, depth, batch)
    check_classes("mlp", num_classes)
    if in_features < 1:
        raise SettingsError("zoo.mlp: in_features must be at least 1")
    b = Builder(seed)
    sample = b.rng.standard_normal((256, in_features), dtype=np.float32)
    x = b.input("input", ir.DataType.FLOAT, [batch, in_features], sample)
    sizes = (256, 128, 64)
    for index in range(repeats(3, depth)):
        features = make_divisible(sizes[min(index, len(sizes) - 1)] * width)
        x = b.linear(f"fc{index + 1}", x, features, gain=2.0)
        x = b.op("Relu", f"relu{index + 1}", [x])
    logits = b.linear("classifier", x, num_classes, output="logits", center=True)
    settings = dict(
        width=width, depth=depth, seed=seed, in_features=in_features, num_classes=num_classes
    )
    return b.model([(logits, [batch, num_classes])], name="mlp", settings=settings)
