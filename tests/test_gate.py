"""The FP16 gate on the real thing: the tiny pipeline's own (overflow-prone) VAE, built with no
substitution, must fail at f16 with ~100% non-finite values, pass at f32, and be moved aside.
The same build swaps in the overflow-prone tiny UNet, which must fail naming its block (its
unscaled twin, the base pipeline's own UNet, passes in the embedded default's build)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from convert.cli import main

RECIPE = """schema_version: 1
name: tiny-sdxl-no-fix
base: {generated: {generator: tiny-sdxl-base, seed: 0}}
substitutions:
  unet: {source: {generated: {generator: tiny-sdxl-unet-fp16-overflow, seed: 0}}}
components:
  unet: {weights: fp16}
target: {device: GPU, inference_precision: [f16, f32]}
validation:
  resolution: 64
  small_resolution: 32
  denoise_steps: 1
  components: [unet, vae_decoder]
  end_to_end: {prompts: [a photo of a cat]}
"""


@pytest.fixture(scope="module")
def failed_build(tmp_path_factory: pytest.TempPathFactory, artifacts_root: Path) -> tuple[int, list[str], Path]:
    """Run the CLI once (about a minute); tests read its exit code, JSON and the moved-aside build."""
    recipe = tmp_path_factory.mktemp("recipes") / "tiny-sdxl-no-fix.yaml"
    recipe.write_text(RECIPE)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--artifacts", str(artifacts_root), "--json", "convert", str(recipe)])
    payload = json.loads(buffer.getvalue())
    return code, payload.get("failures", []), Path(payload.get("moved_to", ""))


def test_original_vae_fails_the_f16_gate(failed_build: tuple[int, list[str], Path], artifacts_root: Path) -> None:
    code, failures, moved = failed_build
    assert code == 6
    assert failures, "no failing check reported"
    decoder_f16 = [f for f in failures if f.startswith("vae_decoder f16:")]
    assert decoder_f16, failures
    first = decoder_f16[0]
    assert "non-finite" in first and "substitute an FP16-fixed VAE (recipe key substitutions.vae)" in first
    invalid, total = first.split(": ", 1)[1].split(" ", 1)[0].split("/")
    assert int(invalid) == int(total) > 0  # every value, as SD.Next's invalid=3145728
    assert not [f for f in failures if " f32" in f.split(":")[0].split("(")[0]], "f32 must pass"
    assert moved.parent == artifacts_root / "broken" and moved.is_dir()
    assert not (artifacts_root / "tiny-sdxl-no-fix").exists()


def test_report_of_the_failed_build(failed_build: tuple[int, list[str], Path]) -> None:
    _, _, moved = failed_build
    report = json.loads((moved / "validation" / "report.json").read_text())
    assert report["passed"] is False
    f16 = [c for c in report["checks"] if c["precision"] == "f16"]
    f32 = [c for c in report["checks"] if c["precision"] == "f32"]
    assert f16 and all(c["invalid"] == c["total"] and c["psnr_db"] is None and not c["passed"] for c in f16)
    assert f32 and all(c["invalid"] == 0 and c["passed"] for c in f32)
    assert all(c["nan"] + c["posinf"] + c["neginf"] == c["invalid"] for c in report["checks"])
    assert all(c["execution"].startswith("emulated") for c in f16), "this host has no f16 hardware: must emulate"
    maxima = [c["max_abs_activation"] for c in report["checks"] if c["max_abs_activation"]]
    assert maxima and max(max(m.values()) for m in maxima) > 65504
    assert report["headline"]["f16_headroom"] < 1
    assert "FAILED" in (moved / "validation" / "report.md").read_text()
    assert not (moved / "manifest.json").exists(), "a failed build must not look like a finished bundle"


def test_overflow_unet_fails_naming_its_block(failed_build: tuple[int, list[str], Path]) -> None:
    from convert.testing.sdxl import UNET_OVERFLOW_BLOCK

    code, failures, moved = failed_build
    unet = [f for f in failures if f.startswith("unet ")]
    assert code == 6 and len(unet) == 1, failures
    assert unet[0].startswith("unet f16: ") and "output values non-finite" in unet[0]
    assert f"first overflow in block {UNET_OVERFLOW_BLOCK} (max |activation|" in unet[0]
    assert unet[0].endswith("run it at f32 on the target (components.unet.inference_precision: [f32]) "
                            "or substitute one without the overflow (substitutions.unet)")
    report = json.loads((moved / "validation" / "report.json").read_text())
    rows = {r["precision"]: r for r in report["submodels"] if r["component"] == "unet"}
    assert rows["f16"]["invalid"] == rows["f16"]["total"] > 0 and rows["f16"]["first_overflow"] == UNET_OVERFLOW_BLOCK
    assert rows["f32"]["passed"] and rows["f32"]["invalid"] == 0
    images = report["end_to_end"]["images"]
    assert [i["precision"] for i in images] == ["f16"] and images[0]["invalid"] == images[0]["total"]
    assert any(f.startswith("end-to-end f16 ('a photo of a cat', seed 0): ") for f in failures)
    assert (moved / "validation" / "end_to_end.png").is_file()
