"""The whole pipeline, stage after stage: recipe -> sources -> patched pipeline -> IR -> report -> bundle.

Callable from Python and tests; the CLI only renders what this returns. Every build
works in its own staging folder, which ends either renamed to the bundle, moved to
`broken/` (validation failed) or deleted (any other error): never half-written output.
A build holds its recipe's lock from resolve to rename (convert.staging), and first
removes the staging folders of builds that died.
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

from convert import budget, disk, fp16fix, lockfile, package
from convert import staging as staging_mod
from convert.budget import Machine, Needs
from convert.capture import redirect_output
from convert.component_cache import ComponentCache, key_inputs
from convert.errors import (ConvertError, ExportError, FetchError, PackageError, PatchError, RecipeError, ResourcesError,
                            ValidationError, ValidationFailed)
from convert.fetch import FetchedSource, fetch, folder_params
from convert.families import PipelineFamily
from convert.recipe import Recipe, load_recipe
from convert.resolve import Resolution, generated_dir, resolve, resolve_source, source_roles
from convert.roles import SourceRole
from convert.single_file import apply_scheduler, materialize, needs_materializing
from convert.workspace import Workspace
from validate.headline import Headline, MalformedHeadline

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Folders of the artifacts folder every build may write to.
WORK_FOLDERS = (".staging", ".locks", "logs", "sources", "broken")
#: The bundle's validation report, written by the validate stage; a reused bundle's verdicts come from it.
REPORT = "validation/report.json"


@dataclass(frozen=True)
class PlannedSource:
    role: SourceRole
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
    needs: Needs | None = None  # None: a source is not resolved (or not generated) yet
    machine: Machine | None = None

    @property
    def shortfalls(self) -> list[str]:
        return budget.shortfalls(self.needs, self.machine) if self.needs and self.machine else []

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "recipe_path": str(self.recipe_path),
            "build_id": self.build_id,
            "output": str(self.output),
            "sources": [s.__dict__ | {"role": s.role.key} for s in self.sources],
            "components": [c.__dict__ for c in self.components],
            "checks": self.checks,
            "estimate": self.needs.to_json() if self.needs else None,
            "machine": self.machine.to_json() if self.machine else None,
            "fits": not self.shortfalls if self.needs else None,
            "shortfalls": self.shortfalls,
        }


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    build_id: str
    reused: bool
    components: list[package.ComponentInfo] = field(default_factory=list)
    headline: Headline | None = None  # None: a reused bundle without validation/report.json
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: dict[str, float] = field(default_factory=dict)  # stage -> this process's largest RSS by its end
    needs: Needs | None = None  # the estimate the build was admitted with (None: reused, nothing built)
    disk_written: dict[str, int] = field(default_factory=dict)  # use -> bytes this build added (measured)
    sources: list[dict[str, Any]] = field(default_factory=list)
    reused_components: list[str] = field(default_factory=list)  # linked from the component cache
    exported_components: list[str] = field(default_factory=list)  # exported (or tokenized) by this build

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reused" if self.reused else "built",
            "reused_components": self.reused_components,
            "exported_components": self.exported_components,
            "bundle": str(self.bundle),
            "build_id": self.build_id,
            "components": [c.to_json() for c in self.components],
            "validation": self.headline.to_json() if self.headline is not None else {},
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "peak_rss_gib": {k: round(v, 2) for k, v in self.peak_rss_gib.items()},
            "estimate": self.needs.to_json() if self.needs else None,
            "disk_written_gb": {k: round(v / 1000**3, 2) for k, v in self.disk_written.items()},
            "sources": self.sources,
        }


def planned_checks(recipe: Recipe) -> list[str]:
    from validate.checks import describe_checks  # light: no OpenVINO import

    from convert.quantize import describe

    return describe_checks(recipe) + fp16fix.describe(recipe) + describe(recipe)


def plan(recipe_path: Path, workspace: Workspace, locked: bool = False) -> Plan:
    """What a build would do, without downloading or generating anything.

    With `locked`, as `convert --locked` would: sources at the lock's commits, and a lock that is
    missing, damaged or differs from what resolves is the same error (exit 3), not a passing plan.
    """
    recipe = load_recipe(recipe_path)
    check_scheduler_of(recipe, recipe_path)
    lock_file = lockfile.lock_path(recipe_path)
    pinned = lockfile.read_lock(lock_file) if locked else None
    pins = lockfile.pins(pinned) if pinned else {}
    planned: list[PlannedSource] = []
    resolved = []
    for role, source in source_roles(recipe):
        if source.generated is not None and not generated_dir(source, workspace).is_dir():
            planned.append(PlannedSource(role, source.describe(), None, "generated offline on first build"))
            continue
        try:
            r = resolve_source(role, source, workspace, recipe_path.parent, pins.get(role.key))
        except FetchError as e:
            planned.append(PlannedSource(role, source.describe(), None, f"unresolved: {e}"))
            continue
        resolved.append(r)
        planned.append(PlannedSource(role, source.describe(), r.commit))
    build_id, resolution = None, None
    if len(resolved) == len(planned):
        from convert.resolve import tool_versions

        resolution = Resolution(recipe, recipe_path, tuple(resolved), tool_versions())
        build_id = resolution.build_id
        if pinned is not None:
            lockfile.check_locked(lock_file, pinned, lockfile.lock_document(resolution))
    components = [
        PlannedComponent(c, weights_label(recipe, c, recipe.settings_for(c).weights), recipe.precisions_for(c) if not c.startswith("tokenizer") else [],
                         dict(recipe.settings_for(c).runtime_options))
        for c in recipe.exported_components()
    ]
    output = workspace.bundle_dir(recipe.name, build_id or "<build-id>")
    needs, machine = needs_of(resolution, workspace) if resolution else (None, None)
    return Plan(recipe, recipe_path, planned, components, planned_checks(recipe), output, build_id, needs, machine)


def needs_of(resolution: Resolution, workspace: Workspace) -> tuple[Needs, Machine]:
    """The build's estimated memory and disk (components the cache holds are neither exported nor stored)."""
    from convert.component_cache import ENTRY_INFO, component_keys
    from convert.fetch import _cache_root

    cache = ComponentCache(workspace.component_cache)
    cached = frozenset(c for c, k in component_keys(resolution).items() if (cache.entry(k) / ENTRY_INFO).is_file())
    needs = budget.resolution_needs(resolution, workspace, cached=cached)
    machine = budget.machine_for({"downloads": _cache_root(workspace.hf_cache), "single file as diffusers": workspace.artifacts,
                           "bundle": workspace.artifacts, "component cache": workspace.component_cache})
    return needs, machine


def build(recipe_path: Path, workspace: Workspace, *, force: bool = False, progress: Progress | None = None,
          locked: bool = False) -> BuildResult:
    """Build a recipe; `locked` builds exactly what its lock file pins (or fails, exit 3), and
    without it a successful build refreshes an existing lock file."""
    recipe = prepare_build(recipe_path, workspace)
    with staging_mod.recipe_lock(workspace, recipe.name):
        return build_holding_lock(recipe, recipe_path, workspace, force=force, progress=progress, locked=locked)


def check_scheduler_of(recipe: Recipe, recipe_path: Path) -> None:
    """A scheduler override diffusers cannot build fails before anything is downloaded (exit 2)."""
    if recipe.scheduler is None:
        return
    from convert.single_file import check_scheduler

    problem = check_scheduler(recipe.scheduler)
    if problem:
        raise RecipeError(f"{recipe_path}: scheduler.{problem}", hint="fix the recipe's scheduler section")


def prepare_build(recipe_path: Path, workspace: Workspace) -> Recipe:
    """Load the recipe and check the artifacts folder before taking the recipe's lock."""
    recipe = load_recipe(recipe_path)
    check_scheduler_of(recipe, recipe_path)
    check_folders_apart(recipe, recipe_path, workspace)  # before anything is created
    disk.check_writable(workspace.artifacts, (*WORK_FOLDERS, recipe.name))
    cache = workspace.component_cache
    if cache.exists() and not cache.is_dir():  # else every export would only warn that it cannot store
        raise PackageError(f"cannot write {cache}: it is {'a file, ' if cache.is_file() else ''}not a folder",
                           hint="point --cache or SDXL_CONVERT_CACHE at a folder")
    disk.keep_free_bytes()  # a malformed reserve fails now, not after the fetch
    staging_mod.remove_stale_staging(workspace)
    return recipe


def check_folders_apart(recipe: Recipe, recipe_path: Path, workspace: Workspace) -> None:
    """The build's output folders never lie inside its own inputs, nor the cache on the artifacts root.

    Writing into a local source changes the content its build id hashes (every build a new id,
    the next one reading its predecessor's output as input); a cache at the artifacts root mixes
    its two-letter shard folders with recipe folders.
    """
    outputs = {"--artifacts": workspace.artifacts, "--cache": workspace.component_cache}
    if workspace.hf_cache is not None:
        outputs["the Hugging Face cache"] = workspace.hf_cache
    for role, source in source_roles(recipe):
        if source.local is None:
            continue
        try:
            folder = source.local.folder(recipe_path.parent)
        except (RuntimeError, OSError):  # a symlink loop: resolve says so in its own words
            continue
        for option, out in outputs.items():
            if disk.is_under(out, folder):
                raise PackageError(f"{option} {out} lies inside the local source {role} ({folder}): the build would "
                                   "write into its own input", hint=f"point {option} at a folder outside {folder}")
    if workspace.component_cache.resolve() == workspace.artifacts.resolve() or disk.is_under(
            workspace.artifacts, workspace.component_cache):
        raise PackageError(f"--cache {workspace.component_cache} is the artifacts folder {workspace.artifacts} or holds it",
                           hint="leave --cache out (it defaults to <artifacts>/cache) or point it at a folder of its own")


def build_holding_lock(recipe: Recipe, recipe_path: Path, workspace: Workspace, *, force: bool = False,
                       progress: Progress | None = None, locked: bool = False,
                       resolution: Resolution | None = None) -> BuildResult:
    """`build` for a caller that holds the recipe's lock (rebuild holds it across build and publish);
    `resolution`: one the caller already made, so a branch cannot move between its check and the build."""
    notify = progress or (lambda _m: None)
    _remove_interrupted_replacements(workspace, recipe.name)
    result, resolution = _locked_build(recipe, recipe_path, workspace, force, notify, locked, resolution)
    path = lockfile.lock_path(recipe_path)
    if not locked and path.is_file():
        lockfile.write_lock(path, lockfile.lock_document(resolution))
    return result


def lock(recipe_path: Path, workspace: Workspace) -> tuple[Path, dict[str, Any], list[str]]:
    """Resolve (metadata only) and write the recipe's lock; returns it and what changed since the last one."""
    recipe = load_recipe(recipe_path)
    with redirect_output(workspace.log_file(recipe.name, "resolve")):
        document = lockfile.lock_document(resolve(recipe, recipe_path, workspace))
    path = lockfile.lock_path(recipe_path)
    changes = ["new lock"]
    if path.exists():
        try:
            changes = lockfile.diff_locks(lockfile.read_lock(path), document)
        except FetchError as e:  # `lock` is the cure for a damaged lock, so it replaces it instead of refusing
            changes = [f"replaced an unreadable lock ({e.message})"]
    lockfile.write_lock(path, document)
    return path, document, changes


def _resolve(recipe: Recipe, recipe_path: Path, workspace: Workspace, locked: bool) -> Resolution:
    if not locked:
        return resolve(recipe, recipe_path, workspace)
    path = lockfile.lock_path(recipe_path)
    pinned = lockfile.read_lock(path)
    resolution = resolve(recipe, recipe_path, workspace, pins=lockfile.pins(pinned))
    lockfile.check_locked(path, pinned, lockfile.lock_document(resolution))
    return resolution


def _locked_build(recipe: Recipe, recipe_path: Path, workspace: Workspace, force: bool, notify: Progress,
                  locked: bool, resolved: Resolution | None) -> tuple[BuildResult, Resolution]:
    timings = StageTimes()
    t0 = time.monotonic()
    if resolved is None:
        notify("resolve: pinning sources (generated sources are built on first use)")
        with _stage("resolve", timings, workspace, FetchError), redirect_output(workspace.log_file(recipe.name, "resolve")):
            resolution = _resolve(recipe, recipe_path, workspace, locked)
    else:
        resolution = resolved
    timings["resolve"] = time.monotonic() - t0
    build_id = resolution.build_id
    dest = workspace.bundle_dir(recipe.name, build_id)
    if dest.is_dir() and not force and not package.verify(dest):
        notify(f"up to date: {dest}")
        info = package.load_bundle(dest)
        return _result_from_existing(info, resolution), resolution

    needs, machine = needs_of(resolution, workspace)
    notify(f"plan: {needs.describe()}")
    problems = budget.shortfalls(needs, machine)
    stores = True
    if problems and needs.disk.get("component cache") and not budget.shortfalls(needs.without("component cache"), machine):
        # the cache only saves later exports; the bundle is the job (a 14 GB CI runner holds downloads + bundle only)
        stores, problems, needs = False, [], needs.without("component cache")
        free = budget.gb(machine.free[machine.shares["component cache"]])
        notify(f"component cache: not storing this build's components ({free} GB free holds the downloads and the "
               f"bundle, not a second copy of it); a later change re-exports them")
    if problems:
        raise ResourcesError(f"{recipe.name} does not fit this machine: {'; '.join(problems)}", hint=budget.FIT_HINT)
    with _stage("staging", StageTimes(), workspace, PackageError):
        staging = staging_mod.new_staging(workspace, build_id)
    bundle_dir = staging / "bundle"
    log_path = workspace.log_file(recipe.name)
    try:
        bundle_dir.mkdir()
        log_path.unlink(missing_ok=True)
        return _build_into(resolution, staging, bundle_dir, dest, workspace, notify, timings, log_path, needs,
                           stores), resolution
    except ConvertError as e:
        raise _named_by_source(e, staging, resolution)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _named_by_source(error: ConvertError, staging: Path, resolution: Resolution) -> ConvertError:
    """The same error with staged copies of sources named as the user wrote them (`<local:./base>`).

    The staging folder is deleted when the build ends, so a message quoting it points nowhere.
    """
    names = [(str(staging / "sources" / s.role.folder_name), f"<{s.source.describe()}>") for s in resolution.sources]
    names += [(str(staging / "sources" / "base_diffusers"), f"<{resolution.recipe.base.describe()} read as diffusers>"),
              (str(staging), "<this build's staging folder>")]

    def rename(text: str) -> str:
        for staged, shown in sorted(names, key=lambda n: -len(n[0])):  # `base_diffusers` before its prefix `base`
            text = text.replace(staged, shown)
        return text

    if str(staging) in str(error):
        error.message, error.hint = rename(error.message), error.hint and rename(error.hint)
        error.path = error.path and Path(rename(str(error.path)))
        error.args = (error.one_line(),)
    return error


def _remove_interrupted_replacements(workspace: Workspace, recipe_name: str) -> None:
    """`<build-id>.old` folders: what an older version's `--force` left when it was killed mid-rename."""
    folder = workspace.artifacts / recipe_name
    for old in folder.glob("*.old") if folder.is_dir() else []:
        log.warning("removing %s, a bundle an interrupted --force build was replacing", old)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _stage(name: str, timings: StageTimes, workspace: Workspace, error: type[ConvertError],
           log: Path | None = None, need: int | None = None) -> Iterator[None]:
    """Time a stage; with `log`, its libraries' output goes there instead of the terminal.

    A full disk or a refused write under the artifacts folder becomes the stage's own one-line error.
    """
    started = time.monotonic()
    try:
        with redirect_output(log) if log else nullcontext():
            yield
    except OSError as e:
        mapped = disk.io_error(e, workspace.artifacts, need, error)
        if mapped is None:
            raise
        raise mapped from e
    timings[name] = time.monotonic() - started
    timings.peaks[name] = peak_rss_gib()


def peak_rss_gib() -> float:
    """This process's largest RSS so far (export and validation run in it).

    VmHWM, the peak of this process's own memory map: ru_maxrss also carries the peak of the
    process that started it across exec (a convert started by a test process of a few GiB
    reported that as its own peak). ru_maxrss (KiB on Linux) where /proc is not there.
    """
    import resource

    try:
        status = Path("/proc/self/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StageTimes(dict[str, float]):
    """Seconds per stage, and in `peaks` the process's peak RSS (GiB) at the end of each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: dict[str, float] = {}


def _build_into(resolution: Resolution, staging: Path, bundle_dir: Path, dest: Path, workspace: Workspace,
                notify: Progress, timings: StageTimes, log: Path, needs: Needs | None = None,
                stores: bool = True) -> BuildResult:
    from convert.export import export_pipeline
    from convert.patch import patch
    from convert.quantize import Quantized, quantize_stage
    from validate.checks import run_validation

    recipe = resolution.recipe
    fetched: dict[SourceRole, FetchedSource] = {}
    with _stage("fetch", timings, workspace, FetchError):  # not redirected: the Hub client's download bars stay visible
        for source in resolution.sources:
            notify(f"fetch: {source.role} ({source.source.describe()})")
            folder = staging / "sources" / source.role.folder_name
            fetched[source.role] = fetch(source, folder, cache_dir=workspace.hf_cache, family=recipe.family)
    if needs_materializing(recipe):
        with _stage("materialize", timings, workspace, PatchError, log):
            notify("patch: reading the single file and fusing LoRAs with diffusers' loaders")
            fetched[SourceRole.base()], _fused = materialize(recipe, fetched, staging / "sources" / "base_diffusers")
    need = disk.bundle_bytes(weight_params(fetched, recipe.family), exported_weights(recipe))
    disk.check_free_space(workspace.artifacts, need, ExportError)

    with _stage("patch", timings, workspace, PatchError, log, need):
        notify("patch: loading the pipeline and substituting components")
        substitutes = substitutes_of(fetched)
        allow = {"base": recipe.base.allow_pickle} | {k: s.source.allow_pickle for k, s in recipe.substitutions.items()}
        patched = patch(fetched[SourceRole.base()], substitutes, allow, recipe.family)
        rescaled = fp16fix.rescale_stage(patched, recipe, staging / "rescaled_vae", notify)
        apply_scheduler(patched.pipeline, recipe.scheduler)

    with _stage("export", timings, workspace, ExportError, log, need):
        cache = ComponentCache(workspace.component_cache, stores)
        cache.remove_stale_temporaries()
        exported = export_pipeline(patched, recipe, bundle_dir, resolution.build_id, notify, cache,
                                   key_inputs(resolution))
        # after the cache: a rewritten VAE IR is a new file (save_atomically), never the cached one
        exported, scaled = fp16fix.runtime_stage(bundle_dir, recipe, patched, exported, notify)
    native = recipe.family.native_resolution(patched.pipeline)
    quantized: list[Quantized] = []
    if recipe.quantized():
        with _stage("quantize", timings, workspace, ExportError, log, need):
            quantized = quantize_stage(bundle_dir, staging / "reference", recipe, native, notify)
    components = [
        package.ComponentInfo(
            name=e.name, weights=weights_label(recipe, e.name, e.weights),
            inference_precision=recipe.precisions_for(e.name) if not e.name.startswith("tokenizer") else [],
            runtime_options=e.runtime_options, files=[str(e.xml.relative_to(bundle_dir))], cache_key=e.cache_key or None)
        for e in exported
    ]
    reused = [e.name for e in exported if e.reused]

    with _stage("validate", timings, workspace, ValidationError, log, need):
        notify("validate: decoding at the target precisions")
        report = run_validation(bundle_dir, patched, recipe, notify, {q.part: q.reference for q in quantized})
        report.quantized = [q.describe() for q in quantized]
        report.fp16_fixes = fp16fix.merge_records(rescaled, scaled)
        report.write(bundle_dir / "validation")
    del patched

    headline = report.headline()
    with _stage("package", timings, workspace, PackageError, need=need):
        package.write_build_info(bundle_dir, package.build_info(resolution, components, report.fit_checks))
        (bundle_dir / "recipe.yaml").write_text(resolution.recipe_path.read_text())
        (bundle_dir / package.CARD).write_text(
            package.model_card(resolution, components, headline, report.to_markdown(image_dir="validation"))
        )
        if not report.passed:
            broken = package.move_aside(bundle_dir, workspace.broken, resolution.build_id)
            raise ValidationFailed(report.failures, path=broken)
        notify("package: manifest and atomic rename")
        bundle = package.finalize(bundle_dir, dest, resolution.build_id, trash=staging / "replaced")
    return BuildResult(
        bundle=bundle.path,
        build_id=resolution.build_id,
        reused=False,
        components=components,
        headline=headline,
        timings=dict(timings),
        peak_rss_gib=timings.peaks,
        sources=[s.lock_entry() for s in resolution.sources],
        reused_components=reused,
        exported_components=[e.name for e in exported if not e.reused],
        needs=needs,
        disk_written={"downloads": sum(f.bytes_downloaded for f in fetched.values()),
                      "bundle": disk.folder_bytes(bundle.path),
                      "component cache": sum(disk.folder_bytes(bundle.path / e.name) for e in exported if not e.reused)
                      if stores else 0},
    )


def weights_label(recipe: Recipe, part: str, weights: str) -> str:
    """The component's weights as build.json and the card show them: int8 activations named."""
    quant = recipe.settings_for(part).quantized_activations() if not part.startswith("tokenizer") else None
    return f"int8 {quant.mode} (weights + activations)" if quant else weights


def substitutes_of(fetched: dict[SourceRole, FetchedSource]) -> dict[str, FetchedSource]:
    """component -> the fetched source that replaces it."""
    return {role.component: f for role, f in fetched.items() if role.component is not None}


def weight_params(fetched: dict[SourceRole, FetchedSource], family: PipelineFamily) -> dict[str, int]:
    """Parameters per pipeline folder (text_encoder, unet, vae, ...), substitutes in place, from headers."""
    folders = {c: fetched[SourceRole.base()].path / c for c in family.loaders}
    folders |= {c: f.path for c, f in substitutes_of(fetched).items()}
    return {c: folder_params(folder) for c, folder in folders.items()}


def exported_weights(recipe: Recipe) -> dict[str, str]:
    """Weight format per exported submodel as the disk holds it during the build (`disk.BYTES_PER_WEIGHT`)."""
    quantized = recipe.quantized()
    return {c: "fp32+int8" if c in quantized else recipe.settings_for(c).weights
            for c in recipe.family.weighted if recipe.settings_for(c).export}


def _result_from_existing(bundle: package.Bundle, resolution: Resolution) -> BuildResult:
    info = package.read_build_info(bundle.path)
    report_path = bundle.path / REPORT
    return BuildResult(
        bundle=bundle.path,
        build_id=bundle.build_id,
        reused=True,
        components=list(info.components),
        headline=read_headline(bundle.path) if report_path.is_file() else None,
        sources=[s.lock_entry() for s in resolution.sources],
    )


def read_headline(bundle: Path) -> Headline:
    """A reused bundle's verdicts, from its report; one-line PackageError if this tool cannot read them."""
    import json

    hint = "rebuild the bundle with `convert --force`"
    try:
        report = json.loads((bundle / REPORT).read_bytes())
        if not isinstance(report, dict) or "headline" not in report:
            raise MalformedHeadline("headline: missing")
        return Headline.from_json(report["headline"])
    except OSError as e:
        raise PackageError(f"cannot read {REPORT} ({e.strerror})", path=bundle, hint=hint) from e
    except ValueError as e:  # not UTF-8, not JSON, or not the shape this tool writes (MalformedHeadline)
        raise PackageError(f"{REPORT} cannot be read back: {e}", path=bundle, hint=hint) from e
