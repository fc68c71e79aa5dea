"""SD 1.x and its LCM form, beyond the family contract (tests/test_family_contract.py): what differs.

The LCM family is gated as FastSD CPU runs it (4 steps, guidance 1, batch 1: LCM embeds the guidance
scale, so even a recipe's guidance 8 keeps batch 1), and an SD 1.x original-layout single file,
refused before this family existed, converts to the same UNet as the diffusers folder it was
written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.cli import main
from convert.families import FAMILIES
from convert.recipe import load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def write_recipe(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"schema_version: 1\nname: {name}\n{body}")
    return path


def _rows(bundle: Path, component: str) -> list[dict[str, object]]:
    report = json.loads((bundle / "validation" / "report.json").read_text())
    return [r for r in report["submodels"] if r["component"] == component]


def test_the_lcm_unet_is_gated_at_its_own_steps_and_batch_1(family_build) -> None:  # type: ignore[no-untyped-def]
    result = family_build("latent-consistency-model")
    rows = _rows(result.bundle, "unet")
    assert rows and all(r["calls"] >= 1 for r in rows)
    described = " ".join(str(r["inputs"]) for r in rows)
    assert "of 4 (batch 1," in described, described
    from convert import package

    recipe = package.read_build_info(result.bundle).recipe
    assert (recipe.run_steps(), recipe.run_guidance()) == (4, 1.0)  # the family's run: the recipe sets neither


def test_an_lcm_recipe_at_guidance_8_still_plans_batch_1(tmp_path: Path) -> None:
    from validate.describe import describe_pipeline_checks

    path = write_recipe(tmp_path, "lcm8", "pipeline: latent-consistency-model\n"
                        "base: {generated: {generator: tiny-sd15-lcm, seed: 0}, license: apache-2.0}\n"
                        "validation: {end_to_end: {guidance_scale: 8.0}}\n")
    lines = describe_pipeline_checks(load_recipe(path))
    assert any("unet at f16" in line and "(batch 1)" in line and "guidance 8" in line for line in lines), lines
    sd15 = write_recipe(tmp_path, "sd15", "pipeline: stable-diffusion-v1\n"
                        "base: {generated: {generator: tiny-sd15, seed: 0}, license: apache-2.0}\n")
    lines = describe_pipeline_checks(load_recipe(sd15))
    assert any("unet at f16" in line and "(batch 2)" in line and "guidance 7.5" in line for line in lines), lines


def test_an_sd1_single_file_converts_to_the_same_unet_as_its_diffusers_folder(
        family_build, artifacts_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import openvino as ov

    folder_build = family_build("stable-diffusion-v1")
    path = write_recipe(tmp_path, "sd15-single-file", (
        "pipeline: stable-diffusion-v1\n"
        "base:\n"
        "  generated: {generator: tiny-sd15-single-file, seed: 0}\n"
        "  file: tiny-sd15.safetensors\n"
        "  config: {generated: {generator: tiny-sd15-config, seed: 0}}\n"
        "  license: apache-2.0\n"
        "components:\n  text_encoder: {weights: fp16}\n  unet: {weights: int8, nncf: {mode: int8_asym}}\n"
        "target: {device: GPU, inference_precision: [f16]}\n"
        "validation: {resolution: 64, small_resolution: 32, denoise_steps: 2, end_to_end: {prompts: []}}\n"))
    assert main(["--artifacts", str(artifacts_root), "convert", str(path)]) == 0
    bundle = next((artifacts_root / "sd15-single-file").glob("*/build.json")).parent
    core = ov.Core()

    def constants(root: Path, part: str) -> list[np.ndarray]:
        model = core.read_model(root / part / "openvino_model.xml")
        return [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]

    for part in ("unet", "text_encoder"):
        ours, theirs = constants(bundle, part), constants(folder_build.bundle, part)
        assert len(ours) == len(theirs) and all(a.shape == b.shape and np.array_equal(a, b)
                                                for a, b in zip(ours, theirs, strict=True)), part
    assert FAMILIES["stable-diffusion-v1"].single_file is not None
