"""The embedded default end to end: a bundle that verifies, loads in optimum-intel and
openvino-genai, and whose VAE decoder provably holds the substituted weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from convert.build import build
from convert import package
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


def test_no_file_of_the_bundle_names_the_machine_it_was_built_on(tiny_build) -> None:
    """Issue 19: diffusers' `_name_or_path` carried the builder's absolute staging path into config.json."""
    bundle = tiny_build.bundle
    texts = {p: p.read_text() for p in bundle.rglob("*.json")}
    assert texts and not [p for p, text in texts.items() if str(bundle.parent.parent) in text or ".staging" in text]
    assert all("_name_or_path" not in json.loads((bundle / part / "config.json").read_text())
               for part in ("unet", "vae_decoder", "vae_encoder"))


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
    keys = {c.name: c.cache_key for c in package.read_build_info(tiny_build.bundle).components}
    for part, weights in {"unet": "int8", "text_encoder": "fp16", "vae_decoder": "fp16"}.items():
        model = core.read_model(tiny_build.bundle / part / "openvino_model.xml")
        assert model.get_rt_info(["sdxl_openvino", "weights"]).astype(str) == weights
        # a cacheable IR names its component key (shared by every build with the same inputs), not the build
        assert model.get_rt_info(["sdxl_openvino", "component_key"]).astype(str) == keys[part]
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
    # what the summary and --json show comes back typed from build.json and report.json, unchanged
    assert again.headline == tiny_build.headline and again.components == tiny_build.components
    assert again.to_json()["validation"] == tiny_build.to_json()["validation"]


def _md_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _num(value: object) -> str:
    return "n/a" if value is None else str(value)


def test_report_gates_every_submodel_and_the_images(tiny_build) -> None:
    folder = tiny_build.bundle / "validation"
    report = json.loads((folder / "report.json").read_text())
    rows = {(r["component"], r["precision"]): r for r in report["submodels"]}
    assert set(rows) == {(c, p) for c in ("text_encoder", "text_encoder_2", "unet") for p in ("f16", "f32")}
    assert all(r["passed"] and r["invalid"] == 0 and r["total"] > 0 for r in rows.values())
    assert rows["unet", "f16"]["execution"].startswith("emulated")
    assert rows["unet", "f16"]["inputs"] == "steps 1, 2, 3 of 3 (batch 2, 64x64)" and rows["unet", "f16"]["calls"] == 3
    assert 0.999 <= rows["unet", "f16"]["min_cosine"] < 1 and rows["unet", "f32"]["min_cosine"] == 1
    assert {"mid_block.attentions.0", "up_blocks.2.resnets.2", "down_blocks.1.attentions.0"} <= set(
        rows["unet", "f16"]["max_abs_activation"])
    images = report["end_to_end"]["images"]
    assert [(i["precision"], i["seed"]) for i in images] == [("f16", 0), ("f16", 1)]
    assert all(i["passed"] and i["invalid"] == 0 and i["ssim"] >= 0.5 for i in images)
    assert images[0]["runs_as"]["unet"] == "f16 emulated"
    assert report["headline"]["end_to_end"]["f16"]["min_ssim"] == min(i["ssim"] for i in images)
    assert set(report["timings_s"]) == {"vae", "pipeline_f32", "submodels", "end_to_end"}


def test_report_grid_and_headroom_charts(tiny_build) -> None:
    from PIL import Image

    from validate.charts import chart_size

    folder = tiny_build.bundle / "validation"
    report = json.loads((folder / "report.json").read_text())
    with Image.open(folder / "end_to_end.png") as grid:
        grid.verify()
    with Image.open(folder / "end_to_end.png") as grid:  # f32 | f16, one row per prompt, 64x64 shown x4
        assert grid.size == (2 * 256, 2 * 256) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    assert not (pixels == (255, 0, 255)).all(axis=-1).any(), "no non-finite pixel in a passing build"
    maxima = {r["component"]: r["max_abs_activation"] for r in report["submodels"]}
    maxima |= {c["component"]: c["max_abs_activation"] for c in report["checks"] if c["max_abs_activation"]}
    for component in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        name = f"headroom_{component}.png"
        assert name in report["figures"]
        with Image.open(folder / name) as chart:
            assert chart.size == chart_size(len(maxima[component]))
    text = (folder / "report.md").read_text()
    for name in ["end_to_end.png", *(f"headroom_{c}.png" for c in maxima)]:
        assert f"(./{name})" in text


def test_report_markdown_numbers_match_json(tiny_build) -> None:
    folder = tiny_build.bundle / "validation"
    report = json.loads((folder / "report.json").read_text())
    text = (folder / "report.md").read_text()
    sub = _md_rows(text, "| component | precision | run as | inputs |")
    assert [[r[0], r[1], r[4], r[5]] for r in sub] == [
        [r["component"], r["precision"], f"{r['invalid']}/{r['total']} ({r['nan']} / {r['posinf']} / {r['neginf']})",
         _num(r["min_cosine"])] for r in report["submodels"]]
    blocks = _md_rows(text, "| component | block | max abs | headroom |")
    seen = {r["component"]: r for r in report["submodels"]}
    assert [[b[0], b[1], b[2], b[3]] for b in blocks] == [
        [c, block, str(value), str(seen[c]["f16_headroom"][block])]
        for c, r in seen.items() for block, value in r["max_abs_activation"].items()]
    e2e = _md_rows(text, "| precision | prompt | seed |")
    assert [[r[0], r[1], r[2], r[4], r[5], r[6]] for r in e2e] == [
        [i["precision"], i["prompt"], str(i["seed"]), f"{i['invalid']}/{i['total']} ({i['nan']} / {i['posinf']} / "
         f"{i['neginf']})", _num(i["psnr_db"]), _num(i["ssim"])] for i in report["end_to_end"]["images"]]
    vae = _md_rows(text, "| component | VAE | precision |")
    assert [[r[0], r[2], r[6]] for r in vae] == [
        [c["component"], c["precision"], "n/a" if c["psnr_db"] is None else "inf" if c["psnr_db"] == "inf"
         else f"{c['psnr_db']:.2f}"] for c in report["checks"]]
