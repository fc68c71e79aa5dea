"""Lock files: `recipes/<name>.lock.json` pins what a recipe resolved to, file by file.

A recipe says `revision: main`; its lock says which commit that was, the sha256 (or git blob
id) of every file the build uses, and the tool versions, so `convert --locked` can build the
same thing later or fail in one line, and a diff of two locks says what moved upstream.
Written with sorted keys and stable order so `git diff` of a lock reads as a change log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import FetchError, PackageError
from convert.readback import read_json, safe_relative
from convert.resolve import Resolution, ResolvedSource

if TYPE_CHECKING:
    from convert.families import PipelineFamily

LOCK_VERSION = 1
LOCK_SUFFIX = ".lock.json"


def lock_path(recipe_path: Path) -> Path:
    """`recipes/tiny.yaml` -> `recipes/tiny.lock.json` (next to the recipe, committed with it)."""
    return recipe_path.with_name(recipe_path.stem + LOCK_SUFFIX)


def used_files(resolved: ResolvedSource, family: PipelineFamily) -> list[dict[str, Any]]:
    """The files a build of this source fetches (fetch's allow-list), with their hashes."""
    from convert.fetch import source_selection

    selected = source_selection(resolved, family)
    return [{"path": f.path, "size": f.size, "sha256": f.sha256} | ({"git_oid": f.git_oid} if f.git_oid else {})
            for f in sorted(selected, key=lambda f: f.path)]


def lock_document(resolution: Resolution) -> dict[str, Any]:
    family = resolution.recipe.family
    return {
        "lock_version": LOCK_VERSION,
        "recipe": resolution.recipe.name,
        "recipe_sha256": resolution.lock()["recipe_sha256"],
        "build_id": resolution.build_id,
        "sources": [s.lock_entry() | {"files": used_files(s, family)} for s in resolution.sources],
        "tools": dict(sorted(resolution.tool_versions.items())),
    }


def write_lock(path: Path, document: dict[str, Any]) -> None:
    """Atomic: a killed `lock` leaves the old lock, never half of a new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PackageError(f"cannot write the lock file {path}: {e.strerror}",
                           hint="make the recipe's folder writable") from e


def read_lock(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise FetchError(f"no lock file {path}", hint="create it with `sdxl-convert lock <recipe>`") from None
    except (OSError, ValueError) as e:
        raise FetchError(f"cannot read the lock file {path} ({e})", hint="recreate it with `sdxl-convert lock <recipe>`") from e
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION or not isinstance(data.get("sources"), list):
        raise FetchError(f"{path} is not a lock file of this tool (lock_version {LOCK_VERSION})",
                         hint="recreate it with `sdxl-convert lock <recipe>`")
    problem = lock_problem(data)
    if problem:
        raise FetchError(f"{path}: {problem}", hint="recreate it with `sdxl-convert lock <recipe>`")
    return data


def lock_problem(data: dict[str, Any]) -> str | None:
    """The first place where a lock document is not what `lock_document` writes (None: it is).

    Read back as input: a hand-edited or damaged lock must fail here in one line, not as a
    KeyError or TypeError deep in resolve (exit 1).
    """
    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    if "recipe_sha256" in data and not text(data["recipe_sha256"]):
        return f"recipe_sha256: expected a digest, got {data['recipe_sha256']!r}"
    tools = data.get("tools", {})
    if not isinstance(tools, dict) or not all(text(k) and isinstance(v, str) for k, v in tools.items()):
        return "tools: expected names mapped to version strings"
    roles: set[str] = set()
    for i, source in enumerate(data["sources"]):
        where = f"sources[{i}]"
        if not isinstance(source, dict):
            return f"{where}: expected an object, got {type(source).__name__}"
        for key in ("role", "commit"):
            if not text(source.get(key)):
                return f"{where}.{key}: expected a string, got {source.get(key)!r}"
        if source["role"] in roles:
            return f"{where}.role: {source['role']} is locked twice"
        roles.add(source["role"])
        files = source.get("files", [])
        if not isinstance(files, list):
            return f"{where}.files: expected a list, got {type(files).__name__}"
        for j, f in enumerate(files):
            if not isinstance(f, dict) or not safe_relative(f.get("path")):
                return f"{where}.files[{j}].path: expected a relative file name"
            if not any(text(f.get(k)) for k in ("sha256", "git_oid")):
                return f"{where}.files[{j}]: expected a sha256 or git_oid"
    return None


def pins(lock: dict[str, Any]) -> dict[str, str]:
    """role key ("substitutions.vae") -> locked commit: what `convert --locked` resolves instead of the recipe's branch."""
    return {s["role"]: s["commit"] for s in lock["sources"]}


def diff_locks(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two locks, one line per change (empty: the same build)."""
    lines: list[str] = []
    if old.get("recipe_sha256") != new.get("recipe_sha256"):
        lines.append("recipe: changed (its digest differs)")
    old_sources = {s["role"]: s for s in old.get("sources", [])}
    new_sources = {s["role"]: s for s in new.get("sources", [])}
    for role in sorted(old_sources.keys() | new_sources.keys()):
        before, after = old_sources.get(role), new_sources.get(role)
        if before is None or after is None:
            lines.append(f"{role}: {'added' if before is None else 'removed'}")
            continue
        if before["commit"] != after["commit"]:
            lines.append(f"{role}: commit {before['commit'][:12]} -> {after['commit'][:12]}")
        lines += [f"{role}: {line}" for line in _diff_files(before.get("files", []), after.get("files", []))]
    old_tools, new_tools = old.get("tools", {}), new.get("tools", {})
    for name in sorted(old_tools.keys() | new_tools.keys()):
        if old_tools.get(name) != new_tools.get(name):
            lines.append(f"tools: {name} {old_tools.get(name, 'absent')} -> {new_tools.get(name, 'absent')}")
    return lines


def _diff_files(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    old = {f["path"]: _content(f) for f in before}
    new = {f["path"]: _content(f) for f in after}
    lines = [f"+ {p}" for p in sorted(new.keys() - old.keys())]
    lines += [f"- {p}" for p in sorted(old.keys() - new.keys())]
    lines += [f"~ {p}" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
    return lines


def _content(f: dict[str, Any]) -> str:
    return str(f.get("sha256") or f.get("git_oid") or f.get("size"))


def check_locked(path: Path, lock: dict[str, Any], resolved: dict[str, Any]) -> None:
    """`convert --locked`: refuse anything that differs from the lock (FetchError, exit 3), first change named."""
    changes = diff_locks(lock, resolved)
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise FetchError(f"--locked: {changes[0]}{more}, not what {path.name} pins",
                         hint="run `sdxl-convert lock <recipe>` to accept the change, or restore what the lock names")
