"""The gate runs a pipeline as its users do: a distilled model run at guidance <= 1 is gated at
batch 1 with its own steps (SDXL Turbo: guidance 0, 1-4 steps), and a gate part the recipe
switches off is reported as not checked, never skipped in silence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openvino as ov
import pytest

from convert.recipe import EndToEndSettings
from validate.pipeline_gate import run_pipeline_checks


def _with_run(recipe, **e2e):  # type: ignore[no-untyped-def]
    run = EndToEndSettings(**{**recipe.validation.end_to_end.model_dump(), **e2e})
    return recipe.model_copy(update={"validation": recipe.validation.model_copy(update={"end_to_end": run})})


@pytest.fixture
def bundle(tiny_build, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A copy: the gate writes its grid into the bundle, and the session's bundle must keep verifying."""
    return Path(shutil.copytree(tiny_build.bundle, tmp_path / "bundle"))


def test_guidance_at_most_one_is_gated_at_batch_one_with_its_steps(bundle: Path) -> None:
    recipe = _with_run(tiny_build_recipe(bundle), steps=1, guidance_scale=0.0, prompts=["a red cube"])
    found = run_pipeline_checks(bundle, recipe, ov.Core(), 64)
    unet = [r for r in found.submodels if r.component == recipe.family.denoiser]
    assert unet and all(r.calls == 1 and "steps 1 of 1 (batch 1," in r.inputs for r in unet)
    assert [i.precision for i in found.images] == ["f16"] and found.images[0].passed
    assert not found.not_checked


def test_a_switched_off_run_is_reported_not_checked(bundle: Path) -> None:
    recipe = _with_run(tiny_build_recipe(bundle), prompts=[])
    found = run_pipeline_checks(bundle, recipe, ov.Core(), 64)
    assert not found.submodels and not found.images
    assert found.not_checked == ["end-to-end images and text_encoder, text_encoder_2, unet on captured calls "
                                 "(validation.end_to_end.prompts is empty)"]


def tiny_build_recipe(bundle: Path):  # type: ignore[no-untyped-def]
    from convert.package import read_build_info

    return read_build_info(bundle).recipe


def test_the_default_run_is_the_familys(tiny_build) -> None:  # type: ignore[no-untyped-def]
    recipe = tiny_build_recipe(tiny_build.bundle)
    report = json.loads((tiny_build.bundle / "validation" / "report.json").read_text())
    gate = recipe.family.gate
    assert recipe.validation.end_to_end.steps is None and recipe.run_steps() == gate.steps
    unet = [r for r in report["submodels"] if r["component"] == recipe.family.denoiser]
    assert unet and all(f"of {gate.steps} (batch 2," in r["inputs"] for r in unet)
