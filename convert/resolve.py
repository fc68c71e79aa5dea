"""Stage 1: pin every source to an immutable commit before anything is downloaded.

A Hub branch can move between two requests; everything after this stage refers to
the 40-hex commit recorded here (and in the bundle's lock), never to `main`.
Local and generated folders are pinned by a content digest instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.disk import io_error
from convert.errors import FetchError
from convert.hub import HubFile, file_sha256, http_status, hub_files, root_cause
from convert.recipe import Recipe, Source, recipe_digest
from convert.roles import SourceRole
from convert.workspace import Workspace

log = logging.getLogger(__name__)

#: Packages whose versions change the output; part of the build id.
TOOL_PACKAGES: tuple[str, ...] = (
    "sdxl-openvino",
    "openvino",
    "openvino-tokenizers",
    "optimum-intel",
    "optimum",
    "nncf",
    "diffusers",
    "transformers",
    "torch",
    "huggingface_hub",
    "safetensors",
)


#: A file of a pinned source (convert.hub.HubFile): fetch verifies the download against its hash.
SourceFile = HubFile


@dataclass(frozen=True)
class ResolvedSource:
    role: SourceRole
    source: Source
    commit: str  # 40-hex Hub commit, or "sha256:<digest>" of a local/generated folder
    files: tuple[SourceFile, ...]
    local_path: Path | None = None  # set for local and generated sources

    def lock_entry(self) -> dict[str, Any]:
        """What build.json and the card record: a local source's path as the recipe wrote it, never resolved."""
        entry: dict[str, Any] = {"role": self.role.key, "source": self.source.describe(), "commit": self.commit}
        if self.source.hub:
            entry |= {"repo": self.source.hub.repo, "revision": self.source.hub.revision}
        if self.source.file is not None:
            sha = next((f.sha256 for f in self.files if f.path == self.source.file), None)
            entry |= {"file": self.source.file, "sha256": sha}
        return entry

    def pin(self) -> dict[str, str]:
        """What the build id hashes: the commit or content digest; where the recipe says it
        comes from is in the recipe digest, except a local folder's path (content only)."""
        return {"role": self.role.key, "commit": self.commit}


@dataclass(frozen=True)
class Resolution:
    recipe: Recipe
    recipe_path: Path
    sources: tuple[ResolvedSource, ...]
    tool_versions: dict[str, str] = field(default_factory=dict)

    @property
    def build_id(self) -> str:
        """Hash of (recipe meaning, source commits, tool versions): names bundle, tag and cache keys."""
        payload = {
            "recipe": recipe_digest(self.recipe),
            "sources": [s.pin() for s in self.sources],
            "tools": self.tool_versions,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def source(self, role: SourceRole) -> ResolvedSource:
        for s in self.sources:
            if s.role == role:
                return s
        raise KeyError(role)

    def entry(self, source: ResolvedSource) -> dict[str, Any]:
        """A LoRA's lock entry carries its fusion scale: the same file at another scale is another model."""
        entry = source.lock_entry()
        if source.role.index is not None:
            entry["scale"] = self.recipe.lora[source.role.index].scale
        return entry

    def lock(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "recipe_sha256": recipe_digest(self.recipe),
            "build_id": self.build_id,
            "sources": [self.entry(s) for s in self.sources],
            "tools": self.tool_versions,
        }


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def source_roles(recipe: Recipe) -> list[tuple[SourceRole, Source]]:
    """Every source a build reads: base, its config source (single-file base), substitutes, LoRAs."""
    roles: list[tuple[SourceRole, Source]] = [(SourceRole.base(), recipe.base)]
    if recipe.base.file is not None:
        roles.append((SourceRole.config(), recipe.base.config or default_config_source(recipe)))
    roles += [(SourceRole.substitution(name), sub.source) for name, sub in recipe.substitutions.items()]
    roles += [(SourceRole.lora(i), lora.source) for i, lora in enumerate(recipe.lora)]
    return roles


def default_config_source(recipe: Recipe) -> Source:
    """The family's pinned config repo: configs and tokenizers of it are fetched, never its weights."""
    from convert.recipe import HubSource

    single = recipe.family.single_file
    assert single is not None  # the recipe validator refuses a single-file base of a family without one
    return Source(hub=HubSource(repo=single.config_repo, revision=single.config_commit))


def resolve(recipe: Recipe, recipe_path: Path, workspace: Workspace, pins: Mapping[str, str] | None = None) -> Resolution:
    """Pin all sources; generated sources are built here (offline) so they can be hashed.

    `pins` (role key -> commit, from a lock file) replaces a Hub source's branch by the commit it
    was locked at; a commit the Hub no longer serves is a FetchError like any missing revision.
    """
    sources = tuple(resolve_source(role, src, workspace, recipe_path.parent, (pins or {}).get(role.key))
                    for role, src in source_roles(recipe))
    return Resolution(recipe=recipe, recipe_path=recipe_path, sources=sources, tool_versions=tool_versions())


def resolve_source(role: SourceRole, source: Source, workspace: Workspace, recipe_dir: Path,
                   pin: str | None = None) -> ResolvedSource:
    """Pin one source; `recipe_dir` anchors a local source's relative path."""
    if source.hub is not None:
        resolved = _resolve_hub(role, source, pin)
        if source.file is not None and not any(f.path == source.file for f in resolved.files):
            raise FetchError(f"{role}: {source.hub.repo}@{resolved.commit[:12]} has no file {source.file}",
                             hint="check the file name (and folder) in the repo at that revision")
        return resolved
    if source.local is not None:
        try:
            folder = source.local.folder(recipe_dir)
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise FetchError(f"{role}: local source path {recipe_dir / source.local.path} cannot be resolved ({e})",
                             hint="fix the path or the symlinks it goes through") from None
        if source.file is not None:
            return _resolve_file(role, source, folder)
        if folder.is_file():
            raise FetchError(
                f"{role}: local source {folder} is a file; a local source is a folder in diffusers layout",
                hint="point path at the folder that holds model_index.json (or the component's config.json)",
            )
        if not folder.is_dir():
            raise FetchError(
                f"{role}: local source folder {folder} does not exist",
                hint="fix the path (relative paths are relative to the recipe) or build the folder first",
            )
        _check_diffusers_folder(role, folder, source.local.subfolder)
        return _resolve_folder(role, source, folder)
    assert source.generated is not None
    if source.file is not None:
        return _resolve_file(role, source, materialize_generated(source, workspace))
    return _resolve_folder(role, source, materialize_generated(source, workspace))


def _resolve_file(role: SourceRole, source: Source, folder: Path) -> ResolvedSource:
    """A single-file source is pinned by that file's sha256 alone; nothing else of the folder is read."""
    assert source.file is not None
    path = folder / source.file
    if not path.is_file():
        raise FetchError(f"{role}: no file {source.file} in {folder}", hint="check the path and file in the recipe")
    entry = SourceFile(path=source.file, size=path.stat().st_size, sha256=file_sha256(path))
    return ResolvedSource(role=role, source=source, commit=f"sha256:{entry.sha256}", files=(entry,), local_path=folder)


def _check_diffusers_folder(role: SourceRole, folder: Path, subfolder: str | None) -> None:
    """Look for the diffusers marker before hashing: `path: /` or `~` would otherwise read every file below."""
    marker = "model_index.json" if role.kind in ("base", "config") else "config.json"  # a config source is a pipeline
    root = folder / subfolder if subfolder else folder
    if not (root / marker).is_file():
        raise FetchError(
            f"{role}: no {marker} in {root}; a local source is a folder in diffusers layout",
            hint="point path (and subfolder) at the folder that holds it; a single-file checkpoint is not supported",
        )


def generated_dir(source: Source, workspace: Workspace) -> Path:
    assert source.generated is not None
    gen = source.generated
    from convert.testing import GENERATORS, generator_version  # light: hashes the generator's source

    version = generator_version(gen.generator) if gen.generator in GENERATORS else "unknown"
    return workspace.generated_sources / f"{gen.generator}-seed{gen.seed}-{version}"


def materialize_generated(source: Source, workspace: Workspace) -> Path:
    """Build a generated source once; later builds reuse the folder (its name keys generator, seed, version)."""
    from convert import testing

    assert source.generated is not None  # its generator name was checked when the recipe loaded
    folder = generated_dir(source, workspace)
    if folder.is_dir():
        return folder
    log.info("generating %s (seed %d) into %s", source.generated.generator, source.generated.seed, folder)
    from convert.staging import new_staging

    # Written in a private staging folder and renamed: a build killed while generating leaves no
    # half-written source for the next one to reuse, and two builds never write into one folder.
    scratch = new_staging(workspace, f"generate-{folder.name}")
    try:
        testing.generate(source.generated.generator, scratch / "out", source.generated.seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch / "out", folder)
        except OSError:
            if not folder.is_dir():  # else another build generated the same source first: use that one
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _resolve_folder(role: SourceRole, source: Source, folder: Path) -> ResolvedSource:
    files = tuple(
        SourceFile(path=rel, size=(folder / rel).stat().st_size, sha256=file_sha256(folder / rel))
        for rel in list_folder(folder)
    )
    digest = hashlib.sha256("\n".join(f"{f.path}\t{f.sha256}" for f in files).encode()).hexdigest()
    return ResolvedSource(role=role, source=source, commit=f"sha256:{digest}", files=files, local_path=folder)


def list_folder(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _resolve_hub(role: SourceRole, source: Source, pin: str | None = None) -> ResolvedSource:
    from huggingface_hub import HfApi

    assert source.hub is not None
    hub = source.hub
    revision = pin if pin and not pin.startswith("sha256:") else hub.revision
    try:
        info = HfApi().model_info(hub.repo, revision=revision, files_metadata=True)
    except Exception as e:  # wrapped into one line by hub_error
        raise hub_error(role, hub.repo, revision, e) from e
    if not info.sha:
        raise FetchError(f"{role}: the Hub returned no commit for {hub.repo}@{hub.revision}")
    files = tuple(hub_files(info.siblings or []))
    log.info("%s: %s@%s -> %s", role, hub.repo, hub.revision, info.sha)
    return ResolvedSource(role=role, source=source, commit=info.sha, files=files)


def hub_error(role: SourceRole, repo: str, revision: str, error: Exception, cache: Path | None = None) -> FetchError:
    """Map huggingface_hub's exceptions to one line that says what to do.

    A wrapped cause (convert.hub.root_cause) is what the user needs.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    error = root_cause(error)
    name = f"{role}: {repo}@{revision}"
    if isinstance(error, hf_errors.GatedRepoError):
        return FetchError(
            f"{name} is gated",
            hint=f"accept the licence at {constants.ENDPOINT}/{repo} and set HF_TOKEN to a token of that account",
        )
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return FetchError(f"{name}: revision not found", hint="check the branch, tag or commit in the recipe")
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return FetchError(f"{name}: repository not found", hint="check the repo id; if it is private, set HF_TOKEN")
    if isinstance(error, hf_errors.RemoteEntryNotFoundError):
        return FetchError(f"{name}: file not found on the Hub", hint="check the subfolder/variant in the recipe")
    if isinstance(error, hf_errors.HfHubHTTPError):
        status = http_status(error)
        if status in (401, 403):
            return FetchError(f"{name}: access denied (HTTP {status})", hint="set HF_TOKEN to a token that can read it")
        return FetchError(f"{name}: the Hub answered HTTP {status}", hint="retry later; files already downloaded are reused")
    if isinstance(error, hf_errors.LocalEntryNotFoundError):
        return FetchError(f"{name}: not downloaded and not in the cache", hint="check the network or HF_ENDPOINT and retry")
    if isinstance(error, OSError):  # the cache, not the Hub: a full disk or a folder we may not write
        mapped = io_error(error, Path(cache or constants.HF_HUB_CACHE), None, FetchError)
        if mapped is not None:
            return FetchError(f"{name}: {mapped.message}",
                              hint="free space or fix the Hugging Face cache's permissions, or set HF_HUB_CACHE to another folder")
    if isinstance(error, (OSError, ConnectionError)) or "connect" in type(error).__name__.lower():
        return FetchError(
            f"{name}: the Hub is unreachable at {constants.ENDPOINT} ({type(error).__name__})",
            hint="check the network or HF_ENDPOINT, or use a local source",
        )
    first_line = str(error).splitlines()[0] if str(error) else ""
    return FetchError(f"{name}: {type(error).__name__}: {first_line}")
