"""Model families: one record is all a new family needs, and recipes are checked against theirs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from convert.build import build
from convert.errors import PatchError, RecipeError
from convert.families import FAMILIES, PipelineFamily, get_family, register, unregister
from convert.families.sdxl import SDXL
from convert.package import verify
from convert.patch import check_family
from convert.recipe import load_recipe
from convert.workspace import Workspace

#: A family defined in this file alone: SDXL's pieces under another name, tags and components left out.
THROWAWAY = dataclasses.replace(SDXL, name="throwaway-xl", description="test family", tags=("throwaway-family",))


@pytest.fixture
def throwaway() -> Iterator[PipelineFamily]:
    register(THROWAWAY)
    try:
        yield THROWAWAY
    finally:
        unregister(THROWAWAY.name)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"schema_version: 1\nname: {name}\n{body}")
    return path


def test_throwaway_family_builds_from_one_record(throwaway: PipelineFamily, tmp_path: Path,
                                                  artifacts_root: Path) -> None:
    recipe = write(tmp_path, "throwaway", f"""pipeline: {throwaway.name}
base: {{generated: {{generator: tiny-sdxl-base, seed: 0}}}}
components:
  unet: {{weights: fp16}}
  tokenizer_2: {{export: false}}
target: {{device: CPU, inference_precision: [f32]}}
validation: {{resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder]}}
""")
    result = build(recipe, Workspace(artifacts=artifacts_root))
    assert verify(result.bundle) == []
    card = (result.bundle / "README.md").read_text()
    tags = yaml.safe_load(card.split("---")[1])["tags"]
    assert "throwaway-family" in tags and "stable-diffusion-xl" not in tags
    assert [c.name for c in result.components] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                   "vae_encoder", "tokenizer"]
    assert not (result.bundle / "tokenizer_2" / "openvino_tokenizer.xml").exists()
    headline = result.headline
    assert headline is not None and headline.passed and set(headline.vae) == {"f32"}  # the VAE gate ran, at f32
    # the recipe gates the decoder only: the parts its family's gate replays are reported as not checked
    assert headline.not_checked == ("text_encoder, text_encoder_2, unet on captured calls (not in validation.components)",)


def test_unknown_family_is_a_recipe_error_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "typo", "pipeline: stable-diffusion-xI\nbase: {local: {path: .}}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "line 3: pipeline: unknown pipeline family 'stable-diffusion-xI'; did you mean 'stable-diffusion-xl'?" in str(info.value)


def test_components_are_checked_against_the_recipes_family(throwaway: PipelineFamily, tmp_path: Path) -> None:
    narrow = dataclasses.replace(throwaway, name="narrow-xl", fit_checks={"vae": SDXL.fit_checks["vae"]})
    register(narrow)
    try:
        path = write(tmp_path, "narrow", "pipeline: narrow-xl\nbase: {local: {path: .}}\n"
                     "substitutions:\n  unet: {source: {local: {path: .}}}\n")
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert "line 5: substitutions: cannot substitute 'unet'; expected one of: vae" in str(info.value)
        path.write_text(path.read_text().replace("pipeline: narrow-xl", "pipeline: stable-diffusion-xl"))
        assert load_recipe(path).family is SDXL
    finally:
        unregister(narrow.name)


def test_base_of_another_family_is_refused_before_loading() -> None:
    with pytest.raises(PatchError) as info:
        check_family({"_class_name": "StableDiffusionXLPipeline"}, dataclasses.replace(SDXL, name="other",
                                                                                      diffusers_class="OtherPipeline"))
    assert str(info.value) == ("base: model_index.json names StableDiffusionXLPipeline, but the recipe's pipeline other "
                               "is a OtherPipeline; set pipeline: stable-diffusion-xl in the recipe")


def test_registry_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(SDXL)
    assert get_family("stable-diffusion-xl") is SDXL and set(FAMILIES) >= {"stable-diffusion-xl"}


def test_exporter_refuses_an_unverified_optimum_intel(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from convert import optimum_compat
    from convert.errors import ExportError

    installed = importlib.metadata.version("optimum-intel")
    assert optimum_compat.check_version() == installed
    monkeypatch.setattr(optimum_compat, "VERIFIED_OPTIMUM_INTEL", ("9.9.",))
    with pytest.raises(ExportError) as info:
        optimum_compat.check_version()
    assert str(info.value).startswith(f"optimum-intel {installed} is not one the exporter was verified with (9.9.x); "
                                      "install the pinned version")


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_names_components_of_its_family(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.family.name == recipe.pipeline
    assert set(recipe.components) <= set(recipe.family.components)
    assert set(recipe.substitutions) <= set(recipe.family.substitutable)
