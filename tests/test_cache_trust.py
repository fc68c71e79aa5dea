"""The component cache is input, not a trusted store (issue 19): through the CLI, a tampered entry
never writes outside the build's folders, never puts a link or a changed file into a bundle, and
never hangs or fills memory; a bundle stays what its manifest says whatever happens to the cache.

One cheap build (the tiny VAE decoder alone, gated at f32) fills a cache; each test tampers with a
copy of it and builds again against the copy."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
from test_faults import nothing_changes_outside, write_recipe

from convert.cli import main

OFF = "{export: false}"


def _recipe(folder: Path, tiny_sources: dict[str, Path]) -> Path:
    return write_recipe(folder, "cache-trust", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
                        "components:\n" + "".join(f"  {c}: {OFF}\n" for c in (
                            "text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder"))
                        + "  vae_decoder: {weights: fp16}\n"
                        "target: {device: CPU, inference_precision: [f32]}\n"
                        "validation: {resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder], end_to_end: {prompts: []}}\n")


def _build(recipe: Path, artifacts: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    code = main(["--json", "--artifacts", str(artifacts), "--cache", str(cache), "convert", str(recipe), "--force"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, Path]) -> tuple[Path, Path]:
    """(recipe, cache) after one build that stored the vae_decoder entry."""
    root = tmp_path_factory.mktemp("cache-trust")
    recipe = _recipe(root, tiny_sources)
    assert main(["--artifacts", str(root / "art"), "--cache", str(root / "cache"), "convert", str(recipe)]) == 0
    return recipe, root / "cache"


def _copy(filled: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the filled cache (at tmp/x/y/cache) and its single entry folder."""
    cache = tmp_path / "x" / "y" / "cache"
    shutil.copytree(filled[1], cache, symlinks=True)
    (entry,) = [p for p in cache.glob("??/*") if p.is_dir()]
    return cache, entry


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def _bundle_files(result: dict) -> list[Path]:  # type: ignore[type-arg]
    return [p for p in Path(result["bundle"]).rglob("*") if not p.is_dir()]


def test_a_reused_entry_is_copied_into_the_bundle_never_linked(filled, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Damage to a cache file after packaging leaves the bundle verifying: it holds private copies."""
    cache, entry = _copy(filled, tmp_path)
    with nothing_changes_outside(tmp_path, tmp_path / "art", cache):
        result = _build(filled[0], tmp_path / "art", cache, capsys)
    assert result["reused_components"] == ["vae_decoder"]
    files = _bundle_files(result)
    assert files and all(p.lstat().st_nlink == 1 and stat.S_ISREG(p.lstat().st_mode) for p in files)
    cached = entry / "files" / "openvino_model.bin"
    assert cached.lstat().st_nlink == 1
    with open(cached, "r+b") as f:  # in place, as a disk error or a careless tool would
        f.write(b"\0" * 64)
    assert main(["verify", result["bundle"]]) == 0, capsys.readouterr()


def test_an_entry_naming_files_outside_itself_is_refused_and_re_exported(filled, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A name with five '..' reads tmp/x/outside/victim.txt from the entry (planted there with the
    recorded sha256) and writes tmp/outside/victim.txt from the staged bundle: outside both
    --artifacts and --cache. It must be refused, not followed."""
    cache, entry = _copy(filled, tmp_path)
    info = json.loads((entry / "entry.json").read_text())
    rel, sha = next(iter(info["files"].items()))
    planted = tmp_path / "x" / "outside" / "victim.txt"
    planted.parent.mkdir(parents=True)
    shutil.copyfile(entry / "files" / rel, planted)
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    info["files"] = {"../../../../../outside/victim.txt": sha, **info["files"]}
    (entry / "entry.json").write_text(json.dumps(info))
    before = _tree(tmp_path / "outside")
    with nothing_changes_outside(tmp_path, tmp_path / "art", cache):
        result = _build(filled[0], tmp_path / "art", cache, capsys)
    assert result["reused_components"] == [] and result["exported_components"] == ["vae_decoder"]
    assert _tree(tmp_path / "outside") == before and victim.read_text() == "keep me"
    assert main(["verify", result["bundle"]]) == 0


def test_a_cache_file_replaced_by_a_symlink_never_reaches_the_bundle(filled, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cache, entry = _copy(filled, tmp_path)
    target = tmp_path / "elsewhere.bin"
    cached = entry / "files" / "openvino_model.bin"
    shutil.copyfile(cached, target)  # same bytes: only the link itself is wrong
    cached.unlink()
    cached.symlink_to(target)
    with nothing_changes_outside(tmp_path, tmp_path / "art", cache):
        result = _build(filled[0], tmp_path / "art", cache, capsys)
    assert result["exported_components"] == ["vae_decoder"]
    assert not [p for p in Path(result["bundle"]).rglob("*") if p.is_symlink()]
    assert target.read_bytes() and main(["verify", result["bundle"]]) == 0


@pytest.mark.parametrize("kind", ["huge", "fifo"])
def test_an_entry_json_that_is_endless_or_a_fifo_is_refused_at_once(filled, tmp_path: Path, capsys, kind: str) -> None:  # type: ignore[no-untyped-def]
    """/dev/zero would grow to gigabytes, a FIFO would hang: both are re-exported instead."""
    cache, entry = _copy(filled, tmp_path)
    info = entry / "entry.json"
    info.unlink()
    if kind == "fifo":
        os.mkfifo(info)
    else:
        info.symlink_to("/dev/zero")
    done: dict = {}  # type: ignore[type-arg]
    worker = threading.Thread(target=lambda: done.update(result=_build(filled[0], tmp_path / "art", cache, capsys)),
                              daemon=True)
    with nothing_changes_outside(tmp_path, tmp_path / "art", cache):
        worker.start()
        worker.join(timeout=300)
        if worker.is_alive():  # unblock the FIFO so the thread can end, then fail
            with open(info, "wb"):
                pass
            pytest.fail("the build hung on the cache entry")
    assert done["result"]["exported_components"] == ["vae_decoder"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "./a", "a/.", "a\\b", "a\nb", "a\0b", 7])
def test_unsafe_names_read_back_are_refused(name: object) -> None:
    from convert.readback import safe_relative

    assert safe_relative(name) is None


def test_plain_relative_names_are_kept() -> None:
    from convert.readback import safe_relative

    assert safe_relative("openvino_model.bin") == "openvino_model.bin"
    assert safe_relative("sub/openvino_model.xml") == "sub/openvino_model.xml"
    assert safe_relative("juggernautXL_v9+RDPhoto2 (Lightning).safetensors")  # community names stay readable


@pytest.mark.parametrize("kind", ["huge", "fifo", "directory"])
def test_records_read_back_are_read_bounded_from_regular_files(tmp_path: Path, kind: str) -> None:
    """Lock files, owner.json, manifests, cache entries: /dev/zero, a FIFO or a folder fails at once."""
    from convert.readback import UnreadableFile, read_json

    path = tmp_path / "record.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises((UnreadableFile, IsADirectoryError)):
        read_json(path)


def test_a_lock_file_that_is_a_device_is_one_line_exit_3(tmp_path: Path, tiny_sources: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, tiny_sources)
    recipe.with_name("cache-trust.lock.json").symlink_to("/dev/zero")
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        code = main(["--artifacts", str(tmp_path / "art"), "convert", str(recipe), "--locked"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot read the lock file {tmp_path / 'cache-trust.lock.json'} (")
    assert "not a regular file" in err[0] and not (tmp_path / "art" / "cache-trust").exists()
