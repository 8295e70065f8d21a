"""Models fed more than one batch of samples: a recurrent state with its batch on axis 1, a
scalar sample rate the graph branches on, constant-valued inputs (--set) and integer inputs
that random data must not invent (issue 19: silero-vad's `input`, `state [2, B, 128]`, `sr`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_squeeze as sq
from onnx_squeeze import cli, model_io
from onnx_squeeze.calibration import NpzSource, open_source
from onnx_squeeze.calibration.service import Calibration, resized
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import create_session, input_specs
from onnx_squeeze.shapes import batch_axis, concrete_input_shapes

rng = np.random.default_rng(0)
W = rng.standard_normal((8, 4)).astype(np.float32)


def vad_model() -> ir.Model:
    """Like silero-vad: ``state`` float [2, ?, 4] (batch on axis 1), ``input`` float [?, 8],
    ``sr`` an int64 scalar. The sample rate picks a branch (If on sr == 16000: the
    hidden state x 1, else x 0.5) and scales the output (x sr / 16000), so a wrong value shows
    in both outputs.

    output = tanh(input @ W + state[0]) * branch * sr / 16000     [B, 4]
    stateN = state + output                                          [2, B, 4]
    """
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"], name="proj"),
        helper.make_node("Gather", ["state", "zero"], ["first"], axis=0, name="first"),
        helper.make_node("Add", ["h", "first"], ["pre"], name="add"),
        helper.make_node("Tanh", ["pre"], ["act"], name="tanh"),
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
        helper.make_node(
            "If",
            ["is16k"],
            ["branch"],
            name="branch",
            then_branch=helper.make_graph(
                [helper.make_node("Identity", ["act"], ["kept"])],
                "then",
                [],
                [helper.make_tensor_value_info("kept", TensorProto.FLOAT, None)],
            ),
            else_branch=helper.make_graph(
                [helper.make_node("Mul", ["act", "half"], ["halved"])],
                "else",
                [],
                [helper.make_tensor_value_info("halved", TensorProto.FLOAT, None)],
            ),
        ),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="srf"),
        helper.make_node("Div", ["srf", "rate16kf"], ["ratio"], name="ratio"),
        helper.make_node("Mul", ["branch", "ratio"], ["output"], name="scale"),
        helper.make_node("Add", ["state", "output"], ["stateN"], name="update"),
    ]
    inits = [
        numpy_helper.from_array(W, "w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
        numpy_helper.from_array(np.array(16000, np.float32), "rate16kf"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]),
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 4]),
        ],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def reference(feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs in numpy."""
    sr = int(feed["sr"])
    act = np.tanh(feed["input"] @ W + feed["state"][0])
    output = act * (1.0 if sr == 16000 else 0.5) * sr / 16000
    return output, feed["state"] + output


SAMPLES = 10


def vad_data() -> dict[str, np.ndarray]:
    data = np.random.default_rng(1)
    return {
        "input": data.standard_normal((SAMPLES, 8)).astype(np.float32),
        "state": data.standard_normal((2, SAMPLES, 4)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


@pytest.fixture
def vad_npz(tmp_path):
    path = tmp_path / "vad.npz"
    np.savez(path, **vad_data())
    return path


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(model, optimization="none").run(None, feed)


# ----------------------------------------------------------------------------- batch axes


@pytest.mark.parametrize(
    ("dims", "data", "axis"),
    [
        ((), None, None),  # a scalar: the same value for every sample
        (("N", 3), None, 0),
        ((1, 1, 64, "W"), None, 0),  # a fixed batch of one before a symbolic width
        ((1, 1, 64, "W"), (32, 1, 64, 170), 0),
        ((2, "?", 128), None, 1),  # a recurrent state: batch on axis 1
        ((2, "?", 128), (2, 32, 128), 1),
        ((2, "?", 128), (), None),  # a 0-d array: one value
        ((8, "seq"), (64, 16), 0),  # the data holds more than the fixed 8 on axis 0
        ((3, 4), None, 0),
    ],
)
def test_batch_axis_of_an_input(dims, data, axis):
    assert batch_axis(dims, data) == axis


def test_shapes_put_the_batch_on_the_states_axis():
    shapes = concrete_input_shapes(vad_model(), {"input": (3, 8)}, batch=3)
    assert shapes == {"state": (2, 3, 4), "input": (3, 8), "sr": ()}


# ----------------------------------------------------------------------------- .npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_samples_are_cut_on_each_inputs_batch_axis(tmp_path, save):
    """Stored (read batch by batch) and compressed files alike: batch i holds sample i of the
    input and state i of axis 1, with the one sample rate; the model runs on every batch and
    matches numpy."""
    data = vad_data()
    save(tmp_path / "vad.npz", **data)
    model = vad_model()
    source = open_source(tmp_path / "vad.npz", model)
    feeds = list(source)
    assert len(feeds) == SAMPLES and source.label.endswith(f"({SAMPLES} samples)")
    for index, feed in enumerate(feeds):
        assert feed["input"].shape == (1, 8) and feed["state"].shape == (2, 1, 4)
        assert feed["sr"].shape == () and feed["sr"].dtype == np.int64
        np.testing.assert_array_equal(feed["state"], data["state"][:, index : index + 1])
        np.testing.assert_array_equal(feed["input"], data["input"][index : index + 1])
        for got, want in zip(run(model, feed), reference(feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    batched = list(NpzSource(tmp_path / "vad.npz", input_specs(model), batch_size=4))
    assert [f["state"].shape for f in batched] == [(2, 4, 4), (2, 4, 4), (2, 2, 4)]
    np.testing.assert_array_equal(batched[2]["state"], data["state"][:, 8:])


def test_npz_whose_arrays_disagree_on_samples_names_them(tmp_path):
    data = vad_data()
    data["state"] = data["state"][:, :7]
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(InputError) as error:
        open_source(tmp_path / "bad.npz", vad_model())
    message = str(error.value)
    assert "state: 7 on axis 1" in message and "input: 10 on axis 0" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- constants


def test_a_set_value_goes_with_every_feed_and_replaces_the_datas(tmp_path):
    """sr from --set instead of the file (or over it): every feed takes it as an int64 scalar,
    and the model's outputs follow the value."""
    data = vad_data()
    np.savez(tmp_path / "no_sr.npz", input=data["input"], state=data["state"])
    model = vad_model()
    with pytest.raises(InputError, match=r"no array for model input 'sr'.*--set"):
        open_source(tmp_path / "no_sr.npz", model)
    source = open_source(tmp_path / "no_sr.npz", model, constants={"sr": "8000"})
    assert source.label.endswith("with sr=8000 set")
    for feed in source:
        assert feed["sr"].dtype == np.int64 and feed["sr"].shape == () and feed["sr"] == 8000
        output, state = run(model, feed)
        np.testing.assert_allclose(output, reference(feed)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state, reference(feed)[1], rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "vad.npz", **data)
    over = next(iter(open_source(tmp_path / "vad.npz", model, constants={"sr": 8000})))
    assert over["sr"] == 8000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"rate": 1}, "--set names 'rate', which the model does not take; its inputs are"),
        ({"sr": "abc"}, "--set sr=abc: input 'sr' takes a number of type int64"),
        ({"sr": 1.5}, "input 'sr' .* is not a whole number"),
        ({"sr": 2**70}, "does not fit in int64"),
        ({"state": np.zeros((3, 1, 4))}, "input 'state' has shape \\(3, 1, 4\\)"),
    ],
)
def test_a_value_that_does_not_fit_names_the_input(vad_npz, value, message):
    with pytest.raises(SettingsError, match=message):
        open_source(vad_npz, vad_model(), constants=value)


def test_one_value_fills_an_input_of_higher_rank(tmp_path):
    """A mask given as one value (--set, or a 0-d array in the .npz) takes each feed's batch
    and its fixed width."""
    model = ir.from_proto(
        onnx.parser.parse_model(
            """<ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 3] x, int64[N, 3] mask) => (float[N, 3] y) {
                m = Cast <to = 1> (mask)
                y = Mul (x, m)
            }"""
        )
    )
    with pytest.raises(
        InputError, match=r"input 'mask' is int64 \['N', 3\] read as values \(Cast\)"
    ):
        open_source("random", model)
    source = open_source("random", model, count=6, batch_size=3, constants={"mask": 1})
    for feed in source:
        assert feed["mask"].shape == (3, 3) and (feed["mask"] == 1).all()
        np.testing.assert_array_equal(run(model, feed)[0], feed["x"])
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.savez(tmp_path / "mask.npz", x=x, mask=np.array(2))
    feeds = list(open_source(tmp_path / "mask.npz", model, batch_size=2))
    assert [f["mask"].shape for f in feeds] == [(2, 3), (2, 3), (1, 3)]
    np.testing.assert_array_equal(np.concatenate([run(model, f)[0] for f in feeds]), 2 * x)


# ----------------------------------------------------------------------------- random data


def test_random_data_never_invents_the_sample_rate():
    model = vad_model()
    with pytest.raises(InputError) as error:
        open_source("random", model, shapes={"input": (1, 8)})
    assert str(error.value) == (
        "input 'sr' is an int64 scalar: random values would be invented; give it with "
        "--set sr=VALUE or in the data"
    )
    source = open_source("random", model, count=4, constants={"sr": 16000})
    assert source.is_random and source.label.startswith("random (4 samples")
    for feed in source:  # the float state is drawn, batch on axis 1
        assert feed["state"].shape == (2, 1, 4) and feed["sr"] == 16000
        np.testing.assert_allclose(run(model, feed)[0], reference(feed)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rows", "drawn"), [(40, True), (4, False)])
def test_token_ids_into_a_table_are_drawn_within_it(rows, drawn):
    """Ids only read by a Gather from a constant table of at least 8 rows take random ids 0..7
    (the zoo transformer's input_ids); a smaller table would be indexed out of range."""
    table = np.ones((rows, 2), np.float32)
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[N, 5] ids) => (float[N, 5, 2] y, int64[2] shape) {
            y = Gather (table, ids)
            shape = Shape (ids)
        }"""
    )
    proto.graph.initializer.append(numpy_helper.from_array(table, "table"))
    model = ir.from_proto(proto)
    if drawn:
        feed = next(iter(open_source("random", model)))
        assert feed["ids"].dtype == np.int64 and 0 <= feed["ids"].min() <= feed["ids"].max() < 8
        assert run(model, feed)[0].shape == (1, 5, 2)
    else:
        with pytest.raises(InputError, match=r"input 'ids' is int64 .* read as values"):
            open_source("random", model)


# ----------------------------------------------------------------------------- consumers


def test_held_out_split_resize_and_sample_counts_follow_the_batch_axis(vad_npz):
    """Every consumer of the data cuts it on the same axes: the held-out fifth is samples 4
    and 9 (state columns alike), the calibration keeps the others, a feed resized for timing
    repeats samples on each batch axis, and the service counts samples there. Static INT8
    reads the data (a pass that reads none is judged on all of it: test_pipeline)."""
    model = vad_model()
    data = dict(np.load(vad_npz))
    recipe = sq.Recipe.from_cli(["quantize_int8:accuracy_control=false"])
    result = sq.compress(model, recipe, calibration=str(vad_npz), runs=1)
    held = list(result.evaluation)
    assert [f["input"].tolist() for f in held] == [data["input"][[i]].tolist() for i in (4, 9)]
    for feed, index in zip(held, (4, 9), strict=True):
        np.testing.assert_array_equal(feed["state"], data["state"][:, [index]])
    kept = list(result.calibration)
    assert len(kept) == 8 and not any(np.array_equal(k["input"], held[0]["input"]) for k in kept)
    assert result.comparison["input_shapes"] == {"state": [2, 1, 4], "input": [1, 8], "sr": []}
    # The compressed model runs on every held-out feed and stays close to the original.
    for feed in held:
        for got, want in zip(run(result.model, feed), reference(feed), strict=True):
            np.testing.assert_allclose(got, want, atol=0.05)

    wide = resized(held[0], model, 3)
    assert wide["state"].shape == (2, 3, 4) and wide["input"].shape == (3, 8)
    assert wide["sr"].shape == ()
    np.testing.assert_array_equal(wide["state"][:, 2], held[0]["state"][:, 0])

    service = Calibration(open_source(vad_npz, model, batch_size=2))
    service.draw_random_for(model, lambda m: {})
    notes: list[str] = []
    assert len(service.first_samples(3, "test", notes)) == 2  # 2 + 2 samples, not 2 x 2 rows
    assert "4 samples in 2 batches" in notes[-1]


# ----------------------------------------------------------------------------- CLI


def test_cli_compare_and_compress_take_the_npz_and_set(tmp_path, vad_npz, capsys):
    path = tmp_path / "vad.onnx"
    model_io.save(vad_model(), path)
    out = tmp_path / "out.onnx"
    assert cli.run(["compare", str(path), str(path), "--inputs", str(vad_npz), "--runs", "1"]) == 0
    code = cli.run(["compress", str(path), "-o", str(out), "--runs", "1"])
    assert code == cli.EXIT_INPUT and not out.exists()
    assert "input 'sr' is an int64 scalar" in capsys.readouterr().err
    args = ["compress", str(path), "-o", str(out), "--runs", "1", "--int8-dynamic"]
    assert cli.run([*args, "--set", "sr=16000", "--shape", "input:1x8"]) == 0
    assert cli.run([*args, "--calib", str(vad_npz), "--force"]) == 0
    feed = {k: v[:, :1] if k == "state" else v[:1] if v.ndim else v for k, v in vad_data().items()}
    for got, want in zip(run(model_io.load(out), feed), reference(feed), strict=True):
        np.testing.assert_allclose(got, want, atol=0.05)
