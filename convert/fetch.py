"""Stage 2: download exactly the files a build needs, pinned, verified, never pickled.

The Hub client checks sizes, not hashes, and a snapshot folder in the cache can hold
files of earlier downloads; so each source is presented to later stages as a fresh
folder of links to just the selected, sha256-verified files.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from convert.errors import FetchError
from convert.families import PipelineFamily
from convert.families.base import CONFIG_FILES
from convert.hub import file_sha256, git_blob_id
from convert.resolve import ResolvedSource, SourceFile, hub_error
from convert.roles import SourceRole

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
#: diffusers / transformers weight file stems; anything else (single-file checkpoints,
#: LoRAs, `sdxl_vae.safetensors`) is not part of a diffusers pipeline and is never fetched.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
#: The folders and tokenizer file names a pipeline needs come from its family (`PipelineFamily.folders`,
#: `.tokenizer_files`); weights are fetched for the folders of its weight-bearing components.


@dataclass(frozen=True)
class FetchedSource:
    role: SourceRole
    path: Path  # folder holding only the selected files (component root when a subfolder was named)
    commit: str
    files: tuple[SourceFile, ...]
    bytes_downloaded: int = 0


def needed_folders(role: SourceRole, family: PipelineFamily) -> list[str] | None:
    """Folders to fetch from a source: every pipeline folder for the base (the original VAE is the
    validation reference even when substituted) and its config source; None = the source is a single component."""
    if role.kind not in ("base", "config"):
        return None
    return list(family.folders)


def select_files(
    files: Iterable[SourceFile],
    *,
    role: SourceRole,
    folders: list[str] | None,
    subfolder: str | None,
    variant: str | None,
    allow_pickle: bool,
    family: PipelineFamily,
    skip_weights: Iterable[str] = (),
) -> list[SourceFile]:
    """The allow-list: configs, tokenizer files and one set of weights per component folder.

    `folders` None means the source is one component (a standalone VAE repo) rooted at `subfolder`.
    Components in `skip_weights` (substituted ones) keep their config (for the fit check) only;
    tokenizer and scheduler folders have none.
    """
    keep = set(CONFIG_FILES) | set(family.tokenizer_files)
    by_path = {f.path: f for f in files}
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    chosen: list[SourceFile] = []
    if prefix and not any(p.startswith(prefix) for p in by_path):
        raise FetchError(f"{role}: the source has no folder {prefix}", hint="check the subfolder in the recipe")
    if folders is None:
        groups = {prefix: [p for p in by_path if p.startswith(prefix) and "/" not in p[len(prefix):]]}
    else:
        if f"{prefix}model_index.json" not in by_path:
            raise FetchError(
                f"{role}: no model_index.json at {prefix or 'the root'}; this is not a diffusers pipeline",
                hint="point the base at a diffusers-format repo/folder (a single-file checkpoint is not supported)",
            )
        chosen.append(by_path[f"{prefix}model_index.json"])
        groups = {
            f"{prefix}{folder}/": [p for p in by_path if p.startswith(f"{prefix}{folder}/") and p.count("/") == prefix.count("/") + 1]
            for folder in folders
        }
    for group, paths in groups.items():
        names = {PurePosixPath(p).name: p for p in paths}
        chosen += [by_path[names[n]] for n in sorted(names) if n in keep]
        component = group.rstrip("/").rsplit("/", 1)[-1]
        if component in skip_weights or (folders is not None and component not in family.loaders):
            continue
        if folders is not None and not paths and component in family.optional:
            continue  # e.g. an SD3 repo without T5; patch passes it as None
        chosen += [by_path[p] for p in _weights(sorted(names), group, role, variant, allow_pickle)]
    if folders is None and not any(f.path.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES) for f in chosen):
        raise FetchError(f"{role}: no weights found at {prefix or 'the root'}", hint="check the subfolder in the recipe")
    return chosen


_WEIGHT = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model)(?:\.(?P<v1>\w+))?(?:-\d+-of-\d+)?(?:\.(?P<v2>\w+))?"
    r"\.(?P<ext>safetensors|bin|ckpt|pt|pth)$"
)
_INDEX = re.compile(r"^(?P<stem>diffusion_pytorch_model|model)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<v1>\w+))?\.json$")


def parse_weight_name(name: str) -> tuple[str, str | None] | None:
    """(extension, variant) of a diffusers/transformers weight or shard-index file name, else None."""
    match = _WEIGHT.match(name) or _INDEX.match(name)
    if match is None:
        return None
    groups = match.groupdict()
    return groups["ext"], groups.get("v1") or groups.get("v2")


def _weights(names: list[str], group: str, role: SourceRole, variant: str | None, allow_pickle: bool) -> list[str]:
    parsed = {n: parse_weight_name(n) for n in names}

    def family(exts: tuple[str, ...], want: str | None) -> list[str]:
        return [group + n for n, p in parsed.items() if p is not None and p[0] in exts and p[1] == want]

    safe, pickle = ("safetensors",), ("bin", "ckpt", "pt", "pth")
    for exts in (safe, pickle) if allow_pickle else (safe,):
        if variant and (found := family(exts, variant)):
            return found
        if found := family(exts, None):
            if variant:
                log.warning("%s: no %s variant in %s; using the default weights", role, variant, group or "the root")
            return found
    pickled = [group + n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise FetchError(
            f"{role}: {group or 'the root'} has only pickle weights ({', '.join(pickled)}); refusing to unpickle",
            hint="use a revision with .safetensors weights, or set allow_pickle: true on this source if you trust it",
        )
    raise FetchError(f"{role}: no .safetensors weights in {group or 'the root'}", hint="check the source and subfolder")


def source_selection(resolved: ResolvedSource, family: PipelineFamily,
                     skip_weights: Iterable[str] = ()) -> list[SourceFile]:
    """The files a build takes from one source: what fetch downloads, the lock records and cache keys hash.

    A single-file source is that one file; a config source (`base.config`) is a base's
    configs and tokenizers, never its weights.
    """
    src = resolved.source
    if src.file is not None:
        return [f for f in resolved.files if f.path == src.file]
    config_only = resolved.role.kind == "config"
    return select_files(
        resolved.files,
        role=resolved.role,
        folders=needed_folders(resolved.role, family),
        subfolder=getattr(src.hub or src.local or src.generated, "subfolder", None),
        variant=src.variant,
        allow_pickle=src.allow_pickle,
        family=family,
        skip_weights=tuple(family.loaders) if config_only else skip_weights,
    )


def fetch(resolved: ResolvedSource, dest: Path, *, cache_dir: Path | None, family: PipelineFamily,
          skip_weights: Iterable[str] = ()) -> FetchedSource:
    """Download (Hub) or select (local) the files of one source and link them into `dest`."""
    src = resolved.source
    subfolder = getattr(src.hub or src.local or src.generated, "subfolder", None)
    selected = source_selection(resolved, family, skip_weights)
    downloaded = 0
    if resolved.local_path is not None:
        root = resolved.local_path
    else:
        root, downloaded = _download(resolved, selected, cache_dir)
    _verify(resolved.role, root, selected)
    check_formats(resolved.role, root, selected, local=resolved.local_path is not None)
    _link_view(root, selected, dest)
    path = dest / subfolder if subfolder else dest
    return FetchedSource(role=resolved.role, path=path, commit=resolved.commit, files=tuple(selected), bytes_downloaded=downloaded)


def _download(resolved: ResolvedSource, selected: list[SourceFile], cache_dir: Path | None) -> tuple[Path, int]:
    """snapshot_download of exactly the selected files at the pinned commit; returns (snapshot, bytes fetched).

    Pinned to the commit (never the branch) so a push between resolve and fetch cannot change
    what is built; with a commit revision the client answers cached files without any request.
    Downloads land in the HF cache only: an interrupted run leaves nothing in the build.
    """
    from huggingface_hub import snapshot_download

    assert resolved.source.hub is not None
    repo = resolved.source.hub.repo
    missing_before = [f for f in selected if not _blob_path(repo, f, cache_dir).is_file()]
    log.info("%s: %d of %d files to download from %s@%s", resolved.role, len(missing_before), len(selected),
             repo, resolved.commit[:12])
    if missing_before:
        _check_cache_space(resolved.role, _cache_root(cache_dir), sum(f.size for f in missing_before))
    try:
        folder = Path(
            snapshot_download(
                repo_id=repo,
                revision=resolved.commit,
                allow_patterns=[glob_escape(f.path) for f in selected],
                cache_dir=str(cache_dir) if cache_dir else None,
            )
        )
    except Exception as e:  # every client error becomes one line (hub_error)
        raise hub_error(resolved.role, repo, resolved.commit, e, _cache_root(cache_dir)) from e
    absent = [f.path for f in selected if not (folder / f.path).is_file()]
    if absent:
        # The client falls back to a partial cached snapshot when the Hub does not answer, and
        # skips files the commit does not list: either way, these files are not here.
        raise FetchError(
            f"{resolved.role}: {absent[0]}" + (f" (+{len(absent) - 1} more)" if len(absent) > 1 else "")
            + f" could not be downloaded from {repo}@{resolved.commit}",
            hint="retry (the Hub may be unreachable); if it persists, check the subfolder/variant in the recipe",
        )
    fetched = sum(f.size for f in missing_before if _blob_path(repo, f, cache_dir).is_file())
    return folder, fetched


def glob_escape(path: str) -> str:
    """allow_patterns are fnmatch globs; a literal file name must not match anything else."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _cache_root(cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)


def _check_cache_space(role: SourceRole, cache: Path, need: int) -> None:
    """A download that cannot fit fails now, not after gigabytes (the client only warns)."""
    from convert.disk import check_free_space

    try:
        check_free_space(cache, need, FetchError)
    except FetchError as e:
        raise FetchError(f"{role}: {e.message}", hint="free some space there or set HF_HUB_CACHE to another disk") from None


def _blob_path(repo: str, f: SourceFile, cache_dir: Path | None) -> Path:
    """Where the HF cache keeps a file's bytes: blobs/<etag>, the sha256 (LFS) or git blob id (regular)."""
    from huggingface_hub.file_download import repo_folder_name

    root = _cache_root(cache_dir)
    etag = f.sha256 or f.git_oid or "-"
    return root / repo_folder_name(repo_id=repo, repo_type="model") / "blobs" / etag


def _verify(role: SourceRole, root: Path, selected: list[SourceFile]) -> None:
    """Check every file against the hash its source published; a mismatch evicts the cached blob.

    The client checks sizes only, so a corrupted transfer or cache would otherwise be built
    and published. LFS files carry a sha256, regular Hub files a git blob id.
    """
    for f in selected:
        path = root / f.path
        if not path.is_file():
            raise FetchError(f"{role}: {f.path} is missing after download", hint="retry; check the disk is not full")
        if path.stat().st_size != f.size:
            raise FetchError(f"{role}: {f.path} has {path.stat().st_size} bytes, expected {f.size}", hint="retry")
        expected, actual = _expected_and_actual(f, path)
        if expected is None or actual == expected:
            continue
        blob = path.resolve()
        if blob != path.absolute() and blob.is_file():
            blob.unlink()  # a corrupt cached blob would fail every later build
        raise FetchError(
            f"{role}: sha256 mismatch for {f.path} (got {actual[:12]}, expected {expected[:12]})"
            if f.sha256 else f"{role}: git blob id mismatch for {f.path} (got {actual[:12]}, expected {expected[:12]})",
            hint="the download was corrupted; run again to download it afresh",
        )


def _expected_and_actual(f: SourceFile, path: Path) -> tuple[str | None, str]:
    if f.sha256 is not None:
        return f.sha256, file_sha256(path)
    if f.git_oid is not None:
        return f.git_oid, git_blob_id(path)
    return None, ""


def _link_view(root: Path, selected: list[SourceFile], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for f in selected:
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((root / f.path).resolve(), target)


# ----------------------------------------------------------------------------- file formats

#: safetensors refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class NotSafetensors(ValueError):
    """What is wrong with a file that claims to be safetensors (the message is the reason)."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size before it is read.

    A corrupt or hostile length (2^40) must not become a 1 TiB read; tensors must lie inside the file.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise NotSafetensors(f"{size} bytes, shorter than the 8-byte header length")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise NotSafetensors(f"header length {length} exceeds the file's {size} bytes" if length > size - 8
                                 else f"header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotSafetensors(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise NotSafetensors("the header is not a JSON object")
    data_bytes = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise NotSafetensors("__metadata__ is not a map of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(v, int) for v in offsets)
                or not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list)):
            raise NotSafetensors(f"tensor {name!r} has no valid dtype/shape/data_offsets")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes:
            raise NotSafetensors(f"tensor {name!r} lies outside the file (bytes {start}..{end} of {data_bytes}); truncated?")
        _check_tensor(name, entry["dtype"], entry["shape"], end - start)
        spans.append((start, end, name))
    _check_layout(spans, data_bytes)
    return header


def _check_tensor(name: str, dtype: str, shape: list[Any], span: int) -> None:
    """What safetensors' loader checks per tensor (else it fails later, naming a staging link or nothing)."""
    if dtype not in DTYPE_BYTES:
        raise NotSafetensors(f"tensor {name!r} has dtype {dtype!r}, which safetensors does not know")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise NotSafetensors(f"tensor {name!r} has shape {shape}, not a list of sizes")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if need != span:
        raise NotSafetensors(f"tensor {name!r} of shape {shape} and dtype {dtype} needs {need} bytes, its data_offsets "
                             f"span {span}")


def _check_layout(spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """Tensors tile the data area exactly, in order: no overlap, no gap, nothing after the last one."""
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise NotSafetensors(f"tensor {name!r} starts at byte {start} of the data, expected {at} "
                                 f"({'overlapping the tensor before it' if start < at else 'a gap before it'})")
        at = end
    if at != data_bytes:
        raise NotSafetensors(f"{data_bytes - at} bytes after the last tensor's data")


def tensor_params(header: dict[str, Any]) -> int:
    """Number of values in a checked header (bytes / element size; exact for every stored dtype)."""
    return sum((e["data_offsets"][1] - e["data_offsets"][0]) // DTYPE_BYTES.get(e["dtype"], 4)
               for name, e in header.items() if name != "__metadata__")


def folder_params(folder: Path) -> int:
    """Parameters of the safetensors weights fetch linked into a component folder (0 if none)."""
    return sum(tensor_params(read_safetensors_header(p)) for p in sorted(folder.glob("*.safetensors")))


def check_formats(role: SourceRole, root: Path, selected: list[SourceFile], *, local: bool) -> None:
    """Every selected weight is a readable safetensors file and every config is JSON, named at its source.

    Caught here, a broken file names the user's own path (not the staging link the later stages see).
    """
    fix = "fix or replace the file in the source folder" if local else "the file is broken at the source; pin another revision"
    for f in selected:
        path = root / f.path
        try:
            if f.path.endswith(".safetensors"):
                read_safetensors_header(path)
            elif f.path.endswith(".json") and not isinstance(json.loads(path.read_bytes()), dict):
                raise FetchError(f"{role}: {path} is not a JSON object", hint=fix)
        except NotSafetensors as e:
            raise FetchError(f"{role}: {path} is not a valid safetensors file: {e}", hint=fix) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FetchError(f"{role}: {path} is not valid JSON ({e})", hint=fix) from None
