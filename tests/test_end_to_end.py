"""End-to-end image verdicts, the grid and the headroom charts, on small arrays (no pipeline)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from validate.charts import COLORS, LABEL_W, PAD, ROW, chart_size, headroom_chart
from validate.end_to_end import MAGENTA, Thresholds, compare, save_grid
from validate.pipeline_run import evenly_spaced
from validate.report import ValidationReport
from validate.submodels import cosine

LIMITS = Thresholds(max_non_finite=0, min_ssim=0.5, min_psnr_db=None, gate=True)


def _image(seed: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((side, side, 3), dtype=np.float32)


def _compare(image: np.ndarray, reference: np.ndarray, limits: Thresholds = LIMITS):  # type: ignore[no-untyped-def]
    return compare(image, reference, precision="f16", prompt="a cat", seed=3, runs_as={"unet": "f16 emulated"},
                   limits=limits)


def test_identical_image_passes_with_exact_scores() -> None:
    ref = _image(0)
    row = _compare(ref.copy(), ref)
    assert row.passed and row.psnr_db == math.inf and row.ssim == 1.0 and row.invalid == 0


def test_nan_image_fails_and_has_no_scores() -> None:
    ref = _image(0)
    black = ref.copy()
    black[:4] = np.nan
    row = _compare(black, ref)
    assert row.nan == 4 * 32 * 3 and row.psnr_db is None and row.ssim is None
    assert row.failures == [f"end-to-end f16 ('a cat', seed 3): {4 * 32 * 3}/{32 * 32 * 3} image values non-finite "
                            "(a black image on the device); see the submodel lines for the block, or run the failing "
                            "submodel at f32"]


def test_unrelated_image_fails_ssim_and_gate_false_only_reports() -> None:
    row = _compare(_image(1), _image(0))
    assert row.ssim is not None and row.ssim < 0.5 and "SSIM" in row.failures[0] and "min_ssim" in row.failures[0]
    info = _compare(_image(1), _image(0), Thresholds(0, 0.5, None, gate=False))
    assert not info.passed and not info.gating
    assert ValidationReport([], {"max_non_finite": 0, "min_psnr_db": 40}, images=[info]).failures == [
        "no validation check ran; enable validation.components in the recipe"]


def test_psnr_floor_applies_when_set() -> None:
    ref = _image(0)
    row = _compare(np.clip(ref + 0.05, 0, 1), ref, Thresholds(0, None, 40.0, gate=True))
    assert row.psnr_db is not None and row.psnr_db < 40 and row.failures[0].split(": ")[1].startswith("PSNR")


def test_grid_layout_and_magenta_for_non_finite(tmp_path: Path) -> None:
    ref, bad = _image(0), np.full((32, 32, 3), np.nan, np.float32)
    assert save_grid([[ref, ref], [ref, bad], [ref, ref]], tmp_path / "g.png") == (2, 3)
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (2 * 256, 3 * 256)  # 32-pixel tiles shown x8
        pixels = np.asarray(grid)
    assert (pixels[256:512, 256:] == MAGENTA).all() and not (pixels[:256] == MAGENTA).all(axis=-1).any()


def test_headroom_chart_marks_the_overflowing_block(tmp_path: Path) -> None:
    maxima = {"conv_in": 3.0, "up_blocks.1.resnets.1": 2.6e5, "conv_out": math.inf}
    headroom_chart("unet", maxima, tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as chart:
        assert chart.size == chart_size(3)
        pixels = np.asarray(chart.convert("RGB"))
    top = PAD * 2 + ROW
    bar_x = LABEL_W + PAD + 2
    assert tuple(pixels[top + ROW // 2, bar_x]) == COLORS["ok"]
    assert tuple(pixels[top + ROW + ROW // 2, bar_x]) == COLORS["over"]
    assert tuple(pixels[top + 2 * ROW + ROW // 2, bar_x]) == COLORS["over"]


def test_cosine_and_step_selection() -> None:
    x = np.arange(1, 7, dtype=np.float32)
    assert cosine(x, 2 * x) == pytest.approx(1.0) and cosine(x, -x) == pytest.approx(-1.0)
    assert math.isnan(cosine(np.array([np.nan, 1.0]), np.array([1.0, 1.0])))
    assert evenly_spaced(3, 3) == [0, 1, 2] and evenly_spaced(10, 3) == [0, 4, 9] and evenly_spaced(2, 5) == [0, 1]


def test_a_component_pinned_to_f32_runs_f32_end_to_end() -> None:
    """The fix the UNet failure line suggests takes effect in the end-to-end run."""
    from convert.recipe import Recipe
    from validate.pipeline_gate import run_precision

    recipe = Recipe.model_validate({
        "schema_version": 1, "name": "x", "base": {"generated": {"generator": "tiny-sdxl-base"}},
        "components": {"unet": {"inference_precision": ["f32"]}}, "target": {"inference_precision": ["f16"]},
    })
    assert run_precision(recipe, "f16", "unet") == "f32"
    assert run_precision(recipe, "f16", "text_encoder") == "f16"
