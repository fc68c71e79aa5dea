"""Hostile and nonsensical recipes through the CLI: refused at load with one line and exit 2,
before anything is written, downloaded or generated; a recipe's data never becomes a path
outside the artifacts folder, and nothing recorded depends on where the recipe lies."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from convert.cli import main

GENERATED = "base: {generated: {generator: tiny-sdxl-base}}\n"
HEAD = "schema_version: 1\nname: hostile\n"


def run(artifacts: Path, *args: str) -> int:
    return main(["--artifacts", str(artifacts), *args])


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def assert_untouched(artifacts: Path) -> None:
    assert not artifacts.exists() or not any(artifacts.rglob("*")), sorted(artifacts.rglob("*"))


def refused(tmp_path: Path, body: str | bytes, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Run `convert` on a recipe holding `body`; assert exit 2, one line, nothing written; return the line."""
    path = tmp_path / "recipe.yaml"
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body, encoding="utf-8")
    artifacts = tmp_path / "artifacts"
    assert run(artifacts, "convert", str(path), *extra) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: ")
    assert_untouched(artifacts)
    return line


SLUG_RULE = "use lowercase letters, digits, '.', '_' and '-', start with a letter or digit, no '..', at most 64 characters"


@pytest.mark.parametrize("name", ["../escaped", "/etc/x", "a/b", "a..b", "Tiny", "tіny", "''", "a" * 65, ".hidden"])
def test_unsafe_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    line = refused(tmp_path, f"schema_version: 1\nname: {name}\n{GENERATED}", capsys)
    assert "line 2: name: '" in line and f"is not a safe name: {SLUG_RULE}" in line
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("name", ["broken", "sources", "logs", "cache"])
def test_names_of_the_artifacts_folders_are_reserved(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    line = refused(tmp_path, f"schema_version: 1\nname: {name}\n{GENERATED}", capsys)
    assert f"name: '{name}' is reserved for the artifacts folder's own {name}/ folder; choose another name" in line


def test_reserved_names_cover_the_workspace(tmp_path: Path) -> None:
    """Every folder the workspace keeps next to bundles is either hidden or reserved as a recipe name."""
    from convert.recipe_rules import RESERVED_NAMES
    from convert.workspace import Workspace

    workspace = Workspace(artifacts=tmp_path)
    folders = {getattr(workspace, attr) for attr in dir(Workspace)
               if isinstance(getattr(Workspace, attr, None), property)} | {workspace.log_file("x").parent}
    tops = {p.relative_to(tmp_path).parts[0] for p in folders if isinstance(p, Path) and p.is_relative_to(tmp_path)}
    assert tops and {t for t in tops if not t.startswith(".")} <= set(RESERVED_NAMES)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("base: {hub: {repo: ../etc}}", "line 3: base.hub.repo: '../etc' is not a Hub repo id; write it as 'owner/name' (Repo id must use"),
        ("base: {hub: {repo: a/b/c}}", "base.hub.repo: 'a/b/c' is not a Hub repo id"),
        ("base: {hub: {repo: 'tést/sdxl'}}", "base.hub.repo: 'tést/sdxl' is not a Hub repo id"),
        ("base: {hub: {repo: a/b, subfolder: ../../etc}}", "base.hub.subfolder: '../../etc' is not a relative folder"),
        ("base: {hub: {repo: a/b, subfolder: /etc}}", "base.hub.subfolder: '/etc' is not a relative folder"),
        ("base: {hub: {repo: a/b, variant: ../fp16}}", "base.hub.variant: '../fp16' is not a variant: letters, digits and '_' only"),
        ("base: {hub: {repo: a/b, revision: 'main; rm'}}", "base.hub.revision: 'main; rm' is not a revision"),
        ("base: {generated: {generator: ../../x}}", "base.generated.generator: unknown generator '../../x'"),
        ("base: {generated: {generator: tiny-sdxl-bas}}", "unknown generator 'tiny-sdxl-bas'; did you mean 'tiny-sdxl-base'?"),
        ("base: {local: {path: ''}}", "base.local.path: a local source needs the path of a folder"),
        (f"{GENERATED}publish: {{repo: ../x}}", "publish.repo: '../x' is not a Hub repo id"),
        (f"{GENERATED}publish: {{repo: ''}}", "publish.repo: '' is not a Hub repo id"),
        (f"{GENERATED}base_model: not a repo", "base_model: 'not a repo' is not a Hub repo id"),
        ("base: {hub: {repo: me/sdxl}}\npublish: {repo: me/sdxl}",
         "publish.repo me/sdxl is also the base source; publishing replaces that repo's files"),
    ],
)
def test_unsafe_paths_and_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, expected: str) -> None:
    assert expected in refused(tmp_path, f"{HEAD}{body}\n", capsys)


@pytest.mark.parametrize(
    ("validation", "expected"),
    [
        ("min_psnr_db: .nan", "validation.min_psnr_db: nan is not a PSNR floor: use a finite number of dB >= 0"),
        ("min_psnr_db: .inf", "validation.min_psnr_db: inf is not a PSNR floor"),
        ("min_psnr_db: -1", "validation.min_psnr_db: -1.0 is not a PSNR floor"),
        ("resolution: 0", "validation.resolution: 0 is not an image side: use a multiple of 8 from 8 to 4096"),
        ("resolution: -64", "validation.resolution: -64 is not an image side"),
        ("resolution: 100", "validation.resolution: 100 is not a multiple of 8 (the VAE's scale factor); use 96 or 104"),
        ("resolution: 100000", "validation.resolution: 100000 is not an image side"),
        ("small_resolution: 4", "validation.small_resolution: 4 is not a multiple of 8 (the VAE's scale factor); use 8"),
        ("denoise_steps: 1000", "validation.denoise_steps: Input should be less than or equal to 50"),
        ("images: [astronot]", "validation.images: unknown sample image 'astronot'; did you mean 'astronaut'?"),
        ("images: []", "validation.images: List should have at least 1 item"),
        ("components: []", "validation.components: List should have at least 1 item"),
        ("components: [vae_decoder, vae_decoder]", "validation.components: lists a component twice"),
        ("max_non_finite: -1", "validation.max_non_finite: Input should be greater than or equal to 0"),
    ],
)
def test_nonsense_validation_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str], validation: str,
                                      expected: str) -> None:
    line = refused(tmp_path, f"{HEAD}{GENERATED}validation: {{{validation}}}\n", capsys)
    assert f"line 4: {expected}" in line


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("components: {unet: {weights: int4, nncf: {group_size: 0}}}",
         "components.unet.nncf.group_size: 0 is not a group size: use a positive number of weights (e.g. 64, 128) or -1"),
        ("components: {unet: {weights: int4, nncf: {group_size: 7}}}",
         "components.unet.nncf.group_size: 7 is not a power of two: NNCF splits each layer's input channels into groups"),
        ("substitutions: {vae_decoder: {source: {generated: {generator: tiny-sdxl-vae-fp16-fix}}}}",
         "substitutions: cannot substitute 'vae_decoder' alone; did you mean 'vae'?"),
        ("substitutions: {vae_encoder: {source: {generated: {generator: tiny-sdxl-vae-fp16-fix}}}}",
         "cannot substitute 'vae_encoder' alone; did you mean 'vae'?"),
        ("components: {vae_encoder: {export: false}}\nvalidation: {components: [vae_decoder, vae_encoder]}",
         "validation.components lists vae_encoder but components.vae_encoder.export is false"),
        ("components: {unet: {export: false}}",
         "validation.end_to_end runs the whole pipeline, which calls unet, but components.unet.export is false"),
        ("validation: {components: [transformer]}",
         "validation.components lists transformer, which a stable-diffusion-xl pipeline does not have"),
        ("components: [unet]", "line 4: components: Input should be a valid dictionary"),
        ("components: {1: {weights: fp16}}", "components.1.[key]: Input should be a valid string"),
        ("components: {vae_decoder: {runtime_options: {'<x y=\"1\">': '1'}}}",
         "components.vae_decoder.runtime_options: '<x y=\"1\">' is not an OpenVINO property name"),
    ],
)
def test_nonsense_component_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str,
                                     expected: str) -> None:
    assert expected in refused(tmp_path, f"{HEAD}{GENERATED}{body}\n", capsys)


ALIAS_BOMB = "".join(
    [HEAD, GENERATED, "description: &a0 [x, x, x, x, x, x, x, x, x, x]\n"]
    + [f"prompt{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12)]
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "holds a NUL byte at offset 8: not a UTF-8 text file; save it as UTF-8"),
        ((HEAD + GENERATED).encode("utf-16"), "is UTF-16 text, not UTF-8; save it as UTF-8"),
        ((HEAD + GENERATED).encode("utf-16-le"), "holds a NUL byte at offset 1"),
        ((HEAD + GENERATED + "description: caf\xe9\n").encode("latin-1"),
         "line 4: not UTF-8 text (byte 0xe9 at offset"),
        (f"{HEAD}{GENERATED}components:\n  unet: {{weights: int8}}\ncomponents:\n  vae_decoder: {{weights: fp16}}\n",
         "duplicate key 'components' at lines 4 and 6; YAML would keep only the last one"),
        (f"{HEAD}{GENERATED}validation:\n  resolution: 64\n  small_resolution: 32\n  resolution: 128\n",
         "duplicate key 'resolution' at lines 5 and 7"),
        (f"{HEAD}{GENERATED}target: {{device: CPU, device: GPU}}\n", "duplicate key 'device' at line 4 (twice)"),
        (ALIAS_BOMB, "aliases expand this recipe past 20000 YAML nodes; write the values out"),
        (f"{HEAD}{GENERATED}description: &a [*a]\n", "an alias refers to a node that contains it"),
        (f"{HEAD}{GENERATED}description: [{', '.join(['1'] * 30_000)}]\n",
         "line 4: more than 20000 YAML values; a recipe holds a few hundred"),
        (f"{HEAD}{GENERATED}description: {'[' * 2000}{']' * 2000}\n", "line 4: nested more than 32 levels deep"),
        ("", "the recipe is empty"),
        ("# only a comment\n", "the recipe is empty"),
        ("just a string\n", "a recipe is a YAML mapping of keys (schema_version, name, base, ...), not a string"),
        ("- schema_version: 1\n", "not a list"),
        (f"{HEAD}base:\n\tgenerated: {{generator: tiny-sdxl-base}}\n", "line 4: not valid YAML (while scanning"),
        (f"{HEAD}{GENERATED}---\nname: other\n", "not valid YAML (expected a single document in the stream"),
        (f"schema_version: 2\nname: hostile\n{GENERATED}",
         "line 1: schema_version 2 is not supported; this tool reads schema_version 1"),
        (f"schema_version: '1'\nname: hostile\n{GENERATED}", "schema_version must be the number 1, not '1'"),
        (f"schema_version: 1\nname: ~\n{GENERATED}", "line 2: name: Input should be a valid string"),
        (f"{HEAD}base: ~\n", "line 3: base: Input should be a valid dictionary"),
        (f"{HEAD}{GENERATED}? [a, b]\n: 1\n", "not valid YAML (while constructing a mapping found unhashable key)"),
        (f"{HEAD}base: !!python/object/apply:os.system [echo hi]\n",
         "line 3: not valid YAML (could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system')"),
        (f"{HEAD}base: {{hub: {{repo: a/b, revision: 2024-01-01}}}}\n",
         "base.hub.revision: Input should be a valid string (YAML read 2024-01-01 as a date: quote it)"),
        (f"{HEAD}{GENERATED}components: {{unet: {{inference_precision: []}}}}\n",
         "components.unet.inference_precision: List should have at least 1 item"),
        (f"{HEAD}{GENERATED}components: {{unet: ~}}\n", "components.unet: Input should be a valid dictionary"),
        (f"{HEAD}{GENERATED}cоmponents: {{}}\n", "unknown field 'cоmponents' in the recipe; did you mean 'components'?"),
    ],
)
def test_malformed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str | bytes, expected: str) -> None:
    assert expected in refused(tmp_path, body, capsys)


def test_oversized_recipe_is_refused_before_parsing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    line = refused(tmp_path, f"{HEAD}{GENERATED}description: '{'x' * (50 << 20)}'\n", capsys)
    assert "is 50 MiB; a recipe is at most 1 MiB" in line
    assert time.monotonic() - started < 5


def test_huge_value_is_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(tmp_path, f"schema_version: 1\nname: {'a' * 900_000}\n{GENERATED}", capsys)
    assert "is not a safe name" in line and len(line) < 500


def test_alias_bomb_with_verbose_prints_little(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """-v logs the traceback: it must not expand (or repr) the bomb either."""
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    started = time.monotonic()
    assert run(tmp_path / "artifacts", "-v", "convert", str(path)) == 2
    out, err = capfd.readouterr()
    assert time.monotonic() - started < 5
    assert "aliases expand this recipe past 20000 YAML nodes" in err and len(out + err) < 20_000
    assert_untouched(tmp_path / "artifacts")


def test_recipe_markup_is_printed_not_parsed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A value like '[/bold]' is quoted in the message: the console must not read it as markup."""
    assert "name: '[/bold]' is not a safe name" in refused(tmp_path, f"schema_version: 1\nname: '[/bold]'\n{GENERATED}",
                                                          capsys)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("base: {generated: {generator: tiny-sdxl-bas}}", "unknown generator 'tiny-sdxl-bas'"),
        ("base: {hub: {repo: ../etc}}", "'../etc' is not a Hub repo id"),
    ],
)
def test_plan_checks_what_load_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str,
                                      expected: str) -> None:
    assert expected in refused(tmp_path, f"{HEAD}{body}\n", capsys, "--plan")


def test_plan_json_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"{HEAD}base: {{hub: {{repo: ../etc}}}}\n")
    assert run(tmp_path / "artifacts", "--json", "convert", str(path), "--plan") == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == "RecipeError" and out["exit_code"] == 2 and "'../etc' is not a Hub repo id" in out["message"]


def test_recipe_path_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "recipes-dir"
    folder.mkdir()
    assert run(tmp_path / "artifacts", "convert", str(folder)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{folder}: is a directory, not a recipe file" in line and "no recipe named" not in line
    (tmp_path / "dir.yaml").mkdir()
    assert run(tmp_path / "artifacts", "convert", str(tmp_path / "dir.yaml")) == 2
    assert "dir.yaml: is a directory, not a recipe file" in error_line(capsys.readouterr().err)
    assert_untouched(tmp_path / "artifacts")


def test_recipe_that_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    assert run(tmp_path / "artifacts", "convert", str(tmp_path / "zero.yaml")) == 2
    assert f"{tmp_path / 'zero.yaml'}: is not a regular file" in error_line(capsys.readouterr().err)
    assert run(tmp_path / "artifacts", "convert", "") == 2
    assert "error: no recipe given" in error_line(capsys.readouterr().err)
    assert_untouched(tmp_path / "artifacts")


def test_local_source_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not a folder")
    path = tmp_path / "r.yaml"
    path.write_text(f"{HEAD}base: {{local: {{path: model.safetensors}}}}\n")
    artifacts = tmp_path / "artifacts"
    assert run(artifacts, "convert", str(path)) == 3
    line = error_line(capsys.readouterr().err)
    assert f"base: local source {tmp_path / 'model.safetensors'} is a file; a local source is a folder in diffusers layout" in line
    assert "does not exist" not in line
    assert not (artifacts / "hostile").exists() and not any((artifacts / ".staging").glob("*"))


# ----------------------------------------------------------------------------- local sources


def _checkout(root: Path, pipeline: Path, *, source_dir: str = "models/base") -> Path:
    """A recipe and its local source, laid out as a user's checkout would be."""
    shutil.copytree(pipeline, root / source_dir)
    recipe = root / "recipes" / "mine.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"schema_version: 1\nname: mine\nbase:\n  local: {{path: ../{source_dir}}}\n")
    return recipe


def test_local_source_build_id_depends_on_content_only(tmp_path: Path, tiny_sources: dict[str, Path]) -> None:
    """Two checkouts, and a third with the folder elsewhere: the same content gives the same build id."""
    from convert.build import plan
    from convert.workspace import Workspace

    base = tiny_sources["tiny-sdxl-base"]
    recipes = [_checkout(tmp_path / "one", base), _checkout(tmp_path / "two", base),
               _checkout(tmp_path / "three", base, source_dir="elsewhere/pipe")]
    plans = [plan(r, Workspace(artifacts=tmp_path / "artifacts")) for r in recipes]
    ids = {p.build_id for p in plans}
    assert len(ids) == 1 and None not in ids
    assert plans[0].sources[0].source == "local:../models/base"
    assert plans[2].sources[0].source == "local:../elsewhere/pipe"

    (tmp_path / "two" / "models" / "base" / "unet" / "config.json").write_text("{}")  # content changes the id
    assert plan(recipes[1], Workspace(artifacts=tmp_path / "artifacts")).build_id not in ids


def test_bundle_records_no_absolute_local_path(tmp_path: Path, tiny_sources: dict[str, Path]) -> None:
    """build.json and the model card are written from the resolution: check what they would hold."""
    from convert import package
    from convert.recipe import load_recipe
    from convert.resolve import resolve
    from convert.roles import SourceRole
    from convert.workspace import Workspace

    recipe_path = _checkout(tmp_path / "checkout", tiny_sources["tiny-sdxl-base"])
    resolution = resolve(load_recipe(recipe_path), recipe_path, Workspace(artifacts=tmp_path / "artifacts"))
    info = json.dumps(package.build_info(resolution, [], []).model_dump(mode="json"))
    card = package.model_card(resolution, [], None, "")
    for text in (info, card):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
        assert "local:../models/base" in text
    assert resolution.source(SourceRole.base()).local_path == (tmp_path / "checkout" / "models" / "base").resolve()


def test_local_source_symlink_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path = tmp_path / "r.yaml"
    path.write_text(f"{HEAD}base: {{local: {{path: a}}}}\n")
    assert run(tmp_path / "artifacts", "convert", str(path)) == 3
    line = error_line(capsys.readouterr().err)
    assert f"base: local source path {tmp_path / 'a'} cannot be resolved" in line and "fix the path or the symlinks" in line


@pytest.mark.parametrize(("role", "body", "marker"), [
    ("base", "base: {local: {path: /}}", "model_index.json"),
    ("substitutions.vae", f"{GENERATED}substitutions: {{vae: {{source: {{local: {{path: ..}}}}}}}}", "config.json"),
])
def test_local_source_without_diffusers_marker_is_not_hashed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             role: str, body: str, marker: str) -> None:
    """`path: /` (or a home folder) fails at once instead of reading every file below it."""
    path = tmp_path / "r.yaml"
    path.write_text(f"{HEAD}{body}\n")
    started = time.monotonic()
    assert run(tmp_path / "artifacts", "convert", str(path), "--plan") == 0  # a plan reports unresolved sources
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert f"{role}: no {marker} in" in " ".join(out.split()) and "a local source is a folder in diffusers layout" in " ".join(out.split())


@pytest.mark.parametrize("repo", ["../etc", "a--b/sdxl", "me/sdxl.git", "tést/sdxl"])
def test_publish_repo_argument_uses_the_recipe_rule(tiny_build, capsys: pytest.CaptureFixture[str], repo: str) -> None:
    """`publish --repo` is checked like publish.repo in a recipe, before the Hub is asked anything."""
    assert main(["publish", str(tiny_build.bundle), "--repo", repo, "--dry-run"]) == 8
    assert f"error: '{repo}' is not a Hub repo id; write it as 'owner/name'" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("config", [b"{not json", b"\xff\xfe\x00", b"[1, 2]"])
def test_broken_config_of_a_local_source_names_the_real_file(tmp_path: Path, tiny_sources: dict[str, Path],
                                                             artifacts_root: Path, capsys: pytest.CaptureFixture[str],
                                                             config: bytes) -> None:
    """Not the deleted staging view, and not 're-download': the bytes are the source's own."""
    vae = tmp_path / "vae"
    shutil.copytree(tiny_sources["tiny-sdxl-vae-fp16-fix"], vae)
    (vae / "config.json").write_bytes(config)
    path = tmp_path / "broken-config.yaml"
    path.write_text(f"schema_version: 1\nname: broken-config\n{GENERATED}"
                    "substitutions:\n  vae: {source: {local: {path: vae}}}\n")
    assert run(artifacts_root, "convert", str(path)) == 3  # fetch checks every config before anything loads
    line = error_line(capsys.readouterr().err)
    assert f"substitutions.vae: {vae.resolve() / 'config.json'} is not" in line
    assert "fix or replace the file in the source folder" in line and "re-download" not in line and ".staging" not in line
    assert not (artifacts_root / "broken-config").exists()
    assert not (artifacts_root / ".staging").exists() or not any((artifacts_root / ".staging").iterdir())


@pytest.mark.parametrize("scale", ["-1e30", "17", ".inf"])
def test_lora_scale_out_of_range_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], scale: str) -> None:
    from convert.workspace import PROJECT_ROOT

    text = (PROJECT_ROOT / "recipes" / "tiny-singlefile-lora.yaml").read_text()
    assert "scale: 0.8" in text
    path = tmp_path / "huge-lora.yaml"
    path.write_text(text.replace("name: tiny-singlefile-lora", "name: huge-lora").replace("scale: 0.8", f"scale: {scale}"))
    assert main(["--artifacts", str(tmp_path / "art"), "convert", str(path), "--plan"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lora.0.scale" in line and "LoRA scale" in line, line
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())
