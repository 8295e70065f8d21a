"""Which ops may run in FP16/BF16: the block lists, the op schemas' type bindings, and probing
an execution provider for a low-precision kernel (one-node models, cached)."""

from __future__ import annotations

import functools
import os

import onnx
import onnx_ir as ir

from onnx_squeeze import runtime, scratch

# Kept in FP32 on every provider: indices/counters, sampling, and ops whose FP16 results are
# known to drift (cumulative sums, box decoding, sorting on ties).
RISKY_OPS = frozenset(
    {
        "Range",
        "CumSum",
        "NonMaxSuppression",
        "TopK",
        "RoiAlign",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "EyeLike",
        "ConstantOfShape",
    }
)
# Blocked for the GPU providers on top of RISKY_OPS, whether or not they are installed here: the
# rest of onnxruntime.transformers.float16's DEFAULT_OP_BLOCK_LIST (the ai.onnx.ml ops it also
# lists have no float16 type in their schemas, so they stay FP32 anyway). CUDA registers FP16
# kernels for nearly every other op.
GPU_BLOCKS = frozenset({"Min", "Max", "Upsample"})
STATIC_BLOCKS = {
    "CUDAExecutionProvider": GPU_BLOCKS,
    "TensorrtExecutionProvider": GPU_BLOCKS,
}


def schema(node: ir.Node, opset: int) -> onnx.defs.OpSchema | None:
    """The op's schema at the model's opset, None for an op onnx does not know."""
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None


def _formal(params: list, index: int) -> onnx.defs.OpSchema.FormalParameter | None:
    if index < len(params):
        return params[index]
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return params[-1] if params and params[-1].option == variadic else None


def convertible_slots(
    node: ir.Node, op_schema: onnx.defs.OpSchema, low: ir.DataType
) -> tuple[list[int], list[int]] | None:
    """Indices of the FLOAT inputs and outputs that may take ``low`` together (they are bound
    to type parameters that allow both), or None when a FLOAT slot cannot take it."""
    wanted = f"tensor({'float16' if low == ir.DataType.FLOAT16 else 'bfloat16'})"
    allowed = {
        c.type_param_str: set(c.allowed_type_strs)
        for c in op_schema.type_constraints
        if {"tensor(float)", wanted} <= set(c.allowed_type_strs)
    }
    slots: tuple[list[int], list[int]] = ([], [])
    for side, (values, params) in enumerate(
        ((node.inputs, op_schema.inputs), (node.outputs, op_schema.outputs))
    ):
        for index, value in enumerate(values):
            if value is None or value.dtype != ir.DataType.FLOAT:
                continue
            formal = _formal(params, index)
            if formal is not None and formal.type_str == "tensor(float)":
                continue  # a fixed FP32 slot (e.g. Resize scales) stays FP32
            if formal is None or formal.type_str not in allowed:
                return None
            slots[side].append(index)
    return slots


def _one_node_model(node: ir.Node, input_types: tuple, output_types: tuple, opset: int) -> bytes:
    """A model holding only a copy of ``node`` with the given element types (None: absent)."""
    inputs = [
        onnx.helper.make_tensor_value_info(f"x{i}", t, None)
        for i, t in enumerate(input_types)
        if t is not None
    ]
    outputs = [
        onnx.helper.make_tensor_value_info(f"y{i}", t, None) for i, t in enumerate(output_types)
    ]
    proto = ir.serde.serialize_node(node)
    del proto.input[:], proto.output[:]
    proto.input.extend(f"x{i}" if t is not None else "" for i, t in enumerate(input_types))
    proto.output.extend(f"y{i}" for i in range(len(output_types)))
    proto.name, proto.doc_string = "probe", ""
    if node.op_type == "Cast":  # its output type is its "to" attribute
        proto.attribute.remove(next(a for a in proto.attribute if a.name == "to"))
        proto.attribute.append(onnx.helper.make_attribute("to", output_types[0]))
    del proto.metadata_props[:]  # per-node notes would defeat the cache
    graph = onnx.helper.make_graph([proto], "probe", inputs, outputs)
    opsets = [onnx.helper.make_opsetid("", opset)]
    if node.domain:
        opsets.append(onnx.helper.make_opsetid(node.domain, 1))
    return onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString()


@functools.lru_cache(maxsize=4096)
def _has_kernel(provider: str, data: bytes, is_cast: bool) -> bool:
    """True when ``provider`` runs the one-node model natively: the session loads and
    onnxruntime inserted no Cast (its CPU EP silently wraps FP16 nodes without kernels in
    Casts to float); ``is_cast`` says the probed node is itself a Cast."""
    with scratch.folder("probe") as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = runtime.session_options(optimization="none", optimized_model_path=path)
        if provider != "CPUExecutionProvider":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:  # a plain session: the probe asks the provider itself, no exposed copy to run
            runtime.ort.InferenceSession(data, options, providers=[provider])
        except Exception:  # any failure (no kernel, bad attributes) means no usable kernel
            return False
        optimized = onnx.load(path)
    return sum(n.op_type == "Cast" for n in optimized.graph.node) == int(is_cast)


def probe(
    provider: str, node: ir.Node, slots: tuple[list[int], list[int]], low: ir.DataType, opset: int
) -> bool:
    """True when ``provider`` (available here) has a kernel for ``node`` with ``slots`` in
    ``low`` precision."""
    inputs = tuple(
        None if v is None else (int(low) if i in slots[0] else int(v.dtype or 1))
        for i, v in enumerate(node.inputs)
    )
    outputs = tuple(
        int(low) if i in slots[1] else int(v.dtype or 1) for i, v in enumerate(node.outputs)
    )
    data = _one_node_model(node, inputs, outputs, opset)
    return _has_kernel(provider, data, node.op_type == "Cast")
