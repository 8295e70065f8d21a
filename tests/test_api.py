"""The Python API takes what users have: a model as a path, an ``onnx.ModelProto`` or an
``onnx_ir.Model``; calibration data as a path, a dict of arrays, feed dicts (a list or a
generator) or an onnxruntime ``CalibrationDataReader``; and gives back a result with the model
(``model_proto()``, ``save()``), and its warnings through ``warnings`` and ``logging`` too."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxruntime.quantization import CalibrationDataReader

import onnx_squeeze as sq
from onnx_squeeze import model_io, zoo
from onnx_squeeze.errors import SettingsError
from onnx_squeeze.runtime import create_session

SAMPLES = 20  # batches of one: 16 to calibrate on, every 5th (4) held out
# the quick INT8 (no accuracy control, placement by the plan alone, untimed: INT8 runs these
# small models slower than float, so the default speed check would leave them float) ...
INT8 = sq.Recipe.from_cli(["quantize_int8:accuracy_control=false,speed_check=false"])
INT8.prepare["simplify"] = False  # ... without onnxsim's subprocess (2.4 s of 2.7 s a run)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    path = folder / "mlp.onnx"
    model_io.save(zoo.small("mlp"), path)
    samples = np.random.default_rng(1).standard_normal((SAMPLES, 64)).astype(np.float32)
    np.savez(folder / "calib.npz", input=samples)
    return path, folder / "calib.npz", samples


class Reader(CalibrationDataReader):
    """onnxruntime's reader protocol, as a user's quantization script has it."""

    def __init__(self, samples: np.ndarray) -> None:
        self.feeds = iter([{"input": samples[i : i + 1]} for i in range(len(samples))])

    def get_next(self):
        return next(self.feeds, None)


def _outputs(model: ir.Model | onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = create_session(model if isinstance(model, onnx.ModelProto) else ir.to_proto(model))
    return session.run(None, feed)[0]


def _int8(model, calibration, **options) -> sq.CompressResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sq.SqueezeWarning)
        return sq.compress(model, INT8, calibration=calibration, runs=1, **options)


def test_calibration_as_a_path_a_dict_feeds_a_generator_or_a_reader_gives_the_same_model(mlp):
    path, npz, samples = mlp
    feeds = [{"input": samples[i : i + 1]} for i in range(SAMPLES)]
    results = {
        "path": _int8(str(path), str(npz)),
        "dict": _int8(str(path), {"input": samples}),
        "list": _int8(str(path), feeds),
        "generator": _int8(str(path), (feed for feed in feeds)),
        "reader": _int8(str(path), Reader(samples)),
    }
    probe = {"input": np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)}
    reference = _outputs(results["path"].model, probe)
    original = _outputs(onnx.load(path), probe)
    for how, result in results.items():
        assert result.calibration.used and not result.calibration.is_random, how
        # the same 16 batches calibrated, the same 4 held out and judged on
        assert "RANDOM" not in " ".join(result.warnings), how
        assert "held out" in result.report["evaluation"], how
        np.testing.assert_array_equal(_outputs(result.model, probe), reference, err_msg=how)
    # and it is an INT8 model of the original: close in every output channel, not equal
    noise = ((reference - original) ** 2).sum(axis=0)
    sqnr_db = 10 * np.log10((original**2).sum(axis=0) / noise)
    assert noise.min() > 0 and sqnr_db.min() > 12 and np.median(sqnr_db) > 20


def test_the_model_as_a_path_a_proto_or_an_ir_model(mlp):
    path, npz, _ = mlp
    probe = {"input": np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)}
    proto = onnx.load(path)
    results = [_int8(source, str(npz)) for source in (str(path), proto, ir.from_proto(proto))]
    expected = _outputs(results[0].model, probe)
    for result in results[1:]:
        np.testing.assert_array_equal(_outputs(result.model, probe), expected)
    assert results[0].report["input"] == str(path) and results[1].report["input"] is None
    # compare takes them all as well
    fidelity = sq.compare(proto, results[1].model, feeds=[probe], runs=0).fidelity[0]
    assert 0 < fidelity.max_abs < 0.5 and fidelity.cosine > 0.99


def test_the_result_gives_its_model_as_a_proto_and_saves_it(mlp, tmp_path):
    path, npz, _ = mlp
    result = _int8(str(path), str(npz))
    proto = result.model_proto()
    onnx.checker.check_model(proto, full_check=True)
    written = result.save(tmp_path / "int8.onnx")
    probe = {"input": np.ones((1, 64), np.float32)}
    expected = _outputs(result.model, probe)
    np.testing.assert_array_equal(_outputs(proto, probe), expected)
    np.testing.assert_array_equal(_outputs(onnx.load(written), probe), expected)
    with pytest.raises(SettingsError, match="input"):
        result.save(path)  # never over the model it came from


def test_warnings_go_through_python_warnings_and_logging(mlp, caplog):
    path, _, _ = mlp
    with (
        caplog.at_level(logging.WARNING, logger="onnx_squeeze"),
        pytest.warns(sq.SqueezeWarning) as caught,
    ):
        result = sq.compress(str(path), INT8, calibration="random", runs=1)
    assert result.warnings
    assert [str(w.message) for w in caught] == result.warnings
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == (
        result.warnings
    )
    assert caught[0].filename == __file__  # pointed at the caller's line


def test_unusable_calibration_data_is_one_clear_error(mlp):
    path, _, _ = mlp
    with pytest.raises(SettingsError, match="dict"):
        sq.compress(str(path), INT8, calibration=3, runs=1)
    with pytest.raises(sq.errors.InputError, match="each must be a dict"):
        _int8(str(path), [np.zeros((1, 64), np.float32)])
