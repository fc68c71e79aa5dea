"""Bad input through the CLI: one line naming the file/field/component and the fix, a distinct
non-zero exit code, and nothing half-written under artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from convert.cli import main

GENERATED_BASE = "generated: {generator: tiny-sdxl-base, seed: 0}"


def write_recipe(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"schema_version: 1\nname: {name}\n{body}")
    return path


def run(artifacts: Path, *args: str) -> int:
    return main(["--artifacts", str(artifacts), *args])


def assert_nothing_written(artifacts: Path, recipe_name: str) -> None:
    assert not (artifacts / recipe_name).exists(), "a bundle folder appeared for a failed build"
    staging = artifacts / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), "staging folder left behind"


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """Progress lines may precede it; the error itself is one line, and the last."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_recipe_typo_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, "typo", f"base: {{{GENERATED_BASE}}}\ncomponents:\n  unet: {{weigths: int8}}\n")
    assert run(tmp_path / "art", "convert", str(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "unknown field 'weigths' in components.unet; did you mean 'weights'?" in line
    assert_nothing_written(tmp_path / "art", "typo")


def test_unknown_recipe_name_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "convert", "sdxl-fp16fx") == 2
    assert "no recipe named 'sdxl-fp16fx'; did you mean 'sdxl-fp16fix'?" in one_error_line(capsys)


def test_missing_local_folder_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, "missing-local", "base: {local: {path: ./no-such-pipeline}}\n")
    assert run(tmp_path / "art", "convert", str(path)) == 3
    line = one_error_line(capsys)
    assert f"base: local source folder {tmp_path / 'no-such-pipeline'} does not exist" in line
    assert "fix the path" in line
    assert_nothing_written(tmp_path / "art", "missing-local")


def test_pickle_only_vae_exit_3(tmp_path: Path, tiny_sources: dict[str, Path], artifacts_root: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    vae = tmp_path / "pickled-vae"
    vae.mkdir()
    shutil.copy(tiny_sources["tiny-sdxl-vae-fp16-fix"] / "config.json", vae)
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    path = write_recipe(tmp_path, "pickled", f"base: {{{GENERATED_BASE}}}\n"
                        "substitutions:\n  vae: {source: {local: {path: pickled-vae}}}\n")
    assert run(artifacts_root, "convert", str(path)) == 3
    line = one_error_line(capsys)
    assert "substitutions.vae: the root has only pickle weights (diffusion_pytorch_model.bin); refusing to unpickle" in line
    assert "allow_pickle: true" in line
    assert_nothing_written(artifacts_root, "pickled")


def test_vae_with_other_latent_channels_exit_4(tmp_path: Path, artifacts_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, latent_channels=16, layers_per_block=1,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  scaling_factor=0.13025).save_pretrained(tmp_path / "flux-like-vae")
    path = write_recipe(tmp_path, "misfit", f"base: {{{GENERATED_BASE}}}\n"
                        "substitutions:\n  vae: {source: {local: {path: flux-like-vae}}}\n")
    assert run(artifacts_root, "convert", str(path)) == 4
    line = one_error_line(capsys)
    assert "substituted vae does not fit: latent_channels 16 but the UNet takes 4" in line
    assert "substitute a VAE trained for this pipeline family" in line
    assert_nothing_written(artifacts_root, "misfit")


def test_vae_of_another_family_exit_4(tmp_path: Path, tiny_sources: dict[str, Path], artifacts_root: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    vae = tmp_path / "sd15-vae"
    shutil.copytree(tiny_sources["tiny-sdxl-vae-fp16-fix"], vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.18215}))
    path = write_recipe(tmp_path, "sd15vae", f"base: {{{GENERATED_BASE}}}\n"
                        "substitutions:\n  vae: {source: {local: {path: sd15-vae}}}\n")
    assert run(artifacts_root, "convert", str(path)) == 4
    assert "scaling_factor 0.18215 but the original VAE uses 0.13025" in one_error_line(capsys)


def test_json_error_for_ci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, "missing-local", "base: {local: {path: ./nowhere}}\n")
    assert run(tmp_path / "art", "--json", "convert", str(path)) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "error" and out["error"] == "FetchError" and out["exit_code"] == 3


def test_plan_of_the_real_recipe_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str], hub_server) -> None:
    """The real recipe's plan prints offline: the repos are unknown to this (local) Hub, said per source."""
    assert run(tmp_path, "--json", "convert", "sdxl-fp16fix", "--plan") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["source"] for s in plan["sources"]] == [
        "hub:stabilityai/stable-diffusion-xl-base-1.0@main", "hub:madebyollin/sdxl-vae-fp16-fix@main"]
    assert all(s["commit"] is None and s["note"].startswith("unresolved:") for s in plan["sources"])
    weights = {c["name"]: c["weights"] for c in plan["components"]}
    assert weights["unet"] == "int8" and weights["vae_decoder"] == "fp16"
    assert any(line.startswith("vae_decoder at f16") for line in plan["checks"])
    assert plan["output"].endswith("sdxl-fp16fix/<build-id>")
