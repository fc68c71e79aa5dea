"""fp16_fix end to end, one CLI build: a VAE that overflows on AND off the residual stream (conv1 spikes),
its decoder fixed by `rescale`, its encoder by `runtime-scale`; both must pass the f16 gate.
Plus the recipe rules and the `none` path's rt_info, without a build."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from convert.cli import main
from convert.errors import RecipeError
from convert.recipe import load_recipe

RECIPE = """schema_version: 1
name: tiny-sdxl-fp16-fixes
base: {generated: {generator: tiny-sdxl-base, seed: 0}}
substitutions:
  vae: {source: {generated: {generator: tiny-sdxl-vae-offstream-overflow, seed: 0}}}
components:
  unet: {weights: fp16}
  vae_decoder: {fp16_fix: rescale}
  vae_encoder: {fp16_fix: runtime-scale}
target: {device: GPU, inference_precision: [f16, f32]}
validation:
  resolution: 64
  small_resolution: 32
  denoise_steps: 0
  images: [astronaut, chelsea]
  end_to_end: {prompts: []}  # the VAE fixes are judged by the VAE checks
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, artifacts_root: Path) -> tuple[int, dict]:
    recipe = tmp_path_factory.mktemp("recipes") / "tiny-sdxl-fp16-fixes.yaml"
    recipe.write_text(RECIPE)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--artifacts", str(artifacts_root), "--json", "convert", str(recipe)])
    return code, json.loads(buffer.getvalue())


def test_both_fixes_pass_the_f16_gate(built: tuple[int, dict]) -> None:
    code, payload = built
    assert code == 0, payload
    bundle = Path(payload["bundle"])
    report = json.loads((bundle / "validation" / "report.json").read_text())
    shipped = [c for c in report["checks"] if c["gating"]]
    assert {(c["component"], c["precision"]) for c in shipped} >= {
        ("vae_decoder", "f16"), ("vae_encoder", "f16"), ("vae_decoder", "f32"), ("vae_encoder", "f32")}
    assert all(c["invalid"] == 0 and c["passed"] for c in shipped)
    originals = [c for c in report["checks"] if c["vae"] == "original" and c["precision"] == "f16"]
    assert originals and all(c["invalid"] == c["total"] for c in originals)  # unfixed: all NaN at f16


def test_rescale_record_shows_f32_fidelity_and_f16_finiteness(built: tuple[int, dict]) -> None:
    _, payload = built
    bundle = Path(payload["bundle"])
    fixes = {f["part"]: f for f in json.loads((bundle / "validation" / "report.json").read_text())["fp16_fixes"]}
    decoder = fixes["vae_decoder"]
    assert decoder["mode"] == "rescale"
    assert list(decoder["conv1_scales"]) == ["decoder.up_blocks.1.resnets.1"]  # the off-stream spike, scaled alone
    assert all(math.log2(t).is_integer() and t <= 2.0**-4 for t in decoder["conv1_scales"].values())
    assert math.log2(decoder["stream_scale"]).is_integer() and decoder["stream_scale"] < 1
    f32 = decoder["f32_psnr_db_vs_unpatched"]
    assert f32 == "inf" or f32 >= 60
    assert decoder["f16_non_finite"] == 0 and decoder["f16_psnr_db"] >= 40
    markdown = (bundle / "validation" / "report.md").read_text()
    assert "- vae_decoder: rescale: decoder: stream x2^" in markdown and "f32 PSNR vs unpatched VAE" in markdown


def test_runtime_scale_writes_the_smallest_passing_factor(built: tuple[int, dict]) -> None:
    import openvino as ov

    from validate.activation_scaling import runtime_factor

    _, payload = built
    bundle = Path(payload["bundle"])
    fixes = {f["part"]: f for f in json.loads((bundle / "validation" / "report.json").read_text())["fp16_fixes"]}
    encoder = fixes["vae_encoder"]
    chosen, tried = encoder["chosen_factor"], encoder["tried"]
    assert chosen is not None and math.log2(chosen).is_integer() and chosen > 1
    assert [t.split(":")[0] for t in tried] == [f"x{2**k:g}" for k in range(int(math.log2(chosen)) + 1)]
    assert tried[-1].endswith("pass") and all(t.endswith("fail") for t in tried[:-1])
    core = ov.Core()
    assert runtime_factor(core.read_model(bundle / "vae_encoder" / "openvino_model.xml")) == chosen
    assert runtime_factor(core.read_model(bundle / "vae_decoder" / "openvino_model.xml")) is None
    components = {c["name"]: c for c in payload["components"]}
    assert components["vae_encoder"]["runtime_options"]["ACTIVATIONS_SCALE_FACTOR"] == f"{chosen}"
    assert "ACTIVATIONS_SCALE_FACTOR" not in components["vae_decoder"]["runtime_options"]


# ----------------------------------------------------------------------------- recipe rules (no build)


@pytest.mark.parametrize(("extra", "message"), [
    ("components: {unet: {fp16_fix: rescale}}", "components.unet.fp16_fix applies to vae_decoder and vae_encoder only"),
    ("components: {vae_decoder: {fp16_fix: substitute}}", "fp16_fix is 'substitute' but substitutions.vae is not set"),
    ("components: {vae_decoder: {fp16_fix: runtime-scale}}\ntarget: {device: CPU}", "runtime-scale needs target.device GPU"),
    ("components: {vae_decoder: {fp16_fix: runtime-scale, runtime_options: {ACTIVATIONS_SCALE_FACTOR: '8'}}}",
     "remove it from runtime_options"),
    ("components: {vae_decoder: {fp16_fix: resacle}}", "fp16_fix"),
])  # fmt: skip
def test_bad_fp16_fix_recipes(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nname: r\nbase: {generated: {generator: tiny-sdxl-base}}\n" + extra + "\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_default_fix_follows_the_substitution(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nname: r\nbase: {generated: {generator: tiny-sdxl-base}}\n")
    assert load_recipe(path).fp16_fix_for("vae_decoder") == "none"
    path.write_text(path.read_text() + "substitutions: {vae: {source: {generated: {generator: tiny-sdxl-vae-fp16-fix}}}}\n")
    assert load_recipe(path).fp16_fix_for("vae_encoder") == "substitute"


def test_none_strips_optimums_scale_factor(tmp_path: Path) -> None:
    """A force_upcast VAE IR carries 128 from optimum-intel; with fp16_fix none it must not ship it."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from convert.export import ExportedComponent
    from convert.fp16fix import runtime_stage
    from validate.activation_scaling import runtime_factor

    x = ops.parameter([1, 4, 8, 8], np.float32, name="latent_sample")
    model = ov.Model([ops.relu(x).output(0)], [x])
    model.set_rt_info("128.0", ["runtime_options", "ACTIVATIONS_SCALE_FACTOR"])
    xml = tmp_path / "vae_decoder" / "openvino_model.xml"
    xml.parent.mkdir()
    ov.save_model(model, xml)
    path = tmp_path / "r.yaml"
    path.write_text("schema_version: 1\nname: r\nbase: {generated: {generator: tiny-sdxl-base}}\n")
    component = ExportedComponent("vae_decoder", xml, "fp32", {"ACTIVATIONS_SCALE_FACTOR": "128.0"})
    done, records = runtime_stage(tmp_path, load_recipe(path), None, [component], lambda _m: None)
    assert records == [] and done[0].runtime_options == {}
    assert runtime_factor(ov.Core().read_model(xml)) is None
    assert sorted(p.name for p in xml.parent.iterdir()) == ["openvino_model.bin", "openvino_model.xml"]


def test_plan_names_each_parts_fix(tmp_path: Path) -> None:
    from convert.fp16fix import describe

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    lines = describe(load_recipe(path))
    assert [line.split(":")[0] for line in lines] == ["vae_decoder fp16_fix rescale", "vae_encoder fp16_fix runtime-scale"]
