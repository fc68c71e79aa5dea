"""The whole pipeline, stage after stage: recipe -> sources -> patched pipeline -> IR -> report -> bundle.

Callable from Python and tests; the CLI only renders what this returns. Every build
works in its own staging folder, which ends either renamed to the bundle, moved to
`broken/` (validation failed) or deleted (any other error): never half-written output.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert import package
from convert.capture import redirect_output
from convert.errors import FetchError, ValidationFailed
from convert.fetch import FetchedSource, fetch
from convert.recipe import Recipe, load_recipe
from convert.resolve import Resolution, generated_dir, resolve, resolve_source, source_roles
from convert.workspace import Workspace

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PlannedSource:
    role: str
    source: str
    commit: str | None
    note: str = ""


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    weights: str
    inference_precision: list[str]
    runtime_options: dict[str, str]


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    recipe_path: Path
    sources: list[PlannedSource]
    components: list[PlannedComponent]
    checks: list[str]
    output: Path
    build_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "recipe_path": str(self.recipe_path),
            "build_id": self.build_id,
            "output": str(self.output),
            "sources": [s.__dict__ for s in self.sources],
            "components": [c.__dict__ for c in self.components],
            "checks": self.checks,
        }


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    build_id: str
    reused: bool
    components: list[dict[str, Any]] = field(default_factory=list)
    headline: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reused" if self.reused else "built",
            "bundle": str(self.bundle),
            "build_id": self.build_id,
            "components": self.components,
            "validation": self.headline,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "sources": self.sources,
        }


def planned_checks(recipe: Recipe) -> list[str]:
    from validate.checks import describe_checks  # light: no OpenVINO import

    return describe_checks(recipe)


def plan(recipe_path: Path, workspace: Workspace) -> Plan:
    """What a build would do, without downloading or generating anything."""
    recipe = load_recipe(recipe_path)
    planned: list[PlannedSource] = []
    resolved = []
    for role, source in source_roles(recipe):
        if source.generated is not None and not generated_dir(source, workspace).is_dir():
            planned.append(PlannedSource(role, source.describe(), None, "generated offline on first build"))
            continue
        try:
            r = resolve_source(role, source, workspace, recipe_path.parent)
        except FetchError as e:
            planned.append(PlannedSource(role, source.describe(), None, f"unresolved: {e}"))
            continue
        resolved.append(r)
        planned.append(PlannedSource(role, source.describe(), r.commit))
    build_id = None
    if len(resolved) == len(planned):
        from convert.resolve import tool_versions

        build_id = Resolution(recipe, recipe_path, tuple(resolved), tool_versions()).build_id
    components = [
        PlannedComponent(c, recipe.settings_for(c).weights, recipe.precisions_for(c) if not c.startswith("tokenizer") else [],
                         dict(recipe.settings_for(c).runtime_options))
        for c in recipe.exported_components()
    ]
    output = workspace.bundle_dir(recipe.name, build_id or "<build-id>")
    return Plan(recipe, recipe_path, planned, components, planned_checks(recipe), output, build_id)


def build(recipe_path: Path, workspace: Workspace, *, force: bool = False, progress: Progress | None = None) -> BuildResult:
    notify = progress or (lambda _m: None)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    recipe = load_recipe(recipe_path)
    notify("resolve: pinning sources (generated sources are built on first use)")
    with redirect_output(workspace.log_file(recipe.name, "resolve")):
        resolution = resolve(recipe, recipe_path, workspace)
    timings["resolve"] = time.monotonic() - t0
    build_id = resolution.build_id
    dest = workspace.bundle_dir(recipe.name, build_id)
    if dest.is_dir() and not force and not package.verify(dest):
        notify(f"up to date: {dest}")
        info = package.load_bundle(dest)
        return _result_from_existing(info, resolution)

    staging = workspace.staging / build_id
    shutil.rmtree(staging, ignore_errors=True)
    bundle_dir = staging / "bundle"
    bundle_dir.mkdir(parents=True)
    log_path = workspace.log_file(recipe.name)
    log_path.unlink(missing_ok=True)
    try:
        return _build_into(resolution, staging, bundle_dir, dest, workspace, notify, timings, log_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _stage(name: str, timings: dict[str, float], log: Path | None = None) -> Iterator[None]:
    """Time a stage; with `log`, its libraries' output goes there instead of the terminal."""
    started = time.monotonic()
    with redirect_output(log) if log else nullcontext():
        yield
    timings[name] = time.monotonic() - started


def _build_into(resolution: Resolution, staging: Path, bundle_dir: Path, dest: Path, workspace: Workspace,
                notify: Progress, timings: dict[str, float], log: Path) -> BuildResult:
    from convert.export import export_pipeline
    from convert.patch import patch
    from validate.checks import run_validation

    recipe = resolution.recipe
    fetched: dict[str, FetchedSource] = {}
    with _stage("fetch", timings):  # not redirected: the Hub client's download bars stay visible
        for source in resolution.sources:
            notify(f"fetch: {source.role} ({source.source.describe()})")
            folder = staging / "sources" / source.role.replace(".", "_")
            fetched[source.role] = fetch(source, folder, cache_dir=workspace.hf_cache)

    with _stage("patch", timings, log):
        notify("patch: loading the pipeline and substituting components")
        substitutes = {role.split(".", 1)[1]: f for role, f in fetched.items() if role != "base"}
        allow = {"base": recipe.base.allow_pickle} | {k: s.source.allow_pickle for k, s in recipe.substitutions.items()}
        patched = patch(fetched["base"], substitutes, allow)

    with _stage("export", timings, log):
        exported = export_pipeline(patched, recipe, bundle_dir, resolution.build_id, notify)
    components = [
        {"name": e.name, "weights": e.weights,
         "inference_precision": recipe.precisions_for(e.name) if not e.name.startswith("tokenizer") else [],
         "runtime_options": e.runtime_options, "files": [str(e.xml.relative_to(bundle_dir))]}
        for e in exported
    ]

    with _stage("validate", timings, log):
        notify("validate: decoding at the target precisions")
        report = run_validation(bundle_dir, patched, recipe, notify)
        report.write(bundle_dir / "validation")
    del patched

    package.write_json(bundle_dir / package.BUILD_INFO, package.build_info(resolution, components, report.fit_checks))
    (bundle_dir / "recipe.yaml").write_text(resolution.recipe_path.read_text())
    (bundle_dir / package.CARD).write_text(
        package.model_card(resolution, components, report.headline(), report.to_markdown(image_dir="validation"))
    )
    if not report.passed:
        broken = package.move_aside(bundle_dir, workspace.broken, resolution.build_id)
        raise ValidationFailed(report.failures, path=broken)

    with _stage("package", timings):
        notify("package: manifest and atomic rename")
        bundle = package.finalize(bundle_dir, dest, resolution.build_id)
    return BuildResult(
        bundle=bundle.path,
        build_id=resolution.build_id,
        reused=False,
        components=components,
        headline=report.headline(),
        timings=timings,
        sources=[s.lock_entry() for s in resolution.sources],
    )


def _result_from_existing(bundle: package.Bundle, resolution: Resolution) -> BuildResult:
    import json

    info = json.loads((bundle.path / package.BUILD_INFO).read_text())
    report_path = bundle.path / "validation" / "report.json"
    headline = json.loads(report_path.read_text()).get("headline", {}) if report_path.is_file() else {}
    return BuildResult(
        bundle=bundle.path,
        build_id=bundle.build_id,
        reused=True,
        components=info.get("components", []),
        headline=headline,
        sources=[s.lock_entry() for s in resolution.sources],
    )

