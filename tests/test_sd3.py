"""SD3.5 beyond the family contract (tests/test_family_contract.py: build, gate, both runtimes): what is
SD3's own. Its VAE passes the f16 gate unpatched, T5 carries optimum's activation scale, its
submodels match optimum-intel's SD3 export, it builds without T5, and a transformer made to
overflow f16 fails the build naming its block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.build import BuildResult, build
from convert.errors import RecipeError
from convert.export import OV_XML, export_pipeline
from convert.families.sd3 import SD3
from convert.fetch import FetchedSource
from convert.package import MANIFEST, verify
from convert.patch import patch
from convert.recipe import Recipe, load_recipe
from convert.roles import SourceRole
from convert.testing.parity import submodel_parity
from convert.workspace import PROJECT_ROOT, Workspace

TINY = PROJECT_ROOT / "recipes" / "tiny-sd35-medium.yaml"


@pytest.fixture(scope="module")
def sd3_build(family_build) -> BuildResult:  # type: ignore[no-untyped-def]
    return family_build(SD3.name)  # the contract test's build (test_family_contract.py), shared


def test_bundle_has_every_sd3_submodel(sd3_build: BuildResult) -> None:
    bundle = sd3_build.bundle
    assert verify(bundle) == []
    listed = set(json.loads((bundle / MANIFEST).read_text())["files"])
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder"):
        assert f"{part}/{OV_XML}" in listed and f"{part}/openvino_model.bin" in listed
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert f"{tok}/openvino_tokenizer.xml" in listed
    assert json.loads((bundle / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    weights = {c.name: c.weights for c in sd3_build.components}
    assert weights["transformer"] == "int8" and weights["text_encoder_3"] == "int8"
    card = (bundle / "README.md").read_text()
    assert "stable-diffusion-3" in card and "from optimum.intel import OVStableDiffusion3Pipeline" in card


def test_unpatched_vae_passes_the_f16_gate(sd3_build: BuildResult) -> None:
    report = json.loads((sd3_build.bundle / "validation" / "report.json").read_text())
    assert report["headline"]["passed"] is True
    f16 = [c for c in report["checks"] if c["precision"] == "f16"]
    assert {c["component"] for c in f16} == {"vae_decoder", "vae_encoder"}
    assert all(c["vae"] == "shipped" and c["nan"] == 0 and c["posinf"] == 0 and c["neginf"] == 0 for c in f16)
    assert any(s.startswith("denoise@") for s in report["inputs"])  # the exported SD3 pipeline ran
    assert "+ 0.0609" in report["inputs"][next(s for s in report["inputs"] if s.startswith("denoise@"))]


def test_t5_carries_optimums_activation_scale(sd3_build: BuildResult) -> None:
    import openvino as ov

    model = ov.Core().read_model(sd3_build.bundle / "text_encoder_3" / OV_XML)
    assert model.get_rt_info()["runtime_options"]["ACTIVATIONS_SCALE_FACTOR"].astype(str) == "8.0"
    assert [c for c in sd3_build.components if c.name == "text_encoder_3"][0].runtime_options == {
        "ACTIVATIONS_SCALE_FACTOR": "8.0"}


def test_sdxl_component_names_are_refused_in_an_sd3_recipe(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("schema_version: 1\nname: x\npipeline: stable-diffusion-3\nbase: {local: {path: .}}\n"
                    "components:\n  unet: {weights: int8}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"line 5: components: unknown component 'unet'; expected one of: {', '.join(SD3.components)}" in str(info.value)


def test_tiny_t5_tokenizer_is_offline_and_covers_the_prompts() -> None:
    from convert.testing.sd3 import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of an astronaut riding a horse"


# ----------------------------------------------------------------------------- parity with optimum-intel

PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def parity_bundles(artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Ours (fp32 weights) and optimum-intel's `export_from_model` of the same fp32 pipeline."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig

    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated

    base = materialize_generated(Source(generated=GeneratedSource(generator="tiny-sd35-medium")),
                                 Workspace(artifacts=artifacts_root))
    recipe = Recipe.model_validate({"schema_version": 1, "name": "sd3-parity", "pipeline": "stable-diffusion-3",
                                    "base": {"local": {"path": str(base)}},
                                    "target": {"device": "CPU", "inference_precision": ["f32"]}})
    ours = tmp_path_factory.mktemp("sd3-ours")
    export_pipeline(patch(FetchedSource(SourceRole.base(), base, "local", ()), {}, {"base": False}, recipe.family), recipe, ours, "parity")
    reference = tmp_path_factory.mktemp("sd3-optimum")
    pipeline = StableDiffusion3Pipeline.from_pretrained(base, torch_dtype=torch.float32)
    export_from_model(pipeline, reference, task="text-to-image", ov_config=OVConfig(dtype="fp32"))
    return ours, reference


def _runtime_options(xml: Path) -> dict[str, str]:
    import openvino as ov

    model = ov.Core().read_model(xml)
    if not model.has_rt_info(["runtime_options"]):
        return {}
    section = model.get_rt_info()["runtime_options"]
    return {key: section[key].astype(str) for key in section}


@pytest.mark.parametrize("part", PARTS)
def test_submodels_match_optimum_intel(parity_bundles: tuple[Path, Path], part: str) -> None:
    ours, reference = parity_bundles
    parity = submodel_parity(part, ours / part / OV_XML, reference / part / OV_XML)
    assert parity.same_interface, f"{part}: inputs/outputs differ from optimum-intel's"
    assert parity.relative <= 1e-5, parity
    assert _runtime_options(ours / part / OV_XML) == _runtime_options(reference / part / OV_XML)
    theirs = json.loads((reference / part / "config.json").read_text())
    theirs.pop("_name_or_path", None)  # the build machine's source folder: we leave it out
    assert json.loads((ours / part / "config.json").read_text()) == theirs


def test_sd3_without_t5_builds_and_generates(artifacts_root: Path, tmp_path: Path) -> None:
    """T5 is optional in SD3 (diffusers runs with text_encoder_3=None): a base without it still builds."""
    import shutil

    from optimum.intel import OVStableDiffusion3Pipeline

    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated

    full = materialize_generated(Source(generated=GeneratedSource(generator="tiny-sd35-medium")),
                                 Workspace(artifacts=artifacts_root))
    base = tmp_path / "no-t5"
    shutil.copytree(full, base, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((base / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (base / "model_index.json").write_text(json.dumps(index))
    recipe = tmp_path / "no-t5.yaml"
    recipe.write_text(f"""schema_version: 1
name: tiny-sd3-no-t5
pipeline: stable-diffusion-3
base: {{local: {{path: {base}}}}}
components: {{text_encoder_3: {{weights: int8}}}}
target: {{device: CPU, inference_precision: [f32]}}
validation: {{resolution: 64, small_resolution: 32, denoise_steps: 1, components: [vae_decoder],
             end_to_end: {{prompts: []}}}}
""")
    result = build(recipe, Workspace(artifacts=tmp_path / "artifacts"))
    names = [c.name for c in result.components]
    assert "text_encoder_3" not in names and "tokenizer_3" not in names and "transformer" in names
    assert not (result.bundle / "text_encoder_3").exists()
    pipe = OVStableDiffusion3Pipeline.from_pretrained(result.bundle, device="CPU")
    images = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=np.random.RandomState(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


OVERFLOW_RECIPE = """schema_version: 1
name: tiny-sd35-overflow
pipeline: stable-diffusion-3
base: {generated: {generator: tiny-sd35-medium, seed: 0}}
substitutions:
  transformer: {source: {generated: {generator: tiny-sd35-transformer-fp16-overflow, seed: 0}}}
components:
  text_encoder_3: {weights: int8, nncf: {mode: int8_asym}}
  transformer: {weights: fp16}
target: {device: GPU, inference_precision: [f16, f32]}
validation:
  resolution: 64
  small_resolution: 32
  denoise_steps: 1
  components: [transformer, vae_decoder]
  end_to_end: {prompts: [a photo of a cat]}
"""


def test_an_overflowing_transformer_fails_the_build_naming_its_block(artifacts_root: Path, tmp_path: Path) -> None:
    import contextlib
    import io

    from convert.cli import main
    from convert.testing.sd3 import TRANSFORMER_OVERFLOW_BLOCK

    recipe = tmp_path / "tiny-sd35-overflow.yaml"
    recipe.write_text(OVERFLOW_RECIPE)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--artifacts", str(artifacts_root), "--json", "convert", str(recipe)])
    payload = json.loads(out.getvalue().strip().splitlines()[-1])  # NNCF prints its int8 table to stdout first
    failures = payload.get("failures", [])
    transformer = [f for f in failures if f.startswith("transformer ")]
    assert code == 6 and len(transformer) == 1, failures
    assert transformer[0].startswith("transformer f16: ") and "output values non-finite" in transformer[0]
    assert f"first overflow in block {TRANSFORMER_OVERFLOW_BLOCK} (max |activation|" in transformer[0]
    moved = Path(payload["moved_to"])
    report = json.loads((moved / "validation" / "report.json").read_text())
    rows = {r["precision"]: r for r in report["submodels"] if r["component"] == "transformer"}
    assert rows["f16"]["first_overflow"] == TRANSFORMER_OVERFLOW_BLOCK and rows["f16"]["invalid"] > 0
    assert rows["f32"]["passed"] and rows["f32"]["invalid"] == 0  # the overflow is invisible at f32
    assert [i["passed"] for i in report["end_to_end"]["images"]] == [False]
    assert not (artifacts_root / "tiny-sd35-overflow").exists()
