"""Disk space and writability: refuse a build that cannot fit before its export, and name a full
disk or an unwritable folder in one line when one is hit anyway.

A full SDXL export writes about 7 GiB; finding out at the last IR (OpenVINO only says
"iostream error") wastes the hour before it. The estimate comes from the sources' own
safetensors headers (exact parameter counts) and the recipe's weight format per component.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

from convert.errors import ConvertError, PackageError, UsageError

GIB = 1024**3
#: Bytes per weight of each recipe weight format; int8/int4 carry per-channel/group scales on top.
BYTES_PER_WEIGHT: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "int8": 1.05, "int4": 0.55,
                                      # int8 activations: exported at fp32 (the gate's reference, in staging), then int8
                                      "fp32+int8": 5.05}
#: Configs, tokenizers, validation images, report and logs: small, but not nothing.
SLACK_BYTES = 64 * 1024**2
#: Extra GiB to leave free on the artifacts disk (a shared machine's reserve); tests use it too.
KEEP_FREE_ENV = "SDXL_CONVERT_KEEP_FREE_GIB"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The VAE's parameters are split between its two exported parts; both are counted whole ("about").
PART_WEIGHTS = {"vae_decoder": "vae", "vae_encoder": "vae"}


def bundle_bytes(params: Mapping[str, int], weights: Mapping[str, str]) -> int:
    """Bytes the exported bundle takes: each exported component's parameters times its weight format.

    `params` is per pipeline folder (text_encoder, unet, vae, ...), `weights` per exported
    component (vae_decoder, unet, ...) with its recipe weight format.
    """
    total = 0.0
    for component, fmt in weights.items():
        total += params.get(PART_WEIGHTS.get(component, component), 0) * BYTES_PER_WEIGHT.get(fmt, 4.0)
    return int(total) + SLACK_BYTES


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (links not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def keep_free_bytes(environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(KEEP_FREE_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{KEEP_FREE_ENV}={raw!r} is not a number of GiB (0 or more)", hint="unset it or give e.g. 10")
    return int(value * GIB)


def gib(n: int) -> str:
    return f"{max(n / GIB, 0.1):.1f}"


def no_space_message(path: Path, need: int | None) -> str:
    return f"no space left on {path}" + (f", need about {gib(need)} GiB" if need else "")


def check_free_space(folder: Path, need: int, error: type[ConvertError]) -> None:
    """Refuse up front what would fill the disk; `error` is the class of the stage that would fail.

    `folder` need not exist yet (a cache made on first use): its nearest existing parent is measured.
    """
    free = shutil.disk_usage(nearest_existing(folder)).free
    keep = keep_free_bytes()
    if free - keep < need:
        reserve = f" and {KEEP_FREE_ENV} keeps {gib(keep)} GiB" if keep else ""
        raise error(no_space_message(folder, need),
                    hint=f"{gib(free)} GiB are free{reserve}; free some space or use another --artifacts folder")


def is_no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS


def is_write_refused(error: BaseException) -> bool:
    """Permission, read-only file system, or a file where a folder should be."""
    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                                          errno.EEXIST, errno.EISDIR)


def io_error(error: OSError, where: Path, need: int | None, cls: type[ConvertError]) -> ConvertError | None:
    """A stage's one-line error for a full disk or a refused write under `where` (else None: not ours to name)."""
    if is_no_space(error):
        return cls(no_space_message(where, need), hint="free some space or use another --artifacts folder")
    filename = Path(error.filename) if error.filename else None
    if is_write_refused(error) and filename is not None and is_under(filename, where):
        blocker = next((p for p in (filename, *filename.parents) if p.is_file()), None) if error.errno in (
            errno.EEXIST, errno.ENOTDIR) else None
        reason = ("it is a file, not a folder" if blocker == filename else f"{blocker} is a file, not a folder"
                  ) if blocker else error.strerror
        return cls(f"cannot write {filename}: {reason}", hint="make it writable or use another --artifacts folder")
    return None


def is_under(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies in it, both resolved: a staging link to a user's source file is not a
    file of ours (its errors are reads), and an --artifacts reached through a symlink still lies where it lies."""
    return path.resolve().is_relative_to(folder.resolve())


def nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest existing parent: where a folder made on first use will live."""
    return next((p for p in (folder, *folder.parents) if p.exists()), Path(folder.anchor or "/"))


def check_writable(folder: Path, subfolders: tuple[str, ...] = ()) -> None:
    """Create `folder` if needed and prove a file can be made in it, before any work is done.

    `subfolders` the build will create must not be files either.
    """
    for path in (folder, *(folder / s for s in subfolders)):
        if path.exists() and not path.is_dir():
            raise PackageError(f"cannot write {path}: it is {'a file, ' if path.is_file() else ''}not a folder",
                               hint="move it away or use another --artifacts folder")
    probe = folder / f".write-test.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = "no space left" if is_no_space(e) else e.strerror
        raise PackageError(f"cannot write {folder}: {reason}",
                           hint="make it writable or use another --artifacts folder") from e
