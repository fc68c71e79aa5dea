"""Resolve and fetch against the local Hub through the real huggingface_hub client.

Why these repos are fakes: fetch reads no tensor, only each safetensors header and each
JSON file (a broken one fails there), so pipeline-shaped repos of small random tensors
behind valid headers (unique bytes per repo: the server stores blobs by content, and
corrupting one must not touch another test's) exercise pinning, the allow-list, hashing,
caching and errors in seconds. The real tiny pipeline goes through the Hub in test_publish.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants

from convert.build import build
from convert.errors import FetchError
from convert.families.sdxl import SDXL
from convert.fetch import FetchedSource, fetch
from convert.recipe import HubSource, Source
from convert.resolve import ResolvedSource, SourceFile, resolve_source
from convert.roles import SourceRole
from convert.workspace import Workspace

if TYPE_CHECKING:
    from hub_server import HubServer

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),  # plain-LFS PUT inside the client
]

WEIGHT_SIZE = 16 * 1024
#: What fetch must take from a pipeline repo with variant fp16: configs, tokenizers, one fp16 weight set per folder.
EXPECTED_FP16 = sorted([
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
])  # fmt: skip


def fake_safetensors(rng: random.Random, size: int) -> bytes:
    """`size` random bytes behind a valid safetensors header (one uint8 tensor)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    return struct.pack("<Q", len(header)) + header + rng.randbytes(size)


def pipeline_files(seed: str) -> dict[str, bytes]:
    """A diffusers SDXL repo layout with the distractors real repos carry (pickles, ONNX, Flax, TF, refiner, other VAEs)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "model_index.json": json.dumps({"_class_name": "StableDiffusionXLPipeline", "seed": seed}).encode(),
        "README.md": b"# upstream\n",
        "scheduler/scheduler_config.json": b'{"_class_name": "EulerDiscreteScheduler"}\n',
        "sd_xl_base_1.0.safetensors": fake_safetensors(rng, WEIGHT_SIZE),
        "sd_xl_refiner_1.0.safetensors": fake_safetensors(rng, WEIGHT_SIZE),
        "refiner/unet/diffusion_pytorch_model.fp16.safetensors": fake_safetensors(rng, WEIGHT_SIZE),
        "vae_1_0/config.json": b"{}\n",
        "vae_1_0/diffusion_pytorch_model.fp16.safetensors": fake_safetensors(rng, WEIGHT_SIZE),
    }
    for folder in ("text_encoder", "text_encoder_2", "unet", "vae"):
        stem = "model" if folder.startswith("text") else "diffusion_pytorch_model"
        files[f"{folder}/config.json"] = json.dumps({"folder": folder, "seed": seed}).encode()
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bf16.safetensors", f"{stem}.bin",
                     "flax_model.msgpack", "model.onnx", "tf_model.h5"):
            safe = name.endswith(".safetensors")
            files[f"{folder}/{name}"] = fake_safetensors(rng, WEIGHT_SIZE) if safe else rng.randbytes(WEIGHT_SIZE)
    for folder in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # unique bytes: the cache dedups by content
            files[f"{folder}/{name}"] = json.dumps({"file": f"{folder}/{name}", "seed": seed}).encode()
    return files


def vae_files(seed: str, size: int = WEIGHT_SIZE) -> dict[str, bytes]:
    """A standalone diffusers VAE repo (like madebyollin/sdxl-vae-fp16-fix), with its single-file twin and a pickle."""
    rng = random.Random(seed)
    return {
        "config.json": json.dumps({"_class_name": "AutoencoderKL", "seed": seed}).encode(),
        "diffusion_pytorch_model.safetensors": fake_safetensors(rng, size),
        "diffusion_pytorch_model.bin": rng.randbytes(1024),
        "sdxl_vae.safetensors": fake_safetensors(rng, 1024),
    }


def seed_repo(hf_api: HfApi, repo_id: str, files: dict[str, bytes], tmp: Path) -> str:
    """Create `repo_id` and upload `files` in one commit on main; returns the commit."""
    folder = tmp / repo_id.replace("/", "--")
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    hf_api.create_repo(repo_id)
    return hf_api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="seed").oid


def hub_source(repo: str, revision: str = "main", **kw: str) -> Source:
    return Source(hub=HubSource(repo=repo, revision=revision, **kw))


def resolve_and_fetch(role: SourceRole, source: Source, tmp: Path, dest: str = "view") -> tuple[ResolvedSource, FetchedSource]:
    resolved = resolve_source(role, source, Workspace(artifacts=tmp / "artifacts"), tmp)
    return resolved, fetch(resolved, tmp / dest, cache_dir=tmp / "cache", family=SDXL)


def view(fetched: FetchedSource, root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in a fetched source's folder."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def resolve_requests(hub_server: HubServer, repo: str, since: int = 0) -> list[tuple[str, str, int]]:
    """(method, file path, status) of every file request for `repo` after log entry `since`."""
    marker = f"/{repo}/resolve/"
    return [(m, p.split(marker, 1)[1].split("/", 1)[1], s) for m, p, s in hub_server.requests_log()[since:] if marker in p]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def pipeline_repo(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """A pipeline repo shared by read-only tests (each fetches into its own cache)."""
    from conftest import HF_TEST_TOKEN

    repo = f"test-user/fetch-pipeline-{random.Random().getrandbits(32):08x}"
    files = pipeline_files(repo)
    seed_repo(HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN), repo, files, tmp_path_factory.mktemp("seed"))
    return repo, files


# ----------------------------------------------------------------------------- pinning and selection


def test_fp16_variant_is_fetched_pinned_and_alone(hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]],
                                                  tmp_path: Path) -> None:
    repo, files = pipeline_repo
    start = len(hub_server.requests_log())
    resolved, fetched = resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path)

    assert re.fullmatch(r"[0-9a-f]{40}", resolved.commit) and resolved.commit == hub_server.head(repo)
    assert resolved.lock_entry() == {"role": "base", "source": f"hub:{repo}@main", "commit": resolved.commit,
                                     "repo": repo, "revision": "main"}
    assert view(fetched, fetched.path) == {p: sha(files[p]) for p in EXPECTED_FP16}
    downloaded = sorted({p for m, p, s in resolve_requests(hub_server, repo, start) if m == "GET"})
    assert downloaded == EXPECTED_FP16  # nothing else crossed the wire: no pickle, ONNX, Flax, TF, refiner, other variant
    assert all(f"/resolve/{resolved.commit}/" in p for _, p, _ in hub_server.requests_log()[start:] if "/resolve/" in p)
    assert fetched.bytes_downloaded == sum(len(files[p]) for p in EXPECTED_FP16)


def test_second_fetch_downloads_zero_bytes(hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]],
                                           tmp_path: Path) -> None:
    repo, files = pipeline_repo
    resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path, dest="first")
    start = len(hub_server.requests_log())
    _, again = resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path, dest="second")

    assert again.bytes_downloaded == 0
    assert resolve_requests(hub_server, repo, start) == []  # not even a HEAD: the cache answers a pinned commit
    assert view(again, again.path) == {p: sha(files[p]) for p in EXPECTED_FP16}


def test_cached_source_is_fetched_while_the_hub_is_down(hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]],
                                                       tmp_path: Path) -> None:
    repo, files = pipeline_repo
    resolved, _ = resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path, dest="first")
    start = len(hub_server.requests_log())
    hub_server.fail_next("GET", rf"^/api/models/{repo}", status=503)
    again = fetch(resolved, tmp_path / "second", cache_dir=tmp_path / "cache", family=SDXL)
    assert [s for _, _, s in hub_server.requests_log()[start:]] == [503]  # the one listing call failed; nothing else asked
    assert again.bytes_downloaded == 0
    assert view(again, again.path) == {p: sha(files[p]) for p in EXPECTED_FP16}


def test_partially_cached_source_while_the_hub_is_down_says_retry(
    hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, _ = pipeline_repo
    resolved = resolve_source(SourceRole.base(), hub_source(repo, variant="fp16"), Workspace(artifacts=tmp_path), tmp_path)
    hub_server.fail_next("GET", rf"^/{repo}/resolve/.*/unet/diffusion_pytorch_model\.fp16\.safetensors$", status=500)
    with pytest.raises(FetchError):
        fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)  # everything else is cached now
    hub_server.fail_next("GET", rf"^/api/models/{repo}", status=503)
    with pytest.raises(FetchError) as info:
        fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert str(info.value).startswith("base: unet/diffusion_pytorch_model.fp16.safetensors could not be downloaded")
    assert "; retry (the Hub may be unreachable)" in str(info.value)


def test_standalone_vae_takes_diffusers_weights_only(hub_server: HubServer, hf_api: HfApi, new_repo_id: str,
                                                     tmp_path: Path) -> None:
    files = vae_files(new_repo_id)
    seed_repo(hf_api, new_repo_id, files, tmp_path)
    _, fetched = resolve_and_fetch(SourceRole.substitution("vae"), hub_source(new_repo_id), tmp_path)
    assert sorted(view(fetched, fetched.path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    downloaded = {p for m, p, _ in resolve_requests(hub_server, new_repo_id) if m == "GET"}
    assert downloaded == {"config.json", "diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("form", ["branch", "tag", "commit"])
def test_every_revision_form_resolves_to_a_commit(hf_api: HfApi, new_repo_id: str, tmp_path: Path, form: str) -> None:
    commit = seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    hf_api.create_branch(new_repo_id, branch="release", revision=commit)
    hf_api.create_tag(new_repo_id, tag="v1.0", revision=commit)
    hf_api.upload_file(path_or_fileobj=b"later\n", path_in_repo="NOTES.md", repo_id=new_repo_id)  # main moves on
    revision = {"branch": "release", "tag": "v1.0", "commit": commit}[form]
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id, revision), Workspace(artifacts=tmp_path), tmp_path)
    assert resolved.commit == commit
    assert resolved.lock_entry()["revision"] == revision and resolved.lock_entry()["commit"] == commit


def test_revision_moved_between_resolve_and_fetch_keeps_the_pin(hub_server: HubServer, hf_api: HfApi,
                                                                new_repo_id: str, tmp_path: Path) -> None:
    old = vae_files(new_repo_id)
    old_commit = seed_repo(hf_api, new_repo_id, old, tmp_path)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id, "main"), Workspace(artifacts=tmp_path), tmp_path)

    new_weights = random.Random(f"{new_repo_id}-v2").randbytes(WEIGHT_SIZE)
    hf_api.upload_file(path_or_fileobj=new_weights, path_in_repo="diffusion_pytorch_model.safetensors", repo_id=new_repo_id)
    assert hub_server.head(new_repo_id) != old_commit

    fetched = fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert fetched.commit == old_commit
    got = (fetched.path / "diffusion_pytorch_model.safetensors").read_bytes()
    assert got == old["diffusion_pytorch_model.safetensors"] and got != new_weights


# ----------------------------------------------------------------------------- integrity and resume


@pytest.mark.parametrize("path", ["diffusion_pytorch_model.safetensors", "config.json"], ids=["lfs-sha256", "git-blob-id"])
def test_corrupt_download_is_refused_evicted_and_refetched(hub_server: HubServer, hf_api: HfApi, new_repo_id: str,
                                                           tmp_path: Path, path: str) -> None:
    seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id), Workspace(artifacts=tmp_path), tmp_path)
    hub_server.corrupt_blob(new_repo_id, path)
    with pytest.raises(FetchError) as info:
        fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    kind = "sha256" if path.endswith(".safetensors") else "git blob id"
    assert f"substitutions.vae: {kind} mismatch for {path}" in str(info.value)
    assert "run again to download it afresh" in str(info.value)
    blobs = list((tmp_path / "cache").rglob("blobs/*"))
    target = {f.path: f for f in resolved.files}[path]
    assert not any(b.name in (target.sha256, target.git_oid) for b in blobs), "the corrupt blob stays cached"

    hub_server.corrupt_blob(new_repo_id, path)  # flipping the byte again restores the original
    fetched = fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert (fetched.path / path).read_bytes() == vae_files(new_repo_id)[path]


def test_interrupted_download_resumes_with_range(hub_server: HubServer, hf_api: HfApi, new_repo_id: str,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = vae_files(new_repo_id, size=1536 * 1024)
    seed_repo(hf_api, new_repo_id, files, tmp_path)
    # The client keeps whole DOWNLOAD_CHUNK_SIZE chunks only; smaller chunks make the resume observable.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    hub_server.truncate_next_download(rf"^/{new_repo_id}/resolve/.*/diffusion_pytorch_model\.safetensors$")
    _, fetched = resolve_and_fetch(SourceRole.substitution("vae"), hub_source(new_repo_id), tmp_path)

    assert (fetched.path / "diffusion_pytorch_model.safetensors").read_bytes() == files["diffusion_pytorch_model.safetensors"]
    gets = [s for m, p, s in resolve_requests(hub_server, new_repo_id) if m == "GET" and p.endswith(".safetensors")]
    assert gets == [200, 206]  # cut off half way, then continued with a Range request


def test_server_error_mid_download_leaves_nothing_and_the_rerun_fetches_the_rest(
    hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, files = pipeline_repo
    failing = "unet/diffusion_pytorch_model.fp16.safetensors"
    hub_server.fail_next("GET", rf"^/{repo}/resolve/[0-9a-f]{{40}}/{re.escape(failing)}$", status=500)
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path)
    assert f"base: {repo}@" in str(info.value) and "HTTP 500" in str(info.value) and "retry" in str(info.value)
    assert not (tmp_path / "view").exists()
    assert not list((tmp_path / "cache").rglob("*.incomplete"))

    start = len(hub_server.requests_log())
    _, fetched = resolve_and_fetch(SourceRole.base(), hub_source(repo, variant="fp16"), tmp_path)
    assert [p for m, p, _ in resolve_requests(hub_server, repo, start) if m == "GET"] == [failing]
    assert fetched.bytes_downloaded == len(files[failing])
    assert view(fetched, fetched.path) == {p: sha(files[p]) for p in EXPECTED_FP16}


def test_build_interrupted_by_a_server_error_leaves_no_staging_and_no_bundle(
    hub_server: HubServer, pipeline_repo: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, _ = pipeline_repo
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(f"schema_version: 1\nname: hub-fail\nbase:\n  hub: {{repo: {repo}, revision: main, variant: fp16}}\n")
    artifacts = tmp_path / "artifacts"
    hub_server.fail_next("GET", rf"^/{repo}/resolve/.*/unet/diffusion_pytorch_model\.fp16\.safetensors$", status=500)
    with pytest.raises(FetchError, match="HTTP 500"):
        build(recipe, Workspace(artifacts=artifacts, hf_cache=tmp_path / "cache"))
    staging = artifacts / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert not (artifacts / "hub-fail").exists() and not (artifacts / "broken").exists()


# ----------------------------------------------------------------------------- errors that say what to do


def test_missing_repo(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.base(), hub_source("test-user/no-such-repo-4f1c"), tmp_path)
    assert str(info.value) == (
        "base: test-user/no-such-repo-4f1c@main: repository not found; check the repo id; if it is private, set HF_TOKEN"
    )


def test_private_repo_without_a_token_says_set_hf_token(hf_api: HfApi, new_repo_id: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hf_api.create_repo(new_repo_id, private=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.base(), hub_source(new_repo_id), tmp_path)
    assert str(info.value) == (
        f"base: {new_repo_id}@main: repository not found; check the repo id; if it is private, set HF_TOKEN"
    )


def test_missing_revision(pipeline_repo: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    repo, _ = pipeline_repo
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.base(), hub_source(repo, "v9.9"), tmp_path)
    assert str(info.value) == f"base: {repo}@v9.9: revision not found; check the branch, tag or commit in the recipe"


def test_missing_subfolder(pipeline_repo: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    repo, _ = pipeline_repo
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.substitution("vae"), hub_source(repo, subfolder="vae_fp16_fix"), tmp_path)
    assert str(info.value) == "substitutions.vae: the source has no folder vae_fp16_fix/; check the subfolder in the recipe"


def test_file_missing_from_the_pinned_commit(hf_api: HfApi, new_repo_id: str, tmp_path: Path) -> None:
    seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id), Workspace(artifacts=tmp_path), tmp_path)
    ghost = SourceFile("diffusion_pytorch_model.fp16.safetensors", 10, "0" * 64)
    stale = ResolvedSource(resolved.role, Source(hub=HubSource(repo=new_repo_id, variant="fp16")), resolved.commit,
                           (*resolved.files, ghost))
    with pytest.raises(FetchError) as info:
        fetch(stale, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert str(info.value) == (
        f"substitutions.vae: diffusion_pytorch_model.fp16.safetensors could not be downloaded from "
        f"{new_repo_id}@{resolved.commit}; retry (the Hub may be unreachable); if it persists, check the "
        "subfolder/variant in the recipe"
    )


def test_gated_repo_says_accept_the_licence_and_set_hf_token(hub_server: HubServer, hf_api: HfApi, new_repo_id: str,
                                                             tmp_path: Path) -> None:
    seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    hub_server.set_gated(new_repo_id)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id), Workspace(artifacts=tmp_path), tmp_path)
    with pytest.raises(FetchError) as info:
        fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert str(info.value) == (
        f"substitutions.vae: {new_repo_id}@{resolved.commit} is gated; accept the licence at "
        f"{hub_server.url}/{new_repo_id} and set HF_TOKEN to a token of that account"
    )
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- broken files and caches


def test_broken_safetensors_at_the_source_is_named_at_fetch(hf_api: HfApi, new_repo_id: str, tmp_path: Path) -> None:
    """The hash matches (the repo holds exactly these bytes), but the file is no safetensors file."""
    files = vae_files(new_repo_id) | {"diffusion_pytorch_model.safetensors": struct.pack("<Q", 2**40) + b"{}"}
    seed_repo(hf_api, new_repo_id, files, tmp_path)
    with pytest.raises(FetchError) as info:
        resolve_and_fetch(SourceRole.substitution("vae"), hub_source(new_repo_id), tmp_path)
    message = str(info.value)
    assert "substitutions.vae: " in message and "diffusion_pytorch_model.safetensors is not a valid safetensors file: " \
        "header length 1099511627776 exceeds the file's 10 bytes" in message
    assert info.value.exit_code == 3 and "the file is broken at the source; pin another revision" in message


def test_unwritable_hf_cache_says_cannot_write(hf_api: HfApi, new_repo_id: str, tmp_path: Path) -> None:
    """A file where the HF cache should be (root ignores chmod, so a file stands in for a read-only folder)."""
    seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id), Workspace(artifacts=tmp_path), tmp_path)
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    with pytest.raises(FetchError) as info:
        fetch(resolved, tmp_path / "view", cache_dir=cache, family=SDXL)
    message = str(info.value)
    assert f"substitutions.vae: {new_repo_id}@" in message and f"cannot write {cache}" in message, message
    assert "HF_HUB_CACHE" in message and not (tmp_path / "view").exists()


def test_download_that_cannot_fit_the_cache_is_refused_before_it_starts(
    hub_server: HubServer, hf_api: HfApi, new_repo_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_repo(hf_api, new_repo_id, vae_files(new_repo_id), tmp_path)
    resolved = resolve_source(SourceRole.substitution("vae"), hub_source(new_repo_id), Workspace(artifacts=tmp_path), tmp_path)
    monkeypatch.setenv("SDXL_CONVERT_KEEP_FREE_GIB", str(2**40))  # a reserve larger than any disk
    start = len(hub_server.requests_log())
    with pytest.raises(FetchError) as info:
        fetch(resolved, tmp_path / "view", cache_dir=tmp_path / "cache", family=SDXL)
    assert str(info.value).startswith(f"substitutions.vae: no space left on {tmp_path / 'cache'}, need about 0.1 GiB; ")
    assert "set HF_HUB_CACHE to another disk" in str(info.value)
    assert not [p for m, p, _ in resolve_requests(hub_server, new_repo_id, start) if m == "GET"]
    assert not (tmp_path / "view").exists()


def test_single_file_source_downloads_that_file_alone(pipeline_repo, hub_server: HubServer, tmp_path: Path) -> None:
    """Kind single_file: one file of the repo, pinned to the commit, sha256-verified; no other request."""
    repo, files = pipeline_repo
    source = Source(hub=HubSource(repo=repo, revision="main"), file="sd_xl_base_1.0.safetensors")
    since = len(hub_server.requests_log())
    resolved, fetched = resolve_and_fetch(SourceRole.base(), source, tmp_path)
    assert view(fetched, tmp_path / "view") == {"sd_xl_base_1.0.safetensors": sha(files["sd_xl_base_1.0.safetensors"])}
    assert {p for _m, p, _s in resolve_requests(hub_server, repo, since)} == {"sd_xl_base_1.0.safetensors"}
    entry = resolved.lock_entry()
    assert entry["file"] == "sd_xl_base_1.0.safetensors" and entry["sha256"] == sha(files["sd_xl_base_1.0.safetensors"])
    assert entry["commit"] == resolved.commit and len(resolved.commit) == 40


def test_single_file_missing_from_the_repo_is_one_line(pipeline_repo, tmp_path: Path) -> None:
    repo, _ = pipeline_repo
    with pytest.raises(FetchError, match=r"base: .* has no file sd_xl_turbo\.safetensors"):
        resolve_and_fetch(SourceRole.base(), Source(hub=HubSource(repo=repo), file="sd_xl_turbo.safetensors"), tmp_path)


def test_config_source_takes_configs_and_tokenizers_never_weights(pipeline_repo, tmp_path: Path) -> None:
    repo, _ = pipeline_repo
    _, fetched = resolve_and_fetch(SourceRole.config(), hub_source(repo), tmp_path)
    got = sorted(view(fetched, tmp_path / "view"))
    assert got == sorted(p for p in EXPECTED_FP16 if not p.endswith(".safetensors"))
