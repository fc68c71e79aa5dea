"""A cache of exported submodels keyed by what determines them, so a rebuild re-exports only what changed.

The key of a submodel hashes its inputs' content, never a path or "a file exists":
  * the sha256 of its own component's weight files (from the substitute when substituted),
  * the hashes of every config and tokenizer file of the pipeline (an export reads more than its
    own config: the SDXL UNet's inputs are shaped by text_encoder_2's and the tokenizer's), except
    the configs of *other* substitutable components (the VAE): a substitute is by construction
    independent of the rest (its fit check holds its interface to the others fixed), so a new
    VAE, config and all, re-exports only the VAE parts,
  * which source role supplies it (a substitution touching it),
  * its recipe settings (weights, nncf, runtime options) and inference precisions,
  * the tool versions and a digest of this tool's export code.
All of it is known after resolve (metadata calls only), so `cache-key` and `rebuild` can compute
keys without downloading anything. An entry is written in a private temporary folder and
renamed into place: a killed build never leaves half an entry; a concurrent writer of the same
key simply loses the rename race. Entries are reused by copy (a reflink where the file system
can), never by link, and the copies are checked against the recorded sha256s, so a tampered or
truncated entry is re-exported and a bundle never changes when the cache does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.hub import file_sha256
from convert.readback import copy_file, is_regular_file, read_json, safe_relative
from convert.resolve import Resolution
from convert.roles import SourceRole

log = logging.getLogger(__name__)

CACHE_ENV = "SDXL_CONVERT_CACHE"
CACHE_FORMAT = 2
ENTRY_INFO = "entry.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: This tool's modules whose code shapes an exported IR: a change to them invalidates every entry.
_EXPORT_CODE = ("export.py", "export_worker.py", "optimum_compat.py", "patch.py", "families")
#: ... and what shapes a VAE part rescaled in the patch stage (fp16_fix: rescale): the rescale itself and
#: the photos it measures activations on.
_RESCALE_CODE = ("rescale.py", "fp16fix.py", "../validate/inputs.py")


def cache_dir(flag: Path | None, artifacts: Path) -> Path:
    """--cache, else $SDXL_CONVERT_CACHE, else <artifacts>/cache."""
    if flag is not None:
        return flag
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else artifacts / "cache"


def export_code_digest(names: tuple[str, ...] = _EXPORT_CODE) -> str:
    root = Path(__file__).resolve().parent
    files = sorted(p.resolve() for name in names for p in ([root / name] if (root / name).is_file()
                                                           else (root / name).rglob("*.py")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _is_weight(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(_WEIGHT_SUFFIXES) or (name.endswith(".json") and ".index" in name)


def _content(f: dict[str, Any]) -> str:
    return str(f.get("sha256") or f.get("git_oid"))


def key_inputs(resolution: Resolution) -> dict[str, dict[str, Any]]:
    """Per exported submodel, everything its key hashes (stored in the entry, to explain a miss)."""
    from convert.lockfile import used_files

    recipe = resolution.recipe
    family = recipe.family
    used = {s.role: used_files(s, family) for s in resolution.sources}
    code = export_code_digest()
    inputs: dict[str, dict[str, Any]] = {}
    whole = sorted(f"{s.role}:{f['path']}:{_content(f)}" for s in resolution.sources
                   if s.role.kind == "lora" or s.source.file is not None for f in used[s.role])
    for name in family.weighted:
        settings = recipe.settings_for(name)
        if not settings.export:
            continue
        component = family.submodel(name).component
        role = SourceRole.substitution(component) if component in recipe.substitutions else SourceRole.base()
        prefix = "" if role.kind != "base" else f"{component}/"
        context = sorted(f"{r}:{f['path']}:{_content(f)}" for r, files in used.items() for f in files
                         if _in_context(r, f["path"], component, family.substitutable))
        weights = sorted(f"{f['path'][len(prefix):]}:{_content(f)}" for f in used[role]
                         if f["path"].startswith(prefix) and _is_weight(f["path"]))
        inputs[name] = {
            "format": CACHE_FORMAT,
            # a single-file base and LoRAs write into every component's weights: all of them key every submodel
            "whole_pipeline_sources": whole,
            "lora": [lora.model_dump(mode="json") for lora in recipe.lora],
            "family": family.name,
            "submodel": name,
            "component": component,
            "source_role": role.key,
            "weights": weights,
            "context": context,
            "settings": settings.model_dump(mode="json"),
            "inference_precision": list(recipe.precisions_for(name)),
            "tools": dict(sorted(resolution.tool_versions.items())),
            "export_code": code,
        }
        if recipe.fp16_fix_for(name) == "rescale":  # the exported weights are the rescaled ones
            inputs[name]["rescale"] = {"validation": recipe.validation.model_dump(mode="json"),
                                       "code": export_code_digest(_RESCALE_CODE)}
    return inputs


def _in_context(role: SourceRole, path: str, component: str, substitutable: tuple[str, ...]) -> bool:
    """A config or tokenizer file any export may read: its own, or one of a non-substitutable component."""
    if _is_weight(path):
        return False
    owner = _owner(role, path)
    return owner == component or owner not in substitutable


def _owner(role: SourceRole, path: str) -> str | None:
    """The pipeline component a source file belongs to (None: the pipeline's own model_index.json,
    or any file of a config source or LoRA, which every export may read)."""
    if role.kind == "substitution":
        return role.component
    if role.kind == "base":
        return path.split("/", 1)[0] if "/" in path else None
    return None


def component_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def component_keys(resolution: Resolution) -> dict[str, str]:
    return {name: component_key(inputs) for name, inputs in key_inputs(resolution).items()}


@dataclass(frozen=True)
class ComponentCache:
    root: Path
    stores: bool = True  # False: entries are read, never added (the disk cannot hold the copies, see convert.budget)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def restore(self, key: str, dest: Path) -> bool:
        """Copy an entry's files into `dest` (an empty submodel folder); False on a miss or a bad entry.

        The entry is input, not a trusted store: its file names must be plain relative paths, its
        files regular files (no links out), and the copies, not the cache's files, are checked
        against the recorded sha256s. A bad entry is removed, and so is `dest`.
        """
        entry = self.entry(key)
        if not (entry / ENTRY_INFO).exists():
            return False
        files = _entry_files(entry)
        problem = "its entry.json does not list files as this tool writes them" if files is None else None
        dest.mkdir(parents=True, exist_ok=True)
        for rel, sha in (files or {}).items():
            source = entry / "files" / rel
            if not is_regular_file(source):
                problem = f"{rel} is not a regular file"
                break
            copy_file(source, dest / rel)
            if file_sha256(dest / rel) != sha:
                problem = f"{rel} differs from its recorded sha256"
                break
        if problem:
            log.warning("component cache entry %s is damaged (%s); re-exporting", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)  # nothing of the bad entry reaches the bundle
            return False
        return True

    def store(self, key: str, source: Path, inputs: dict[str, Any]) -> None:
        """Add a freshly exported submodel folder; a failure to cache never fails the build."""
        entry = self.entry(key)
        if entry.is_dir() or not self.stores:
            return
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            files = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*")) if p.is_file()}
            for rel, path in files.items():
                copy_file(path, tmp / "files" / rel)  # never a link: the staged file becomes the bundle's
            info = {"key": key, "inputs": inputs, "files": {rel: file_sha256(p) for rel, p in files.items()}}
            (tmp / ENTRY_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, entry)
        except OSError as e:
            if not entry.is_dir():  # else another build stored the same key first
                log.warning("could not add %s to the component cache %s: %s", source.name, self.root, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_stale_temporaries(self) -> None:
        """Temporary folders of dead builds (a kill -9 between link and rename); names hold the pid."""
        for tmp in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            pid = tmp.name.split("-")[2] if tmp.name.count("-") >= 3 else ""
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _entry_files(entry: Path) -> dict[str, str] | None:
    """The {relative name: sha256} an entry.json lists, or None where it is not what `store` writes."""
    try:
        info = read_json(entry / ENTRY_INFO, limit=2**20)
    except (OSError, ValueError):  # UnreadableFile, or not UTF-8 JSON
        return None
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    sha = re.compile(r"[0-9a-f]{64}")
    if not all(safe_relative(rel) and isinstance(h, str) and sha.fullmatch(h) for rel, h in files.items()):
        return None
    return files
