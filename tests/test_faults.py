"""Faults through the CLI: usage errors, crashes, signals, concurrent builds, dead builds' leftovers,
full and unwritable disks, corrupt source files. Each case asserts the exit code, the one-line
message and that nothing is left half-written.

Cheap by design: most cases fail at resolve or fetch, and the builds that must really run (to be
locked out, killed or terminated) share the session's generated sources via --artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from convert.cli import main
from convert.workspace import PROJECT_ROOT, Workspace

GENERATED_BASE = "generated: {generator: tiny-sdxl-base, seed: 0}"
GENERATED_VAE = "generated: {generator: tiny-sdxl-vae-fp16-fix, seed: 0}"


def write_recipe(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"schema_version: 1\nname: {name}\n{body}")
    return path


def local_recipe(folder: Path, name: str, tiny_sources: dict[str, Path]) -> Path:
    """The tiny pipeline from local folders: no generation, cheap to resolve and fetch."""
    return write_recipe(folder, name, f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
                        f"substitutions:\n  vae: {{source: {{local: {{path: {tiny_sources['tiny-sdxl-vae-fp16-fix']}}}}}}}\n"
                        "validation: {end_to_end: {prompts: []}}\n")  # faults, disks, locks: not the run


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith("error:")]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = error_lines("\n".join(err))
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def assert_nothing_written(artifacts: Path, recipe_name: str) -> None:
    assert not (artifacts / recipe_name).exists(), "a bundle folder appeared for a failed build"
    staging = artifacts / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), f"staging left behind: {list(staging.iterdir())}"


def tree_state(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` (outside `skip`): path -> (size, mtime_ns), links not followed."""
    state = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        st = path.lstat()
        state[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return state


@contextmanager
def nothing_changes_outside(root: Path, *build_folders: Path) -> Iterator[None]:
    """The command run inside changes nothing under `root` except in `build_folders` (its artifacts, cache)."""
    before = tree_state(root, build_folders)
    yield
    after = tree_state(root, build_folders)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"changed outside the build's folders: {changed[:5]}"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- command line


def test_global_flags_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`just convert RECIPE --json` puts the flags after the subcommand."""
    path = write_recipe(tmp_path, "late-flags", "base: {local: {path: ./nowhere}}\n")
    assert main(["convert", str(path), "--json", "--artifacts", str(tmp_path / "art")]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "error" and out["error"] == "FetchError" and out["exit_code"] == 3
    assert_nothing_written(tmp_path / "art", "late-flags")


def test_flags_before_the_subcommand_are_not_reset_after_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path, "early-flags", "base: {local: {path: ./nowhere}}\n")
    assert main(["--json", "--artifacts", str(tmp_path / "art"), "convert", str(path), "--force"]) == 3
    assert json.loads(capsys.readouterr().out)["exit_code"] == 3
    assert (tmp_path / "art" / "logs").is_dir()  # the --artifacts given before the subcommand was used


@pytest.mark.parametrize(("argv", "usage"), [
    (["convert"], "usage: sdxl-convert convert"),
    (["frobnicate"], "usage: sdxl-convert "),
    (["convert", "x", "--no-such-flag"], "usage: sdxl-convert "),
])
def test_usage_errors_exit_64(argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 64
    err = capsys.readouterr().err
    assert usage in err
    assert len(error_lines(err)) == 1 and "sdxl-convert" in error_lines(err)[0]


def test_usage_error_with_json_prints_a_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "convert"]) == 64
    out = json.loads(capsys.readouterr().out)
    assert out == {"status": "error", "error": "UsageError", "exit_code": 64,
                   "message": out["message"]} and "the following arguments are required: recipe" in out["message"]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    assert "--json" in capsys.readouterr().out  # global flags are documented after the subcommand too


def _explode(*_args: object, **_kwargs: object) -> None:
    raise ZeroDivisionError("boom in a place nobody expected\nsecond line of detail")


def test_unexpected_exception_is_one_line_and_a_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours (simulated in our own code, never in a library) still ends as one line, exit 1."""
    from convert import build

    monkeypatch.setattr(build, "plan", _explode)
    assert main(["convert", "tiny-sdxl-fp16fix", "--plan", "--json", "--artifacts", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "status": "error", "error": "InternalError", "exit_code": 1,
        "message": "internal error: ZeroDivisionError: boom in a place nobody expected; run with -v for the traceback"}
    assert "Traceback" not in captured.err
    assert error_lines(captured.err) == ["error: internal error: ZeroDivisionError: boom in a place nobody expected; "
                                         "run with -v for the traceback"]


def test_unexpected_exception_with_v_shows_the_traceback(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from convert import build

    monkeypatch.setattr(build, "plan", _explode)
    assert main(["-v", "convert", "tiny-sdxl-fp16fix", "--plan", "--artifacts", str(tmp_path)]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: boom" in err


def test_keyboard_interrupt_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from convert import build

    def interrupt(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "plan", interrupt)
    assert main(["convert", "tiny-sdxl-fp16fix", "--plan", "--json", "--artifacts", str(tmp_path)]) == 130
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "error" and out["error"] == "Interrupted" and out["exit_code"] == 130
    assert out["message"] == "interrupted; nothing was published and no bundle was half-written"


# ----------------------------------------------------------------------------- corrupt sources

HEADER_CASES = {
    "three-bytes": (b"abc", "3 bytes, shorter than the 8-byte header length"),
    "huge-header-length": (struct.pack("<Q", 2**40) + b"{}", "header length 1099511627776 exceeds the file's 10 bytes"),
    "garbage-json": (struct.pack("<Q", 6) + b"{nope!", "the header is not JSON"),
    "truncated": (struct.pack("<Q", 62) + json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
                  .encode().ljust(62) + b"\0" * 4, "tensor 'w' lies outside the file (bytes 0..16 of 4); truncated?"),
}


def _in_bounds(tensors: dict[str, dict[str, object]], data: int) -> bytes:
    """A header whose offsets all lie inside the file, followed by `data` bytes."""
    raw = json.dumps(tensors).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data


# invalid but in bounds (issue 19): what safetensors' loader refuses later, naming a staging link
HEADER_CASES |= {
    "unknown-dtype": (_in_bounds({"w": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}}, 16),
                      "tensor 'w' has dtype 'F17', which safetensors does not know"),
    "shape-vs-span": (_in_bounds({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16),
                      "tensor 'w' of shape [3] and dtype F32 needs 12 bytes, its data_offsets span 16"),
    "negative-size": (_in_bounds({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16),
                      "tensor 'w' has shape [-4], not a list of sizes"),
    "overlap": (_in_bounds({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24),
                "tensor 'b' starts at byte 8 of the data, expected 16 (overlapping the tensor before it)"),
    "gap": (_in_bounds({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, 24),
            "tensor 'b' starts at byte 16 of the data, expected 8 (a gap before it)"),
    "trailing-bytes": (_in_bounds({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 20),
                       "4 bytes after the last tensor's data"),
    "bad-metadata": (_in_bounds({"__metadata__": {"format": 3}, "w": {"dtype": "F32", "shape": [4],
                                                                      "data_offsets": [0, 16]}}, 16),
                     "__metadata__ is not a map of strings"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_corrupt_safetensors_in_a_local_source_exit_3(case: str, tmp_path: Path, tiny_sources: dict[str, Path],
                                                      artifacts_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, reason = HEADER_CASES[case]
    vae = tmp_path / "broken-vae"
    vae.mkdir()
    shutil.copy(tiny_sources["tiny-sdxl-vae-fp16-fix"] / "config.json", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(content)
    path = write_recipe(tmp_path, f"corrupt-{case}", f"base: {{{GENERATED_BASE}}}\n"
                        "substitutions:\n  vae: {source: {local: {path: broken-vae}}}\n")
    with nothing_changes_outside(tmp_path):  # the user's folder (and its broken file) untouched
        assert main(["--artifacts", str(artifacts_root), "convert", str(path)]) == 3
    line = one_error_line(capsys)
    assert f"substitutions.vae: {weights} is not a valid safetensors file: {reason}" in line
    assert "fix or replace the file in the source folder" in line
    assert_nothing_written(artifacts_root, f"corrupt-{case}")


def test_bad_config_json_names_the_users_file(tmp_path: Path, tiny_sources: dict[str, Path], artifacts_root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    vae = tmp_path / "vae-bad-config"
    shutil.copytree(tiny_sources["tiny-sdxl-vae-fp16-fix"], vae)
    (vae / "config.json").write_text('{"latent_channels": 4,,}')
    path = write_recipe(tmp_path, "bad-config", f"base: {{{GENERATED_BASE}}}\n"
                        "substitutions:\n  vae: {source: {local: {path: vae-bad-config}}}\n")
    assert main(["--artifacts", str(artifacts_root), "convert", str(path)]) == 3
    line = one_error_line(capsys)
    assert f"substitutions.vae: {vae / 'config.json'} is not valid JSON (Expecting property name" in line
    assert ".staging" not in line and "re-download" not in line
    assert_nothing_written(artifacts_root, "bad-config")


# ----------------------------------------------------------------------------- unwritable output


def test_artifacts_is_a_file_exit_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    path = write_recipe(tmp_path, "to-a-file", f"base: {{{GENERATED_BASE}}}\n")
    assert main(["--artifacts", str(target), "convert", str(path)]) == 7
    line = one_error_line(capsys)
    assert line == f"error: cannot write {target}: it is a file, not a folder; move it away or use another --artifacts folder"
    assert target.read_text() == "x"


def test_component_cache_is_a_file_exit_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any work, not a warning per exported component."""
    cache = tmp_path / "cache-file"
    cache.write_text("x")
    path = write_recipe(tmp_path, "cache-to-a-file", f"base: {{{GENERATED_BASE}}}\n")
    assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path), "--cache", str(cache)]) == 7
    line = one_error_line(capsys)
    assert line == f"error: cannot write {cache}: it is a file, not a folder; point --cache or SDXL_CONVERT_CACHE at a folder"
    assert cache.read_text() == "x" and not (tmp_path / "art" / "cache-to-a-file").exists()


def test_artifacts_below_a_file_exit_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "artifacts"
    path = write_recipe(tmp_path, "below-a-file", f"base: {{{GENERATED_BASE}}}\n")
    assert main(["--artifacts", str(target), "convert", str(path)]) == 7
    assert f"cannot write {target}: Not a directory" in one_error_line(capsys)


@pytest.mark.parametrize("blocked", [".staging", "logs", "sources"])
def test_a_file_where_a_work_folder_goes_exit_7(blocked: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    art.mkdir()
    (art / blocked).write_text("in the way")
    path = write_recipe(tmp_path, "blocked", f"base: {{{GENERATED_BASE}}}\n")
    assert main(["--artifacts", str(art), "convert", str(path)]) == 7
    assert one_error_line(capsys) == (f"error: cannot write {art / blocked}: it is a file, not a folder; "
                                      "move it away or use another --artifacts folder")
    assert sorted(p.name for p in art.iterdir()) == [blocked]


def test_refused_write_during_a_stage_is_that_stages_error(tmp_path: Path, tiny_sources: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The resolve stage's log is a folder: the write fails mid-build, named, with resolve's exit code."""
    art = tmp_path / "art"
    log = art / "logs" / "log-in-the-way.resolve.log"
    log.mkdir(parents=True)
    path = local_recipe(tmp_path, "log-in-the-way", tiny_sources)
    assert main(["--artifacts", str(art), "convert", str(path)]) == 3
    assert one_error_line(capsys) == (f"error: cannot write {log}: Is a directory; "
                                      "make it writable or use another --artifacts folder")
    assert_nothing_written(art, "log-in-the-way")


@pytest.fixture
def mounted_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs file systems (root only; CI runs as root); unmounted afterwards."""
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_artifacts_exit_7(tmp_path: Path, mounted_tmpfs, capsys: pytest.CaptureFixture[str]) -> None:
    """Read-only by a read-only mount: chmod does not stop root, which CI runs as."""
    art = mounted_tmpfs("ro", "ro,size=1m")
    path = write_recipe(tmp_path, "read-only", f"base: {{{GENERATED_BASE}}}\n")
    assert main(["--artifacts", str(art), "convert", str(path)]) == 7
    line = one_error_line(capsys)
    assert line == f"error: cannot write {art}: Read-only file system; make it writable or use another --artifacts folder"


def test_full_disk_refused_before_the_export(tmp_path: Path, tiny_sources: dict[str, Path], mounted_tmpfs,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A 2 MiB disk cannot hold the tiny bundle: refused up front (the plan's estimate), before any work."""
    art = mounted_tmpfs("small", "size=2m")
    path = local_recipe(tmp_path, "small-disk", tiny_sources)
    assert main(["--artifacts", str(art), "convert", str(path)]) == 7
    line = one_error_line(capsys)
    assert line.startswith("error: small-disk does not fit this machine: about 0.")
    assert " GB of disk for bundle + component cache but <0.1 GB are free there; " in line
    assert "free disk or point --artifacts, --cache, HF_HUB_CACHE elsewhere" in line
    assert_nothing_written(art, "small-disk")


def test_full_disk_found_before_the_export(tmp_path: Path, tiny_sources: dict[str, Path], mounted_tmpfs,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's own check still holds where the up-front one was passed (the disk filled meanwhile)."""
    from convert import budget

    monkeypatch.setattr(budget, "shortfalls", lambda _needs, _machine: [])
    art = mounted_tmpfs("small", "size=2m")
    path = local_recipe(tmp_path, "small-disk", tiny_sources)
    assert main(["--artifacts", str(art), "convert", str(path)]) == 5
    line = one_error_line(capsys)
    assert line.startswith(f"error: no space left on {art}, need about 0.1 GiB; ")
    assert "GiB are free; free some space or use another --artifacts folder" in line
    assert_nothing_written(art, "small-disk")


def test_keep_free_reserve_refuses_the_export(tmp_path: Path, tiny_sources: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check on any machine: SDXL_CONVERT_KEEP_FREE_GIB reserves more than any disk has."""
    monkeypatch.setenv("SDXL_CONVERT_KEEP_FREE_GIB", str(2**40))
    path = local_recipe(tmp_path, "reserve", tiny_sources)
    assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 7
    line = one_error_line(capsys)
    assert line.startswith("error: reserve does not fit this machine: about 0.")
    assert " GB of disk for bundle + component cache but 0.0 GB are free there after the " in line
    assert "GiB that SDXL_CONVERT_KEEP_FREE_GIB keeps" in line
    assert_nothing_written(tmp_path / "art", "reserve")


def test_disk_full_during_a_stage_names_it(tmp_path: Path, tiny_sources: dict[str, Path], mounted_tmpfs,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A real ENOSPC (a tmpfs out of inodes: bytes are free, so the up-front check passes) in fetch."""
    art = mounted_tmpfs("few-inodes", "size=512m,nr_inodes=14")
    path = local_recipe(tmp_path, "inodes", tiny_sources)
    assert main(["--artifacts", str(art), "convert", str(path)]) == 3
    line = one_error_line(capsys)
    assert line == f"error: no space left on {art}; free some space or use another --artifacts folder"
    assert_nothing_written(art, "inodes")


def test_openvino_iostream_error_on_a_full_disk_is_enospc(mounted_tmpfs) -> None:
    """OpenVINO says only "iostream error" when a save fills the disk; the export names it ENOSPC."""
    import errno

    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from convert.export import save_atomically

    folder = mounted_tmpfs("save", "size=1m")
    param = ops.parameter([1, 512], np.float32)
    model = ov.Model([ops.matmul(param, ops.constant(np.ones((512, 1024), np.float32)), False, False)], [param])
    with pytest.raises(OSError) as raised:
        save_atomically(model, folder / "openvino_model.xml", compress_to_fp16=False)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(folder)
    assert list(folder.iterdir()) == []


def test_validation_stage_errors_are_one_line_exit_6(tmp_path: Path) -> None:
    """An OpenVINO error inside the validation stage becomes a ValidationError naming the component."""
    import openvino as ov

    from convert.errors import ValidationError
    from validate.checks import stage_errors

    with pytest.raises(ValidationError) as raised, stage_errors("vae_decoder", tmp_path):
        ov.Core().read_model(tmp_path / "vae_decoder" / "openvino_model.xml")
    assert raised.value.exit_code == 6
    from validate.host import cpu_isa, openvino_version

    on = f"on this CPU ({cpu_isa().describe()}, OpenVINO {openvino_version()})"
    assert str(raised.value).startswith(f"vae_decoder: validation could not run {on}: RuntimeError: ")
    assert "\n" not in str(raised.value)


def test_openvino_error_in_the_validation_stage_exit_6(tmp_path: Path, tiny_sources: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A runtime option OpenVINO accepts into rt_info but refuses at compile time, reached cheaply:
    only the tiny VAE decoder is exported, validated at f32 without a denoising run."""
    off = "{export: false}"
    path = write_recipe(tmp_path, "bad-runtime-option", f"base: {{local: {{path: {tiny_sources['tiny-sdxl-base']}}}}}\n"
                        "components:\n" + "".join(f"  {c}: {off}\n" for c in (
                            "text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder"))
                        + "  vae_decoder: {weights: fp16, runtime_options: {KV_CACHE_PRECISION: bogus}}\n"
                        "target: {device: CPU, inference_precision: [f32]}\n"
                        "validation: {resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder], end_to_end: {prompts: []}}\n")
    art = tmp_path / "art"
    assert main(["--artifacts", str(art), "convert", str(path)]) == 6
    line = one_error_line(capsys)
    from validate.host import cpu_isa, openvino_version

    assert line == (f"error: vae_decoder: validation could not run on this CPU ({cpu_isa().describe()}, OpenVINO "
                    f"{openvino_version()}): RuntimeError: Unsupported element type: bogus; run with -v for the "
                    "traceback and report it with this line; the converters' output is in the build log; a machine "
                    "with another CPU may run the gate")
    assert_nothing_written(art, "bad-runtime-option")
    assert not (art / "broken").exists()


# ----------------------------------------------------------------------------- concurrent and dead builds


def _staging_of(artifacts: Path, pid: int) -> list[Path]:
    staging = artifacts / ".staging"
    return [p for p in staging.iterdir() if f".{pid}." in p.name] if staging.is_dir() else []


def _start_build(artifacts: Path, recipe: Path) -> tuple[subprocess.Popen[str], Path]:
    """`python -m convert` in a real process; returns once its staging folder exists (the lock is held)."""
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "convert", "--artifacts", str(artifacts), "convert", str(recipe)],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in _staging_of(artifacts, proc.pid) if (p / "owner.json").is_file()]
        if found:
            return proc, found[0]
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"the build never started staging (rc {proc.returncode}): {err[-2000:]}")


def test_second_build_is_refused_then_sigterm_cleans_up(tmp_path: Path, tiny_sources: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    path = local_recipe(tmp_path, "concurrent", tiny_sources)
    first, staging = _start_build(art, path)
    try:
        assert main(["--artifacts", str(art), "convert", str(path)]) == 75
        line = one_error_line(capsys)
        assert line.startswith(f"error: another build of concurrent is running (pid {first.pid}); wait for it")
        assert staging.is_dir(), "the refused build touched the running build's staging"
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated; nothing was published and no bundle was half-written"
    assert_nothing_written(art, "concurrent")
    assert not (art / ".locks" / "concurrent.owner.json").exists()


def test_kill_9_leaves_staging_that_the_next_build_removes(tmp_path: Path, tiny_sources: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    path = local_recipe(tmp_path, "killed", tiny_sources)
    victim, staging = _start_build(art, path)
    victim.kill()
    victim.communicate(timeout=60)
    assert staging.is_dir() and json.loads((staging / "owner.json").read_text())["pid"] == victim.pid
    # the next build of anything in this artifacts folder removes it; this one fails fast, at resolve
    broken = write_recipe(tmp_path, "next", "base: {local: {path: ./nowhere}}\n")
    assert main(["--artifacts", str(art), "convert", str(broken)]) == 3
    assert not staging.exists()
    assert_nothing_written(art, "killed")


def test_stale_staging_of_dead_builds_is_removed_live_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convert.staging import OWNER, Owner, new_staging

    art = tmp_path / "art"
    workspace = Workspace(artifacts=art)
    live = new_staging(workspace, "aaaa")  # this process: alive
    dead = art / ".staging" / f"bbbb.{dead_pid()}.0123abcd"
    (dead / "bundle" / "unet").mkdir(parents=True)
    (dead / "bundle" / "unet" / "openvino_model.bin").write_bytes(b"\0" * 1024)
    Owner(int(dead.name.split(".")[1]), Owner.me().host, None).write(dead / OWNER)
    reused = art / ".staging" / "cccc.1.00000000"  # pid 1 is alive, but not the process that owned this (start times differ)
    reused.mkdir()
    Owner(1, Owner.me().host, "-1").write(reused / OWNER)
    legacy = art / ".staging" / "0123456789abcdef"  # an older version's, without owner.json
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    other_host = art / ".staging" / f"dddd.{dead_pid()}.11111111"
    other_host.mkdir()
    Owner(int(other_host.name.split(".")[1]), "another-host", None).write(other_host / OWNER)

    path = write_recipe(tmp_path, "cleaner", "base: {local: {path: ./nowhere}}\n")
    assert main(["--artifacts", str(art), "convert", str(path)]) == 3
    assert live.is_dir() and other_host.is_dir()
    assert not dead.exists() and not reused.exists() and not legacy.exists()


def test_interrupted_force_replacement_is_not_reused(tmp_path: Path, tiny_sources: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Simulated on disk (a kill between finalize's two renames cannot be timed): the old bundle sits
    in the dead build's staging and no bundle is under its name, so the next run rebuilds; an older
    version's `<id>.old` is removed too."""
    from convert.staging import OWNER, Owner

    art = tmp_path / "art"
    dead = art / ".staging" / f"feedfacefeedface.{dead_pid()}.22222222"
    (dead / "replaced" / "unet").mkdir(parents=True)
    (dead / "replaced" / "unet" / "openvino_model.bin").write_bytes(b"\0" * 1024)
    Owner(int(dead.name.split(".")[1]), Owner.me().host, None).write(dead / OWNER)
    old = art / "half" / "feedfacefeedface.old"
    (old / "unet").mkdir(parents=True)
    path = write_recipe(tmp_path, "half", "base: {local: {path: ./nowhere}}\n")
    assert main(["--artifacts", str(art), "convert", str(path)]) == 3
    assert not dead.exists() and not old.exists()
    assert list((art / "half").iterdir()) == []


def test_force_replaces_a_bundle_through_the_builds_own_staging(tmp_path: Path) -> None:
    """finalize moves the replaced bundle into the build's staging (same file system), never beside it."""
    from convert.package import finalize, verify

    dest = tmp_path / "art" / "r" / "id"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("old")
    staging = tmp_path / "art" / ".staging" / "id.1.x"
    (staging / "bundle").mkdir(parents=True)
    (staging / "bundle" / "new.txt").write_text("new")
    finalize(staging / "bundle", dest, "id", trash=staging / "replaced")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "new.txt"] and verify(dest) == []
    assert not (staging / "replaced").exists() and list((tmp_path / "art" / "r").iterdir()) == [dest]


@pytest.mark.parametrize(("manifest", "problem"), [
    (b"\xff\xfe", "unreadable manifest ('utf-8' codec can't decode byte 0xff"),
    (b'{"build_id": "x", "files": []}', "unreadable manifest ('files' must map each path to its size and sha256)"),
    (b'{"files": {}}', "unreadable manifest ('build_id')"),
    (b'{"build_id": "x", "files": {"../../../../../../etc/hostname": {"size": 1, "sha256": "0"}}}',
     "../../../../../../etc/hostname: outside the bundle"),
])
def test_verify_a_hostile_manifest_exit_7(manifest: bytes, problem: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_bytes(manifest)
    assert main(["verify", str(tmp_path / "bundle")]) == 7
    line = one_error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'bundle'}: bundle does not verify: ") and problem in line


def test_space_estimate_of_the_real_sdxl_bundle_is_close_and_never_under() -> None:
    """SDXL's parameter counts with the bench recipe's formats against the bundle BENCHMARKS.md measured."""
    from convert.disk import GIB, bundle_bytes

    params = {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684, "vae": 83_653_863}
    fp16 = dict.fromkeys(("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"), "fp16")
    for weights, measured_gib in ((fp16, 6.47), (fp16 | {"unet": "int8"}, 4.09)):
        estimate = bundle_bytes(params, weights) / GIB
        assert measured_gib <= estimate <= measured_gib * 1.15, (weights["unet"], estimate)


@pytest.mark.parametrize("raw", ["lots", "nan", "inf", "-1"])
def test_malformed_keep_free_reserve_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("SDXL_CONVERT_KEEP_FREE_GIB", raw)
    path = write_recipe(tmp_path, "reserve-typo", f"base: {{{GENERATED_BASE}}}\n")
    with nothing_changes_outside(tmp_path, tmp_path / "art"):
        assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path)]) == 64
    assert one_error_line(capsys) == (f"error: SDXL_CONVERT_KEEP_FREE_GIB={raw!r} is not a number of GiB (0 or more); "
                                      "unset it or give e.g. 10")
    assert_nothing_written(tmp_path / "art", "reserve-typo")


@pytest.mark.signals
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_termination_signals_end_cleanly_with_a_json_document(signum: int, code: int, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A real signal to this process while a command runs; the previous handler is restored after."""
    from convert import build

    def signalled(*_args: object, **_kwargs: object) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signum)
    monkeypatch.setattr(build, "plan", signalled)
    assert main(["convert", "tiny-sdxl-fp16fix", "--plan", "--json", "--artifacts", str(tmp_path)]) == code
    out = json.loads(capsys.readouterr().out)
    assert out == {"status": "error", "error": "Terminated", "exit_code": code,
                   "message": "terminated; nothing was published and no bundle was half-written"}
    assert signal.getsignal(signum) == before


def test_nothing_changes_outside_sees_a_new_and_a_changed_file(tmp_path: Path) -> None:
    """The helper the CLI fault tests rely on can fail."""
    (tmp_path / "kept").write_text("a")
    (tmp_path / "build").mkdir()
    with nothing_changes_outside(tmp_path, tmp_path / "build"):
        (tmp_path / "build" / "bundle").write_text("inside the build's folder: allowed")
    with pytest.raises(AssertionError, match="changed outside the build's folders: \\['new'\\]"):
        with nothing_changes_outside(tmp_path, tmp_path / "build"):
            (tmp_path / "new").write_text("x")
    with pytest.raises(AssertionError, match="'kept'"):
        with nothing_changes_outside(tmp_path, tmp_path / "build"):
            (tmp_path / "kept").write_text("bb")
