"""Hostile input beyond issue 19's list (its "cases nobody listed"): each class that misbehaved, through
the CLI, with its exit code, its one line and nothing changed outside the build's folders.

Most fail when the recipe loads (well under a second); the patch-stage ones load the tiny pipeline
(a few seconds) and stop before any export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_faults import nothing_changes_outside, one_error_line, write_recipe

from convert.cli import main

OFF = "{export: false}"
VAE_ONLY = ("components:\n" + "".join(f"  {c}: {OFF}\n" for c in (
    "text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder"))
    + "  vae_decoder: {weights: fp16}\ntarget: {device: CPU, inference_precision: [f32]}\n"
    "validation: {resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder], end_to_end: {prompts: []}}\n")


def _lora(tiny_lora: Path, scale: str = "1.0") -> str:
    return (f"  - {{source: {{local: {{path: {tiny_lora}}}, file: tiny-sdxl-lora-kohya.safetensors}}, "
            f"scale: {scale}, targets: [unet]}}\n")


@pytest.fixture(scope="module")
def tiny_lora(artifacts_root: Path) -> Path:
    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated
    from convert.workspace import Workspace

    return materialize_generated(Source(generated=GeneratedSource(generator="tiny-sdxl-lora", seed=0)),
                                 Workspace(artifacts=artifacts_root))


@pytest.mark.parametrize(("body", "expected"), [
    ("lora:\n{lora0}", "lora.0.scale: a LoRA at scale 0 changes nothing: remove the entry, or give its strength"),
    ("lora:\n{lora1}{lora1}", "lora.1: the same file as lora.0 (local:"),
    ("validation: {{resolution: 64, small_resolution: 128}}\n",
     "validation.small_resolution 128 is above validation.resolution 64; set small_resolution to 64 or less"),
    ("validation: {{images: [astronaut, chelsea, astronaut]}}\n", "validation.images: lists astronaut more than once"),
    ("target: {{device: GPU, inference_precision: [f16, bf16]}}\n",
     "target.inference_precision: bf16 is a CPU precision; a GPU runs f16 or f32 (set target.device: CPU for bf16)"),
    ("components: {{unet: {{runtime_options: {{INFERENCE_PRECISION_HINT: f16}}}}}}\ntarget: {{device: CPU, "
     "inference_precision: [f32]}}\n", "components.unet.runtime_options: INFERENCE_PRECISION_HINT is chosen by "
     "inference_precision (target or component), which the gate runs; remove it from runtime_options"),
], ids=["lora-scale-0", "same-lora-twice", "small-above-full", "image-twice", "bf16-on-gpu", "precision-by-hand"])
def test_recipes_that_would_pass_meaninglessly_are_refused_at_load(
        body: str, expected: str, tmp_path: Path, tiny_sources: dict[str, Path], tiny_lora: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each passed the plan and built: a LoRA fused at 0 (the card said "fused"), one LoRA fused twice
    (a doubled strength under two names), a "small" decode larger than the full one, every check run
    twice on one image, a GPU bundle gated at bf16 (which no GPU runs), a precision set in the IR by
    hand that the gate never ran."""
    text = body.format(lora0=_lora(tiny_lora, "0"), lora1=_lora(tiny_lora))
    path = write_recipe(tmp_path, "meaningless", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n{text}")
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: ") and expected in line, line


def test_a_recipe_path_too_long_for_the_file_system_is_exit_2_not_internal(capsys: pytest.CaptureFixture[str]) -> None:
    """ENAMETOOLONG escaped Path.is_dir(): `error: internal error: OSError`, exit 1."""
    assert main(["convert", "/" + "a" * 5000 + ".yaml", "--plan"]) == 2
    line = one_error_line(capsys)
    assert "(5006 characters): cannot read the recipe (File name too long)" in line and len(line) < 400, line


@pytest.mark.parametrize("endpoint", ["not a url", "127.0.0.1:8080", "ftp://hub"])
def test_an_hf_endpoint_that_is_not_a_url_is_a_usage_error(endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """It was `error: base: a/b@main: UnsupportedProtocol: ...` (exit 3), naming no setting."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    path = write_recipe(tmp_path, "endpoint", "base: {hub: {repo: a/b, revision: main}}\n")
    with nothing_changes_outside(tmp_path):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 64
    assert one_error_line(capsys) == (f"error: HF_ENDPOINT={endpoint!r} is not an http(s) URL; unset it for "
                                      "huggingface.co, or give e.g. http://127.0.0.1:8080")


def test_plan_locked_checks_the_lock_like_convert_locked(tmp_path: Path, tiny_sources: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--plan --locked` ignored --locked: a lock of nothing (or of another recipe) planned as fine."""
    path = write_recipe(tmp_path, "plan-locked", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n")
    with nothing_changes_outside(tmp_path):
        assert main(["convert", str(path), "--plan", "--locked"]) == 3
    assert one_error_line(capsys) == (f"error: no lock file {tmp_path / 'plan-locked.lock.json'}; "
                                      "create it with `sdxl-convert lock <recipe>`")
    lock = tmp_path / "plan-locked.lock.json"
    assert main(["--artifacts", str(tmp_path / "art"), "lock", str(path)]) == 0
    capsys.readouterr()
    assert main(["convert", str(path), "--plan", "--locked"]) == 0
    capsys.readouterr()
    document = json.loads(lock.read_text())
    document["recipe_sha256"] = "0" * 64  # a lock written for another recipe (or an older version of this one)
    lock.write_text(json.dumps(document))
    with nothing_changes_outside(tmp_path):
        assert main(["convert", str(path), "--plan", "--locked"]) == 3
    assert one_error_line(capsys).startswith("error: --locked: recipe: changed (its digest differs), not what "
                                             "plan-locked.lock.json pins")


@pytest.mark.parametrize("where", ["artifacts", "cache"])
def test_output_folders_inside_a_local_source_are_refused_before_anything_is_written(
        where: str, tmp_path: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--artifacts inside the local base built into its own input: exit 0, and every later build had
    a new id (the base's content hash changed) and read its predecessor's output as input."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sources["tiny-sdxl-base"], base)
    path = write_recipe(tmp_path, "inside", "base: {local: {path: ./base}}\n" + VAE_ONLY)
    inside = base / "out"
    args = ["--artifacts", str(inside)] if where == "artifacts" else ["--artifacts", str(tmp_path / "art"), "--cache", str(inside)]
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main([*args, "convert", str(path)]) == 7
    line = one_error_line(capsys)
    assert line.startswith(f"error: --{where} {inside} lies inside the local source base ({base}): the build would "
                           f"write into its own input; point --{where} at a folder outside {base}"), line
    assert not inside.exists()


def test_a_cache_on_the_artifacts_root_is_refused(tmp_path: Path, tiny_sources: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, "cache-root", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n")
    with nothing_changes_outside(tmp_path):
        assert main(["--artifacts", str(tmp_path / "art"), "--cache", str(tmp_path / "art"), "convert", str(path)]) == 7
    assert one_error_line(capsys).startswith(f"error: --cache {tmp_path / 'art'} is the artifacts folder")


def _base_copy(tmp_path: Path, tiny_sources: dict[str, Path]) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_sources["tiny-sdxl-base"], base)
    return base


def test_a_tokenizer_without_its_vocabulary_is_refused_not_shipped(tmp_path: Path, tiny_sources: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """transformers built a 2-token CLIP tokenizer from tokenizer_config.json alone; the build passed
    (exit 0) and shipped it: every prompt became <|endoftext|>."""
    base = _base_copy(tmp_path, tiny_sources)
    (base / "tokenizer" / "tokenizer.json").unlink()
    path = write_recipe(tmp_path, "no-vocab", "base: {local: {path: ./base}}\n" + VAE_ONLY.replace(
        "  tokenizer: {export: false}\n", ""))
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 4
    assert one_error_line(capsys) == (
        "error: base: tokenizer holds only its 2 special tokens (its vocabulary files are missing), so it cannot feed "
        "text_encoder; check tokenizer/ holds its vocabulary files (tokenizer.json, or vocab.json and merges.txt) "
        "from the same model")
    assert not (tmp_path / "art" / "no-vocab").exists()


def test_patch_errors_name_the_users_source_not_the_deleted_staging_copy(
        tmp_path: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = _base_copy(tmp_path, tiny_sources)
    shutil.rmtree(base / "scheduler")
    path = write_recipe(tmp_path, "staged-name", "base: {local: {path: ./base}}\n" + VAE_ONLY)
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 4
    assert one_error_line(capsys) == ("error: base: no scheduler in <local:base>; a StableDiffusionXLPipeline needs it; "
                                      "check the base source")


def test_a_full_checkpoint_given_as_a_lora_is_named_for_what_it_is(tmp_path: Path, tiny_sources: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It was diffusers' "When using the offline mode, you must specify a `weight_name`"."""
    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated
    from convert.workspace import Workspace

    single = materialize_generated(Source(generated=GeneratedSource(generator="tiny-sdxl-single-file", seed=0)),
                                   Workspace(artifacts=tmp_path / "gen"))
    path = write_recipe(tmp_path, "full-as-lora", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
                        f"lora: [{{source: {{local: {{path: {single}}}, file: tiny-sdxl.safetensors}}, targets: [unet]}}]\n"
                        + VAE_ONLY)
    with nothing_changes_outside(tmp_path, tmp_path / "art", tmp_path / "gen"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 4
    line = one_error_line(capsys)
    assert line.startswith("error: lora.0: tiny-sdxl.safetensors holds no LoRA layers (none of its 961 tensor names says "
                           "lora); it looks like a stable-diffusion-xl checkpoint"), line


def test_a_recipe_named_twice_is_rebuilt_once(tmp_path: Path, tiny_sources: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Named twice (by path, or by path and by name), it ran twice; the second run only found it up to date."""
    path = write_recipe(tmp_path, "twice", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n")
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        code = main(["--json", "--artifacts", str(tmp_path / "art"), "rebuild", str(path), str(tmp_path / "." / "twice.yaml")])
    document = json.loads(capsys.readouterr().out)
    assert code == 2 and [r["recipe"] for r in document["recipes"]] == ["twice"], document  # no publish: section


def test_verify_refuses_a_bundle_file_replaced_by_a_symlink(tmp_path: Path, tiny_sources: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Same bytes through a link out of the bundle: verify passed, and publish would have uploaded it."""
    path = write_recipe(tmp_path, "linked", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n" + VAE_ONLY)
    assert main(["--json", "--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 0
    bundle = Path(json.loads(capsys.readouterr().out)["bundle"])
    weights = bundle / "vae_decoder" / "openvino_model.bin"
    outside = tmp_path / "outside.bin"
    shutil.copyfile(weights, outside)
    weights.unlink()
    weights.symlink_to(outside)
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["verify", str(bundle)]) == 7
        assert main(["publish", str(bundle), "--dry-run"]) == 8
    err = capsys.readouterr().err
    assert err.count("vae_decoder/openvino_model.bin: a symbolic link (or inside one); a bundle holds its own files, "
                     "never a link out of itself") == 2, err


def test_staged_names_are_replaced_longest_first() -> None:
    """`sources/base_diffusers` (a single file read as diffusers) must not become `<base>_diffusers`."""
    from types import SimpleNamespace

    from convert.build import _named_by_source
    from convert.errors import PatchError
    from convert.roles import SourceRole

    staging = Path("/a/.staging/x")
    base = SimpleNamespace(role=SourceRole.base(), source=SimpleNamespace(describe=lambda: "local:./b"))
    resolution = SimpleNamespace(sources=[base], recipe=SimpleNamespace(
        base=SimpleNamespace(describe=lambda: "local:./b/m.safetensors")))
    error = PatchError(f"no {staging}/sources/base_diffusers/unet; {staging}/sources/base/vae; {staging}/logs")
    renamed = _named_by_source(error, staging, resolution)  # type: ignore[arg-type]
    assert str(renamed) == ("no <local:./b/m.safetensors read as diffusers>/unet; <local:./b>/vae; "
                            "<this build's staging folder>/logs")
    assert renamed.exit_code == 4
