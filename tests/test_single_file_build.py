"""A community checkpoint end to end: one original-layout file + a kohya LoRA + the baked VAE replaced.

One build of recipes/tiny-singlefile-lora.yaml is shared by the asserting tests (module scope);
the bad inputs fail before export and share one artifacts folder, so generated sources are made once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.cli import main
from convert.workspace import PROJECT_ROOT, Workspace
from tests.test_bad_input import assert_nothing_written, one_error_line, write_recipe

RECIPE = PROJECT_ROOT / "recipes" / "tiny-singlefile-lora.yaml"
SINGLE_FILE = "generated: {generator: tiny-sdxl-single-file, seed: 0}\n  file: tiny-sdxl.safetensors"
CONFIG = "config: {generated: {generator: tiny-sdxl-single-file-config, seed: 0}}"
#: the UNet IR holds fp16 weights (run at f32 here), so its output differs by their rounding:
#: measured 0.14% of the output's largest magnitude; the fixture LoRA itself moves it by 1.6%.
UNET_TOLERANCE = 5e-3  # max |IR - diffusers| relative to max |diffusers| output


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("single-file-artifacts")


@pytest.fixture(scope="module")
def build_result(artifacts: Path):  # -> convert.build.BuildResult
    from convert.build import build

    return build(RECIPE, Workspace(artifacts=artifacts))


def _generated(artifacts: Path, generator: str) -> Path:
    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated

    return materialize_generated(Source(generated=GeneratedSource(generator=generator)), Workspace(artifacts=artifacts))


def _diffusers_unet_with_lora(artifacts: Path, fused: bool = True) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(_generated(artifacts, "tiny-sdxl-single-file") / "tiny-sdxl.safetensors"),
        config=str(_generated(artifacts, "tiny-sdxl-single-file-config")), local_files_only=True)
    if fused:
        pipe.load_lora_weights(str(_generated(artifacts, "tiny-sdxl-lora")),
                               weight_name="tiny-sdxl-lora-kohya.safetensors", adapter_name="speed")
        pipe.fuse_lora(lora_scale=0.8, components=["unet"])
        pipe.unload_lora_weights()
    return pipe.unet.eval()


def _unet_outputs(bundle: Path, unet: Any) -> tuple[np.ndarray, np.ndarray]:
    import openvino as ov
    import torch

    from convert.testing.parity import example_inputs

    core = ov.Core()
    model = core.read_model(bundle / "unet" / "openvino_model.xml")
    inputs = example_inputs(model)
    ours = np.asarray(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(inputs)[0])
    with torch.no_grad():
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        ref = unet(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                   added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample.numpy()
    return ours, ref


def test_exported_unet_is_diffusers_unet_with_the_lora_fused(build_result, artifacts: Path) -> None:
    ours, ref = _unet_outputs(build_result.bundle, _diffusers_unet_with_lora(artifacts))
    scale = float(np.abs(ref).max())
    assert float(np.abs(ours - ref).max()) <= UNET_TOLERANCE * scale
    _, unfused = _unet_outputs(build_result.bundle, _diffusers_unet_with_lora(artifacts, fused=False))
    assert float(np.abs(unfused - ref).max()) > 2 * UNET_TOLERANCE * scale  # the LoRA is in: without it, farther


def test_provenance_names_file_lora_and_vae(build_result) -> None:
    info = json.loads((build_result.bundle / "build.json").read_text())
    sources = {s["role"]: s for s in info["lock"]["sources"]}
    assert sources["base"]["file"] == "tiny-sdxl.safetensors" and len(sources["base"]["sha256"]) == 64
    assert sources["base"]["commit"] == f"sha256:{sources['base']['sha256']}"
    assert sources["lora.0"]["file"] == "tiny-sdxl-lora-kohya.safetensors" and sources["lora.0"]["scale"] == 0.8
    assert "file" not in sources["base.config"] and "file" not in sources["substitutions.vae"]
    card = (build_result.bundle / "README.md").read_text()
    assert f"**Single-file checkpoint:** `tiny-sdxl.safetensors`" in card and sources["base"]["sha256"] in card
    assert "**Baked VAE replaced** by `generated:tiny-sdxl-vae-fp16-fix(seed=0)`" in card
    assert "at scale 0.8 into unet" in card and sources["lora.0"]["sha256"] in card
    scheduler = json.loads((build_result.bundle / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "trailing"


def test_bundle_generates_in_optimum_intel_and_genai(build_result) -> None:
    import openvino_genai
    from optimum.intel import OVStableDiffusionXLPipeline

    pipe = OVStableDiffusionXLPipeline.from_pretrained(build_result.bundle, device="CPU")
    images = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=np.random.RandomState(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    genai = openvino_genai.Text2ImagePipeline(str(build_result.bundle), "CPU")
    image = np.array(genai.generate("a photo of a cat", width=64, height=64, num_inference_steps=2).data)
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_without_vae_substitution_the_checkpoint_fails_the_fp16_gate(artifacts: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The baked (stock SDXL-like) VAE overflows at f16: exit 6 and the bundle under broken/.
    Only the VAE is exported (the gate decodes with it alone), to keep this build cheap."""
    body = (f"base:\n  {SINGLE_FILE}\n  {CONFIG}\n"
            "components:\n  text_encoder: {export: false}\n  text_encoder_2: {export: false}\n  unet: {export: false}\n"
            "  vae_decoder: {weights: fp16}\n  vae_encoder: {weights: fp16}\n"
            "target: {inference_precision: [f16]}\n"
            "validation: {components: [vae_decoder, vae_encoder], resolution: 64, small_resolution: 32, "
            "denoise_steps: 0, check_original: false, end_to_end: {prompts: []}}\n")
    path = write_recipe(tmp_path, "baked-vae", body)
    assert main(["--artifacts", str(artifacts), "convert", str(path)]) == 6
    err = capsys.readouterr().err
    assert "error: validation failed; build kept for inspection in" in err
    assert "vae_decoder f16:" in err and "non-finite" in err
    assert not (artifacts / "baked-vae").exists()
    assert any((artifacts / "broken").iterdir())


BAD_LORA = "\nlora:\n  - source: {{local: {{path: {folder}}}, file: {file}}}\n    targets: [unet]\n"


def _lora_variant(artifacts: Path, tmp_path: Path, rename: tuple[str, str], widen: int = 0) -> Path:
    """The fixture LoRA (diffusers layout) with module names rewritten or inputs widened: one made for another UNet."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(_generated(artifacts, "tiny-sdxl-lora") / "pytorch_lora_weights.safetensors"))
    folder = tmp_path / "lora"
    folder.mkdir()
    if widen:
        state = {k: torch.zeros(v.shape[0], v.shape[1] + widen) if ".down." in k else v for k, v in state.items()}
    save_file({k.replace(*rename): v for k, v in state.items()}, str(folder / "other.safetensors"))
    return folder


def _single_file_variant(artifacts: Path, tmp_path: Path, keys: dict[str, Any] | None = None,
                         truncate: bool = False) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    target = folder / "model.safetensors"
    if keys is not None:
        from safetensors.torch import save_file

        save_file(keys, str(target))
    else:
        shutil.copy(_generated(artifacts, "tiny-sdxl-single-file") / "tiny-sdxl.safetensors", target)
    if truncate:
        with target.open("r+b") as handle:
            handle.truncate(target.stat().st_size // 2)
    return folder


def _sd15_like() -> dict[str, Any]:
    import torch

    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(320, 640, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}


@pytest.mark.parametrize("case", ["other-family", "truncated", "ckpt", "lora-other-arch", "lora-no-keys",
                                  "lora-shapes", "lora-nan", "refiner-config"])
def test_bad_community_inputs(case: str, artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local_file = "local: {{path: {folder}}}\n  file: model.safetensors"
    if case == "other-family":
        base = local_file.format(folder=_single_file_variant(artifacts, tmp_path, _sd15_like()))
    elif case == "truncated":
        base = local_file.format(folder=_single_file_variant(artifacts, tmp_path, truncate=True))
    elif case == "ckpt":
        base = "local: {path: .}\n  file: model.ckpt"
    else:
        base = SINGLE_FILE
    body = f"base:\n  {base}\n  {CONFIG}\n"
    if case == "refiner-config":
        body = f"base:\n  {base}\n  config: {{generated: {{generator: tiny-sdxl-refiner, seed: 0}}}}\n"
    if case == "lora-other-arch":  # SD 1.x puts attention in down_blocks.0, SDXL has none there
        body += BAD_LORA.format(folder=_lora_variant(artifacts, tmp_path, ("down_blocks.1.", "down_blocks.0.")),
                                file="other.safetensors")
    if case == "lora-no-keys":
        body += BAD_LORA.format(folder=_lora_variant(artifacts, tmp_path, ("unet.", "unet.no_such_block.")),
                                file="other.safetensors")
    if case == "lora-shapes":  # same layer names, another model's widths
        body += BAD_LORA.format(folder=_lora_variant(artifacts, tmp_path, ("", ""), widen=8), file="other.safetensors")
    if case == "lora-nan":
        body += "lora:\n  - source: {generated: {generator: tiny-sdxl-lora}, file: pytorch_lora_weights.safetensors}\n" \
                "    scale: .nan\n"
    name = f"bad-{case}"
    path = write_recipe(tmp_path, name, body)
    code = main(["--artifacts", str(artifacts), "convert", str(path)])
    line = one_error_line(capsys)
    expected = {
        "other-family": (4, "base: model.safetensors is a stable-diffusion-v1 checkpoint, not a stable-diffusion-xl one"),
        "truncated": (3, "is not a valid safetensors file"),
        "ckpt": (2, "'model.ckpt' is a pickle checkpoint (loading it runs code); refusing it"),
        "lora-other-arch": (4, "lora.0: 120 of 136 LoRA layers of other.safetensors matched the unet"),
        "lora-no-keys": (4, "lora.0: 0 of 136 LoRA layers of other.safetensors matched the model"),
        "lora-shapes": (4, "lora.0: the LoRA layers of other.safetensors have the shapes of another model ("),
        "lora-nan": (2, "nan is not a LoRA scale: use a finite number"),
        "refiner-config": (4, "base.config: the config source is a StableDiffusionXLImg2ImgPipeline, but the file "
                              "is stable-diffusion-xl"),
    }[case]
    assert (code, expected[1] in line) == (expected[0], True), line
    assert_nothing_written(artifacts, name)
    assert not (artifacts / "broken").exists() or not any(p.name.startswith(name) for p in (artifacts / "broken").iterdir())
