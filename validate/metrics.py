"""Numeric verdicts on decoded images, safe against the NaN traps of half precision.

An all-NaN f16 decode must fail every check. Plain comparisons get that wrong:
`psnr(nan_image) < 35` is False, so a "fail if below threshold" gate would pass it.
Here a non-finite input gives a NaN PSNR, and `passes_psnr` is False for NaN.
Pure numpy: usable on outputs of OpenVINO, torch or files alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

F16_MAX = 65504.0


@dataclass(frozen=True)
class FiniteCount:
    """How many values of an array are NaN, +inf or -inf."""

    total: int
    nan: int
    posinf: int
    neginf: int

    @property
    def non_finite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def invalid(self) -> int:
        """NaN plus inf, the number SD.Next logs as `invalid=` for a broken VAE decode."""
        return self.non_finite

    @property
    def all_finite(self) -> bool:
        return self.non_finite == 0

    def describe(self) -> str:
        """One line for reports and error messages."""
        return (f"{self.non_finite} of {self.total} values non-finite "
                f"(nan={self.nan}, +inf={self.posinf}, -inf={self.neginf})")

    def __add__(self, other: FiniteCount) -> FiniteCount:
        """Counts of several outputs together (a submodel's outputs over all its calls)."""
        return FiniteCount(self.total + other.total, self.nan + other.nan, self.posinf + other.posinf,
                           self.neginf + other.neginf)


NO_VALUES = FiniteCount(0, 0, 0, 0)


class Counted:
    """A check result holding a `counts: FiniteCount`, read under the names its reports use."""

    counts: FiniteCount

    @property
    def total(self) -> int:
        return self.counts.total

    @property
    def nan(self) -> int:
        return self.counts.nan

    @property
    def posinf(self) -> int:
        return self.counts.posinf

    @property
    def neginf(self) -> int:
        return self.counts.neginf

    @property
    def invalid(self) -> int:
        return self.counts.invalid


def flat_counts(row: dict[str, Any]) -> dict[str, Any]:
    """`asdict` of a Counted result with `counts` spread in place: report.json's flat total/nan/posinf/neginf."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "counts":
            out |= value
        else:
            out[key] = value
    return out


def count_non_finite(x: np.ndarray) -> FiniteCount:
    """Count NaN/+inf/-inf in `x` (integer arrays are all finite)."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.inexact):
        return FiniteCount(int(a.size), 0, 0, 0)
    return FiniteCount(int(a.size), int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum()))


def psnr(x: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of `x` against `reference`, computed in float64.

    `data_range` defaults to 2.0 because VAE decodes are images in [-1, 1].
    Returns +inf for identical arrays and NaN if either holds a non-finite value:
    never compare the result with `<` alone, use `passes_psnr`.
    """
    a = np.asarray(x, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shape {a.shape} does not match reference shape {b.shape}")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    if a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def passes_psnr(value: float, threshold: float) -> bool:
    """True if `value` reaches `threshold` dB; NaN (a non-finite image) never passes."""
    if math.isnan(threshold):
        raise ValueError("passes_psnr: threshold is NaN")
    return not math.isnan(value) and value >= threshold


def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """`x` rounded to f16 or bf16 (nearest even, overflow to inf) and back to f32.

    The reference the OpenVINO emulation in validate/precision.py must match bit for bit.
    """
    x = np.asarray(x, np.float32)
    if precision == "f16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if precision == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), x, rounded)
    if precision == "f32":
        return x.copy()
    raise ValueError(f"round_to: unknown precision {precision!r}; expected f32, f16 or bf16")


def headroom(max_abs: float, limit: float = F16_MAX) -> float:
    """How many times larger activations could grow before exceeding `limit`.

    `limit / max_abs`: 2.0 means a 2x safety margin, below 1.0 the format overflows
    (f16 values above 65504 round to inf from 65520). All-zero activations give inf;
    a non-finite maximum (inf, or NaN from an earlier overflow) gives 0.0: no headroom.
    """
    if math.isnan(max_abs) or math.isinf(max_abs):
        return 0.0
    if max_abs < 0:
        raise ValueError(f"headroom: max_abs must be >= 0, got {max_abs}")
    if max_abs == 0:
        return math.inf
    return limit / max_abs
