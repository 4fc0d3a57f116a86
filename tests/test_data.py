"""Calibration/evaluation data sources: files, image folders, callables, re-batching. Bad data
raises a DataError naming the source and the input."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from PIL import Image

from deploykit.data import ArraySource, CallableSource, ImageFolderSource, RandomSource, open_source
from deploykit.errors import DataError
from deploykit.targets import Preprocess

SPECS = {"a": (["N", 3], np.float32), "b": (["N", 2], np.int64)}
ONE = {"x": (["N", 4], np.float32)}


def _collect(source, batch_size):
    batches = list(source.batches(batch_size))
    feeds = {k: np.concatenate([b.feeds[k] for b in batches]) for k in batches[0].feeds}
    labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
    return batches, feeds, labels


# ------------------------------------------------------------------------------ .npz / .npy
def test_npz_with_named_inputs_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 3)).astype(np.float32)
    b = rng.integers(0, 5, (10, 2))
    labels = np.arange(10)
    path = tmp_path / "data.npz"
    np.savez(path, a=a, b=b, labels=labels)
    source = open_source(path, SPECS)
    assert isinstance(source, ArraySource)
    batches, feeds, got_labels = _collect(source, 4)
    assert [len(x.feeds["a"]) for x in batches] == [4, 4, 2]
    np.testing.assert_array_equal(feeds["a"], a)
    np.testing.assert_array_equal(feeds["b"], b)
    assert feeds["b"].dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)


def test_npy_feeds_the_single_input(tmp_path):
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    _, feeds, labels = _collect(open_source(path, ONE), 2)
    np.testing.assert_array_equal(feeds["x"], x)
    assert labels is None


def test_npy_refused_for_two_inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"x\.npy.*one input"):
        open_source(path, SPECS)


def test_float64_data_is_cast_to_float32(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((3, 4), np.float64))
    _, feeds, _ = _collect(open_source(path, ONE), 8)
    assert feeds["x"].dtype == np.float32


def _bad(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["shape", "dtype", "name", "nan", "inf"])
def test_bad_data_names_file_and_input(tmp_path, case):
    good_a = np.zeros((4, 3), np.float32)
    good_b = np.zeros((4, 2), np.int64)
    arrays = {
        "shape": {"a": np.zeros((4, 5), np.float32), "b": good_b},
        "dtype": {"a": np.zeros((4, 3), np.int64), "b": good_b},
        "name": {"a_typo": good_a, "b": good_b},
        "nan": {"a": np.where(np.eye(4, 3) > 0, np.nan, 0).astype(np.float32), "b": good_b},
        "inf": {"a": np.full((4, 3), np.inf, np.float32), "b": good_b},
    }[case]
    path = _bad(tmp_path, **arrays)
    with pytest.raises(DataError) as exc:
        list(open_source(path, SPECS).batches(2))
    msg = str(exc.value)
    assert str(path) in msg
    assert ("a_typo" if case == "name" else "'a'") in msg
    if case in ("nan", "inf"):
        assert "NaN/Inf" in msg
    if case == "dtype":
        assert "int64" in msg and "float32" in msg


def test_wrong_rank_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 4, 1), np.float32))
    with pytest.raises(DataError, match=r"x\.npy: input 'x' has shape \[2, 4, 1\].*rank 2"):
        list(open_source(path, ONE).batches(1))


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_source(tmp_path / "missing.npz", ONE)


# ------------------------------------------------------------------------------ image folders
def _png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"imgs: no images found"):
        open_source(tmp_path / "imgs", {"x": (["N", 3, 8, 8], np.float32)})


def test_image_folder_class_subfolders_give_labels(tmp_path):
    root = tmp_path / "imgs"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        for i in range(3):
            _png(root / cls / f"{i}.png", (8, 8), color)
    source = open_source(root, {"x": (["N", 3, 8, 8], np.float32)})
    assert isinstance(source, ImageFolderSource)
    assert source.classes == ["cat", "dog"]
    _, feeds, labels = _collect(source, 4)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert feeds["x"].shape == (6, 3, 8, 8)
    # default preprocessing: /255, NCHW; red images have channel 0 == 1
    np.testing.assert_allclose(feeds["x"][0, :, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(feeds["x"][5, :, 0, 0], [0, 1, 0])


def test_flat_image_folder_has_no_labels(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.png", (8, 8), (10, 20, 30))
    _, feeds, labels = _collect(open_source(tmp_path, {"x": (["N", 3, 8, 8], np.float32)}), 8)
    assert labels is None and feeds["x"].shape == (2, 3, 8, 8)


def test_resize_crop_mean_std_nchw(tmp_path):
    _png(tmp_path / "a" / "0.png", (20, 10), (255, 0, 51))  # W=20, H=10
    pp = Preprocess(resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.2), layout="NCHW")
    _, feeds, _ = _collect(open_source(tmp_path, {"x": (["N", 3, 8, 8], np.float32)}, pp), 1)
    x = feeds["x"]
    assert x.shape == (1, 3, 8, 8)
    # (1 - .5)/.5 = 1, (0 - .5)/.25 = -2, (.2 - .5)/.2 = -1.5
    np.testing.assert_allclose(x[0, :, 3, 3], [1.0, -2.0, -1.5], atol=1e-5)
    np.testing.assert_allclose(x[0], np.broadcast_to(x[0, :, :1, :1], x[0].shape), atol=1e-5)


def test_centre_crop_takes_the_middle(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)
    img[:, :2] = (255, 0, 0)  # left and right 2 columns red, the middle 8 blue
    img[:, 10:] = (255, 0, 0)
    img[:, 2:10] = (0, 0, 255)
    (tmp_path / "a").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "0.png")
    pp = Preprocess(crop=8, layout="NHWC")
    _, feeds, _ = _collect(open_source(tmp_path, {"x": (["N", 8, 8, 3], np.float32)}, pp), 1)
    x = feeds["x"]
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(x[0, ..., 0], 0)  # no red left
    np.testing.assert_array_equal(x[0, ..., 2], 1)


def test_nhwc_layout_is_detected_from_the_model_shape(tmp_path):
    _png(tmp_path / "0.png", (16, 16), (0, 0, 255))
    _, feeds, _ = _collect(open_source(tmp_path, {"x": (["N", 8, 8, 3], np.float32)}), 1)
    assert feeds["x"].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(feeds["x"][0, 4, 4], [0, 0, 1], atol=1e-6)


def test_grayscale(tmp_path):
    _png(tmp_path / "0.png", (10, 10), (255, 255, 255))
    pp = Preprocess(resize=8, crop=8, color="L", mean=(0.5,), std=(0.5,))
    _, feeds, _ = _collect(open_source(tmp_path, {"x": (["N", 1, 8, 8], np.float32)}, pp), 1)
    assert feeds["x"].shape == (1, 1, 8, 8)
    np.testing.assert_allclose(feeds["x"], 1.0, atol=1e-5)


def test_image_of_wrong_size_for_model_is_refused(tmp_path):
    _png(tmp_path / "0.png", (10, 10), (1, 2, 3))
    pp = Preprocess(resize=6, crop=6)
    with pytest.raises(DataError, match=r"input 'x' has shape \[1, 3, 6, 6\]"):
        list(open_source(tmp_path, {"x": (["N", 3, 8, 8], np.float32)}, pp).batches(1))


# ------------------------------------------------------------------------------ callables
_MODULE = textwrap.dedent("""
    import numpy as np

    def feeds():
        rng = np.random.default_rng(0)
        for n in (3, 5):
            yield {"x": rng.standard_normal((n, 4)).astype(np.float32)}, np.arange(n)

    def not_callable_target():
        raise RuntimeError("boom")

    VALUE = 3
""")


def _expected_callable():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 5)])


def test_callable_module_function(tmp_path, monkeypatch):
    (tmp_path / "dk_test_feeds_mod.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = open_source("dk_test_feeds_mod:feeds", ONE)
    assert isinstance(source, CallableSource)
    _, feeds, labels = _collect(source, 4)
    np.testing.assert_array_equal(feeds["x"], _expected_callable())
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2, 3, 4])


def test_callable_file_function(tmp_path):
    path = tmp_path / "dk_test_feeds_file.py"
    path.write_text(_MODULE)
    source = open_source(f"{path}:feeds", ONE)
    assert isinstance(source, CallableSource)
    _, feeds, _ = _collect(source, 2)
    np.testing.assert_array_equal(feeds["x"], _expected_callable())


def test_callable_errors(tmp_path):
    path = tmp_path / "dk_test_feeds_err.py"
    path.write_text(_MODULE)
    with pytest.raises(DataError, match="raised RuntimeError: boom"):
        list(open_source(f"{path}:not_callable_target", ONE).batches(1))
    with pytest.raises(DataError, match="VALUE is not callable"):
        open_source(f"{path}:VALUE", ONE)
    with pytest.raises(DataError, match="cannot import"):
        open_source(f"{path}:nothing_here", ONE)
    with pytest.raises(DataError, match="cannot import"):
        open_source("dk_no_such_module_xyz:fn", ONE)


def test_python_callable_single_dict():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    _, feeds, _ = _collect(open_source(lambda: {"x": x}, ONE), 2)
    np.testing.assert_array_equal(feeds["x"], x)


# ------------------------------------------------------------------------------ re-batching
def _chunky():
    """Uneven chunk sizes so re-batching has to split and join chunks."""
    rng = np.random.default_rng(7)
    out = []
    for n in (3, 10, 1, 20, 16, 9):
        out.append(({"a": rng.standard_normal((n, 3)).astype(np.float32),
                     "b": rng.integers(0, 9, (n, 2))}, rng.integers(0, 10, n)))
    return out


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_rebatching_keeps_data(batch_size):
    chunks = _chunky()
    total = sum(len(c[1]) for c in chunks)
    batches, feeds, labels = _collect(open_source(lambda: chunks, SPECS), batch_size)
    sizes = [len(b.feeds["a"]) for b in batches]
    assert sum(sizes) == total == 59
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    np.testing.assert_array_equal(feeds["a"], np.concatenate([c[0]["a"] for c in chunks]))
    np.testing.assert_array_equal(feeds["b"], np.concatenate([c[0]["b"] for c in chunks]))
    np.testing.assert_array_equal(labels, np.concatenate([c[1] for c in chunks]))


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_limit_is_respected(batch_size):
    chunks = _chunky()
    batches, feeds, labels = _collect(open_source(lambda: chunks, SPECS, limit=13), batch_size)
    assert len(feeds["a"]) == 13 and len(labels) == 13
    np.testing.assert_array_equal(feeds["a"], np.concatenate([c[0]["a"] for c in chunks])[:13])


def test_limit_on_array_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(40 * 4, dtype=np.float32).reshape(40, 4))
    _, feeds, _ = _collect(open_source(path, ONE, limit=25), 8)
    np.testing.assert_array_equal(feeds["x"], np.arange(25 * 4, dtype=np.float32).reshape(25, 4))


def test_empty_source_raises():
    with pytest.raises(DataError, match="no samples"):
        list(open_source(lambda: [], ONE).batches(4))


def test_random_source_is_marked_and_sized():
    source = RandomSource({"x": (["N", 4], np.float32), "ids": (["N", 5], np.int64)}, samples=40)
    assert source.is_random
    _, feeds, _ = _collect(source, 16)
    assert feeds["x"].shape == (40, 4) and feeds["ids"].shape == (40, 5)
    assert feeds["ids"].dtype == np.int64 and np.all(np.isfinite(feeds["x"]))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2")
    with pytest.raises(DataError, match=r"data\.csv: unsupported data"):
        open_source(path, ONE)


# ------------------------------------------------------------------------------ edge cases (core fixes)
def test_batch_size_zero_is_refused_not_an_endless_loop(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match=r"x\.npy: batch size 0 must be >= 1"):
        next(open_source(path, ONE).batches(0))


def test_scalar_array_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.float32(3.0))
    with pytest.raises(DataError, match=r"x\.npy: array \['x'\] is a scalar"):
        open_source(path, ONE)


def test_images_of_different_sizes_for_a_dynamic_model(tmp_path):
    _png(tmp_path / "a.png", (8, 8), (1, 2, 3))
    _png(tmp_path / "b.png", (10, 6), (1, 2, 3))
    with pytest.raises(DataError, match=r"images differ in size after preprocessing.*resize and crop"):
        list(open_source(tmp_path, {"x": (["N", 3, "H", "W"], np.float32)}).batches(2))
    # with a crop they line up
    pp = Preprocess(resize=6, crop=6)
    _, feeds, _ = _collect(open_source(tmp_path, {"x": (["N", 3, "H", "W"], np.float32)}, pp), 2)
    assert feeds["x"].shape == (2, 3, 6, 6)


def test_unreadable_image_names_the_file(tmp_path):
    _png(tmp_path / "a.png", (8, 8), (1, 2, 3))
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        list(open_source(tmp_path, {"x": (["N", 3, 8, 8], np.float32)}).batches(2))


def test_label_count_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 4), np.float32), labels=np.arange(7))
    with pytest.raises(DataError, match=r"d\.npz: 7 labels for 10 samples"):
        list(open_source(path, ONE).batches(4))


def test_uneven_input_lengths(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((10, 3), np.float32), b=np.zeros((8, 2), np.int64))
    with pytest.raises(DataError, match=r"d\.npz: inputs have different sample counts"):
        list(open_source(path, SPECS).batches(4))


def test_generator_failing_midway_is_a_data_error():
    def feeds():
        yield {"x": np.zeros((2, 4), np.float32)}
        raise RuntimeError("disk gone")

    with pytest.raises(DataError, match="feeds: the data function raised RuntimeError: disk gone"):
        list(open_source(feeds, ONE).batches(1))


def test_data_function_returning_none():
    with pytest.raises(DataError, match="returned nothing"):
        list(open_source(lambda: None, ONE).batches(1))


def test_negative_limit_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((10, 4), np.float32))
    with pytest.raises(DataError, match="sample limit -5 must be >= 0"):
        list(open_source(path, ONE, limit=-5).batches(4))


def test_digits_test_data_is_scikit_learns_file():
    """deploykit.testing.models.digits reads the digits file scikit-learn ships, as its
    load_digits does, without importing scikit-learn: all 1,797 images, 16 grey levels (plus
    black), the per-class counts of that dataset, a 70/30 split that depends only on the seed."""
    from deploykit.testing import models

    d = models.digits()
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    assert d.x_train.shape == (1257, 1, 8, 8) and d.x_test.shape == (540, 1, 8, 8) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert np.array_equal(np.unique(x * 16), np.arange(17))
    again, other = models.digits(), models.digits(seed=1)
    assert np.array_equal(again.x_train, d.x_train) and not np.array_equal(other.x_train, d.x_train)
