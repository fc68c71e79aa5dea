"""NaN-safe metrics: an all-NaN half-precision decode must never pass a gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from validate.metrics import FiniteCount, count_non_finite, headroom, passes_psnr, psnr, round_to


def test_count_separates_nan_and_signed_inf() -> None:
    x = np.array([0.0, 1.0, np.nan, np.nan, np.inf, -np.inf, -np.inf, 65504.0], np.float32)
    c = count_non_finite(x)
    assert c == FiniteCount(total=8, nan=2, posinf=1, neginf=2)
    assert c.non_finite == c.invalid == 5
    assert not c.all_finite
    assert c.describe() == "5 of 8 values non-finite (nan=2, +inf=1, -inf=2)"


def test_count_on_float16_and_integer_arrays() -> None:
    with np.errstate(over="ignore"):
        half = np.array([65504, 65520, -1e6, 1], np.float32).astype(np.float16)  # overflow -> +-inf
    assert count_non_finite(half) == FiniteCount(4, 0, 1, 1)
    assert count_non_finite(np.arange(6).reshape(2, 3)).all_finite


def test_count_all_nan_image_like_sdnext() -> None:
    image = np.full((1, 3, 32, 32), np.nan, np.float16)
    assert count_non_finite(image).invalid == 3 * 32 * 32


def test_psnr_identical_is_inf_and_passes() -> None:
    x = np.linspace(-1, 1, 100, dtype=np.float32)
    assert psnr(x, x) == math.inf
    assert passes_psnr(psnr(x, x), 35.0)


def test_psnr_known_value() -> None:
    ref = np.zeros(1000, np.float32)
    x = np.full(1000, 0.02, np.float32)  # mse 4e-4, range 2: 10 log10(4 / 4e-4) = 40 dB
    assert psnr(x, ref) == pytest.approx(40.0, abs=1e-5)
    assert psnr(x, ref, data_range=1.0) == pytest.approx(40.0 - 10 * math.log10(4), abs=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_psnr_non_finite_is_nan_and_never_passes(bad: float) -> None:
    ref = np.zeros(16, np.float32)
    x = ref.copy()
    x[3] = bad
    for value in (psnr(x, ref), psnr(ref, x)):
        assert math.isnan(value)
        assert not (value < 35.0)  # the trap: a "fail if below" gate would let it through
        assert not passes_psnr(value, 35.0)


def test_psnr_rejects_shape_mismatch_and_bad_range() -> None:
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros(3), np.zeros(3), data_range=0.0)


def test_passes_psnr_threshold_edges() -> None:
    assert passes_psnr(35.0, 35.0)
    assert not passes_psnr(34.99, 35.0)
    assert passes_psnr(math.inf, 35.0)
    with pytest.raises(ValueError):
        passes_psnr(40.0, math.nan)


def test_headroom_ratio_and_edges() -> None:
    assert headroom(32752.0) == pytest.approx(2.0)
    assert headroom(65504.0) == 1.0
    assert headroom(2.0e5) < 1.0  # the overflow-prone SDXL VAE
    assert headroom(0.0) == math.inf
    assert headroom(math.inf) == 0.0
    assert headroom(math.nan) == 0.0
    assert headroom(10.0, limit=100.0) == 10.0
    with pytest.raises(ValueError):
        headroom(-1.0)


def test_round_to_references() -> None:
    x = np.array([1 + 2.0**-9, 1 + 2.0**-12, 65519, 65520, 1 + 2.0**-8, 1 + 3 * 2.0**-8, np.nan], np.float32)
    f16 = round_to(x, "f16")
    assert f16[:4].tolist() == [1 + 2.0**-9, 1.0, 65504.0, np.inf] and np.isnan(f16[6])
    bf16 = round_to(x, "bf16")  # ties to even: 1+2^-8 -> 1, 1+3*2^-8 -> 1+2^-6
    assert bf16[:6].tolist() == [1.0, 1.0, 65536.0, 65536.0, 1.0, 1 + 2.0**-6] and np.isnan(bf16[6])
    assert round_to(np.float32([3.4e38]), "bf16")[0] == np.inf
    assert round_to(x[:3], "f32").tolist() == x[:3].tolist()
    with pytest.raises(ValueError, match="precision"):
        round_to(x, "f8")
