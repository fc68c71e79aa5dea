"""A Hugging Face Hub-compatible HTTP server for tests, built on the standard library.

Why: the converter resolves, downloads and publishes through the *unmodified*
huggingface_hub client. Mocking the client would test our mocks; this server
speaks the client's real wire protocol (see /work/shared/notes/hub-protocol.md)
so tests exercise the same code paths as production, offline and fast.

Scope: model repos only, one user namespace, no Xet (run the client with
``HF_HUB_DISABLE_XET=1``; Xet is never advertised), no pull requests.
State is git-like: content-addressed blobs on disk, immutable commits that are
snapshots ``{path: FileEntry}``, branches and tags pointing at 40-hex commit ids.
Repo metadata lives in memory; blobs live under ``root/blobs``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml  # a hard dependency of huggingface_hub, so always present with it

DEFAULT_USER = "test-user"
# Real Hub: >10 MB or binary or matching .gitattributes. 1 MiB keeps LFS test files small.
LFS_MIN_SIZE = 1024 * 1024
LFS_EXTENSIONS = frozenset(
    ".7z .arrow .bin .bz2 .ckpt .ftz .gguf .gz .h5 .joblib .mlmodel .model .msgpack .npy .npz"
    " .onnx .ot .parquet .pb .pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm"
    " .xz .zip .zst".split()
)
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in sorted(LFS_EXTENSIONS))
_SHA1 = re.compile(r"[0-9a-f]{40}")
Op = tuple[str, str, "FileEntry | None"]  # (put | deletedFile | deletedFolder, path, entry)


class HubError(Exception):
    """An HTTP error in the Hub's dialect: the client maps ``code`` (X-Error-Code) to typed errors."""

    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. ``git_oid`` is the git blob id (of the LFS pointer for LFS files)."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))

    def preupload_oid(self) -> str:
        """The oid the client compares with its local one to skip unchanged files."""
        return self.sha256 if self.lfs else self.git_oid

    def lfs_json(self, sha_key: str) -> dict[str, Any] | None:
        """LFS block; the tree API names the hash ``oid``, repo info names it ``sha256``."""
        if not self.lfs:
            return None
        return {sha_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    files: Mapping[str, FileEntry]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    gated: str | bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """Upload-mode rule, like the Hub's but with a 1 MiB threshold (see LFS_MIN_SIZE)."""
    return size > LFS_MIN_SIZE or Path(path).suffix.lower() in LFS_EXTENSIONS or b"\0" in sample


def _front_matter(text: str) -> dict[str, Any] | None:
    """Parse README YAML front matter; raises yaml.YAMLError on invalid YAML."""
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.S | re.M)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class BlobStore:
    """Content-addressed blobs (by sha256), written atomically so readers never see partial files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        return sha256

    def size(self, sha256: str) -> int | None:
        target = self.path(sha256)
        return target.stat().st_size if target.exists() else None

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


class HubState:
    """Repos, refs and commits. One lock guards all metadata; commits are immutable once made."""

    def __init__(self, root: Path) -> None:
        self.blobs = BlobStore(root / "blobs")
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    # -- lookup ---------------------------------------------------------------
    def repo(self, repo_id: str, authenticated: bool = True) -> Repo:
        with self.lock:
            repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            # The Hub answers 401 for private repos without a token, 404 otherwise: same error code.
            status = 401 if repo is not None else 404
            raise HubError(status, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch, tag (optionally as refs/heads/, refs/tags/) or full commit id -> commit."""
        with self.lock:
            name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
            commit_id = repo.branches.get(name) or repo.tags.get(name)
            if commit_id is None and _SHA1.fullmatch(revision) and revision in repo.commits:
                commit_id = revision
            if commit_id is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo.commits[commit_id]

    # -- mutations ------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, None, "You already created this model repo")
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            data = GITATTRIBUTES.encode()
            entry = FileEntry(self.blobs.put(data), len(data), _git_oid(data), lfs=False)
            self._add_commit(repo, "main", None, {".gitattributes": entry}, "initial commit", "")
            self.repos[repo_id] = repo
            return repo

    def delete_repo(self, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop(repo_id, None) is None:
                raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")

    def commit(self, repo: Repo, branch: str, header: Mapping[str, Any], ops: list[Op]) -> Commit:
        """Apply ops on the branch head; a stale ``parentCommit`` is refused with 412 like the Hub."""
        with self.lock:
            if branch not in repo.branches:
                self.resolve(repo, branch)  # raises RevisionNotFound for unknown revisions
                raise HubError(400, None, f"Can only commit to a branch, not {branch!r}")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent and not head.id.startswith(parent.lower()):
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = _apply_ops(dict(head.files), ops)
            title = header.get("summary") or "Upload files"
            return self._add_commit(repo, branch, head.id, files, title, header.get("description") or "")

    def _add_commit(
        self, repo: Repo, branch: str, parent: str | None, files: dict[str, FileEntry], title: str, message: str
    ) -> Commit:
        date = _now()
        tree = sorted((path, entry.git_oid) for path, entry in files.items())
        seed = json.dumps([parent, tree, title, message, date, next(self._counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title, message, date)
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        return commit

    def create_ref(self, repo: Repo, kind: str, name: str, target: str) -> None:
        """Create a branch or tag (``kind`` is 'branch' or 'tag'); 409 if the name is taken."""
        with self.lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if name in refs:
                raise HubError(409, None, f"{kind.capitalize()} {name} already exists")
            refs[name] = self.resolve(repo, target).id

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        with self.lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if refs.pop(name, None) is None:
                raise HubError(404, "RevisionNotFound", f"{kind.capitalize()} {name} not found")


def _apply_ops(files: dict[str, FileEntry], ops: list[Op]) -> dict[str, FileEntry]:
    for kind, path, entry in ops:
        if kind == "put" and entry is not None:
            files[path] = entry
        elif kind == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, "EntryNotFound", f"File {path} not found")
        elif kind == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
    return files


def _read_json(commit: Commit, blobs: BlobStore, path: str) -> dict[str, Any] | None:
    """A JSON object file of the commit, or None if absent or not a JSON object."""
    entry = commit.files.get(path)
    try:
        data = json.loads(blobs.read(entry.sha256)) if entry is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _derived_metadata(commit: Commit, blobs: BlobStore) -> dict[str, Any]:
    """What the Hub derives from repo files: card data, library, config and tags.

    Mirrors the Hub closely enough for library/task inference (optimum, diffusers):
    model_index.json means diffusers, config.json means transformers, the card wins.
    """
    readme = commit.files.get("README.md")
    try:
        card = _front_matter(blobs.read(readme.sha256).decode("utf-8", "replace")) if readme else None
    except yaml.YAMLError:
        card = None
    card = card or {}
    library, config, tags = None, None, list(card.get("tags") or [])
    if (index := _read_json(commit, blobs, "model_index.json")) is not None:
        class_name = index.get("_class_name")
        library, config = "diffusers", {"diffusers": {"_class_name": class_name}}
        tags += ["diffusers", f"diffusers:{class_name}"]
    elif (model_config := _read_json(commit, blobs, "config.json")) is not None and "model_type" in model_config:
        library = "transformers"
        config = {k: model_config[k] for k in ("model_type", "architectures") if k in model_config}
    library = card.get("library_name") or library
    base_models = card.get("base_model") or []
    for base in [base_models] if isinstance(base_models, str) else base_models:
        tags.append(f"base_model:{base}")
        if card.get("base_model_relation"):
            tags.append(f"base_model:{card['base_model_relation']}:{base}")
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    tags = list(dict.fromkeys(([library] if library else []) + tags))
    return {"cardData": card or None, "library_name": library, "config": config, "tags": tags,
            "pipeline_tag": card.get("pipeline_tag")}


def _model_info(repo: Repo, commit: Commit, blobs: BlobStore, with_blobs: bool) -> dict[str, Any]:
    """Repo info as the Hub returns it (``?blobs=true`` adds size, blob id and LFS sha256)."""
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update(size=entry.size, blobId=entry.git_oid)
            if entry.lfs:
                sibling["lfs"] = entry.lfs_json("sha256")
        siblings.append(sibling)
    return {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.id,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": repo.gated,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        **_derived_metadata(commit, blobs),
        "siblings": siblings,
    }


def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing under ``prefix``: files and directories, recursive or one level deep."""
    base = prefix.strip("/") + "/" if prefix.strip("/") else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, entry in commit.files.items():
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            folder = base + "/".join(parts[:i])
            oid = hashlib.sha1(f"{commit.id}:{folder}".encode()).hexdigest()
            entries.setdefault(folder, {"type": "directory", "oid": oid, "path": folder, "size": 0})
        if recursive or len(parts) == 1:
            item = {"type": "file", "oid": entry.git_oid, "path": path, "size": entry.size}
            if entry.lfs:
                item["lfs"] = entry.lfs_json("oid")
            entries[path] = item
    if base and not entries:
        raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {commit.id}")
    return [entries[key] for key in sorted(entries)]


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into [start, end); None means the whole file."""
    if not header:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or not (match[1] or match[2]):
        raise HubError(416, None, f"Unsupported range {header}", {"Content-Range": f"bytes */{size}"})
    if match[1]:
        start, end = int(match[1]), (int(match[2]) + 1 if match[2] else size)
    else:
        start, end = max(0, size - int(match[2])), size
    end = min(end, size)
    if start >= end:
        raise HubError(416, None, f"Range {header} not satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("GET", rf"/api/models/{_REPO}/refs", "refs"),
        ("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<name>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/models/{_REPO}/branch/(?P<name>[^/]+)", "delete_branch"),
        ("POST", rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
        ("DELETE", rf"/api/models/{_REPO}/tag/(?P<name>[^/]+)", "delete_tag"),
        ("PUT", rf"/api/models/{_REPO}/settings", "settings"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


def _match_route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """Match the raw path (so an encoded '/' in a revision stays one segment), then decode groups."""
    method = "GET" if method == "HEAD" else method
    path_matched = False
    for route_method, pattern, name in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        path_matched = True
        if route_method == method:
            return name, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
    if path_matched:
        raise HubError(405, None, f"{method} not allowed on {path}")
    if path.startswith(("/api/datasets/", "/api/spaces/", "/datasets/", "/spaces/")):
        raise HubError(404, "RepoNotFound", "The test Hub serves model repos only")
    raise HubError(404, None, f"No route for {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    """One request: read the body, apply injected faults, dispatch to ``_route_<name>``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # otherwise ~45 ms per small request (Nagle + delayed ACK)
    server: _HTTPServer

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: tests assert on ``HubServer.requests_log()`` instead of stderr noise."""

    # -- plumbing -------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def state(self) -> HubState:
        return self.server.hub.state

    def _handle(self) -> None:
        split = urlsplit(self.path)
        self._path, self._query = split.path, parse_qs(split.query)
        self._body = self._read_body()  # always: an unread body corrupts the next keep-alive request
        try:
            status = self.hub._take_fault(self.command, self._path)
            if status is not None:
                raise HubError(status, None, "Injected fault")
            name, groups = _match_route(self.command, self._path)
            getattr(self, f"_route_{name}")(**groups)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-response: not a server bug
        except Exception as error:  # a server bug must reach the test as a visible 500, not a hang
            self.hub._internal_errors.append(traceback.format_exc())
            self.close_connection = True  # headers may already be out: never reuse this connection
            self._send_error(HubError(500, None, f"Internal test-server error: {error!r}"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, None, f"Invalid JSON body: {error}") from error

    def _flag(self, name: str) -> bool:
        return any(v.lower() in ("1", "true") for v in self._query.get(name, []))

    @property
    def _authenticated(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.hub._log(self.command, self._path, status)

    def _send_bytes(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        self._start(status, {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send_bytes(status, json.dumps(payload, default=str).encode(), content_type=content_type)

    def _send_error(self, error: HubError) -> None:
        header_safe = " ".join(error.message.encode("ascii", "replace").decode().split())  # headers are latin-1
        headers = dict(error.headers, **{"X-Error-Message": header_safe})
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_bytes(error.status, json.dumps({"error": error.message}).encode(), headers)

    def _repo(self, repo_id: str) -> Repo:
        return self.state.repo(repo_id, authenticated=self._authenticated)

    # -- repos ----------------------------------------------------------------
    def _route_whoami(self) -> None:
        if not self._authenticated:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": DEFAULT_USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def _route_agent_harnesses(self) -> None:
        """The client fetches this registry once per process for its user agent; an empty one detects nothing."""
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _route_create_repo(self) -> None:
        body = self._json_body()
        if body.get("type", "model") != "model":
            raise HubError(400, None, "The test Hub serves model repos only")
        repo_id = f"{body.get('organization') or DEFAULT_USER}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        try:
            self.state.create_repo(repo_id, private)
        except HubError as error:
            self._send_bytes(error.status, json.dumps({"error": error.message, "url": url}).encode())
            return
        self._send_json({"url": url, "name": repo_id})

    def _route_delete_repo(self) -> None:
        body = self._json_body()
        self.state.delete_repo(f"{body.get('organization') or DEFAULT_USER}/{body['name']}")
        self._send_json({})

    def _route_settings(self, repo: str) -> None:
        body, target = self._json_body(), self._repo(repo)
        with self.state.lock:
            if "gated" in body:
                target.gated = body["gated"]
            if "private" in body or "visibility" in body:
                target.private = bool(body.get("private")) or body.get("visibility") == "private"
        self._send_json({})

    def _route_validate_yaml(self) -> None:
        try:
            _front_matter(str(self._json_body().get("content", "")))
        except yaml.YAMLError as error:
            self._send_json({"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, status=400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _route_repo_info(self, repo: str, rev: str = "main") -> None:
        target = self._repo(repo)
        commit = self.state.resolve(target, rev)
        self._send_json(_model_info(target, commit, self.state.blobs, with_blobs=self._flag("blobs")))

    def _route_tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self.state.resolve(self._repo(repo), rev)
        self._send_json(_tree(commit, path, recursive=self._flag("recursive")))

    def _route_refs(self, repo: str) -> None:
        target = self._repo(repo)
        with self.state.lock:
            refs = {kind: sorted(getattr(target, kind).items()) for kind in ("branches", "tags")}
        prefix = {"branches": "refs/heads/", "tags": "refs/tags/"}
        payload: dict[str, Any] = {
            kind: [{"name": name, "ref": prefix[kind] + name, "targetCommit": commit} for name, commit in items]
            for kind, items in refs.items()
        }
        payload.update(converts=[], pullRequests=[])
        self._send_json(payload)

    def _route_commits(self, repo: str, rev: str) -> None:
        target = self._repo(repo)
        commit: Commit | None = self.state.resolve(target, rev)
        history = []
        while commit is not None:
            history.append({"id": commit.id, "title": commit.title, "message": commit.message,
                            "date": commit.date, "authors": [{"user": DEFAULT_USER}]})
            commit = target.commits.get(commit.parent) if commit.parent else None
        self._send_json(history)

    # -- uploads --------------------------------------------------------------
    def _route_preupload(self, repo: str, rev: str) -> None:
        files = self.state.resolve(self._repo(repo), rev).files
        answers = []
        for item in self._json_body().get("files", []):
            path, sample = item["path"], base64.b64decode(item.get("sample", ""))
            mode = "lfs" if _wants_lfs(path, int(item.get("size", 0)), sample) else "regular"
            existing = files.get(path)
            oid = existing.preupload_oid() if existing is not None else None
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers})

    def _route_lfs_batch(self, repo: str) -> None:
        self._repo(repo)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, None, "The test Hub only supports LFS uploads; download via /resolve/")
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self.state.blobs.size(oid) != size:
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{oid}", "expires_in": 3600}}
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _route_lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self._body).hexdigest() != oid:
            raise HubError(400, None, f"Uploaded bytes do not hash to {oid}")
        self.state.blobs.put(self._body)
        self._send_json({})

    def _route_commit(self, repo: str, rev: str) -> None:
        if self._flag("create_pr"):
            raise HubError(400, None, "The test Hub does not support pull requests")
        target = self._repo(repo)
        lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "Commit payload must start with a header line")
        ops = [self._commit_op(line["key"], line["value"]) for line in lines[1:]]
        commit = self.state.commit(target, rev, lines[0]["value"], ops)
        url = f"{self.hub.url}/{repo}/commit/{commit.id}"
        self._send_json({"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": None})

    def _commit_op(self, key: str, value: Mapping[str, Any]) -> Op:
        """Turn one ndjson operation into (kind, path, entry), storing inline content as a blob."""
        path = str(value["path"])
        if key == "file":
            data = base64.b64decode(value["content"])
            return "put", path, FileEntry(self.state.blobs.put(data), len(data), _git_oid(data), lfs=False)
        if key == "lfsFile":
            oid = str(value["oid"])
            size = self.state.blobs.size(oid)
            if size is None or ("size" in value and int(value["size"]) != size):
                raise HubError(422, None, f"LFS object {oid} for {path} was not uploaded")
            return "put", path, FileEntry(oid, size, _git_oid(_lfs_pointer(oid, size)), lfs=True)
        if key in ("deletedFile", "deletedFolder"):
            return key, path, None
        raise HubError(400, None, f"Unsupported commit operation {key!r}")

    # -- refs -----------------------------------------------------------------
    def _route_create_branch(self, repo: str, name: str) -> None:
        start = self._json_body().get("startingPoint") or "main"
        self.state.create_ref(self._repo(repo), "branch", name, start)
        self._send_json({})

    def _route_delete_branch(self, repo: str, name: str) -> None:
        self.state.delete_ref(self._repo(repo), "branch", name)
        self._send_json({})

    def _route_create_tag(self, repo: str, rev: str) -> None:
        self.state.create_ref(self._repo(repo), "tag", self._json_body()["tag"], rev)
        self._send_json({})

    def _route_delete_tag(self, repo: str, name: str) -> None:
        self.state.delete_ref(self._repo(repo), "tag", name)
        self._send_json({})

    # -- downloads ------------------------------------------------------------
    def _route_resolve(self, repo: str, rev: str, path: str) -> None:
        target = self._repo(repo)
        if target.gated:
            status = 403 if self._authenticated else 401
            raise HubError(status, "GatedRepo", f"Access to model {repo} is restricted; you are not authorized.")
        commit = self.state.resolve(target, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        self._stream_blob(entry, headers)

    def _stream_blob(self, entry: FileEntry, headers: dict[str, str]) -> None:
        """Send the blob (or a Range of it); an armed truncation sends half and drops the connection."""
        byte_range = _byte_range(self.headers.get("Range"), entry.size) if self.command == "GET" else None
        start, end = byte_range or (0, entry.size)
        headers["Content-Length"] = str(end - start)
        if byte_range is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        truncate = self.command == "GET" and self.hub._take_truncation(self._path)
        self._start(206 if byte_range else 200, headers)
        if self.command == "HEAD":
            return
        remaining = (end - start) // 2 if truncate else end - start
        with open(self.state.blobs.path(entry.sha256), "rb") as handle:
            handle.seek(start)
            while remaining > 0 and (chunk := handle.read(min(remaining, 1 << 20))):
                self.wfile.write(chunk)
                remaining -= len(chunk)
        if truncate:
            self.wfile.flush()
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens 8 connections at once; a short backlog costs 1 s SYN retries

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


class HubServer:
    """A local Hub on 127.0.0.1:<free port>, plus fault-injection helpers for tests.

    Seed repos through the real client (``HfApi(endpoint=server.url)``); only the helpers
    below reach into server state, to simulate what a well-behaved client cannot cause.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hub-server-"))
        self.state = HubState(self.root)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[list[Any]] = []  # [method, compiled regex, status, remaining]
        self._truncations: list[re.Pattern[str]] = []
        self._log_entries: list[tuple[str, str, int]] = []
        self._internal_errors: list[str] = []
        self._control = threading.Lock()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> None:
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers ---------------------------------------------------------
    def set_gated(self, repo_id: str, gated: bool = True) -> None:
        """Gate (or ungate) a repo: metadata stays readable, file downloads raise GatedRepoError."""
        with self.state.lock:
            self.state.repo(repo_id).gated = "auto" if gated else False

    def fail_next(self, method: str, path_regex: str, status: int = 500, count: int = 1) -> None:
        """Answer the next ``count`` requests matching method and path (re.search) with ``status``."""
        with self._control:
            self._faults.append([method.upper(), re.compile(path_regex), status, count])

    def truncate_next_download(self, path_regex: str) -> None:
        """Make the next matching GET send half its bytes, then close: the client must resume with Range."""
        with self._control:
            self._truncations.append(re.compile(path_regex))

    def corrupt_blob(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip the first byte of the stored blob in place: same size, sha256 no longer matches metadata.

        Blobs are content-addressed and never rewritten, so every path and repo sharing these bytes
        stays corrupted, even after re-uploading them: use bytes unique to the test.
        """
        entry = self.state.resolve(self.state.repo(repo_id), revision).files[path]
        blob = self.state.blobs.path(entry.sha256)
        data = bytearray(blob.read_bytes())
        if not data:
            raise ValueError(f"{path} is empty: nothing to corrupt")
        data[0] ^= 0xFF
        blob.write_bytes(bytes(data))

    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, raw URL path without query, status) of every answered request, in order."""
        with self._control:
            return list(self._log_entries)

    def clear_log(self) -> None:
        with self._control:
            self._log_entries.clear()

    def internal_errors(self) -> list[str]:
        """Tracebacks of server bugs (answered as 500); tests can assert this stays empty."""
        return list(self._internal_errors)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.state.lock:
            return self.state.repo(repo_id).branches[branch]

    # -- used by the handler --------------------------------------------------
    def _log(self, method: str, path: str, status: int) -> None:
        with self._control:
            self._log_entries.append((method, path, status))

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._control:
            for fault in self._faults:
                if fault[0] == method and fault[3] > 0 and fault[1].search(path):
                    fault[3] -= 1
                    return int(fault[2])
        return None

    def _take_truncation(self, path: str) -> bool:
        with self._control:
            for pattern in self._truncations:
                if pattern.search(path):
                    self._truncations.remove(pattern)
                    return True
        return False
