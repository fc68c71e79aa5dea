"""Builds sharing one artifacts folder: a lock per recipe, a private staging folder per build,
and the removal of staging folders whose build died (kill -9, OOM killer, power loss).

Staging folders are named `<build-id>.<pid>.<random>` (process-unique, like huggingface_hub's
temporary files) and hold `owner.json` (pid, host, process start time). A folder whose owner
is not alive on this host is garbage: a full-size one is gigabytes. The start time guards
against pid reuse; another host's folders (a shared file system) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from convert.errors import BusyError
from convert.readback import read_json
from convert.workspace import Workspace

log = logging.getLogger(__name__)

OWNER = "owner.json"
#: A staging folder without owner.json is younger than this only between its mkdir and the write.
OWNERLESS_GRACE_S = 60.0


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    started: str | None  # /proc/<pid>/stat start time (clock ticks since boot); None where unknown

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname(), process_start(os.getpid()))

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        try:
            data = read_json(path, limit=2**16)
            return cls(int(data["pid"]), str(data["host"]), data.get("started"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n")


def process_start(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/<pid>/stat): tells a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def is_alive(owner: Owner) -> bool:
    """True for an owner on another host too: its liveness cannot be known from here."""
    if owner.host != socket.gethostname():
        return True
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    started = process_start(owner.pid)
    return owner.started is None or started is None or started == owner.started


def new_staging(workspace: Workspace, build_id: str) -> Path:
    """A staging folder no other build (process or thread) can be given."""
    folder = workspace.staging / f"{build_id}.{os.getpid()}.{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    Owner.me().write(folder / OWNER)
    return folder


def stale_staging(workspace: Workspace, now: float | None = None) -> list[Path]:
    """Staging folders of builds that are no longer running."""
    root = workspace.staging
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    stale = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        owner = Owner.read(folder / OWNER)
        if owner is None:
            if now - folder.stat().st_mtime > OWNERLESS_GRACE_S:  # a crash before owner.json, or an older version's
                stale.append(folder)
        elif not is_alive(owner):
            stale.append(folder)
    return stale


def remove_stale_staging(workspace: Workspace) -> list[Path]:
    removed = []
    for folder in stale_staging(workspace):
        log.warning("removing %s, left by a build that is no longer running", folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def lock_path(workspace: Workspace, recipe_name: str) -> Path:
    return workspace.artifacts / ".locks" / f"{recipe_name}.lock"


@contextmanager
def recipe_lock(workspace: Workspace, recipe_name: str) -> Iterator[None]:
    """One build of a recipe at a time per artifacts folder; a second one fails at once, naming the first.

    The kernel drops the lock (flock) when its holder dies, so a killed build never blocks the next.
    The holder's pid is kept beside the lock file: flock itself cannot tell who holds it.
    """
    from filelock import FileLock, Timeout

    path = lock_path(workspace, recipe_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_suffix(".owner.json")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = Owner.read(holder)
        pid = f" (pid {owner.pid})" if owner else ""
        raise BusyError(f"another build of {recipe_name} is running{pid}",
                        hint=f"wait for it to finish, or build into another --artifacts folder than {workspace.artifacts}") from None
    try:
        Owner.me().write(holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
