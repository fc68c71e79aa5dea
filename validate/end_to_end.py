"""End to end: the final images of the whole pipeline at the target precision vs f32.

What a user sees is the image, after the UNet's errors have compounded over the denoising
steps and gone through the VAE: a submodel that passes alone can still give a black
image. Same prompts, seeds and steps at both precisions; non-finite pixels, PSNR and SSIM
(scikit-image) judge the target-precision image against the f32 one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from validate.metrics import Counted, FiniteCount, count_non_finite, flat_counts, passes_psnr, psnr

MAGENTA = (255, 0, 255)  # non-finite pixels, as in the VAE sample PNGs


@dataclass(frozen=True)
class ImageComparison(Counted):
    """One prompt at one precision vs its f32 image; numbers rounded as reported."""

    precision: str
    prompt: str
    seed: int
    runs_as: dict[str, str]  # component -> "f16 emulated", "f32 native", ...
    counts: FiniteCount
    psnr_db: float | None  # None: non-finite image
    ssim: float | None
    failures: list[str] = field(default_factory=list)
    gating: bool = True

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return flat_counts(asdict(self)) | {"invalid": self.invalid, "passed": self.passed}


@dataclass(frozen=True)
class Thresholds:
    max_non_finite: int
    min_ssim: float | None
    min_psnr_db: float | None
    gate: bool


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity of two [H, W, 3] images in [0, 1]; NaN if either is non-finite."""
    from skimage.metrics import structural_similarity

    if not (np.isfinite(image).all() and np.isfinite(reference).all()):
        return math.nan
    side = min(image.shape[:2])
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(reference.astype(np.float64), image.astype(np.float64), data_range=1.0,
                                       channel_axis=-1, win_size=window))


def compare(image: np.ndarray, reference: np.ndarray, *, precision: str, prompt: str, seed: int,
            runs_as: dict[str, str], limits: Thresholds, hint: str | None = None) -> ImageComparison:
    """Judge one target-precision image against the f32 image of the same prompt and seed.

    `hint`: what to change if it fails, where it is not the precision (a quantized denoiser)."""
    counts = count_non_finite(image)
    value = psnr(image, reference, data_range=1.0)
    similarity = ssim(image, reference)
    name = f"end-to-end {precision} ('{prompt}', seed {seed})"
    against = "the f32 image of the unquantized pipeline" if hint else "the f32 image"
    failures = []
    if counts.invalid > limits.max_non_finite:
        failures.append(f"{name}: {counts.invalid}/{counts.total} image values non-finite (a black image on the "
                        f"device); see the submodel lines for the block, or run the failing submodel at f32")
    elif limits.min_ssim is not None and not (similarity >= limits.min_ssim):
        failures.append(f"{name}: SSIM {similarity:.4f} < {limits.min_ssim:g} vs {against}; " + (hint or
                        "run the UNet at f32 (components.unet.inference_precision) or relax validation.end_to_end.min_ssim"))
    elif limits.min_psnr_db is not None and not passes_psnr(value, limits.min_psnr_db):
        failures.append(f"{name}: PSNR {value:.2f} dB < {limits.min_psnr_db:g} dB vs {against}; " + (hint or
                        "run the UNet at f32 (components.unet.inference_precision) or relax validation.end_to_end.min_psnr_db"))
    return ImageComparison(
        precision=precision, prompt=prompt, seed=seed, runs_as=runs_as, counts=counts,
        psnr_db=None if math.isnan(value) else (value if math.isinf(value) else round(value, 2)),
        ssim=None if math.isnan(similarity) else round(similarity, 4), failures=failures, gating=limits.gate,
    )


def to_rgb(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> uint8, non-finite pixels magenta so a NaN image is visible."""
    bad = ~np.isfinite(image).all(axis=-1)
    rgb = (np.clip(np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0), 0, 1) * 255).round().astype(np.uint8)
    rgb[bad] = MAGENTA
    return rgb


def grid_scale(side: int, target: int = 256) -> int:
    """Integer upscale so that small validation images are big enough to look at."""
    return max(1, target // side)


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: Path) -> tuple[int, int]:
    """One row per prompt, one column per precision (f32 first); returns (columns, rows).

    Tiles are upscaled by an integer factor (nearest), so pixels stay pixels.
    """
    from PIL import Image

    tiles = [[to_rgb(im) for im in row] for row in rows]
    scale = grid_scale(tiles[0][0].shape[0])
    grid = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return len(tiles[0]), len(tiles)


def markdown(results: Sequence[ImageComparison], limits: Thresholds | None) -> list[str]:
    if not results:
        return []
    gate = "not gating (report only)" if limits is None or not limits.gate else (
        f"gate: at most {limits.max_non_finite} non-finite values"
        + (f", SSIM >= {limits.min_ssim:g}" if limits.min_ssim is not None else "")
        + (f", PSNR >= {limits.min_psnr_db:g} dB" if limits.min_psnr_db is not None else ""))
    lines = ["", f"End to end: the whole pipeline at the target precision vs f32, same prompt and seed ({gate}):", "",
             "| precision | prompt | seed | submodels ran as | invalid (NaN / +inf / -inf) | PSNR dB | SSIM | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        runs = ", ".join(f"{k} {v}" for k, v in r.runs_as.items())
        verdict = ("pass" if r.passed else "FAIL") if r.gating else ("(info) " + ("ok" if r.passed else "would fail"))
        lines.append(f"| {r.precision} | {r.prompt} | {r.seed} | {runs} | {r.invalid}/{r.total} "
                     f"({r.nan} / {r.posinf} / {r.neginf}) | {_num(r.psnr_db)} | {_num(r.ssim)} | {verdict} |")
    return lines


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else str(value)
