"""Calibration sources and streaming statistics."""

from __future__ import annotations

import math
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_squeeze.calibration import (
    CalibrationSource,
    ChannelStatistics,
    Histogram,
    ImageFolderSource,
    MinMax,
    NpzSource,
    RandomSource,
    ReaderSource,
    StatisticsCollector,
    joined,
    open_source,
    stat_graph,
)
from onnx_squeeze.errors import InputError, SettingsError
from onnx_squeeze.runtime import InputSpec, input_specs

Image = pytest.importorskip("PIL.Image")


def parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def two_input_model(batch: str = "N") -> ir.Model:
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch},3] a, int64[{batch},2] b) => (float[{batch},3] y) {{ y = Identity(a) }}
        """
    )


def image_model(shape: str) -> ir.Model:
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{shape}] image) => (float[{shape}] y) {{ y = Identity(image) }}
        """
    )


def conv_relu_proto(batch: int | str = "N") -> onnx.ModelProto:
    """x -> Conv(2->4, 3x3) -> Relu (r1) -> Conv(4->3, 1x1) -> y, seeded weights."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    b1 = np.array([0.5, -0.5, 0.0, -3.0], np.float32)  # the last channel is mostly zero after Relu
    w2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
        ],
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches_of(arrays: list[np.ndarray], name: str = "x") -> list[dict[str, np.ndarray]]:
    return [{name: a} for a in arrays]


# ----------------------------------------------------------------------------- npz / npy


def test_npz_file_split_into_batches_and_cast(tmp_path):
    a = np.arange(30, dtype=np.float64).reshape(10, 3)
    b = np.arange(20).reshape(10, 2)
    path = tmp_path / "calib.npz"
    np.savez(path, a=a, b=b, labels=np.zeros(10))  # extra arrays are ignored
    source = NpzSource(path, input_specs(two_input_model()), batch_size=4)
    feeds = list(source)
    assert [f["a"].shape[0] for f in feeds] == [4, 4, 2] and len(source) == 3
    assert all(f["a"].dtype == np.float32 and f["b"].dtype == np.int64 for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["a"] for f in feeds]), a.astype(np.float32))
    assert set(feeds[0]) == {"a", "b"}
    assert source.label == f"npz:{path} (10 samples)" and not source.is_random
    assert isinstance(source, CalibrationSource)
    again = list(source)  # iterating again restarts
    np.testing.assert_array_equal(again[0]["b"], feeds[0]["b"])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_batches_are_read_from_the_file_only_when_fed(tmp_path, save, monkeypatch):
    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    b = np.asfortranarray(np.arange(20).reshape(10, 2))  # Fortran order: loaded whole
    save(tmp_path / "calib.npz", a=a, b=b)
    loads = []
    monkeypatch.setattr(np, "load", lambda *args, **kw: loads.append(1) or _np_load(*args, **kw))
    source = NpzSource(tmp_path / "calib.npz", input_specs(two_input_model()), batch_size=4)
    feeds = list(source)
    np.testing.assert_array_equal(np.concatenate([f["a"] for f in feeds]), a)
    np.testing.assert_array_equal(np.concatenate([f["b"] for f in feeds]), b)
    assert len(loads) == 1  # b (or the compressed file) is loaded; stored C-order a never is
    np.savez(tmp_path / "c.npz", a=a, b=np.ascontiguousarray(b))
    loads.clear()
    assert sum(f["a"].shape[0] for f in NpzSource(tmp_path / "c.npz", source._specs)) == 10
    assert not loads


_np_load = np.load


def test_npz_fixed_batch_dimension_drops_partial_batch(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, a=np.zeros((5, 3), np.float32), b=np.zeros((5, 2), np.int64))
    source = NpzSource(path, input_specs(two_input_model(batch="2")))
    assert source.batch_size == 2
    assert [f["a"].shape for f in source] == [(2, 3), (2, 3)]
    assert "4 samples, 1 unused" in source.label
    with pytest.raises(SettingsError, match="fixed at 2"):
        NpzSource(path, input_specs(two_input_model(batch="2")), batch_size=3)


def test_npy_file_and_folder_sorted_by_name(tmp_path):
    model = image_model("N,3")
    data = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    np.save(tmp_path / "one.npy", data)
    feeds = list(open_source(tmp_path / "one.npy", model, batch_size=6))
    np.testing.assert_array_equal(feeds[0]["image"], data)

    folder = tmp_path / "parts"
    folder.mkdir()
    np.save(folder / "b.npy", data[3:])
    np.savez(folder / "a.npz", image=data[:3])
    source = open_source(folder, model, batch_size=2, limit=5)
    assert isinstance(source, NpzSource)
    got = np.concatenate([f["image"] for f in source])
    np.testing.assert_array_equal(got, data[:5])  # a.npz first; batches do not span files
    assert [f["image"].shape[0] for f in source] == [2, 1, 2]
    assert source.label == f"npz:{folder} (2 files, 5 samples, 1 unused)"


def test_npy_for_a_model_with_two_inputs_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"x\.npy.*one array.*2 inputs \(a, b\).*\.npz"):
        open_source(tmp_path / "x.npy", two_input_model())


MISMATCHES = [
    ({"a": np.zeros((2, 3), np.float32)}, r"no array for model input 'b'; the file has 'a'"),
    (
        {"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 2), np.int64)},
        r"array 'a' has shape \(2, 4\), the model input needs \('N', 3\)",
    ),
    (
        {"a": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.int64)},
        r"array 'a' has shape \(3,\)",
    ),
    (
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 2), np.float32)},
        r"array 'b' is float32, the model input is int64: save it with \.astype\(np\.int64\)",
    ),
    (
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.int64)},
        r"different numbers of samples",
    ),
]


@pytest.mark.parametrize(("arrays", "message"), MISMATCHES)
def test_npz_mismatch_names_the_file_and_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message) as error:
        NpzSource(path, input_specs(two_input_model()))
    assert "bad.npz" in str(error.value)


@pytest.mark.parametrize(("arrays", "message"), MISMATCHES)
def test_arrays_given_in_memory_are_checked_as_a_file_is(arrays, message):
    with pytest.raises(InputError, match=message) as error:
        open_source(arrays, two_input_model())
    assert str(error.value).startswith("the given arrays: ")


def test_arrays_in_memory_and_feed_lists_are_batched_like_a_file(tmp_path):
    a = np.arange(30, dtype=np.float64).reshape(10, 3)
    b = np.arange(20).reshape(10, 2)
    np.savez(tmp_path / "calib.npz", a=a, b=b)
    model = two_input_model()
    from_file = list(open_source(tmp_path / "calib.npz", model, batch_size=4))
    from_arrays = open_source({"a": a, "b": b}, model, batch_size=4)
    assert from_arrays.label == "arrays (10 samples)" and len(from_arrays) == 3
    feeds = open_source(from_file, model)
    assert feeds.label == "feeds (3 batches)" and len(feeds) == 3
    once = open_source(iter(from_file), model)  # an iterator: read once, replayed
    for source in (from_arrays, feeds, once, once):
        got = list(source)
        assert [sorted(f) for f in got] == [["a", "b"]] * 3
        for mine, theirs in zip(got, from_file, strict=True):
            for name in ("a", "b"):
                assert mine[name].dtype == theirs[name].dtype
                np.testing.assert_array_equal(mine[name], theirs[name])


def test_missing_path_and_unknown_file_type(tmp_path):
    model = image_model("N,3")
    with pytest.raises(InputError, match=r"calibration data not found: .*nope\.npz"):
        open_source(str(tmp_path / "nope.npz"), model)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(InputError, match="unsupported file type"):
        open_source(tmp_path / "data.csv", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.npz/\.npy files or images"):
        open_source(tmp_path / "empty", model)
    with pytest.raises(SettingsError, match="got a int"):
        open_source(3, model)


# ----------------------------------------------------------------------------- images


def write_image(path, size, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_imagenet_nchw(tmp_path):
    write_image(tmp_path / "b" / "2.png", (300, 200), (255, 0, 0))
    write_image(tmp_path / "a.png", (100, 150), (0, 128, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(tmp_path, image_model("N,3,32,48"), batch_size=2)
    assert isinstance(source, ImageFolderSource) and source.layout == "NCHW"
    [feed] = list(source)
    batch = feed["image"]
    assert batch.shape == (2, 3, 32, 48) and batch.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    # sorted by path: a.png before b/2.png; a flat color survives resize and crop exactly.
    np.testing.assert_allclose(
        batch[0, :, 5, 5], (np.array([0, 128, 255]) / 255 - mean) / std, rtol=1e-5
    )
    np.testing.assert_allclose(
        batch[1, :, 5, 5], (np.array([255, 0, 0]) / 255 - mean) / std, rtol=1e-5
    )
    assert "2 images, imagenet 32x48 NCHW" in source.label


def test_image_folders_are_taken_in_turn_so_a_limit_spans_every_class(tmp_path):
    for folder, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        for index in range(3):
            write_image(tmp_path / folder / f"{index}.png", (8, 8), color)
    source = ImageFolderSource(tmp_path, input_specs(image_model("1,3,8,8"))[0], "raw01", limit=2)
    assert [p.relative_to(tmp_path).as_posix() for p in source.files] == ["cat/0.png", "dog/0.png"]
    reds = [float(feed["image"][0, 0].mean()) for feed in source]
    assert reds == pytest.approx([1.0, 0.0])


def test_image_folder_nhwc_presets_symbolic_size_and_limit(tmp_path):
    write_image(tmp_path / "wide.jpg", (80, 40), (255, 255, 255))
    write_image(tmp_path / "z.bmp", (10, 10), (0, 0, 0))
    model = image_model("N,H,W,3")
    yolo = ImageFolderSource(tmp_path, input_specs(model)[0], "yolo", limit=1)
    assert yolo.layout == "NHWC" and yolo.size == (640, 640) and len(yolo) == 1
    [feed] = list(yolo)
    image = feed["image"][0]
    assert image.shape == (640, 640, 3)
    np.testing.assert_allclose(image[0, 0], 114 / 255, rtol=1e-6)  # letterbox padding
    np.testing.assert_allclose(image[320, 320], 1.0, atol=0.02)  # the white image, centered

    raw = ImageFolderSource(
        tmp_path, input_specs(model)[0], "raw01", overrides={"image": (1, 20, 30, 3)}
    )
    shapes = [f["image"].shape for f in raw]
    assert shapes == [(1, 20, 30, 3)] * 2
    inception = open_source(tmp_path, image_model("1,3,16,16"), preset="inception")
    values = np.concatenate([f["image"] for f in inception])
    assert values.min() >= -1 and values.max() <= 1 and values.min() < -0.9 and values.max() > 0.9


def test_image_errors(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", (8, 8), (1, 2, 3))
    with pytest.raises(SettingsError, match="unknown image preset 'vgg'"):
        open_source(tmp_path, image_model("1,3,8,8"), preset="vgg")
    with pytest.raises(InputError, match="no 3-channel axis"):
        open_source(tmp_path, image_model("1,1,8,8"))
    with pytest.raises(InputError, match=r"one input.*has 2"):
        open_source(tmp_path, two_input_model())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"cannot read image .*broken\.jpg"):
        list(open_source(tmp_path, image_model("1,3,8,8")))
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"both arrays .* and images"):
        open_source(tmp_path, image_model("1,3,8,8"))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(InputError, match=r"pip install onnx-squeeze\[images\]"):
        ImageFolderSource(tmp_path, input_specs(image_model("1,3,8,8"))[0])


# ----------------------------------------------------------------------------- random, readers


def test_random_source_is_labelled_and_deterministic():
    model = two_input_model()
    source = open_source(None, model, count=5, seed=3, batch_size=2)
    assert isinstance(source, RandomSource) and source.is_random
    assert source.label == "random (6 samples, seed 3)" and len(source) == 3
    first, again = list(source), list(source)
    same_seed = list(open_source("random", model, count=5, seed=3, batch_size=2))
    other_seed = list(open_source("random", model, count=5, seed=4, batch_size=2))
    assert first[0]["a"].shape == (2, 3) and first[0]["b"].dtype == np.int64
    for feeds in (again, same_seed):
        np.testing.assert_array_equal(feeds[2]["a"], first[2]["a"])
    assert not np.array_equal(other_seed[0]["a"], first[0]["a"])
    fixed = RandomSource(input_specs(two_input_model("4")), count=8)
    assert fixed.batch_size == 4 and [f["b"].shape for f in fixed] == [(4, 2), (4, 2)]
    mixed = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] x, float[1] scale) => (float[N,3] y) { y = Mul(x, scale) }
        """
    )
    feed = next(iter(RandomSource(input_specs(mixed), batch_size=4)))
    assert (feed["x"].shape, feed["scale"].shape) == ((4, 3), (1,))  # fixed dims stay
    overridden = RandomSource(
        input_specs(image_model("N,3,H,W")), overrides={"image": (2, 3, 5, 7)}
    )
    assert next(iter(overridden))["image"].shape == (2, 3, 5, 7)


class ListReader:
    """onnxruntime's CalibrationDataReader protocol, optionally with rewind()."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.position = 0

    def get_next(self):
        if self.position == len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]


class RewindingReader(ListReader):
    def rewind(self):
        self.position = 0


def reader_feeds(count=3):
    return [{"x": np.full((1, 2), i, np.float32)} for i in range(count)]


def test_reader_with_rewind_iterates_again():
    source = open_source(RewindingReader(reader_feeds()), model=None)
    assert isinstance(source, ReaderSource) and not source.is_random
    assert source.label == "reader:RewindingReader"
    first = [f["x"][0, 0] for f in source]
    assert first == [f["x"][0, 0] for f in source] == [0, 1, 2]


def test_reader_without_rewind_is_cached_when_small():
    reader = ListReader(reader_feeds(4))
    source = ReaderSource(reader)
    partial = iter(source)
    assert next(partial)["x"][0, 0] == 0  # a pass stopped early ...
    assert [f["x"][0, 0] for f in source] == [0, 1, 2, 3]  # ... continues from the reader
    assert [f["x"][0, 0] for f in source] == [0, 1, 2, 3]  # then replays the cache


def test_reader_without_rewind_too_large_reads_once():
    source = ReaderSource(ListReader(reader_feeds()), cache_limit_bytes=8)
    assert len(list(source)) == 3
    with pytest.raises(InputError, match=r"no rewind.*read once already.*add a rewind"):
        list(source)


def test_reader_returning_a_list_is_refused():
    source = ReaderSource(ListReader([[np.zeros(2)]]))
    with pytest.raises(InputError, match="get_next\\(\\) returned a list"):
        list(source)


def test_open_source_returns_a_source_as_is():
    source = RandomSource(input_specs(image_model("N,3")))
    assert open_source(source, model=None) is source


# ----------------------------------------------------------------------------- accumulators


def random_batches(seed=0, count=6):
    """Batches (N, 4, 3, 3) whose range grows from batch to batch, with some exact zeros."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(count):
        batch = rng.standard_normal((int(rng.integers(1, 5)), 4, 3, 3)) * (1 + i) + i * 0.3
        batch[rng.random(batch.shape) < 0.2] = 0
        batches.append(batch.astype(np.float32))
    return batches


def test_minmax_and_channel_statistics_match_numpy():
    batches = random_batches()
    data = np.concatenate(batches)
    minmax, channels, last = MinMax(), ChannelStatistics(axis=1), ChannelStatistics(axis=-1)
    for batch in batches:
        minmax.update(batch)
        channels.update(batch)
        last.update(batch)
    assert (minmax.min, minmax.max, minmax.count) == (data.min(), data.max(), data.size)
    per_channel = np.moveaxis(data, 1, 0).reshape(4, -1).astype(np.float64)
    assert channels.count == per_channel.shape[1] and channels.channels == 4
    np.testing.assert_allclose(channels.mean, per_channel.mean(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(channels.var, per_channel.var(axis=1), rtol=1e-10)
    np.testing.assert_allclose(channels.abs_mean, np.abs(per_channel).mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(channels.zero_fraction, (per_channel == 0).mean(axis=1))
    np.testing.assert_array_equal(channels.min, per_channel.min(axis=1))
    np.testing.assert_array_equal(channels.max, per_channel.max(axis=1))
    np.testing.assert_allclose(
        last.mean, data.reshape(-1, 3).mean(axis=0, dtype=np.float64), rtol=1e-10
    )


def test_channel_count_change_is_an_error():
    channels = ChannelStatistics(axis=1)
    channels.update(np.zeros((1, 3)))
    with pytest.raises(InputError, match="has 4 entries here but 3 before"):
        channels.update(np.zeros((1, 4)))
    with pytest.raises(InputError, match="out of range for rank 1"):
        channels.update(np.zeros(3))


def test_variance_keeps_precision_for_large_means():
    channels = ChannelStatistics(axis=0)
    for _ in range(10):
        channels.update(np.array([[1e8 + 1, 1e8 - 1]]))
    np.testing.assert_allclose(channels.var, [1.0], rtol=1e-9)


def quantile(data: np.ndarray, q: float) -> float:
    """The smallest value with a fraction q of the data at or below it (the histogram's meaning)."""
    return float(np.quantile(data, q, method="inverted_cdf"))


def test_histogram_quantiles_within_one_bin_width():
    batches = random_batches(seed=1, count=8)
    data = np.concatenate(batches).ravel().astype(np.float64)
    histogram = Histogram(bins=512)
    for batch in batches:
        histogram.update(batch)
    assert histogram.total == data.size
    assert histogram.low <= data.min() and histogram.high >= data.max()
    for q in (0.0, 0.001, 0.1, 0.5, 0.9, 0.999, 1.0):
        assert abs(histogram.quantile(q) - quantile(data, q)) <= histogram.width
    low, high = histogram.percentile_range(99.0)
    assert abs(low - quantile(data, 0.005)) <= histogram.width
    assert abs(high - quantile(data, 0.995)) <= histogram.width
    low, high = histogram.percentile_range(99.9, symmetric=True)
    assert low == -high and abs(high - quantile(np.abs(data), 0.999)) <= histogram.width
    assert histogram.edges.shape == (513,) and histogram.counts.shape == (512,)


def test_histogram_growth_keeps_counts_and_distribution():
    rng = np.random.default_rng(2)
    narrow, wide = rng.standard_normal(4000), rng.standard_normal(4000) * 20 + 5
    histogram = Histogram(bins=256)
    histogram.update(narrow)
    width = histogram.width
    histogram.update(wide)
    assert histogram.total == 8000 and histogram.counts.shape == (256,)
    factor = histogram.width / width
    assert factor == round(factor) > 1  # a whole number of old bins per new bin
    # The new edges are old edges, so the counts below every edge stay exact.
    data = np.sort(np.concatenate([narrow, wide]))
    below = np.searchsorted(data, histogram.edges[1:-1])
    assert np.abs(np.cumsum(histogram.counts)[:-1] - below).max() <= 1


def test_histogram_growth_keeps_a_zero_lower_edge():
    histogram = Histogram(bins=8)
    histogram.update(np.array([0.0, 1.0]))
    histogram.update(np.array([0.0, 5.0]))  # grows upwards only, as after a Relu
    assert histogram.low == 0.0 and histogram.high >= 5.0 and histogram.total == 4
    histogram.update(np.array([-3.0]))  # grows downwards only: old bins stay whole
    assert histogram.low <= -3.0 and histogram.total == 5
    assert abs(histogram.quantile(0.0) - -3.0) <= histogram.width
    assert 0.0 in histogram.edges  # new edges are old edges


def test_histogram_constant_values_then_spread_and_nonfinite():
    histogram = Histogram(bins=16)
    histogram.update(np.zeros(10))
    assert histogram.width == 0 and histogram.quantile(0.5) == 0.0
    assert histogram.percentile_range(99, symmetric=True) == (-0.0, 0.0)
    histogram.update(np.array([1.0, 2.0, 4.0, np.nan, np.inf]))
    assert (histogram.low, histogram.high, histogram.total) == (0.0, 4.0, 13)
    assert histogram.counts[0] == 10 and histogram.nonfinite == 2


def test_histogram_merge_keeps_total_and_distribution():
    batches = random_batches(seed=3, count=6)
    data = np.concatenate(batches).ravel()
    left, right, single = Histogram(256), Histogram(256), Histogram(256)
    for i, batch in enumerate(batches):
        (left if i % 2 else right).update(batch)
        single.update(batch)
    left.merge(right)
    assert left.total == data.size
    for q in (0.01, 0.5, 0.99):
        assert abs(left.quantile(q) - quantile(data, q)) <= 2 * left.width
    empty = Histogram(256)
    empty.merge(single)  # same bins: an exact copy
    np.testing.assert_array_equal(empty.counts, single.counts)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
batch_lists = st.lists(
    st.integers(1, 3).flatmap(lambda n: st.lists(finite, min_size=2 * n, max_size=2 * n)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(batch_lists, st.randoms(use_true_random=False))
def test_minmax_and_channels_do_not_depend_on_order(values, random):
    batches = [np.array(v, np.float32).reshape(-1, 2) for v in values]
    shuffled = random.sample(batches, len(batches))

    def accumulate(order):
        minmax, channels = MinMax(), ChannelStatistics(axis=1)
        for batch in order:
            minmax.update(batch)
            channels.update(batch)
        return minmax, channels

    (m1, c1), (m2, c2) = accumulate(batches), accumulate(shuffled)
    half = len(shuffled) // 2
    (m3, c3), (m4, c4) = accumulate(shuffled[:half]), accumulate(shuffled[half:])
    m3.merge(m4)
    c3.merge(c4)
    for minmax in (m2, m3):
        assert (minmax.min, minmax.max, minmax.count) == (m1.min, m1.max, m1.count)
    scale = max(1.0, float(np.abs(np.concatenate(batches)).max()))
    for channels in (c2, c3):
        assert channels.count == c1.count
        np.testing.assert_allclose(channels.mean, c1.mean, rtol=1e-9, atol=1e-9 * scale)
        np.testing.assert_allclose(channels.var, c1.var, rtol=1e-7, atol=1e-9 * scale**2)
        np.testing.assert_allclose(channels.abs_mean, c1.abs_mean, rtol=1e-9)
        np.testing.assert_array_equal(channels.zero_fraction, c1.zero_fraction)
        np.testing.assert_array_equal(channels.min, c1.min)
        np.testing.assert_array_equal(channels.max, c1.max)


# ----------------------------------------------------------------------------- collector


def run_exposed(proto: onnx.ModelProto, names: list[str], feeds) -> dict[str, np.ndarray]:
    """The reference: onnxruntime on the model with ``names`` as outputs, batches concatenated."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    del exposed.graph.output[:]
    exposed.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    results = [session.run(names, feed) for feed in feeds]
    return {n: np.concatenate([r[i] for r in results]) for i, n in enumerate(names)}


def test_collector_matches_onnxruntime_and_leaves_the_model_alone():
    proto = conv_relu_proto()
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    source = RandomSource(input_specs(model), count=12, seed=5, batch_size=3)
    collector = StatisticsCollector(model, ["r1", "x", "y", "r1"], histogram_bins=128)
    statistics = collector.collect(source, progress=False)
    assert list(statistics) == ["r1", "x", "y"]
    assert ir.to_proto(model).SerializeToString() == before
    assert [v.name for v in model.graph.outputs] == ["y"]

    reference = run_exposed(proto, ["r1", "y"], list(source))
    reference["x"] = np.concatenate([f["x"] for f in source])
    for name, data in reference.items():
        found = statistics[name]
        # The collector's session optimizes the graph; kernels may differ in the last bits.
        np.testing.assert_allclose(
            [found.minmax.min, found.minmax.max], [data.min(), data.max()], rtol=1e-5
        )
        assert found.histogram.total == data.size
        assert (
            abs(found.histogram.quantile(0.5) - quantile(data, 0.5)) <= 1.01 * found.histogram.width
        )
        per_channel = np.moveaxis(data, 1, 0).reshape(data.shape[1], -1).astype(np.float64)
        np.testing.assert_allclose(
            found.channels.mean, per_channel.mean(axis=1), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(found.channels.var, per_channel.var(axis=1), rtol=1e-5)
        np.testing.assert_allclose(found.channels.zero_fraction, (per_channel == 0).mean(axis=1))
    assert statistics["r1"].minmax.min == 0.0 and statistics["r1"].channels.zero_fraction[3] > 0.5


def test_collector_memory_does_not_grow_with_batches():
    model = ir.from_proto(conv_relu_proto())
    collector = StatisticsCollector(model, ["c1", "r1"], histogram_bins=64)
    specs = input_specs(model)

    def total_bytes(count):
        statistics = collector.collect(RandomSource(specs, count=count))  # progress on
        return sum(s.nbytes for s in statistics.values())

    assert total_bytes(2) == total_bytes(50)


def test_collector_options_limit_and_reader():
    model = ir.from_proto(conv_relu_proto())
    feeds = [{"x": np.full((1, 2, 6, 6), i, np.float32)} for i in range(5)]
    collector = StatisticsCollector(model, ["x", "r1"], keep=("minmax",), channel_axis={"x": 2})
    statistics = collector.collect(ReaderSource(RewindingReader(feeds)), limit=2, progress=False)
    assert statistics["x"].minmax.max == 1.0 and statistics["x"].minmax.count == 2 * 72
    assert statistics["x"].histogram is None and statistics["x"].channels is None
    with_channels = StatisticsCollector(
        model, ["x", "r1"], keep=("channels",), channel_axis={"x": 2}
    )
    statistics = with_channels.collect(feeds, progress=False)  # any iterable of feeds works
    assert statistics["x"].channels.channels == 6 and statistics["r1"].channels is None
    assert statistics["x"].minmax is None
    vector = StatisticsCollector(model, ["x"], channel_axis=7).collect(feeds[:1], progress=False)
    assert vector["x"].channels is None  # a shared axis skips tensors of lower rank


def test_collector_errors():
    model = ir.from_proto(conv_relu_proto(batch=1))
    with pytest.raises(SettingsError, match="no tensor named 'nope', 'c9'"):
        StatisticsCollector(model, ["r1", "nope", "c9"])
    with pytest.raises(SettingsError, match="'w1': initializers are constant"):
        StatisticsCollector(model, ["w1"])
    with pytest.raises(SettingsError, match="unknown statistics \\['gram'\\]"):
        StatisticsCollector(model, ["r1"], keep=("minmax", "gram"))
    with pytest.raises(SettingsError, match="channel_axis names tensors not collected"):
        StatisticsCollector(model, ["r1"], channel_axis={"y": 1})
    with pytest.raises(SettingsError, match="channel_axis 5 is out of range for 'r1'"):
        StatisticsCollector(model, ["r1"], channel_axis={"r1": 5}).collect(
            RandomSource(input_specs(model), count=1), progress=False
        )
    collector = StatisticsCollector(model, ["r1"])
    with pytest.raises(InputError, match=r"batch 0 of .*invalid dimensions"):
        collector.collect([{"x": np.zeros((1, 2, 5, 5), np.float32)}], progress=False)
    with pytest.raises(InputError, match="yielded no batches"):
        collector.collect([], progress=False)


def test_collector_tensor_of_unknown_type():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        g (float[N,3] x) => (float[N,3] y) { t = custom.Mystery(x)  y = Identity(x) }
        """
    )
    with pytest.raises(InputError, match="element type of 't' is unknown"):
        StatisticsCollector(model, ["t"])


def test_collector_joins_small_batches_into_runs_with_the_same_statistics(monkeypatch):
    from onnx_squeeze.calibration import collector as calibration

    model = ir.from_proto(conv_relu_proto())
    feeds = list(RandomSource(input_specs(model), count=12, seed=2, batch_size=1))
    collector = StatisticsCollector(model, ["x", "r1"])
    runs = []
    original = calibration._Runs.__iter__
    monkeypatch.setattr(
        calibration._Runs, "__iter__", lambda self: (runs.append(r) or r for r in original(self))
    )
    joined = collector.collect(feeds, progress=False)
    assert len(runs) < len(feeds) and sum(feed["x"].shape[0] for _, feed in runs) == 12
    monkeypatch.setattr(calibration, "RUN_BYTES", 0)  # one feed per run
    runs.clear()
    single = collector.collect(feeds, progress=False)
    assert len(runs) == len(feeds)
    for name in ("x", "r1"):
        a, b = joined[name], single[name]
        assert (a.minmax.min, a.minmax.max, a.minmax.count) == (
            b.minmax.min,
            b.minmax.max,
            b.minmax.count,
        )
        assert a.histogram.total == b.histogram.total
        np.testing.assert_allclose(a.channels.mean, b.channels.mean, rtol=1e-6, atol=1e-7)


def test_feeds_held_for_many_runs_are_joined_into_batches():
    """Consecutive feeds of one shape become batches of at most the samples asked, in order;
    a feed of another shape starts a new batch; a model with a fixed batch keeps its feeds."""

    def feed(rows: int, start: int, width: int = 3) -> dict:
        values = np.arange(start, start + rows, dtype=np.float32)[:, None]
        return {"a": np.repeat(values, width, axis=1), "b": np.zeros((rows, 2), np.int64)}

    feeds = [feed(1, i) for i in range(5)] + [feed(2, 5, width=4), feed(1, 7, width=4)]
    batches = joined(feeds, 2, two_input_model())
    assert [f["a"].shape for f in batches] == [(2, 3), (2, 3), (1, 3), (2, 4), (1, 4)]
    np.testing.assert_array_equal(np.concatenate([f["a"][:, 0] for f in batches]), np.arange(8))
    assert len(joined(feeds[:4], 8, two_input_model(batch="1"))) == 4


def test_runs_join_only_feeds_of_the_same_shape():
    from onnx_squeeze.calibration.collector import _Runs

    feeds = [{"x": np.zeros((1, 3))}, {"x": np.zeros((2, 3))}, {"x": np.zeros((1, 4))}]
    runs = _Runs(feeds, batched=True)
    runs.samples = 8
    assert [(index, feed["x"].shape) for index, feed in runs] == [(0, (3, 3)), (2, (1, 4))]
    fixed = _Runs(feeds, batched=False)
    fixed.samples = 8
    assert [index for index, _ in fixed] == [0, 1, 2]


# ----------------------------------------------------------------------------- in-graph reduction


@given(size=st.integers(1, 10**6), values=st.integers(1, 10**5))
def test_sample_stride_is_coprime_and_keeps_at_most_the_values_asked(size, values):
    step = stat_graph.stride(size, values)
    assert math.gcd(step, size) == 1
    assert -(-size // step) <= values


@pytest.mark.parametrize("opset", [13, 18])
def test_reduced_collection_matches_whole_tensors(opset):
    """Min/max and channel means reduced in the graph equal those of whole tensors (at both
    forms of the Reduce ops' axes); the histogram counts a strided sample of at most
    ``sample_values`` values per sample and keeps the distribution."""
    proto = conv_relu_proto()
    proto.opset_import[0].version = opset
    model = ir.from_proto(proto)
    source = list(RandomSource(input_specs(model), count=40, seed=5, batch_size=2))
    names, keep = ["c1", "r1", "x"], ("minmax", "histogram", "means")
    whole = StatisticsCollector(model, names, keep=keep).collect(source, progress=False)
    reduced = StatisticsCollector(model, names, keep=keep, sample_values=20)
    found = reduced.collect(source, progress=False)
    reference = run_exposed(proto, ["c1", "r1"], source)
    for name in ("c1", "r1"):
        a, b, data = found[name], whole[name], reference[name]
        np.testing.assert_allclose([a.minmax.min, a.minmax.max], [data.min(), data.max()], 1e-5)
        assert a.minmax.count == b.minmax.count == data.size
        np.testing.assert_allclose(a.means.mean, b.means.mean, rtol=1e-5, atol=1e-6)
        assert 40 * 20 * 0.5 <= a.histogram.total <= 40 * 20  # 144 values per sample, sampled
        tolerance = 0.1 * (data.max() - data.min())  # 800 sampled values estimate the median
        assert abs(a.histogram.quantile(0.5) - quantile(data, 0.5)) <= tolerance
    assert found["x"].histogram.total == whole["x"].histogram.total  # a fed input stays whole


DERIVING = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 6, 6] x, float hi) => (float[N, 4, 6, 6] y, float[N, 4, 6, 6] z) {
        c = Add (x, x)
        s = Sigmoid (c)
        m = Mul (c, s)
        r = Relu (m)
        t = Tanh (r)
        lo = Constant <value = float {-0.5}> ()
        top = Constant <value = float {0.5}> ()
        k = Clip (m, lo, top)
        free = Clip (m, lo, hi)
        l = LeakyRelu <alpha = 0.1> (m)
        h = HardSigmoid (l)
        flip = LeakyRelu <alpha = -1.0> (m)
        y = Add (t, h)
        z = Add (k, free)
    }"""


def test_outputs_of_non_decreasing_ops_derive_from_their_input(monkeypatch):
    """Sigmoid, Relu, Tanh (chained after Relu), Clip with constant bounds, LeakyRelu and
    HardSigmoid outputs are left out of the reduced model: the op applied to its input's
    extremes and sample gives what reducing them gives. A Clip with a bound known at run time,
    a decreasing LeakyRelu and a tensor whose channel means are asked are reduced."""
    model = parse(DERIVING)
    names = ["c", "s", "m", "r", "t", "k", "free", "l", "h", "flip"]
    wanted = {name: stat_graph.Wanted(rank=4, step=7) for name in names}
    wanted["l"] = stat_graph.Wanted(rank=4, step=7, channel_axis=1)
    found = stat_graph.derived(model, wanted)
    assert {name: d.source for name, d in found.items()} == {
        "s": "c",
        "r": "m",
        "t": "m",
        "k": "m",
        "h": "l",
    }
    assert found["t"].function(np.array([-1.0, 2.0])) == pytest.approx([0.0, np.tanh(2.0)])

    rng = np.random.default_rng(3)
    source = [
        {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32), "hi": np.array(0.3, np.float32)}
        for _ in range(5)
    ]
    keep = ("minmax", "histogram")
    left_out = []
    reduced_model = stat_graph.reduced_model

    def recording(model, wanted, leave_out=()):
        left_out.append(set(leave_out))
        return reduced_model(model, wanted, leave_out)

    monkeypatch.setattr(stat_graph, "reduced_model", recording)
    derived = StatisticsCollector(model, names, keep=keep, sample_values=20)
    found = derived.collect(source, progress=False)
    monkeypatch.setattr(stat_graph, "derived", lambda model, wanted: {})
    reduced = StatisticsCollector(model, names, keep=keep, sample_values=20)
    expected = reduced.collect(source, progress=False)
    assert left_out == [{"s", "r", "t", "k", "l", "h"}, set()]
    for name in names:
        a, b = found[name], expected[name]
        np.testing.assert_allclose(
            [a.minmax.min, a.minmax.max], [b.minmax.min, b.minmax.max], rtol=1e-6, atol=1e-7
        )
        assert a.minmax.count == b.minmax.count and a.histogram.total == b.histogram.total
        for q in (0.1, 0.5, 0.9):
            width = (b.minmax.max - b.minmax.min) / 100
            assert abs(a.histogram.quantile(q) - b.histogram.quantile(q)) <= width


def test_reduced_collection_keeps_whole_tensors_where_it_must():
    """Tensors with full channel statistics, and tensors that are not float, are returned
    whole next to the reduced ones."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (int64[N] y) {
            r = Relu (x)
            y = ArgMax <axis = 1, keepdims = 0> (r)
        }"""
    model = ir.from_proto(onnx.parser.parse_model(text))
    source = list(RandomSource(input_specs(model), count=6, seed=1, batch_size=3))
    collector = StatisticsCollector(
        model, ["r", "y"], keep=("minmax", "channels"), channel_axis={"r": 1}, sample_values=2
    )
    statistics = collector.collect(source, progress=False)
    assert statistics["r"].channels.count == 6 and statistics["y"].minmax.count == 6
    assert 0 <= statistics["y"].minmax.min <= statistics["y"].minmax.max <= 2
    with pytest.raises(SettingsError, match="sample_values"):
        StatisticsCollector(model, ["r"], sample_values=-1)


def test_statistics_sessions_run_nodes_eagerly(monkeypatch):
    """The collector's sessions run each reduction as soon as its tensor is made (priority
    order), so onnxruntime frees every tensor once it is reduced instead of holding them all
    until the reductions run at the end (twice the activation memory on a 640x640 YOLO)."""
    import onnx_squeeze.calibration.runner as calibration_module
    from onnx_squeeze import runtime

    made = []

    def spy(path, provider="cpu", **options):
        made.append(runtime.session_options(**options).execution_order)
        return runtime.create_session(path, provider, **options)

    monkeypatch.setattr(calibration_module, "create_session", spy)
    model = ir.from_proto(conv_relu_proto())
    source = list(RandomSource(input_specs(model), count=4, seed=5, batch_size=2))
    StatisticsCollector(model, ["c1", "r1"], sample_values=20).collect(source, progress=False)
    assert made and set(made) == {ort.ExecutionOrder.PRIORITY_BASED}
    assert runtime.session_options().execution_order == ort.ExecutionOrder.DEFAULT


def test_npz_source_carries_named_arrays_only_when_asked(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((6, 3), np.float32), labels=np.arange(6), short=np.arange(2))
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 3))]
    source = NpzSource(path, specs, batch_size=4)
    assert [set(feed) for feed in source] == [{"x"}, {"x"}]
    carried = source.carrying(["labels"])
    assert [feed["labels"].tolist() for feed in carried] == [[0, 1, 2, 3], [4, 5]]
    assert [set(feed) for feed in source] == [{"x"}, {"x"}]  # the original is unchanged
    with pytest.raises(InputError, match="'short' needs one entry per sample"):
        source.carrying(["short"])
    with pytest.raises(InputError, match=r"'absent'.*found none"):
        source.carrying(["absent"])
