"""Calibration that stops once the activation ranges settle, and what it leaves unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_squeeze.calibration import Histogram, MinMax, StatisticsCollector, TensorStatistics
from onnx_squeeze.passes.base import make_pass
from onnx_squeeze.passes.quantize import bias_correction
from onnx_squeeze.passes.quantize import params as quant_params
from onnx_squeeze.passes.quantize.params import UINT8
from onnx_squeeze.passes.quantize.settling import RangeSettling
from onnx_squeeze.records import PassContext
from tests.helpers import check, run
from tests.test_quantize_int8 import block_model


def _histogram(values: np.ndarray) -> Histogram:
    histogram = Histogram(2048)
    histogram.update(values)
    return histogram


def test_noise_loss_is_the_db_of_expected_noise_between_two_ranges():
    histogram = _histogram(np.linspace(0.0, 1.0, 100_001))
    assert quant_params.noise_loss_db(histogram, (0.0, 1.0), (0.0, 1.0), UINT8) == 0.0
    # twice the range: twice the step, four times the rounding noise
    doubled = quant_params.noise_loss_db(histogram, (0.0, 2.0), (0.0, 1.0), UINT8)
    assert doubled == pytest.approx(10 * math.log10(4), abs=1e-6)
    assert quant_params.noise_loss_db(histogram, (0.0, 1.0), (0.0, 2.0), UINT8) == pytest.approx(
        -doubled
    )
    # clipping half of uniform values costs far more than rounding them
    assert quant_params.noise_loss_db(histogram, (0.0, 0.5), (0.0, 1.0), UINT8) > 30
    assert quant_params.noise_loss_db(None, (0.0, 0.5), (0.0, 1.0), UINT8) == math.inf
    assert quant_params.noise_loss_db(histogram, None, (0.0, 1.0), UINT8) == math.inf


def test_expected_errors_from_running_sums_equal_the_sum_over_every_bin():
    """Each candidate is scored on the grid it is quantized to: the zero point rounded to an
    integer, as scale_zero_point makes it."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        values = rng.standard_normal(5000) * rng.uniform(0.1, 10) + rng.uniform(-3, 3)
        histogram = _histogram(values.astype(np.float32))
        low, high = min(histogram.low, 0.0), max(histogram.high, 0.0)
        ranges = np.vstack([quant_params._candidates(low, high), [[low * 0.3, high * 0.2]]])
        centers = histogram.low + histogram.width * (np.arange(histogram.bins) + 0.5)
        expected = []
        for a, b in ranges:
            scale, zero = quant_params.scale_zero_point(a, b, UINT8, symmetric=False)
            step, zero = float(scale), int(zero)
            a, b = -zero * step, (UINT8.qmax - zero) * step
            inside = (centers >= a) & (centers <= b)
            error = np.where(inside, step**2 / 12, (centers - np.clip(centers, a, b)) ** 2)
            expected.append((error * histogram.counts).sum() / histogram.total)
        np.testing.assert_allclose(
            quant_params._expected_errors(histogram, ranges, UINT8, False), expected, rtol=1e-9
        )


def _feed_settling(settling: RangeSettling, scale_of_batch, batches: int = 256) -> int | None:
    """Feed ``batches`` batches of normal values (scaled per batch) to fresh statistics, asking
    ``settling`` after each; the batches read when it stopped (None: never)."""
    rng = np.random.default_rng(0)
    statistics = {"t": TensorStatistics("t", minmax=MinMax(), histogram=Histogram(2048))}
    for batch in range(1, batches + 1):
        statistics["t"].update(rng.standard_normal(4096).astype(np.float32) * scale_of_batch(batch))
        if settling(batch, statistics):
            return batch
    return None


def _mse_settling(tolerance_db: float = 0.1) -> RangeSettling:
    def range_of(statistics: TensorStatistics) -> tuple[float, float]:
        return quant_params.calibrated_range(statistics, "mse", UINT8, symmetric=False)

    return RangeSettling(range_of, UINT8, tolerance_db)


def test_ranges_of_steady_data_settle_at_the_first_check():
    settling = _mse_settling()
    assert _feed_settling(settling, lambda batch: 1.0) == 64
    [(batches, average, worst, name)] = settling.checks
    assert batches == 64 and name == "t" and average == worst <= 0.1


def test_ranges_of_drifting_data_never_settle():
    """Values that widen batch after batch: the first half's ranges clip the second half."""
    settling = _mse_settling()
    assert _feed_settling(settling, lambda batch: 1.0 + batch / 32) is None
    assert [check[0] for check in settling.checks] == [64, 128, 256]
    assert all(average > 0.1 for _, average, _, _ in settling.checks)


def test_zero_tolerance_never_checks():
    settling = _mse_settling(0.0)
    assert _feed_settling(settling, lambda batch: 1.0, batches=128) is None
    assert settling.checks == []


def test_a_tensor_with_no_range_keeps_reading():
    """A tensor whose range cannot be had (non-finite values) is left out of the judgement."""

    def range_of(statistics: TensorStatistics) -> tuple[float, float]:
        raise ValueError("non-finite")

    settling = RangeSettling(range_of, UINT8, 0.1)
    assert _feed_settling(settling, lambda batch: 1.0, batches=128) is None


# ---------------------------------------------------------------------------------------------
# In the collector and the quantizer


class _Batches:
    """``count`` single-sample feeds for ``block_model``: ``distinct`` random samples over and
    over (so that more of them tell nothing new), scaled by ``scale(index)``; counts the feeds
    read."""

    def __init__(self, count: int, distinct: int = 16, scale=lambda index: 1.0) -> None:
        self.count, self.distinct, self.scale, self.read = count, distinct, scale, 0
        self.label = f"batches ({count}, {id(self)})"

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        rng = np.random.default_rng(0)
        samples = rng.standard_normal((self.distinct, 1, 4, 8, 8)).astype(np.float32)
        for index in range(self.count):
            self.read += 1
            yield {"x": samples[index % self.distinct] * np.float32(self.scale(index))}


def test_the_collector_reads_no_further_than_stop_says():
    model = block_model()
    source = _Batches(40)
    collector = StatisticsCollector(model, ["r1"], keep=("minmax",), join=False)
    statistics = collector.collect(source, progress=False, stop=lambda read, _: read >= 5)
    assert source.read == 5
    assert statistics["r1"].minmax.count == 5 * 8 * 8 * 8


def _quantized(model, source, **settings):
    settings.setdefault("accuracy_control", False)  # it re-reads the first batches
    settings.setdefault("speed_check", False)  # and this the first one
    result = model.clone()
    context = PassContext(calibration=source)
    report = make_pass("quantize_int8", settings)(result, context)
    return result, report, context


def test_quantizer_stops_on_steady_data_and_reads_all_of_drifting_data():
    model = block_model()
    steady = _Batches(256)
    settled, report, _ = _quantized(model, steady, bias_correction=False)
    check(settled)
    [note] = [n for n in report.notes if n.startswith("calibration read")]
    read = int(note.split()[2])
    # joined runs put the checks near 32 and 64 batches; the joiner reads one feed ahead
    assert 64 <= read < 128 and steady.read <= read + 1
    everything = _Batches(256)
    full, report, _ = _quantized(model, everything, bias_correction=False, settle_db=0)
    assert everything.read == 256
    assert not any(n.startswith("calibration read") for n in report.notes)
    # the ranges had settled: both models give the same outputs, to a few quantization steps
    feed = next(iter(_Batches(1)))
    a, b, reference = run(settled, feed)[0], run(full, feed)[0], run(model, feed)[0]
    assert np.abs(a - b).max() < 0.02 * np.abs(reference).max()

    drifting = _Batches(256, scale=lambda index: 1.0 + index / 32)
    _, report, _ = _quantized(model, drifting, bias_correction=False)
    assert drifting.read == 256
    assert not any(n.startswith("calibration read") for n in report.notes)


def test_output_correction_measures_the_float_model_on_the_very_batches_it_read():
    """The float model's output means come from the calibration run, over its first batches
    (at least 32, whole joined runs); the quantized model is then measured on the same ones."""
    model = block_model()
    source = _Batches(100, distinct=100)
    _, report, context = _quantized(model, source, settle_db=0)
    reference = context.data.store(model, bias_correction.OUTPUT_MEANS)["first"]
    assert reference.read is not None and 32 <= reference.read < 100
    axes = reference.axes
    collector = StatisticsCollector(model, list(axes), keep=("means",), channel_axis=axes)
    direct = collector.collect(source, limit=reference.read, progress=False)
    for name in axes:
        np.testing.assert_allclose(reference.means[name].mean, direct[name].means.mean, rtol=1e-5)
    note = next(n for n in report.notes if n.startswith("output bias correction"))
    assert f"the first {reference.read} calibration batches" in note


def test_one_tensor_whose_noise_would_double_keeps_reading():
    """Forty tensors of uniform values; the first half's range of one of them is twice as wide
    as the whole data's (four times the rounding noise, +6 dB): the average loss is within the
    tolerance, yet that one tensor's noise would have more than doubled."""

    def range_of(statistics: TensorStatistics) -> tuple[float, float]:
        if statistics.name == "t0":
            width = 2.0 if statistics.minmax.count <= 32 * 4096 else 1.0
            return -width, width
        return statistics.minmax.min, statistics.minmax.max

    settling = RangeSettling(range_of, UINT8, tolerance_db=1.0)
    rng = np.random.default_rng(0)
    names = [f"t{index}" for index in range(40)]
    statistics = {n: TensorStatistics(n, minmax=MinMax(), histogram=Histogram(2048)) for n in names}
    for batch in range(1, 65):
        for name in names:
            statistics[name].update(rng.uniform(-1, 1, 4096).astype(np.float32))
        assert not settling(batch, statistics)
    [(_, average, worst, name)] = settling.checks
    assert name == "t0" and worst == pytest.approx(10 * math.log10(4), abs=0.05)
    assert average <= 1.0


def test_shapes_known_in_the_graph_spare_the_run_with_every_tensor_whole(monkeypatch):
    """With every collected tensor's shape in the graph, the reduced copy is the only session
    made; without, a whole-tensor run comes first. The statistics are the same."""
    from onnx_ir.passes.common import ShapeInferencePass

    from onnx_squeeze.calibration import collector as collector_module

    sessions = []
    original = collector_module.exposed_session
    monkeypatch.setattr(
        collector_module, "exposed_session", lambda m, p: sessions.append(m) or original(m, p)
    )
    names = ["r1", "c2", "r2", "f"]
    results = []
    for known in (False, True):
        model = block_model()
        ShapeInferencePass()(model)
        for name in names:  # element types stay known: the collector infers no shapes itself
            model.graph.node(name).outputs[0].shape = (
                model.graph.node(name).outputs[0].shape if known else None
            )
        sessions.clear()
        collector = StatisticsCollector(
            model, names, keep=("minmax", "histogram"), sample_values=64
        )
        results.append(collector.collect(_Batches(8, distinct=8), progress=False))
        assert len(sessions) == (1 if known else 2)
    for name in names:
        whole, reduced = results[0][name], results[1][name]
        assert (whole.minmax.min, whole.minmax.max) == (reduced.minmax.min, reduced.minmax.max)
        np.testing.assert_array_equal(whole.histogram.counts, reduced.histogram.counts)
