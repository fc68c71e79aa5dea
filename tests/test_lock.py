"""Lock files through the CLI against the local Hub: written, diffed, enforced by `convert --locked`.

No build runs here (a --locked build that matches its lock is the rebuild sequence's job,
tests/test_rebuild.py): every refusal happens at resolve, in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_faults import nothing_changes_outside

from convert.cli import main as cli_main
from convert.lockfile import diff_locks

if TYPE_CHECKING:
    from hub_server import HubServer

pytestmark = [pytest.mark.hub, pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]

DOWNLOADS = ("GET",)


@pytest.fixture(scope="module")
def upstream(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A recipe naming two upstream repos by branch; returns (recipe, base repo, vae repo)."""
    from huggingface_hub import HfApi

    from conftest import HF_TEST_TOKEN
    from test_publish import _recipe, _seed_upstream

    root = tmp_path_factory.mktemp("lock")
    api = HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN)
    base_repo, vae_repo, _ = _seed_upstream(api, root / "upstream", root.name[-8:])
    recipe = root / "recipes" / "hub-tiny-sdxl.yaml"
    recipe.parent.mkdir()
    recipe.write_text(_recipe(base_repo, vae_repo, f"test-user/lock-out-{root.name[-8:]}"))
    return recipe, base_repo, vae_repo


def _lock(recipe: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert cli_main(["lock", str(recipe), "--json", "--artifacts", str(tmp / "art")]) == 0
    return json.loads(capsys.readouterr().out)


def test_lock_pins_commits_and_file_hashes_then_names_an_upstream_change(
        upstream: tuple[Path, str, str], hub_server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import HfApi

    from conftest import HF_TEST_TOKEN
    from convert.testing import generate

    recipe, base_repo, vae_repo = upstream
    api = HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN)
    recipe.with_name("hub-tiny-sdxl.lock.json").unlink(missing_ok=True)  # another test of this module may have locked it
    start = len(hub_server.requests_log())
    first = _lock(recipe, tmp_path, capsys)
    requests = hub_server.requests_log()[start:]
    assert not [r for r in requests if "/resolve/" in r[1]], "lock downloads no file, metadata only"
    lock_file = recipe.with_name("hub-tiny-sdxl.lock.json")
    assert first["lock"] == str(lock_file) and first["changes"] == ["new lock"]
    document = json.loads(lock_file.read_text())
    commits = {s["role"]: s["commit"] for s in document["sources"]}
    assert commits == {"base": api.model_info(base_repo).sha, "substitutions.vae": api.model_info(vae_repo).sha}
    base_files = {f["path"] for f in document["sources"][0]["files"]}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in base_files and "unet/model.onnx" not in base_files
    assert all(f["sha256"] or f.get("git_oid") for s in document["sources"] for f in s["files"])
    assert "openvino" in document["tools"]

    assert _lock(recipe, tmp_path, capsys)["changes"] == []  # nothing moved: same lock

    vae = generate("tiny-sdxl-vae-fp16-fix", tmp_path / "vae-v2", 1)
    new = api.upload_file(path_or_fileobj=vae / "diffusion_pytorch_model.safetensors",
                          path_in_repo="diffusion_pytorch_model.safetensors", repo_id=vae_repo).oid
    changes = _lock(recipe, tmp_path, capsys)["changes"]
    assert changes == [f"substitutions.vae: commit {commits['substitutions.vae'][:12]} -> {new[:12]}",
                       "substitutions.vae: ~ diffusion_pytorch_model.safetensors"]


def test_locked_convert_refuses_a_file_whose_hash_differs(upstream: tuple[Path, str, str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe, _, _ = upstream
    _lock(recipe, tmp_path, capsys)
    lock_file = recipe.with_name("hub-tiny-sdxl.lock.json")
    document = json.loads(lock_file.read_text())
    entry = next(f for f in document["sources"][0]["files"] if f["path"] == "unet/diffusion_pytorch_model.fp16.safetensors")
    entry["sha256"] = "0" * 64
    lock_file.write_text(json.dumps(document))
    art = tmp_path / "art"
    code = cli_main(["convert", str(recipe), "--locked", "--artifacts", str(art)])
    err = capsys.readouterr().err
    assert code == 3
    assert "--locked: base: ~ unet/diffusion_pytorch_model.fp16.safetensors, not what hub-tiny-sdxl.lock.json pins" in err
    assert not list(art.glob(".staging/*")) and not (art / "hub-tiny-sdxl").exists()


def test_locked_convert_fails_when_upstream_no_longer_serves_the_commit(
        upstream: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, base_repo, _ = upstream
    _lock(recipe, tmp_path, capsys)
    lock_file = recipe.with_name("hub-tiny-sdxl.lock.json")
    document = json.loads(lock_file.read_text())
    document["sources"][0]["commit"] = "f" * 40  # a commit the Hub never had (or garbage-collected)
    lock_file.write_text(json.dumps(document))
    code = cli_main(["convert", str(recipe), "--locked", "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 3
    assert f"base: {base_repo}@{'f' * 40}: revision not found" in err


def test_locked_convert_without_a_lock_says_create_one(upstream: tuple[Path, str, str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "copy.yaml"
    recipe.write_text(upstream[0].read_text())
    assert cli_main(["convert", str(recipe), "--locked", "--artifacts", str(tmp_path / "art")]) == 3
    assert f"no lock file {tmp_path / 'copy.lock.json'}; create it with `sdxl-convert lock <recipe>`" in capsys.readouterr().err


def test_lock_diff_names_tool_and_recipe_changes() -> None:
    old = {"recipe_sha256": "a", "sources": [], "tools": {"openvino": "2025.1", "nncf": "2.0"}}
    new = {"recipe_sha256": "b", "sources": [], "tools": {"openvino": "2025.2", "nncf": "2.0"}}
    assert diff_locks(old, new) == ["recipe: changed (its digest differs)", "tools: openvino 2025.1 -> 2025.2"]


def _keys(recipe: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert cli_main(["cache-key", str(recipe), "--json", "--artifacts", str(tmp / "art")]) == 0
    return json.loads(capsys.readouterr().out)["components"]


def test_cache_keys_move_only_for_the_components_whose_inputs_moved(
        upstream: tuple[Path, str, str], hub_server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `rebuild` reuses, computed with metadata calls only: a new VAE moves the VAE keys, a
    UNet weight format the UNet key, a tool version every key."""
    from huggingface_hub import HfApi

    from conftest import HF_TEST_TOKEN
    from convert import resolve

    recipe, _, vae_repo = upstream
    start = len(hub_server.requests_log())
    before = _keys(recipe, tmp_path, capsys)
    assert not [r for r in hub_server.requests_log()[start:] if "/resolve/" in r[1]]
    assert set(before) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert cli_main(["cache-key", str(recipe), "--combined", "--artifacts", str(tmp_path / "art")]) == 0
    assert len(capsys.readouterr().out.strip()) == 32

    HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN).upload_file(
        path_or_fileobj=b'{"_class_name": "AutoencoderKL", "scaling_factor": 0.13025, "note": "v3"}',
        path_in_repo="config.json", repo_id=vae_repo)
    after_vae = _keys(recipe, tmp_path, capsys)
    assert {c for c in before if before[c] != after_vae[c]} == {"vae_decoder", "vae_encoder"}

    edited = tmp_path / "edited.yaml"
    edited.write_text(recipe.read_text().replace("unet: {weights: int8, nncf: {mode: int8_asym}}", "unet: {weights: fp16}"))
    after_unet = _keys(edited, tmp_path, capsys)
    assert {c for c in before if after_vae[c] != after_unet[c]} == {"unet"}

    real = resolve.tool_versions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resolve, "tool_versions", lambda: real() | {"optimum-intel": "99.0"})
        after_tools = _keys(edited, tmp_path, capsys)
    assert all(after_tools[c] != after_unet[c] for c in before)


def test_cache_keys_of_a_rescaled_vae_follow_the_settings_and_code_that_shape_it(
        tiny_sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: fp16_fix rescale exports weights rescaled from the validation photos at the recipe's
    headroom; two recipes differing only there must not share a VAE entry (one shipped the other's VAE)."""
    import shutil

    from convert import component_cache

    def recipe(name: str, validation: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"schema_version: 1\nname: {name}\nbase: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
                        "components:\n  vae_decoder: {weights: fp16, fp16_fix: rescale}\n"
                        "  vae_encoder: {weights: fp16, fp16_fix: rescale}\n"
                        f"target: {{device: GPU, inference_precision: [f16]}}\nvalidation: {{{validation}}}\n")
        return path

    base = _keys(recipe("a", "min_f16_headroom: 4"), tmp_path, capsys)
    vae = {"vae_decoder", "vae_encoder"}
    for name, validation in (("headroom", "min_f16_headroom: 256"), ("photos", "images: [astronaut]"),
                             ("size", "resolution: 128"), ("small", "small_resolution: 16")):
        moved = _keys(recipe(name, validation if "headroom" in validation else f"min_f16_headroom: 4, {validation}"),
                      tmp_path, capsys)
        assert {c for c in base if base[c] != moved[c]} == vae, validation

    # the rescale code: a copy of the tool whose rescale.py differs moves the VAE keys only
    copy = tmp_path / "tool"
    shutil.copytree(Path(component_cache.__file__).parents[1] / "convert", copy / "convert")
    shutil.copytree(Path(component_cache.__file__).parents[1] / "validate", copy / "validate")
    monkeypatch.setattr(component_cache, "__file__", str(copy / "convert" / "component_cache.py"))
    same = _keys(recipe("a", "min_f16_headroom: 4"), tmp_path, capsys)
    assert same == base
    for edited in ("convert/rescale.py", "convert/fp16fix.py", "validate/inputs.py"):
        (copy / edited).write_text((copy / edited).read_text() + "\n# changed\n")
        moved = _keys(recipe("a", "min_f16_headroom: 4"), tmp_path, capsys)
        assert {c for c in same if same[c] != moved[c]} == vae, edited
        same = moved


def _local_recipe(folder: Path, tiny_sources: dict[str, Path]) -> Path:
    path = folder / "local-lock.yaml"
    path.write_text(f"schema_version: 1\nname: local-lock\nbase: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n")
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["sources"][0].pop("role"), "sources[0].role: expected a string, got None"),
    (lambda d: d["sources"][0].update(commit=None), "sources[0].commit: expected a string, got None"),
    (lambda d: d["sources"][0].update(files={"a": 1}), "sources[0].files: expected a list, got dict"),
    (lambda d: d["sources"][0]["files"][0].update(path="../../etc/passwd"), "sources[0].files[0].path: expected a relative file name"),
    (lambda d: d["sources"].append(dict(d["sources"][0])), "sources[1].role: base is locked twice"),
    (lambda d: d.update(tools=["openvino"]), "tools: expected names mapped to version strings"),
])
def test_a_structurally_wrong_lock_is_one_line_exit_3_and_lock_replaces_it(
        change, message: str, tiny_sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """Issue 19: these were KeyError/TypeError (exit 1); `lock` over a corrupt lock told you to run `lock`."""
    recipe = _local_recipe(tmp_path, tiny_sources)
    _lock(recipe, tmp_path, capsys)
    path = recipe.with_name("local-lock.lock.json")
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert cli_main(["convert", str(recipe), "--locked", "--artifacts", str(tmp_path / "art")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: {message}; recreate it with `sdxl-convert lock <recipe>`"], err
    assert not (tmp_path / "art" / "local-lock").exists()
    relocked = _lock(recipe, tmp_path, capsys)
    assert relocked["changes"] == [f"replaced an unreadable lock ({path}: {message})"]
    assert cli_main(["convert", str(recipe), "--locked", "--plan", "--artifacts", str(tmp_path / "art")]) == 0


@pytest.mark.hub
@pytest.mark.parametrize("build_json", [
    {"lock": {"sources": [{"role": "base"}]}},  # no commit
    {"lock": {"sources": "base"}},
    {"lock": None},
])
def test_a_published_build_json_without_a_commit_means_rebuild_not_a_crash(
        build_json: dict, hf_api, new_repo_id: str, tiny_sources: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Issue 19: a hand-edited build.json at the published head was an internal error in `rebuild`."""
    from convert.rebuild import published_changes
    from convert.recipe import load_recipe
    from convert.resolve import resolve
    from convert.workspace import Workspace

    hf_api.create_repo(new_repo_id)
    commit = hf_api.upload_file(path_or_fileobj=json.dumps(build_json).encode(), path_in_repo="build.json",
                                repo_id=new_repo_id)
    recipe = _local_recipe(tmp_path, tiny_sources)
    resolution = resolve(load_recipe(recipe), recipe, Workspace(artifacts=tmp_path / "art"))
    changes = published_changes(new_repo_id, commit.oid, resolution)
    assert len(changes) == 1 and changes[0].startswith("the published head's build.json is unreadable ("), changes


def test_rebuild_over_a_published_build_json_without_a_commit_rebuilds_through_the_cli(
        hf_api, new_repo_id: str, tiny_sources: dict[str, Path], tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI side of the case above: `rebuild` says why, rebuilds, publishes, exit 0; nothing else is touched."""
    hf_api.create_repo(new_repo_id)
    hf_api.upload_file(path_or_fileobj=b'{"lock": {"sources": [{"role": "base"}]}}', path_in_repo="build.json",
                       repo_id=new_repo_id)
    recipe = tmp_path / "bad-head.yaml"
    off = "{export: false}"
    recipe.write_text(
        f"schema_version: 1\nname: bad-head\nbase: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
        "components:\n" + "".join(f"  {c}: {off}\n" for c in (
            "text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder"))
        + "  vae_decoder: {weights: fp16}\ntarget: {device: CPU, inference_precision: [f32]}\n"
        "validation: {resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder], end_to_end: {prompts: []}}\n"
        f"publish: {{repo: {new_repo_id}}}\n")
    with nothing_changes_outside(tmp_path, tmp_path / "art", tmp_path / "hf-cache"):  # the Hub cache: conftest's
        code = cli_main(["--json", "--artifacts", str(tmp_path / "art"), "rebuild", str(recipe)])
    (outcome,) = json.loads(capsys.readouterr().out)["recipes"]
    assert code == 0 and outcome["status"] == "rebuilt", outcome
    assert any(c.startswith("the published head's build.json is unreadable (") for c in outcome["changed"]), outcome
    assert hf_api.model_info(new_repo_id).sha == outcome["commit"]
