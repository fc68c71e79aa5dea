"""Stage 6: turn a validated staging folder into a self-contained, verifiable bundle.

The bundle is usable as is by optimum-intel and openvino-genai (it is their folder
layout) and carries its own proof: a manifest of every file's size and sha256, the
resolved recipe and lock, tool versions, the validation report and a model card.
It appears under its final name only by an atomic rename, so a crash leaves no
half-written bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from convert.errors import PackageError
from convert.readback import UnreadableFile, read_json
from convert.recipe import Recipe
from convert.resolve import Resolution, file_sha256
from convert.roles import SourceRole
from validate.headline import Headline

MANIFEST = "manifest.json"
BUILD_INFO = "build.json"
CARD = "README.md"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Bundle:
    path: Path
    build_id: str
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]


def manifest_for(folder: Path, build_id: str) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"manifest_version": MANIFEST_VERSION, "build_id": build_id, "files": files}


def verify(folder: Path) -> list[str]:
    """Problems with a bundle (missing/changed/extra files); empty means it verifies."""
    path = folder / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest"]
    try:
        manifest = read_json(path)
        listed: dict[str, dict[str, Any]] = manifest["files"]
        if not isinstance(manifest["build_id"], str) or not isinstance(listed, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys()
                                                   for e in listed.values()):
            raise TypeError("'files' must map each path to its size and sha256")
    except (OSError, UnreadableFile, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{path}: unreadable manifest ({e})"]
    problems = []
    links = _links_in(folder)
    for rel, entry in listed.items():
        file = folder / rel
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            problems.append(f"{rel}: outside the bundle")  # a hostile manifest must not make us read (or publish) /etc
        elif any(rel == link or rel.startswith(f"{link}/") for link in links):
            problems.append(f"{rel}: a symbolic link (or inside one); a bundle holds its own files, never a link out of itself")
        elif not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {file.stat().st_size} != {entry['size']}")
        elif file_sha256(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(listed) - {MANIFEST})]
    problems += [f"{link}: a symbolic link; a bundle holds its own files, never a link out of itself"
                 for link in sorted(links) if not any(rel == link or rel.startswith(f"{link}/") for rel in listed)]
    return problems


def _links_in(folder: Path) -> set[str]:
    """Relative paths of the symbolic links under `folder` (not followed): files or folders.

    Except the Hugging Face cache's own: a downloaded bundle (`.../snapshots/<commit>/`) is links
    into the repo's content-addressed `blobs/`, which is how the Hub client stores every file.
    """
    blobs = folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.is_symlink() and not (blobs is not None and path.resolve().parent == blobs.resolve()):
                found.add(path.relative_to(folder).as_posix())
    return found


def load_bundle(folder: Path) -> Bundle:
    problems = verify(folder)
    if problems:
        raise PackageError(f"bundle does not verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                           path=folder, hint="rebuild it with `convert`")
    manifest = json.loads((folder / MANIFEST).read_text())
    return Bundle(path=folder, build_id=manifest["build_id"], manifest=manifest)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_OPTIONAL_LOCK_KEYS = ("repo", "revision", "file", "sha256", "scale")


class LockedSource(_Record):
    role: str
    source: str = Field(description="The source as the recipe names it (Source.describe()).")
    commit: str = Field(description="40-hex Hub commit, or sha256:<digest> of a local/generated folder.")
    repo: str | None = None  # Hub sources only; absent from the JSON otherwise
    revision: str | None = None
    file: str | None = None  # single-file sources (checkpoints, LoRAs) only
    sha256: str | None = None  # that file's sha256
    scale: float | None = None  # LoRAs only: the fusion scale

    @model_serializer(mode="wrap")
    def _hub_keys_only_for_hub(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in _OPTIONAL_LOCK_KEYS}


class Lock(_Record):
    recipe: str
    recipe_sha256: str
    build_id: str
    sources: list[LockedSource]
    tools: dict[str, str]


class ComponentInfo(_Record):
    """One exported submodel or tokenizer: what build.json, the card's table and the CLI summary show."""

    name: str
    weights: str
    inference_precision: list[str]  # empty for tokenizers
    runtime_options: dict[str, str]
    files: list[str]  # its IR, relative to the bundle
    cache_key: str | None = None  # the component cache key (convert.component_cache); None for tokenizers

    def to_json(self) -> dict[str, Any]:
        """`--json`'s shape: no cache_key key for a tokenizer (build.json writes it as null)."""
        return self.model_dump(exclude={"cache_key"} if self.cache_key is None else set())


class BuildInfo(_Record):
    """build.json: what a bundle was built from, read back (and validated) by publish and by a rebuild.

    The recipe is stored resolved and re-validated on reading, as rattler-build reads back its
    rendered recipe: a build.json this tool cannot read is refused rather than half-understood.
    """

    build_id: str
    recipe: Recipe
    lock: Lock
    components: list[ComponentInfo]
    fit_checks: list[str]


def build_info(resolution: Resolution, components: list[ComponentInfo], checks: list[str]) -> BuildInfo:
    return BuildInfo(build_id=resolution.build_id, recipe=resolution.recipe, lock=Lock(**resolution.lock()),
                     components=list(components), fit_checks=checks)


def write_build_info(folder: Path, info: BuildInfo) -> None:
    write_json(folder / BUILD_INFO, info.model_dump(mode="json"))


def read_build_info(folder: Path) -> BuildInfo:
    """The bundle's build.json, validated; one-line PackageError if it is missing or does not fit the schema."""
    path = folder / BUILD_INFO
    try:
        return BuildInfo.model_validate_json(path.read_bytes())
    except OSError as e:
        raise PackageError(f"cannot read {BUILD_INFO} ({e.strerror})", path=folder, hint="rebuild it with `convert`") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "root"
        raise PackageError(f"{BUILD_INFO} does not fit this tool's schema at {where}: {first['msg']}", path=folder,
                           hint="rebuild it with this version of `convert`") from e


def card_metadata(resolution: Resolution, headline: Headline | None) -> dict[str, Any]:
    recipe = resolution.recipe
    base_model = recipe.base_model or (recipe.base.hub.repo if recipe.base.hub else None)
    meta: dict[str, Any] = {"library_name": "openvino", "pipeline_tag": recipe.family.task}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["license"] = recipe.base.license or "other"
    meta["tags"] = sorted({"openvino", *recipe.family.tags, recipe.family.task, *(recipe.publish.tags if recipe.publish else [])})
    meta["upstream"] = {s.role.key: s.commit for s in resolution.sources}
    meta["upstream_sources"] = {s.role.key: s.source.describe() for s in resolution.sources}  # "has it moved?" in one call
    meta["substitution_licenses"] = {k: v.source.license or "unknown" for k, v in recipe.substitutions.items()}
    meta["build_id"] = resolution.build_id
    meta["validation"] = headline.to_json() if headline is not None else {}
    return meta


def model_card(resolution: Resolution, components: list[ComponentInfo], headline: Headline | None, summary_md: str) -> str:
    recipe = resolution.recipe
    front = yaml.safe_dump(card_metadata(resolution, headline), sort_keys=False).strip()
    lines = [f"---\n{front}\n---", "", f"# {recipe.name} (OpenVINO IR)", "", recipe.description.strip(), ""]
    for name, sub in recipe.substitutions.items():
        lines.append(
            f"**Substituted {name}:** `{sub.source.describe()}` (licence: {sub.source.license or 'unknown'}). "
            f"Why: {' '.join(sub.reason.split()) or 'not stated in the recipe'}"
        )
        lines.append("")
    lines += _community_lines(resolution)
    lines += ["## Components", "", "| component | weights | runs at | runtime options |", "|---|---|---|---|"]
    for c in components:
        options = ", ".join(f"{k}={v}" for k, v in c.runtime_options.items()) or "-"
        lines.append(f"| {c.name} | {c.weights} | {', '.join(c.inference_precision) or '-'} | {options} |")
    lines += ["", "## Validation", "", summary_md.strip(), "", "## Provenance", ""]
    for s in resolution.sources:
        lines.append(f"- {s.role}: `{s.source.describe()}` at `{s.commit}`")
    lines.append(f"- build id `{resolution.build_id}`; tool versions in `{BUILD_INFO}`; every file's sha256 in `{MANIFEST}`")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *recipe.family.usage(),
        "```",
        "",
        *_device_lines(recipe),
    ]
    return "\n".join(lines)


def _device_lines(recipe: Recipe) -> list[str]:
    """What precision the user's device will really compute, and how to pin the one the gate judged."""
    if recipe.target.device != "CPU":
        return []
    judged = sorted({p for part in recipe.exported_components() if not part.startswith("tokenizer")
                     for p in recipe.precisions_for(part)})
    lines = ["On a CPU, OpenVINO computes bf16 by default where the CPU has avx512_bf16 or AMX (recent Xeons, "
             "AMD Zen 4 and later) and f32 elsewhere; this bundle was gated at " + ", ".join(judged) + "."]
    f32_only = [part for part in recipe.exported_components()
                if not part.startswith("tokenizer") and "bf16" not in recipe.precisions_for(part)]
    if f32_only:
        lines.append(f"{', '.join(f32_only)} {'was' if len(f32_only) == 1 else 'were'} judged at f32 only: on a bf16 "
                     "CPU pass `ov_config={\"INFERENCE_PRECISION_HINT\": \"f32\"}` to `from_pretrained`.")
    return [" ".join(lines), ""]


def _community_lines(resolution: Resolution) -> list[str]:
    """Where a single-file base came from, which LoRAs were fused at what scale, and the baked VAE's fate."""
    recipe, lines = resolution.recipe, []
    entries = {s.role: resolution.entry(s) for s in resolution.sources}
    if recipe.base.file is not None:
        base, config = entries[SourceRole.base()], entries[SourceRole.config()]
        where = f"{base['repo']}@{base['commit']}" if "repo" in base else recipe.base.describe()
        lines.append(f"**Single-file checkpoint:** `{base['file']}` from `{where}` (sha256 `{base['sha256']}`); "
                     f"configs and tokenizers from `{config['source']}` at `{config['commit']}`.")
        if "vae" in recipe.substitutions:
            lines.append(f"**Baked VAE replaced** by `{recipe.substitutions['vae'].source.describe()}`.")
        lines.append("")
    for i, lora in enumerate(recipe.lora):
        entry = entries[SourceRole.lora(i)]
        lines += [f"**LoRA fused:** `{entry['file']}` from `{entry['source']}` (sha256 `{entry['sha256']}`) at scale "
                  f"{lora.scale} into {', '.join(lora.targets)}.", ""]
    if recipe.scheduler is not None:
        settings = ", ".join(f"{k}={v}" for k, v in recipe.scheduler.config.items())
        lines += [f"**Scheduler:** {recipe.scheduler.class_name}" + (f" ({settings})" if settings else "") + ".", ""]
    return lines


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def finalize(staging: Path, dest: Path, build_id: str, trash: Path) -> Bundle:
    """Write the manifest and move the staging folder to its final name in one rename.

    A bundle being replaced (`--force`) is first renamed to `trash`, inside the build's own
    staging folder: a build killed between the two renames leaves no bundle under `dest`
    (the next run rebuilds, never reuses half of one), and the old one is removed with the
    dead build's staging at the next start.
    """
    manifest = manifest_for(staging, build_id)
    write_json(staging / MANIFEST, manifest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        os.replace(dest, trash)
        os.replace(staging, dest)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(staging, dest)
    return Bundle(path=dest, build_id=build_id, manifest=manifest)


def move_aside(staging: Path, broken_root: Path, build_id: str) -> Path:
    """A failed build is kept for inspection under broken/, never where publish looks."""
    target = broken_root / build_id
    broken_root.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
