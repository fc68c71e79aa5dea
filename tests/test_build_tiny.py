"""The embedded default end to end: a bundle that verifies, loads in optimum-intel and
openvino-genai, and whose VAE decoder provably holds the substituted weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from convert.build import build
from convert.package import MANIFEST, verify
from convert.resolve import file_sha256
from convert.workspace import PROJECT_ROOT, Workspace

TINY = PROJECT_ROOT / "recipes" / "tiny-sdxl-fp16fix.yaml"


def test_bundle_layout_and_manifest(tiny_build) -> None:
    bundle = tiny_build.bundle
    assert verify(bundle) == []
    manifest = json.loads((bundle / MANIFEST).read_text())
    listed = set(manifest["files"])
    for part in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        assert f"{part}/openvino_model.xml" in listed and f"{part}/openvino_model.bin" in listed
    for tok in ("tokenizer", "tokenizer_2"):
        assert f"{tok}/openvino_tokenizer.xml" in listed and f"{tok}/openvino_detokenizer.xml" in listed
    assert {"model_index.json", "README.md", "build.json", "recipe.yaml", "validation/report.json"} <= listed
    unet_bin = manifest["files"]["unet/openvino_model.bin"]
    assert unet_bin["sha256"] == file_sha256(bundle / "unet" / "openvino_model.bin")
    assert not list((bundle.parent.parent / ".staging").glob(f"{tiny_build.build_id}.*")), "staging left behind"


def test_tampered_bundle_fails_verification(tiny_build, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_build.bundle, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    (copy / "stray.txt").write_text("x")
    problems = verify(copy)
    assert "scheduler/scheduler_config.json: size" in problems[0]
    assert "stray.txt: not in the manifest" in problems


def test_optimum_intel_loads_and_generates(tiny_build) -> None:
    from optimum.intel import OVStableDiffusionXLPipeline

    pipe = OVStableDiffusionXLPipeline.from_pretrained(tiny_build.bundle, device="CPU")
    images = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=np.random.RandomState(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0


def test_openvino_genai_loads_and_generates(tiny_build) -> None:
    import openvino_genai

    pipe = openvino_genai.Text2ImagePipeline(str(tiny_build.bundle), "CPU")
    image = np.array(pipe.generate("a photo of a cat", width=64, height=64, num_inference_steps=2).data)
    assert image.shape == (1, 64, 64, 3)
    assert image.dtype == np.uint8 and image.std() > 0


def _ir_constants(xml: Path) -> dict[str, np.ndarray]:
    import openvino as ov

    model = ov.Core().read_model(xml)
    out = {}
    for op in model.get_ops():
        name = op.get_friendly_name()
        if op.get_type_name() == "Constant" and name.startswith("self."):
            key = name.removeprefix("self.").removesuffix("_compressed")
            out[key] = op.get_data().astype(np.float32)
    return out


def test_vae_decoder_holds_the_substituted_weights(tiny_build, tiny_sources) -> None:
    from safetensors.numpy import load_file

    ir = _ir_constants(tiny_build.bundle / "vae_decoder" / "openvino_model.xml")
    fixed = load_file(tiny_sources["tiny-sdxl-vae-fp16-fix"] / "diffusion_pytorch_model.safetensors")
    original = load_file(tiny_sources["tiny-sdxl-base"] / "vae" / "diffusion_pytorch_model.safetensors")
    compared = differing = 0
    for name, value in ir.items():
        if name not in fixed:
            continue
        want = fixed[name].astype(np.float16).astype(np.float32).reshape(value.shape)
        np.testing.assert_allclose(value, want, rtol=0, atol=0, err_msg=name)
        compared += 1
        other = original[name].astype(np.float16).astype(np.float32).reshape(value.shape)
        differing += int(not np.array_equal(value, other))
    assert compared >= 20, "too few decoder weights found by name in the IR"
    assert differing >= 10, "the IR's decoder weights equal the original VAE's: the substitution did not happen"


def test_report_tells_the_fp16_story(tiny_build) -> None:
    report = json.loads((tiny_build.bundle / "validation" / "report.json").read_text())
    assert report["passed"] is True
    rows = report["checks"]
    shipped_f16 = [r for r in rows if r["vae"] == "substituted" and r["precision"] == "f16"]
    original_f16 = [r for r in rows if r["vae"] == "original" and r["precision"] == "f16" and r["component"] == "vae_decoder"]
    assert shipped_f16 and all(r["invalid"] == 0 and r["psnr_db"] >= 40 for r in shipped_f16)
    assert original_f16 and all(r["invalid"] == r["total"] for r in original_f16)
    assert all(r["execution"].startswith(("emulated", "native")) for r in rows)
    assert {r["input_set"] for r in shipped_f16} >= {"images@64", "denoise@32"}
    assert (tiny_build.bundle / "validation" / "reference_f32.png").is_file()
    assert (tiny_build.bundle / "validation" / "original_f16.png").is_file()


def test_ir_weights_and_rt_info_follow_the_recipe(tiny_build) -> None:
    import openvino as ov

    core = ov.Core()
    kinds = {}
    for part, weights in {"unet": "int8", "text_encoder": "fp16", "vae_decoder": "fp16"}.items():
        model = core.read_model(tiny_build.bundle / part / "openvino_model.xml")
        assert model.get_rt_info(["sdxl_openvino", "weights"]).astype(str) == weights
        assert model.get_rt_info(["sdxl_openvino", "build_id"]).astype(str) == tiny_build.build_id
        kinds[part] = {op.get_output_element_type(0).get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert kinds["unet"] & {"u8", "i8"}
    assert "f16" in kinds["text_encoder"]


def test_model_card_metadata(tiny_build) -> None:
    text = (tiny_build.bundle / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "openvino"
    assert front["pipeline_tag"] == "text-to-image"
    assert front["license"] == "apache-2.0"
    assert "openvino" in front["tags"]
    assert front["validation"]["passed"] is True and front["validation"]["f16"]["non_finite"] == 0
    assert front["validation"]["original_vae_f16"]["non_finite"] == front["validation"]["original_vae_f16"]["values"]
    assert "**Substituted vae:**" in text and "65504" in text


def test_unchanged_rebuild_reuses_the_bundle(tiny_build, artifacts_root: Path) -> None:
    again = build(TINY, Workspace(artifacts=artifacts_root))
    assert again.reused is True
    assert again.bundle == tiny_build.bundle
    assert again.build_id == tiny_build.build_id
