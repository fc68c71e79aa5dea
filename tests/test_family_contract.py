"""The contract every registered pipeline family keeps (in the style of diffusers' PipelineTesterMixin).

One tiny build per family per pytest session (`family_build`): every weighted submodel exported
and gated at every target precision (text encoders and the denoiser on captured calls, the VAE
on its own checks), the end-to-end image compared at each target precision, converting again
reuses the bundle, `verify` and `publish --dry-run` accept it, optimum-intel generates with the
family's class, and openvino-genai where the family has a class for it.
"""

from __future__ import annotations

import gc
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from convert.cli import main
from convert.families import FAMILIES
from convert.package import MANIFEST
from convert.workspace import PROJECT_ROOT
from tests.tiny_recipes import FAMILY_BUILD_FILES, TINY_RECIPES
from tests.hub_server import DEFAULT_USER
from validate.inputs import run_inputs

NAMES = sorted(FAMILIES)
GENAI = [name for name in NAMES if FAMILIES[name].genai_class]


def test_every_registered_family_has_a_tiny_recipe() -> None:
    from convert.recipe import load_recipe

    assert set(TINY_RECIPES) == set(FAMILIES)
    for name, recipe in TINY_RECIPES.items():
        assert load_recipe(PROJECT_ROOT / "recipes" / f"{recipe}.yaml").pipeline == name


def test_every_file_reading_a_session_build_is_scheduled_with_the_others(request: pytest.FixtureRequest) -> None:
    """conftest's xdist scheduler runs FAMILY_BUILD_FILES in one worker; a file reading a session build but missing
    from that list would build its families again in the other worker."""
    readers = {item.path.name for item in request.session.items if "family_build" in getattr(item, "fixturenames", ())}
    if not readers:  # -k/-m left none of them in this run: nothing to schedule
        pytest.skip("no selected test reads a session build")
    assert readers <= FAMILY_BUILD_FILES, readers - FAMILY_BUILD_FILES


@pytest.mark.parametrize("name", NAMES)
def test_every_submodel_exported_and_gated_at_every_precision(family_build, name: str) -> None:  # type: ignore[no-untyped-def]
    family, result = FAMILIES[name], family_build(name)
    report = json.loads((result.bundle / "validation" / "report.json").read_text())
    listed = set(json.loads((result.bundle / MANIFEST).read_text())["files"])
    built = {c.name: c for c in result.components}
    assert report["passed"] is True and report["headline"]["passed"] is True
    assert not report["headline"].get("not_checked")
    for part in family.weighted:  # every weighted submodel the family has (the tiny recipes export them all)
        assert f"{part}/openvino_model.xml" in listed and part in built, part
    gated = {(r["component"], r["precision"]) for r in report["submodels"]}
    gated |= {(c["component"], c["precision"]) for c in report["checks"] if c["gating"]}
    for part in family.weighted:
        for precision in built[part].inference_precision:
            assert (part, precision) in gated, f"{part} {precision} not gated"
    replayed = [r for r in report["submodels"] if r["component"] == family.denoiser and r["precision"] != "f32"]
    assert replayed and all(r["calls"] >= 1 and r["min_cosine"] is not None for r in replayed)
    images = report["end_to_end"]["images"]
    targets = {p for c in built.values() for p in c.inference_precision if p != "f32"}
    assert {i["precision"] for i in images} == targets and all(i["invalid"] == 0 and i["passed"] for i in images)
    assert (result.bundle / "validation" / "end_to_end.png").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_converting_again_is_up_to_date_and_the_bundle_verifies_and_publishes(
        family_build, artifacts_root: Path, hub_server, name: str,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    result = family_build(name)
    recipe = PROJECT_ROOT / "recipes" / f"{TINY_RECIPES[name]}.yaml"
    capsys.readouterr()  # the session's build may have run in this test's setup (NNCF prints to stdout)
    assert main(["--json", "--artifacts", str(artifacts_root), "convert", str(recipe)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["status"] == "reused" and Path(again["bundle"]) == result.bundle
    assert main(["verify", str(result.bundle)]) == 0
    assert "files verify" in capsys.readouterr().out
    repo = f"{DEFAULT_USER}/contract-{name}-{uuid.uuid4().hex[:8]}"
    assert main(["--json", "publish", str(result.bundle), "--repo", repo, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and "build.json" in dry["files"] and "validation/report.json" in dry["files"]


@pytest.mark.parametrize("name", NAMES)
def test_optimum_intel_generates(family_build, name: str) -> None:  # type: ignore[no-untyped-def]
    import optimum.intel

    family, result = FAMILIES[name], family_build(name)
    pipe = getattr(optimum.intel, family.optimum_class).from_pretrained(result.bundle, device="CPU")
    gate = family.gate
    assert gate is not None
    images = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=gate.guidance_scale, output_type="np",
                  generator=np.random.RandomState(0), **run_inputs(family, 64)).images
    del pipe
    gc.collect()
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0


@pytest.mark.parametrize("name", GENAI)
def test_openvino_genai_generates(family_build, name: str) -> None:  # type: ignore[no-untyped-def]
    import openvino_genai

    family, result = FAMILIES[name], family_build(name)
    pipe = getattr(openvino_genai, family.genai_class)(str(result.bundle), "CPU")
    image = np.array(pipe.generate("a photo of a cat", width=64, height=64, num_inference_steps=2).data)
    del pipe  # its worker threads must not outlive the test: test_faults signals this process later
    gc.collect()
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 and image.std() > 0


@pytest.mark.hub
@pytest.mark.parametrize("name", NAMES)
def test_a_rebuild_against_the_local_hub_publishes_from_the_cache_then_skips(
        family_build, artifacts_root: Path, hub_server, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """`rebuild` needs a `publish:` section, which the tiny recipes leave out (a scheduled `rebuild --all` must
    not publish them): a copy with one. Its end-to-end run is switched off (the gate of this family's
    run is the session build's, asserted above): what is checked here is the rebuild path per family,
    exports all from the component cache the session build filled, publish, tag, then a skip."""
    from huggingface_hub import HfApi

    from convert.rebuild import rebuild_one
    from convert.workspace import Workspace

    family = FAMILIES[name]
    family_build(name)  # fills the component cache
    repo = f"{DEFAULT_USER}/contract-rebuild-{TINY_RECIPES[name]}-{uuid.uuid4().hex[:8]}"
    text = (PROJECT_ROOT / "recipes" / f"{TINY_RECIPES[name]}.yaml").read_text()
    recipe = tmp_path / f"{TINY_RECIPES[name]}.yaml"
    recipe.write_text(f"{text}\npublish: {{repo: {repo}, private: true}}\n"
                      .replace("validation:\n", "validation:\n  end_to_end: {prompts: []}\n", 1))
    workspace = Workspace(artifacts=artifacts_root)
    first = rebuild_one(recipe, workspace)
    assert first.status == "rebuilt", first.message
    assert set(family.weighted) <= set(first.reused_components), first.reused_components
    assert not set(family.weighted) & set(first.exported_components), first.exported_components
    assert first.tag == f"build-{first.build_id}"
    api = HfApi(endpoint=hub_server.url)
    assert f"{family.denoiser}/openvino_model.xml" in api.list_repo_files(repo)
    again = rebuild_one(recipe, workspace)
    assert again.status == "skipped" and again.build_id == first.build_id, again.message
