"""End-to-end checks that the unmodified huggingface_hub client works against tests/hub_server.py.

Why: every Hub-facing test in this repo trusts the local server; if it drifts from what the
client expects, those tests would pass or fail for the wrong reasons. Each test drives the real
client and, where the wire matters (LFS, resume, faults), asserts on the server's request log.
"""

from __future__ import annotations

import hashlib
import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pytest_socket import SocketConnectBlockedError

if TYPE_CHECKING:
    from hub_server import HubServer

pytestmark = [
    pytest.mark.hub,
    # The plain-LFS PUT passes a file object as `data=`; httpx deprecates that inside huggingface_hub.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

README = """---
library_name: openvino
base_model: upstream/sdxl-tiny
pipeline_tag: text-to-image
tags: [openvino, test]
upstream_commit: 0123456789abcdef0123456789abcdef01234567
---
# Tiny test bundle
"""
LFS_SIZE = 1536 * 1024  # above the server's 1 MiB LFS threshold
_UNGUARDED_CONNECT = socket.socket.connect  # captured at import: pytest-socket guards only while tests run


@dataclass(frozen=True)
class Seeded:
    """A repo uploaded once per module: its id, the local source folder and the upload commit."""

    repo_id: str
    folder: Path
    commit: str
    upload_log: list[tuple[str, str, int]]


def _write_folder(folder: Path, weights: bytes) -> None:
    files = {
        "README.md": README.encode(),
        "config.json": b'{"sample_size": 32}\n',
        "unet/openvino_model.xml": b"<net name='unet'/>\n",
        "unet/sub/notes.txt": b"nested\n",
        "weights.bin": weights,
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    api = HfApi(endpoint=hub_server.url)
    folder = tmp_path_factory.mktemp("seed")
    _write_folder(folder, random.Random(0).randbytes(LFS_SIZE))
    repo_id = api.create_repo(f"test-user/seeded-{uuid.uuid4().hex[:8]}").repo_id
    hub_server.clear_log()
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Seed")
    return Seeded(repo_id, folder, info.oid, hub_server.requests_log())


@pytest.fixture(autouse=True)
def _no_server_bugs(hub_server: HubServer) -> Iterator[None]:
    """Fail the test if the server answered any request with an internal error."""
    before = len(hub_server.internal_errors())
    yield
    assert hub_server.internal_errors()[before:] == []


def test_upload_folder_sends_large_binary_through_lfs(seeded: Seeded) -> None:
    methods_paths = [(m, p) for m, p, _ in seeded.upload_log]
    assert ("POST", f"/{seeded.repo_id}.git/info/lfs/objects/batch") in methods_paths
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in methods_paths)
    assert ("POST", "/api/validate-yaml") in methods_paths
    assert all(status < 400 for _, _, status in seeded.upload_log)


def test_model_info_reports_lfs_sha256_and_card_data(hf_api: HfApi, seeded: Seeded) -> None:
    info = hf_api.model_info(seeded.repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    weights = (seeded.folder / "weights.bin").read_bytes()
    assert info.sha == seeded.commit
    assert siblings["weights.bin"].lfs is not None
    assert siblings["weights.bin"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["weights.bin"].size == LFS_SIZE
    assert siblings["config.json"].lfs is None and siblings["unet/openvino_model.xml"].lfs is None
    assert info.card_data is not None and info.card_data.base_model == "upstream/sdxl-tiny"
    assert info.card_data.get("upstream_commit") == "0123456789abcdef0123456789abcdef01234567"
    assert info.library_name == "openvino" and "openvino" in (info.tags or [])


def test_list_files_and_tree(hf_api: HfApi, seeded: Seeded) -> None:
    expected = sorted([".gitattributes", *_tree_bytes(seeded.folder)])
    assert sorted(hf_api.list_repo_files(seeded.repo_id)) == expected
    top = {e.path: type(e).__name__ for e in hf_api.list_repo_tree(seeded.repo_id, path_in_repo="unet")}
    assert top == {"unet/openvino_model.xml": "RepoFile", "unet/sub": "RepoFolder"}
    with pytest.raises(EntryNotFoundError):
        list(hf_api.list_repo_tree(seeded.repo_id, path_in_repo="missing"))


def test_snapshot_download_at_branch_and_at_commit(hf_api: HfApi, seeded: Seeded) -> None:
    hf_api.create_branch(seeded.repo_id, branch="dev", revision=seeded.commit)
    dev = hf_api.upload_file(path_or_fileobj=b'{"sample_size": 64}\n', path_in_repo="config.json",
                             repo_id=seeded.repo_id, revision="dev", commit_message="Bump")
    at_dev = Path(snapshot_download(seeded.repo_id, revision="dev"))
    at_sha = Path(snapshot_download(seeded.repo_id, revision=seeded.commit))
    assert at_dev.name == dev.oid and at_sha.name == seeded.commit
    expected = _tree_bytes(seeded.folder)
    assert {k: v for k, v in _tree_bytes(at_sha).items() if k != ".gitattributes"} == expected
    assert (at_dev / "config.json").read_bytes() == b'{"sample_size": 64}\n'
    assert (at_dev / "weights.bin").read_bytes() == expected["weights.bin"]
    assert hf_api.model_info(seeded.repo_id).sha == seeded.commit  # main untouched


def test_refs_tags_and_commit_history(hf_api: HfApi, seeded: Seeded) -> None:
    hf_api.create_tag(seeded.repo_id, tag="v1.0", revision=seeded.commit, tag_message="first build")
    refs = hf_api.list_repo_refs(seeded.repo_id)
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", seeded.commit)]
    assert ("main", seeded.commit) in [(b.name, b.target_commit) for b in refs.branches]
    path = hf_hub_download(seeded.repo_id, "config.json", revision="v1.0")
    assert Path(path).read_bytes() == (seeded.folder / "config.json").read_bytes()
    history = hf_api.list_repo_commits(seeded.repo_id)
    assert [c.commit_id for c in history][0] == seeded.commit
    assert [c.title for c in history] == ["Seed", "initial commit"]
    with pytest.raises(HfHubHTTPError) as conflict:
        hf_api.create_tag(seeded.repo_id, tag="v1.0")
    assert conflict.value.response.status_code == 409
    hf_api.delete_tag(seeded.repo_id, tag="v1.0")
    assert hf_api.list_repo_refs(seeded.repo_id).tags == []


def test_not_found_errors_are_typed(hf_api: HfApi, seeded: Seeded) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_api.model_info("test-user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_api.model_info(seeded.repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(seeded.repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(seeded.repo_id, "no-such-file.json")
    assert not hf_api.file_exists(seeded.repo_id, "no-such-file.json")


def test_create_repo_conflict_and_private_visibility(hf_api: HfApi, hub_server: HubServer, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id, private=True)
    with pytest.raises(HfHubHTTPError) as conflict:
        hf_api.create_repo(new_repo_id)
    assert conflict.value.response.status_code == 409
    assert hf_api.create_repo(new_repo_id, exist_ok=True).repo_id == new_repo_id
    assert hf_api.model_info(new_repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=False).model_info(new_repo_id)


def test_gated_repo_raises_gated_repo_error(hf_api: HfApi, hub_server: HubServer, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id)
    hf_api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=new_repo_id)
    hub_server.set_gated(new_repo_id)
    with pytest.raises(GatedRepoError):
        hf_hub_download(new_repo_id, "config.json")
    assert hf_api.model_info(new_repo_id).gated == "auto"  # metadata stays readable, like the Hub
    hub_server.set_gated(new_repo_id, gated=False)
    assert Path(hf_hub_download(new_repo_id, "config.json")).read_bytes() == b"{}"


def test_identical_reupload_creates_no_commit(
    hf_api: HfApi, hub_server: HubServer, new_repo_id: str, tmp_path: Path
) -> None:
    _write_folder(tmp_path, random.Random(1).randbytes(LFS_SIZE))
    hf_api.create_repo(new_repo_id)
    first = hf_api.upload_folder(repo_id=new_repo_id, folder_path=tmp_path)
    hub_server.clear_log()
    second = hf_api.upload_folder(repo_id=new_repo_id, folder_path=tmp_path)
    assert second.oid == first.oid == hub_server.head(new_repo_id)
    assert not any(p.endswith("/commit/main") or p.startswith("/lfs-upload/") for _, p, _ in hub_server.requests_log())
    assert len(hf_api.list_repo_commits(new_repo_id)) == 2


def test_failed_commit_leaves_branch_head_unchanged(hf_api: HfApi, hub_server: HubServer, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id)
    before = hub_server.head(new_repo_id)
    hub_server.fail_next("POST", r"/commit/main$", status=500)
    with pytest.raises(HfHubHTTPError) as failure:
        hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=new_repo_id)
    assert failure.value.response.status_code == 500
    assert hub_server.head(new_repo_id) == before
    after = hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=new_repo_id)
    assert hub_server.head(new_repo_id) == after.oid != before


def test_stale_parent_commit_is_rejected(hf_api: HfApi, hub_server: HubServer, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id)
    stale = hub_server.head(new_repo_id)
    hf_api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=new_repo_id)
    with pytest.raises(HfHubHTTPError) as rejected:
        hf_api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id=new_repo_id, parent_commit=stale)
    assert rejected.value.response.status_code == 412


def test_invalid_readme_metadata_is_rejected_before_upload(hf_api: HfApi, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        hf_api.upload_file(path_or_fileobj=b"---\ntags: [x\n---\n", path_in_repo="README.md", repo_id=new_repo_id)


def test_truncated_download_resumes_with_range(
    hub_server: HubServer, seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client writes whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks only; a partial chunk is lost on
    # disconnect and the retry starts from 0 without Range. Smaller chunks make the resume observable.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    hub_server.truncate_next_download(rf"^/{seeded.repo_id}/resolve/.*/weights\.bin$")
    hub_server.clear_log()
    path = hf_hub_download(seeded.repo_id, "weights.bin")
    assert Path(path).read_bytes() == (seeded.folder / "weights.bin").read_bytes()
    gets = [status for method, p, status in hub_server.requests_log() if method == "GET" and "weights.bin" in p]
    assert gets == [200, 206]


def test_corrupt_blob_is_served_with_original_metadata(
    hf_api: HfApi, hub_server: HubServer, new_repo_id: str
) -> None:
    data = random.Random(new_repo_id).randbytes(LFS_SIZE)  # unique bytes: blobs are shared by content
    hf_api.create_repo(new_repo_id)
    hf_api.upload_file(path_or_fileobj=data, path_in_repo="weights.bin", repo_id=new_repo_id)
    hub_server.corrupt_blob(new_repo_id, "weights.bin")
    served = Path(hf_hub_download(new_repo_id, "weights.bin")).read_bytes()
    siblings = {s.rfilename: s for s in hf_api.model_info(new_repo_id, files_metadata=True).siblings or []}
    sibling = siblings["weights.bin"]
    assert len(served) == len(data) and served != data
    assert sibling.lfs is not None and sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()


def test_network_guard_blocks_other_hosts(pytestconfig: pytest.Config) -> None:
    # This test must never send a packet: only try when the guard is on and allows loopback only.
    allowed = str(pytestconfig.getoption("allow_hosts", default=None) or "").split(",")
    if not set(allowed) <= {"127.0.0.1", "localhost", "::1"}:
        pytest.skip(f"--allow-hosts={','.join(allowed)} overrides the loopback-only default")
    assert socket.socket.connect is not _UNGUARDED_CONNECT, "network guard is not installed"
    with pytest.warns(UserWarning, match="10.255.255.1"), pytest.raises(SocketConnectBlockedError):
        socket.create_connection(("10.255.255.1", 9), timeout=1)
