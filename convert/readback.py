"""Files a build reads back (cache entries, lock files, records): input to check, never a store to trust.

Cache entries, lock files, owner records and manifests are inputs like a recipe: a `/dev/zero`
or a FIFO in their place must fail at once, not fill memory or hang; a name read from one must
stay inside its folder. And a bundle never shares an inode with the component cache: a hard link
would let damage to a cache file change every bundle linked to it after packaging.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 * 2**20  # the largest build record or cache entry description we write is a few KiB


class UnreadableFile(ValueError):
    """A small JSON file that is not a regular file or is too large; says which."""


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in `path`, read only from a regular file of at most `limit` bytes.

    Opened non-blocking, so a FIFO fails instead of waiting for a writer; OSError passes through
    (a missing file is the caller's to explain).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{path}: not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"{path}: {info.st_size} bytes, more than the {limit} a record of this tool has")
        data = os.read(fd, limit + 1)
        while len(data) <= limit and (more := os.read(fd, limit + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(f"{path}: more than {limit} bytes")
    return json.loads(data.decode("utf-8"))  # UnicodeDecodeError / JSONDecodeError: the caller's to word


def safe_relative(name: object) -> str | None:
    """`name` if it is a relative POSIX path that stays inside its folder: no absolute, empty, '.' or '..'
    parts, no backslash, no control characters. (Community file names have '+', spaces, brackets: kept.)"""
    if not isinstance(name, str) or not name or len(name) > 1024 or "\\" in name or not name.isprintable():
        return None
    return name if all(part not in ("", ".", "..") for part in name.split("/")) else None


def is_regular_file(path: Path) -> bool:
    """A regular file itself, not a symlink to one (a link could point anywhere, and change later)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def copy_file(src: Path, dest: Path) -> None:
    """A private copy of `src` at `dest` (reflinked where the file system can, else copied)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        try:
            while os.copy_file_range(fin.fileno(), fout.fileno(), 2**30) > 0:
                pass
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
            shutil.copyfileobj(fin, fout, 16 * 2**20)
