"""Scheduled rebuilds: per recipe, skip when the published repo already holds this build, else
build -> validate -> publish -> tag, reusing every unchanged component from the cache.

"Already holds" is decided with metadata calls only (resolve's `model_info`, the published
repo's head and tags): the tag `build-<id>` pointing at the repo's head. A skip thus downloads
nothing. One recipe failing is recorded and the next one runs; the recipe's lock
(convert.staging) is held from the check to the tag, so two rebuilds of one recipe into one
artifacts folder never interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert import build as build_mod
from convert import staging as staging_mod
from convert.capture import redirect_output
from convert.errors import ConvertError, InternalError, PublishError, RecipeError, ValidationFailed
from convert.lockfile import diff_locks, lock_problem
from convert.readback import read_json
from convert.recipe import Recipe
from convert.resolve import Resolution, resolve
from convert.workspace import Workspace

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Published:
    head: str | None  # None: the repo does not exist yet
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> commit

    def holds(self, build_id: str) -> bool:
        return self.head is not None and self.tags.get(f"build-{build_id}") == self.head


@dataclass(frozen=True)
class RebuildOutcome:
    recipe: str
    status: str  # skipped | rebuilt | failed
    seconds: float
    build_id: str | None = None
    changed: list[str] = field(default_factory=list)
    message: str = ""
    exit_code: int = 0
    commit: str | None = None
    tag: str | None = None
    bundle: str | None = None
    reused_components: list[str] = field(default_factory=list)
    exported_components: list[str] = field(default_factory=list)
    report: str | None = None  # the validation report of a failed gate (broken/<id>/validation)
    estimate: dict[str, Any] | None = None  # the build's memory/disk estimate (convert.budget), when it built
    peak_rss_gib: dict[str, float] = field(default_factory=dict)  # stage -> the build's peak RSS by its end

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 2) if k == "seconds" else v) for k, v in self.__dict__.items()}


def read_published(repo: str) -> Published:
    """The published repo's head and tags: two metadata calls, no file download."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    api = HfApi()
    try:
        head = api.model_info(repo).sha
        refs = api.list_repo_refs(repo)
    except hf_errors.RepositoryNotFoundError:
        return Published(head=None)
    except Exception as e:
        raise PublishError(f"{repo}: cannot read the published repo ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                           hint="check HF_TOKEN and the network") from e
    return Published(head=head, tags={t.name: t.target_commit for t in refs.tags})


def published_changes(repo: str, head: str | None, resolution: Resolution) -> list[str]:
    """What differs from the build at the repo's head (its build.json's lock): one small download."""
    if head is None:
        return ["not published yet"]
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, "build.json", revision=head)
        lock = read_json(Path(path))["lock"]
    except Exception as e:  # a repo published by hand, or an older build.json: the build still runs
        log.info("no readable build.json at %s@%s: %s", repo, head, e)
        return ["the published head has no readable build.json"]
    problem = (lock_problem(lock) if isinstance(lock, dict) and isinstance(lock.get("sources"), list)
               else "its lock is not an object with sources")
    if problem:  # read back as input: a hand-edited build.json must not end the rebuild in a KeyError
        return [f"the published head's build.json is unreadable ({problem})"]
    return diff_locks(lock, resolution.lock()) or ["the published head is another build"]


def rebuild_one(recipe_path: Path, workspace: Workspace, progress: Progress | None = None) -> RebuildOutcome:
    started = time.monotonic()
    name = recipe_path.stem
    try:
        recipe = build_mod.prepare_build(recipe_path, workspace)
        name = recipe.name
        if recipe.publish is None:
            raise RecipeError(f"{recipe_path.name}: no publish: section, so there is nothing to rebuild into",
                              hint="add publish.repo, or leave the recipe out of rebuild")
        with staging_mod.recipe_lock(workspace, recipe.name):
            return _rebuild_locked(recipe, recipe_path, workspace, started, progress)
    except ConvertError as e:
        report = str(e.path / "validation" / "report.md") if isinstance(e, ValidationFailed) and e.path else None
        return RebuildOutcome(name, "failed", time.monotonic() - started, message=str(e), exit_code=e.exit_code,
                              report=report)
    except Exception as e:  # a bug in one recipe's build must not stop the others
        log.debug("rebuild of %s failed", name, exc_info=e)
        error = InternalError.of(e)
        return RebuildOutcome(name, "failed", time.monotonic() - started, message=str(error), exit_code=error.exit_code)


def _rebuild_locked(recipe: Recipe, recipe_path: Path, workspace: Workspace, started: float,
                    progress: Progress | None) -> RebuildOutcome:
    from convert.publish import publish

    assert recipe.publish is not None
    repo = recipe.publish.repo
    with redirect_output(workspace.log_file(recipe.name, "resolve")):
        resolution = resolve(recipe, recipe_path, workspace)
    published = read_published(repo)
    build_id = resolution.build_id
    if published.holds(build_id):
        return RebuildOutcome(recipe.name, "skipped", time.monotonic() - started, build_id,
                              message=f"{repo} holds build {build_id} at its head", commit=published.head,
                              tag=f"build-{build_id}")
    changed = published_changes(repo, published.head, resolution)
    result = build_mod.build_holding_lock(recipe, recipe_path, workspace, progress=progress, resolution=resolution)
    done = publish(result.bundle)
    return RebuildOutcome(recipe.name, "rebuilt", time.monotonic() - started, build_id, changed,
                          message=f"published to {repo} at {done.commit} (tag {done.tag})", commit=done.commit,
                          tag=done.tag, bundle=str(result.bundle), reused_components=result.reused_components,
                          exported_components=result.exported_components,
                          estimate=result.needs.to_json() if result.needs else None,
                          peak_rss_gib={k: round(v, 2) for k, v in result.peak_rss_gib.items()})


def publishable_recipes(folders: list[Path]) -> list[Path]:
    """`rebuild --all`: every recipe with a `publish:` section (others have nowhere to go), by name."""
    from convert.recipe import load_recipe

    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            try:
                if load_recipe(path).publish is not None:
                    found.setdefault(path.stem, path)
            except ConvertError:
                found.setdefault(path.stem, path)  # a broken recipe is reported as failed, not skipped silently
    return [found[k] for k in sorted(found)]
