"""What resolve, fetch and publish share about the Hub: file records, content hashes, error facts.

One file record (`HubFile`) for a file the Hub lists and a file we hold, normalised at the
boundary from the client's `RepoSibling` (sha256 for LFS files, git blob id for regular ones);
the two hashes the Hub uses; and the facts about a client exception (its HTTP status, its real
cause) that each stage words into its own one-line error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HubFile:
    """One file of a repo or folder, with the hash it can be checked against.

    The Hub publishes a sha256 only for LFS files; for small regular files it gives the git
    blob id instead, which is just as good a check (sha1 of ``blob <size>\\0<bytes>``).
    """

    path: str
    size: int
    sha256: str | None  # None only for small non-LFS Hub files
    git_oid: str | None = None  # git blob id of non-LFS Hub files


def hub_files(siblings: Iterable[Any]) -> Iterator[HubFile]:
    """The client's `RepoSibling`s (model_info(files_metadata=True)) as file records."""
    for s in siblings:
        lfs = getattr(s, "lfs", None)
        sha = lfs.sha256 if lfs is not None else None
        size = lfs.size if lfs is not None else (s.size or 0)
        git_oid = None if lfs is not None else getattr(s, "blob_id", None)
        yield HubFile(path=s.rfilename, size=int(size or 0), sha256=sha, git_oid=git_oid)


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """git's id of a file's bytes: how the Hub names regular (non-LFS) files."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def same_content(local: Path, remote: HubFile) -> bool:
    """Whether a local file holds the remote file's bytes: by sha256 where the Hub has one, else by git blob id."""
    if not local.is_file() or local.stat().st_size != remote.size:
        return False
    if remote.sha256 is not None:
        return file_sha256(local) == remote.sha256
    return remote.git_oid is not None and git_blob_id(local) == remote.git_oid


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def root_cause(error: Exception) -> Exception:
    """The client wraps a failed metadata request of a download into LocalEntryNotFoundError
    ("not in the cache"), which hides a gated repo or a 500; the cause is what the user needs."""
    from huggingface_hub import errors as hf_errors

    if isinstance(error, hf_errors.LocalEntryNotFoundError) and isinstance(error.__cause__, Exception):
        return error.__cause__
    return error
