"""The int16 pair-sum saturation record (deploykit/quantize/saturation.py): the NumPy replay of
u8 x s8 kernels without VNNI against a brute-force loop, and the record quantize writes into
the canonical model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from deploykit.canonical import ASYMMETRIC, SYMMETRIC
from deploykit.data import ArraySource
from deploykit.model import input_specs, normalise
from deploykit.quantize import quantize, requantize, saturation
from deploykit.testing.tiny import pair_saturating_mlp, pair_saturating_net


def _brute_force(u8: np.ndarray, zero: int, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Every output, every tap, every pair of adjacent input channels, one at a time."""
    n, c, h, wd = u8.shape
    o, _, kh, kw = w.shape
    x = np.full((n, c + c % 2, h + 2 * pad, wd + 2 * pad), zero, np.int64)
    x[:, :c, pad:pad + h, pad:pad + wd] = u8
    wt = np.zeros((o, c + c % 2, kh, kw), np.int64)
    wt[:, :c] = w
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    error = np.zeros((n, o, ho, wo), np.int64)
    for b, k, y, xx, i, j in np.ndindex(n, o, ho, wo, kh, kw):
        for p in range(0, x.shape[1], 2):
            s = sum(int(wt[k, q, i, j]) * int(x[b, q, y * stride + i, xx * stride + j]) for q in (p, p + 1))
            error[b, k, y, xx] += min(max(s, -32768), 32767) - s
    return error


@pytest.mark.parametrize("stride,pad,channels", [(1, 0, 4), (2, 1, 3)])
def test_replay_matches_a_brute_force_loop(stride, pad, channels):
    rng = np.random.default_rng(stride)
    u8 = rng.integers(0, 256, (2, channels, 5, 5))
    w = rng.integers(-127, 128, (3, channels, 3, 3))
    w[0] = 127  # all positive: pairs of large activations saturate
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride, stride], pads=[pad] * 4)
    want = _brute_force(u8, 90, w, stride, pad)
    got = saturation.pair_sum_error(u8, 90, w, node)
    assert np.abs(want).max() > 0  # the case saturates
    np.testing.assert_array_equal(got, want)
    # weights within [-64, 64] cannot saturate: 2 x 255 x 64 < 32,767
    assert not saturation.pair_sum_error(u8, 90, np.clip(w, -64, 64), node).any()


def test_matmul_replay_matches_a_brute_force_loop():
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (6, 7))  # odd K: the last one pairs with a zero weight
    w = rng.integers(-127, 128, (7, 5))
    w[:, 0] = 127
    want = np.zeros((6, 5), np.int64)
    for r, o, p in np.ndindex(6, 5, 4):
        s = sum(int(u8[r, k]) * int(w[k, o]) for k in (2 * p, 2 * p + 1) if k < 7)
        want[r, o] += min(max(s, -32768), 32767) - s
    got = saturation.matmul_pair_error(u8, w)
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


def test_matmuls_are_recorded_too(tmp_path):
    fp32 = normalise(pair_saturating_mlp())
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).uniform(-1, 1, (32, 16)).astype(np.float32))
    result = quantize(fp32, ArraySource(tmp_path / "calib.npz", input_specs(fp32)), "minmax", activations=ASYMMETRIC)
    errors = saturation.recorded(result.model)
    assert errors is not None and errors["hot"] > 0.05 and errors["cool"] == 0.0, errors


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    fp32 = normalise(pair_saturating_net())
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("sat") / "calib.npz"
    np.savez(path, x=rng.uniform(-1, 1, (32, 4, 12, 12)).astype(np.float32))
    return fp32, quantize(fp32, ArraySource(path, input_specs(fp32)), "minmax", activations=ASYMMETRIC)


def test_quantize_records_which_convs_saturate(placed):
    _, result = placed
    errors = saturation.recorded(result.model)
    assert errors is not None and set(errors) == {"hot", "cool"}
    assert errors["hot"] > 0.05, errors  # positive weights, inputs over the whole range
    assert errors["cool"] == 0.0, errors  # adjacent channels' weights of opposite signs
    assert result.saturation["samples"] == saturation.SAMPLES


def test_the_record_follows_placements_of_its_profile_only(placed):
    fp32, result = placed
    assert saturation.recorded(requantize(result, fp32, float_layers=["cool"]).model) == saturation.recorded(result.model)
    # measured on the asymmetric grid: a symmetric placement's u8 values differ, so no record
    assert saturation.recorded(requantize(result, fp32, activations=SYMMETRIC).model) is None


def test_placing_again_gives_the_same_model_bytes(placed):
    fp32, result = placed
    assert requantize(result, fp32).model.SerializeToString() == result.model.SerializeToString()
