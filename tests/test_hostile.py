"""Fuzzing the CLI with broken models: small valid models mutated as an attacker or a broken
exporter would (a dropped input, an initializer's dims swapped, a cycle, corrupt or truncated
bytes, an unknown op, a missing initializer, absurd dims). Whatever comes in, the CLI never
ends in an internal error (exit 2), never changes its input, and never writes an output that
fails onnx.checker or onnxruntime from an input that passes the checker (issue 23)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.hostile_cases import mlp
from onnx_squeeze import cli


def _drop_input(proto, _):
    del proto.graph.input[0]


def _swap_dims(proto, index):
    tensor = proto.graph.initializer[index % len(proto.graph.initializer)]
    tensor.dims[:] = [*reversed(tensor.dims), 2]


def _cycle(proto, index):
    node = proto.graph.node[index % 3]
    node.input[0] = proto.graph.node[3].output[0]


def _unknown_op(proto, index):
    proto.graph.node[index % 4].op_type = "NoSuchOp"


def _missing_initializer(proto, index):
    del proto.graph.initializer[index % len(proto.graph.initializer)]


def _absurd_dim(proto, index):
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[index % 2].dim_value = [0, 2**40, 3][index % 3]


def _duplicate_output(proto, index):
    proto.graph.node[1 + index % 3].output[0] = proto.graph.node[0].output[0]


MUTATIONS = [
    _drop_input,
    _swap_dims,
    _cycle,
    _unknown_op,
    _missing_initializer,
    _absurd_dim,
    _duplicate_output,
]


def _bytes_of(mutation, index: int, corrupt: int | None) -> bytes:
    proto = mlp()
    mutation(proto, index)
    data = proto.SerializeToString()
    if corrupt is not None:  # flip one byte, or cut the file there
        position = corrupt % len(data)
        if corrupt % 2:
            data = data[:position]
        else:
            data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]
    return data


def _valid_input(path) -> bool:
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
    except Exception:  # any complaint: decode errors, validation or inference errors
        return False
    return True


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutation=st.sampled_from(MUTATIONS),
    index=st.integers(0, 11),
    corrupt=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_a_mutated_model_never_ends_in_an_internal_error(
    tmp_path_factory, mutation, index, corrupt
):
    folder = tmp_path_factory.mktemp("hostile")
    source = folder / "m.onnx"
    source.write_bytes(_bytes_of(mutation, index, corrupt))
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = folder / "out.onnx"
    for argv in (
        ["inspect", str(source)],
        ["compress", str(source), "-o", str(out), "--prune-weights", "0.5", "--runs", "1"],
    ):
        code = cli.run(argv)
        assert code in (cli.EXIT_OK, cli.EXIT_INPUT), (mutation.__name__, argv[0], code)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    if out.exists() and _valid_input(source):  # an input the checker rejects is noted, not fixed
        onnx.checker.check_model(onnx.load(out), full_check=True)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feed = {
            i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()
        }
        session.run(None, feed)
