"""`rebuild` against the local Hub: one recipe taken through five successive steps.

Cost: four tiny builds (a full one, then three that export only what changed and reuse the rest
from the component cache; each still validates the whole bundle), about 6-9 minutes on two shared
cores, plus a no-op rebuild (about a second). Each step is a module-scoped fixture that runs the
step before it, so the tests may run in any order and each asserts on its own step.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from convert import package
from convert.rebuild import RebuildOutcome, rebuild_one
from convert.workspace import Workspace

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from hub_server import HubServer

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

WEIGHTED = {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
TOKENIZERS = {"tokenizer", "tokenizer_2"}


@dataclass
class Seq:
    root: Path
    recipe: Path
    workspace: Workspace
    api: HfApi
    hub: HubServer
    vae_repo: str
    publish_repo: str

    def rebuild(self) -> tuple[RebuildOutcome, list[tuple[str, str, int]]]:
        start = len(self.hub.requests_log())
        outcome = rebuild_one(self.recipe, self.workspace)
        assert outcome.status != "failed", outcome.message
        return outcome, self.hub.requests_log()[start:]


@pytest.fixture(scope="module")
def seq(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Seq:
    from huggingface_hub import HfApi

    from conftest import HF_TEST_TOKEN
    from test_publish import _recipe, _seed_upstream

    root = tmp_path_factory.mktemp("rebuild")
    api = HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN)
    suffix = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    base_repo, vae_repo, _ = _seed_upstream(api, root / "upstream", suffix)
    recipe = root / "recipes" / "hub-tiny-sdxl.yaml"
    recipe.parent.mkdir()
    publish_repo = f"test-user/rebuild-tiny-sdxl-ov-{suffix}"
    recipe.write_text(_recipe(base_repo, vae_repo, publish_repo))
    workspace = Workspace(artifacts=root / "artifacts", hf_cache=root / "hf-cache", cache=root / "component-cache")
    return Seq(root, recipe, workspace, api, hub_server, vae_repo, publish_repo)


@pytest.fixture(scope="module")
def first(seq: Seq) -> RebuildOutcome:
    t0 = time.monotonic()
    outcome, _ = seq.rebuild()
    print(f"\nfull build + publish: {time.monotonic() - t0:.1f} s")
    return outcome


@dataclass(frozen=True)
class Noop:
    code: int
    document: dict[str, Any]
    requests: list[tuple[str, str, int]]


@pytest.fixture(scope="module")
def noop(seq: Seq, first: RebuildOutcome) -> Noop:
    """Through the CLI, after a recipe that cannot be rebuilt (no publish:): it fails, the next still runs."""
    from convert.cli import main

    unpublishable = seq.root / "recipes" / "no-publish.yaml"
    unpublishable.write_text(seq.recipe.read_text().split("publish:")[0].replace("name: hub-tiny-sdxl", "name: no-publish"))
    start = len(seq.hub.requests_log())
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["rebuild", str(unpublishable), str(seq.recipe), "--json", "--artifacts", str(seq.workspace.artifacts),
                     "--cache", str(seq.workspace.cache)])
    document = json.loads(out.getvalue())
    print(f"\nno-op rebuild: {document['recipes'][1]['seconds']:.2f} s")
    return Noop(code, document, seq.hub.requests_log()[start:])


@pytest.fixture(scope="module")
def vae_commit(seq: Seq, noop: Noop) -> RebuildOutcome:
    from convert.testing import generate

    vae = _retouched_vae(generate("tiny-sdxl-vae-fp16-fix", seq.root / "vae-v2", 0))  # new weights, same config
    seq.api.upload_file(path_or_fileobj=vae,
                        path_in_repo="diffusion_pytorch_model.safetensors", repo_id=seq.vae_repo,
                        commit_message="a better VAE")
    outcome, _ = seq.rebuild()
    print(f"\nVAE-only rebuild + publish: {outcome.seconds:.1f} s")
    return outcome


@pytest.fixture(scope="module")
def unet_format(seq: Seq, vae_commit: RebuildOutcome) -> RebuildOutcome:
    text = seq.recipe.read_text()
    seq.recipe.write_text(text.replace("unet: {weights: int8, nncf: {mode: int8_asym}}", "unet: {weights: fp16}"))
    assert seq.recipe.read_text() != text
    outcome, _ = seq.rebuild()
    print(f"\nUNet-format rebuild + publish: {outcome.seconds:.1f} s")
    return outcome


@pytest.fixture(scope="module")
def new_tools(seq: Seq, unet_format: RebuildOutcome) -> RebuildOutcome:
    from convert import resolve

    real = resolve.tool_versions
    with pytest.MonkeyPatch.context() as mp:  # what a new OpenVINO release looks like to the keys
        mp.setattr(resolve, "tool_versions", lambda: real() | {"openvino": "2099.0.0"})
        outcome, _ = seq.rebuild()
    print(f"\nnew-tools rebuild + publish: {outcome.seconds:.1f} s")
    return outcome


def _retouched_vae(folder: Path) -> Path:
    """The same VAE with one decoder bias nudged by 1e-4: other bytes, the same images (the gate still passes)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if k.startswith("decoder.") and k.endswith(".bias"))
    tensors[name] = tensors[name] + tensors[name].dtype.type(1e-4)
    save_file(tensors, path, metadata=metadata)
    return path


def _tag_commit(seq: Seq, tag: str) -> str:
    return next(t.target_commit for t in seq.api.list_repo_refs(seq.publish_repo).tags if t.name == tag)


def test_first_rebuild_exports_everything_and_publishes_a_tag(seq: Seq, first: RebuildOutcome) -> None:
    assert first.status == "rebuilt" and first.changed == ["not published yet"]
    assert set(first.exported_components) == WEIGHTED | TOKENIZERS and first.reused_components == []
    assert first.tag == f"build-{first.build_id}" and _tag_commit(seq, first.tag) == first.commit
    assert seq.api.model_info(seq.publish_repo).sha == first.commit


def test_rebuild_with_nothing_changed_skips_with_zero_downloads(noop: Noop, first: RebuildOutcome) -> None:
    failed, skipped = noop.document["recipes"]
    assert skipped["status"] == "skipped" and skipped["build_id"] == first.build_id and skipped["commit"] == first.commit
    assert [r for r in noop.requests if "/resolve/" in r[1]] == []  # no file of any repo was downloaded
    assert all(r[0] == "GET" for r in noop.requests)  # and nothing written
    assert skipped["seconds"] < 3


def test_one_failing_recipe_does_not_stop_the_others_and_sets_the_exit_status(noop: Noop) -> None:
    failed, skipped = noop.document["recipes"]
    assert noop.code == 2 and noop.document["status"] == "error" and noop.document["exit_code"] == 2
    assert failed["recipe"] == "no-publish" and failed["status"] == "failed"
    assert failed["message"] == ("no-publish.yaml: no publish: section, so there is nothing to rebuild into; "
                                 "add publish.repo, or leave the recipe out of rebuild")
    assert skipped["status"] == "skipped"


def test_a_second_rebuild_of_the_same_recipe_is_refused_while_one_runs(seq: Seq, noop: Noop) -> None:
    from convert.staging import recipe_lock

    start = len(seq.hub.requests_log())
    with recipe_lock(seq.workspace, "hub-tiny-sdxl"):
        outcome = rebuild_one(seq.recipe, seq.workspace)
    assert outcome.status == "failed" and outcome.exit_code == 75
    assert outcome.message.startswith(f"another build of hub-tiny-sdxl is running (pid {os.getpid()})")
    assert seq.hub.requests_log()[start:] == []  # refused before any call


def test_vae_only_upstream_change_re_exports_only_the_vae(seq: Seq, first: RebuildOutcome,
                                                          vae_commit: RebuildOutcome) -> None:
    from huggingface_hub import hf_hub_download

    assert vae_commit.status == "rebuilt" and vae_commit.build_id != first.build_id
    assert any(line.startswith("substitutions.vae: commit ") for line in vae_commit.changed), vae_commit.changed
    assert set(vae_commit.exported_components) - TOKENIZERS == {"vae_decoder", "vae_encoder"}
    assert set(vae_commit.reused_components) == {"text_encoder", "text_encoder_2", "unet"}
    assert vae_commit.commit != first.commit and _tag_commit(seq, f"build-{vae_commit.build_id}") == vae_commit.commit
    assert vae_commit.bundle is not None and not package.verify(Path(vae_commit.bundle))
    report = json.loads((Path(vae_commit.bundle) / "validation" / "report.json").read_text())
    assert report["passed"] is True
    # the old tag still serves the old bundle, byte for byte
    assert first.bundle is not None and first.tag is not None
    old_manifest = package.load_bundle(Path(first.bundle)).files
    path = hf_hub_download(seq.publish_repo, "vae_decoder/openvino_model.bin", revision=first.tag)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == old_manifest["vae_decoder/openvino_model.bin"]["sha256"]
    new_manifest = package.load_bundle(Path(vae_commit.bundle)).files
    assert new_manifest["vae_decoder/openvino_model.bin"]["sha256"] != old_manifest["vae_decoder/openvino_model.bin"]["sha256"]
    assert new_manifest["unet/openvino_model.bin"] == old_manifest["unet/openvino_model.bin"]


def test_unet_weight_format_change_re_exports_only_the_unet(unet_format: RebuildOutcome) -> None:
    assert unet_format.status == "rebuilt"
    assert "recipe: changed (its digest differs)" in unet_format.changed
    assert set(unet_format.exported_components) - TOKENIZERS == {"unet"}
    assert set(unet_format.reused_components) == WEIGHTED - {"unet"}


def test_new_tool_version_rebuilds_everything(new_tools: RebuildOutcome) -> None:
    assert new_tools.status == "rebuilt" and "tools: openvino" in " ".join(new_tools.changed)
    assert set(new_tools.exported_components) == WEIGHTED | TOKENIZERS and new_tools.reused_components == []


def test_a_killed_cache_write_leaves_no_entry(seq: Seq, first: RebuildOutcome, tmp_path: Path) -> None:
    """A temporary entry of a dead process is removed; a damaged entry is refused, not linked."""
    from convert.component_cache import ComponentCache

    cache = ComponentCache(seq.workspace.component_cache)
    dead = cache.root / ".tmp-abc-999999999-0000"
    dead.mkdir(parents=True)
    cache.remove_stale_temporaries()
    assert not dead.exists()
    entries = sorted(p for p in cache.root.glob("??/*") if p.is_dir())
    assert entries
    copy = tmp_path / "cache"
    shutil.copytree(cache.root, copy)
    victim = copy / entries[0].relative_to(cache.root)
    (victim / "files" / "openvino_model.bin").write_bytes(b"truncated")
    assert ComponentCache(copy).restore(victim.name, tmp_path / "out") is False
    assert not victim.exists() and not (tmp_path / "out").exists()
