"""Recipe schema: valid recipes load, every invalid one fails with a one-line, pointed message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_faults import nothing_changes_outside

from convert.errors import RecipeError
from convert.recipe import json_schema, load_recipe, recipe_digest, find_recipe
from convert.workspace import PROJECT_ROOT

BAD = Path(__file__).parent / "recipes_bad"
RECIPES = PROJECT_ROOT / "recipes"


@pytest.mark.parametrize("name", ["tiny-sdxl-fp16fix", "sdxl-fp16fix"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    assert "vae" in recipe.substitutions
    assert recipe.settings_for("unet").weights == "int8"
    assert "f16" in recipe.precisions_for("vae_decoder")


def test_real_recipe_pins_hub_sources() -> None:
    recipe = load_recipe(RECIPES / "sdxl-fp16fix.yaml")
    assert recipe.base.hub is not None and recipe.base.hub.repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert recipe.base.hub.variant == "fp16"
    vae = recipe.substitutions["vae"].source.hub
    assert vae is not None and vae.repo == "madebyollin/sdxl-vae-fp16-fix"


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("typo_field.yaml", "line 5: unknown field 'precison' in components.unet; did you mean 'inference_precision'?"),
        ("typo_top.yaml", "line 4: unknown field 'substitution' in the recipe; did you mean 'substitutions'?"),
        ("wrong_type.yaml", "line 5: validation.max_non_finite: Input should be a valid integer"),
        ("unknown_component.yaml", "unknown component 'vae_decodr'; did you mean 'vae_decoder'?"),
        ("bad_precision.yaml", "target.inference_precision.0: Input should be 'f32', 'f16' or 'bf16'"),
        ("two_sources.yaml", "base: a source needs exactly one of 'hub', 'local', 'generated' (got ['hub', 'local'])"),
        ("bad_schema_version.yaml", "line 1: schema_version 2 is not supported; this tool reads schema_version 1"),
        ("not_yaml.yaml", "not valid YAML"),
        ("nncf_on_fp16.yaml", "'nncf' settings need weights int8 or int4, not fp16"),
        ("bad_repo_id.yaml", "'stable-diffusion-xl-base-1.0' is not a Hub repo id; write it as 'owner/name'"),
        ("duplicate_precision.yaml", "line 4: target.inference_precision: lists f16 more than once; name each once"),
        ("int4_knob_on_int8.yaml", "nncf.group_size applies to int4 weights only; remove it or use weights: int4"),
        ("seed_too_big.yaml", "line 5: validation.end_to_end.seed: Input should be less than or equal to 4294967288"),
        ("scale_factor_text.yaml", "line 5: components.vae_decoder.runtime_options: ACTIVATIONS_SCALE_FACTOR: 'abc' is "
                                   "not a positive number (e.g. 8 or 128.0)"),
    ],
)
def test_bad_recipe_messages(file: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(BAD / file)
    message = str(info.value)
    assert expected in message
    assert message.startswith(str(BAD / file))
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_missing_recipe_file_suggests_names() -> None:
    with pytest.raises(RecipeError, match="no recipe named 'tiny-sdxl-fp16fx'; did you mean 'tiny-sdxl-fp16fix'"):
        find_recipe("tiny-sdxl-fp16fx", [RECIPES])


def test_digest_ignores_formatting(tmp_path: Path) -> None:
    text = (RECIPES / "tiny-sdxl-fp16fix.yaml").read_text()
    reformatted = tmp_path / "tiny-sdxl-fp16fix.yaml"
    reformatted.write_text("# a comment\n" + text.replace("{weights: fp16}", "\n    weights: fp16"))
    assert recipe_digest(load_recipe(reformatted)) == recipe_digest(load_recipe(RECIPES / "tiny-sdxl-fp16fix.yaml"))


def test_local_paths_are_relative_to_the_recipe(tmp_path: Path) -> None:
    """Kept as written (nothing recorded depends on the checkout); resolved against the recipe's folder."""
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("schema_version: 1\nname: r\nbase: {local: {path: ../pipe}}\n")
    recipe = load_recipe(path)
    assert recipe.base.local is not None and recipe.base.local.path == Path("../pipe")
    assert recipe.base.local.folder(path.parent) == (tmp_path / "pipe").resolve()


def test_json_schema_file_is_current() -> None:
    on_disk = json.loads((PROJECT_ROOT / "recipe.schema.json").read_text())
    assert on_disk == json_schema(), "recipe.schema.json is stale: run `just schema`"


def test_every_field_has_a_description() -> None:
    schema = json_schema()
    missing = [
        f"{model}.{field}"
        for model, definition in [("Recipe", schema), *schema["$defs"].items()]
        for field, prop in definition.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert missing == []


def test_generator_names_match_the_generators() -> None:
    """The recipe checks generator names without importing torch; every registered name is a real generator."""
    import importlib

    from convert import testing
    from convert.recipe_rules import GENERATOR_NAMES

    assert GENERATOR_NAMES == testing.GENERATORS
    for name in GENERATOR_NAMES:
        module, function, _ = testing._GENERATORS[name]
        assert callable(getattr(importlib.import_module(module), function)), name


def test_every_allowed_sample_image_loads_offline() -> None:
    """Each name the recipe accepts is shipped with scikit-image and becomes an RGB batch (no pooch download)."""
    from convert.recipe_rules import SAMPLE_IMAGES
    from validate.inputs import sample_images

    batch = sample_images(list(SAMPLE_IMAGES), 16)
    assert batch.shape == (len(SAMPLE_IMAGES), 3, 16, 16) and -1.0 <= batch.min() and batch.max() <= 1.0


def test_loading_a_recipe_stays_light() -> None:
    """`--plan` and recipe errors answer fast: no torch, and no huggingface_hub for a recipe without Hub ids."""
    import subprocess
    import sys

    code = (
        "import sys; from convert.recipe import load_recipe; "
        f"load_recipe(__import__('pathlib').Path({str(RECIPES / 'tiny-sdxl-fp16fix.yaml')!r})); "
        "print(sorted(m for m in ('torch', 'huggingface_hub', 'diffusers', 'openvino') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("file", ["duplicate_precision.yaml", "seed_too_big.yaml", "scale_factor_text.yaml",
                                  "int4_knob_on_int8.yaml"])
def test_values_found_late_before_are_refused_at_load_by_the_cli(file: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: these passed the plan and failed after the export (exit 6 or an internal error)."""
    from convert.cli import main

    with nothing_changes_outside(BAD), nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(BAD / file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {BAD / file}: line "), err
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").rglob("*.xml"))


def test_a_narrow_terminal_folds_the_plan_instead_of_cutting_names(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """COLUMNS=20 cut text_encoder and text_encoder_2 both to 'te…', int8 and int4 both to 'in…'."""
    from convert.cli import main

    monkeypatch.setenv("COLUMNS", "20")
    assert main(["convert", "tiny-sdxl-fp16fix", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 4]
    assert "text_encoder_2" in "".join(cells)


def test_json_into_a_closed_pipe_is_one_line_not_two_tracebacks() -> None:
    """`sdxl-convert ... --json | head -0`: exit 141 (128 + SIGPIPE) and one line on stderr."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "convert", "convert", "tiny-sdxl-fp16fix", "--plan", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader goes away before the plan is printed
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141
    assert err.strip().splitlines() == ["stdout was closed before the output was written (broken pipe)"], err


def test_hf_home_naming_a_file_is_a_usage_error_not_an_unreachable_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from convert.cli import main

    not_a_folder = tmp_path / "hf-home"
    not_a_folder.write_text("")
    monkeypatch.setenv("HF_HOME", str(not_a_folder))
    with nothing_changes_outside(tmp_path):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", "tiny-sdxl-fp16fix", "--plan"]) == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: HF_HOME={str(not_a_folder)!r} is not a folder; point HF_HOME at a folder (or unset it)"]


def test_a_deleted_working_directory_still_finds_the_projects_recipes(tmp_path: Path) -> None:
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    project = Path(__file__).parents[1]
    script = f"cd {gone} && rmdir {gone} && exec {sys.executable} -m convert convert tiny-sdxl-fp16fix --plan --json"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(project)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recipe"] == "tiny-sdxl-fp16fix"


@pytest.mark.parametrize(("change", "expected"), [
    (("timestep_spacing: trailing", "timestep_spacin: trailing"),
     "scheduler.config.timestep_spacin: EulerDiscreteScheduler has no such setting; did you mean 'timestep_spacing'?"),
    (("EulerDiscreteScheduler", "FlaxEulerDiscreteScheduler"),
     "scheduler.class_name: diffusers has no PyTorch scheduler FlaxEulerDiscreteScheduler; did you mean 'EulerDiscreteScheduler'?"),
    (("EulerDiscreteScheduler", "DPMSolverSDEScheduler"),
     "scheduler.class_name: DPMSolverSDEScheduler needs the packages torch, torchsde, not all installed here"),
    (("{timestep_spacing: trailing}", "{num_train_timesteps: 1000000000}"),
     "scheduler.config.num_train_timesteps: 1000000000 is not a number of steps from 1 to 10000"),
    (("timestep_spacing: trailing", "timestep_spacing: bogus"),
     "scheduler.config: EulerDiscreteScheduler refuses these settings (bogus is not supported."),
])
def test_a_scheduler_diffusers_cannot_build_is_refused_before_any_download(
        change: tuple[str, str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: a typo was silently ignored (the card claimed it); the rest failed after the export."""
    from convert.cli import main

    text = (Path(__file__).parents[1] / "recipes" / "tiny-singlefile-lora.yaml").read_text()
    assert change[0] in text
    recipe = tmp_path / "scheduler.yaml"
    recipe.write_text(text.replace(change[0], change[1]).replace("name: tiny-singlefile-lora", "name: scheduler"))
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {recipe}: {expected}"), err
    assert not (tmp_path / "art" / "sources").exists() and not (tmp_path / "art" / "scheduler").exists()


@pytest.mark.parametrize("name", ["tiny-sd35-medium", "tiny-sdxl-refiner", "tiny-sdxl-fp16fix", "sd35-medium",
                                  "sdxl-turbo-fp16fix"])
def test_a_recipe_stored_in_build_json_reads_back_under_its_own_family(name: str) -> None:
    # issue 20: an SD3 bundle's build.json held SDXL's default validation.components and was refused on reading
    from convert.recipe import Recipe

    recipe = load_recipe(PROJECT_ROOT / "recipes" / f"{name}.yaml")
    stored = json.loads(json.dumps(recipe.model_dump(mode="json")))
    again = Recipe.model_validate(stored)
    assert again == recipe and again.gated_components() == recipe.gated_components()
    assert set(again.gated_components()) <= set(recipe.family.weighted)
