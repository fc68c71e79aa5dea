"""Publish through the real huggingface_hub client, and the whole Hub round trip.

One bundle is built per module (a tiny convert costs over a minute here) from upstream repos
seeded on the local Hub, by repo id and branch, exactly as a user's recipe would name them;
every test publishes it (or a copy) to a repo of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from huggingface_hub import HfApi, snapshot_download

from convert import package
from convert.build import BuildResult, build
from convert.cli import main as cli_main
from convert.errors import PublishError
from convert.fetch import fetch
from convert.publish import apply_plan, plan_publish, publish
from convert.recipe import load_recipe
from convert.resolve import resolve
from convert.workspace import Workspace

if TYPE_CHECKING:
    from hub_server import HubServer

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),  # plain-LFS PUT inside the client
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # tracing the tiny models during the one build
]

#: Files real upstream repos carry that a build must never download.
DISTRACTORS = ("unet/diffusion_flax_model.msgpack", "unet/model.onnx", "text_encoder/tf_model.h5",
               "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "sd_xl_refiner_1.0.safetensors",
               "refiner/unet/diffusion_pytorch_model.fp16.safetensors")
WRITES = ("POST", "PUT", "DELETE")


@dataclass(frozen=True)
class HubBuild:
    bundle: Path
    result: BuildResult
    base_repo: str
    vae_repo: str
    upstream: dict[str, str]  # role -> upstream commit
    build_requests: list[tuple[str, str, int]]
    recipe: Path
    workspace: Workspace


def _seed_upstream(api: HfApi, root: Path, suffix: str) -> tuple[str, str, dict[str, str]]:
    """The generated tiny pipeline as an upstream repo (with an fp16 variant and distractors) and the fixed VAE."""
    from convert.testing import generate

    base, vae = generate("tiny-sdxl-base", root / "base", 0), generate("tiny-sdxl-vae-fp16-fix", root / "vae", 0)
    for weights in list(base.rglob("*.safetensors")):  # the variant a recipe asks for (fp32 bytes: fine to load)
        shutil.copy(weights, weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    for i, rel in enumerate(DISTRACTORS):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(f"{rel} {suffix} {i}".encode() * 64)
    base_repo, vae_repo = f"test-user/upstream-tiny-sdxl-{suffix}", f"test-user/upstream-vae-fp16-fix-{suffix}"
    commits = {}
    for role, repo, folder in (("base", base_repo, base), ("substitutions.vae", vae_repo, vae)):
        api.create_repo(repo)
        commits[role] = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="upstream").oid
    return base_repo, vae_repo, commits


def _recipe(base_repo: str, vae_repo: str, publish_repo: str) -> str:
    return f"""schema_version: 1
name: hub-tiny-sdxl
description: Tiny SDXL from the (local) Hub, pinned by branch, with the FP16-fixed VAE.
base:
  hub: {{repo: {base_repo}, revision: main, variant: fp16}}
  license: apache-2.0
substitutions:
  vae:
    source:
      hub: {{repo: {vae_repo}, revision: main}}
      license: mit
    reason: the base VAE overflows at f16
components:
  text_encoder: {{weights: fp16}}
  text_encoder_2: {{weights: fp16}}
  unet: {{weights: int8, nncf: {{mode: int8_asym}}}}
  vae_decoder: {{weights: fp16}}
  vae_encoder: {{weights: fp16}}
target: {{device: GPU, inference_precision: [f16]}}
validation: {{resolution: 64, small_resolution: 32, denoise_steps: 0, images: [astronaut], check_original: false,
             end_to_end: {{prompts: []}}}}  # publishing and rebuilding: the family contract gates the run
publish: {{repo: {publish_repo}, private: true, tags: [tiny, test]}}
"""


@pytest.fixture(scope="module")
def hub_build(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> HubBuild:
    from conftest import HF_TEST_TOKEN

    root = tmp_path_factory.mktemp("hub-build")
    api = HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN)
    suffix = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    base_repo, vae_repo, upstream = _seed_upstream(api, root / "upstream", suffix)
    recipe = root / "hub-tiny-sdxl.yaml"
    recipe.write_text(_recipe(base_repo, vae_repo, f"test-user/hub-tiny-sdxl-ov-{suffix}"))
    workspace = Workspace(artifacts=root / "artifacts", hf_cache=root / "hf-cache")
    start = len(hub_server.requests_log())
    result = build(recipe, workspace)
    return HubBuild(result.bundle, result, base_repo, vae_repo, upstream, hub_server.requests_log()[start:], recipe,
                    workspace)


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest, symlinks=False)
    return dest


def _reseal(bundle: Path) -> None:
    """Rewrite the manifest after editing a copy, so only the edit (not a stale manifest) is what publish sees."""
    build_id = json.loads((bundle / package.MANIFEST).read_text())["build_id"]
    (bundle / package.MANIFEST).unlink()
    package.write_json(bundle / package.MANIFEST, package.manifest_for(bundle, build_id))


def _remote_files(api: HfApi, repo: str, revision: str | None = None) -> dict[str, Any]:
    return {s.rfilename: s for s in api.model_info(repo, revision=revision, files_metadata=True).siblings or []}


def _writes(hub_server: HubServer, since: int) -> list[tuple[str, str, int]]:
    return [r for r in hub_server.requests_log()[since:] if r[0] in WRITES]


def _bundle_set(bundle: Path) -> set[str]:
    return {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- the round trip


def test_hub_round_trip_convert_publish_download_generate(hub_server: HubServer, hf_api: HfApi, hub_build: HubBuild,
                                                          new_repo_id: str, tmp_path: Path) -> None:
    bundle = hub_build.bundle
    # convert: pinned to the upstream commits, fp16 variant, nothing else downloaded
    lock = json.loads((bundle / package.BUILD_INFO).read_text())["lock"]
    assert {s["role"]: s["commit"] for s in lock["sources"]} == hub_build.upstream
    gets = [p for m, p, _ in hub_build.build_requests if m == "GET" and "/resolve/" in p]
    fetched = {repo: {g.split(f"/{repo}/resolve/{hub_build.upstream[role]}/", 1)[1] for g in gets if g.startswith(f"/{repo}/")}
               for role, repo in (("base", hub_build.base_repo), ("substitutions.vae", hub_build.vae_repo))}
    assert sum(map(len, fetched.values())) == len(gets)  # every download named its pinned commit
    assert fetched[hub_build.vae_repo] == {"config.json", "diffusion_pytorch_model.safetensors"}
    base_weights = {f for f in fetched[hub_build.base_repo] if f.endswith(".safetensors")}
    assert base_weights == {"text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert not set(DISTRACTORS) & fetched[hub_build.base_repo]
    # a second run reuses the HF cache: 0 bytes, not a single file request
    start = len(hub_server.requests_log())
    resolution = resolve(load_recipe(hub_build.recipe), hub_build.recipe, hub_build.workspace)
    again = [fetch(s, tmp_path / "refetch" / s.role.folder_name, cache_dir=hub_build.workspace.hf_cache,
                   family=resolution.recipe.family) for s in resolution.sources]
    assert resolution.build_id == hub_build.result.build_id and [f.bytes_downloaded for f in again] == [0, 0]
    assert [p for _, p, _ in hub_server.requests_log()[start:] if "/resolve/" in p] == []

    # publish: one commit, tagged with the build id, private by the recipe
    result = publish(bundle, repo=new_repo_id)
    assert result.committed and not result.dry_run and result.tag == f"build-{hub_build.result.build_id}"
    assert result.commit == hub_server.head(new_repo_id)
    assert sorted(result.files) == sorted(_bundle_set(bundle))
    info = hf_api.model_info(new_repo_id)
    assert info.private is True
    commits = hf_api.list_repo_commits(new_repo_id)
    assert [c.commit_id for c in commits][:1] == [result.commit] and len(commits) == 2  # repo creation + the bundle
    tags = {t.name: t.target_commit for t in hf_api.list_repo_refs(new_repo_id).tags}
    assert tags == {result.tag: result.commit}

    # the card metadata comes back through model_info
    card = info.card_data.to_dict() if info.card_data else {}
    assert card["library_name"] == "openvino" and card["pipeline_tag"] == "text-to-image"
    assert card["base_model"] == hub_build.base_repo and card["base_model_relation"] == "quantized"
    assert card["license"] == "apache-2.0" and card["substitution_licenses"] == {"vae": "mit"}
    assert {"openvino", "tiny", "test"} <= set(card["tags"])
    assert card["upstream"] == hub_build.upstream and card["build_id"] == hub_build.result.build_id
    assert card["upstream_sources"] == {"base": f"hub:{hub_build.base_repo}@main",
                                        "substitutions.vae": f"hub:{hub_build.vae_repo}@main"}
    assert card["validation"]["passed"] is True and card["validation"]["f16"]["non_finite"] == 0

    # download into a fresh cache: exactly the bundle, byte for byte
    folder = Path(snapshot_download(new_repo_id, cache_dir=tmp_path / "fresh-cache"))
    manifest = json.loads((folder / package.MANIFEST).read_text())
    downloaded = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert downloaded == set(manifest["files"]) | {package.MANIFEST, ".gitattributes"}
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert package.verify(folder) == [".gitattributes: not in the manifest"]

    # and it runs
    from optimum.intel import OVStableDiffusionXLPipeline

    pipe = OVStableDiffusionXLPipeline.from_pretrained(folder, device="CPU")
    image = pipe("a photo of an astronaut riding a horse", height=64, width=64, num_inference_steps=2).images[0]
    assert image.size == (64, 64)


# ----------------------------------------------------------------------------- idempotence, strays, dry run


def test_republishing_the_same_bundle_makes_no_commit(hub_server: HubServer, hf_api: HfApi, hub_build: HubBuild,
                                                      new_repo_id: str) -> None:
    first = publish(hub_build.bundle, repo=new_repo_id)
    start = len(hub_server.requests_log())
    second = publish(hub_build.bundle, repo=new_repo_id)

    assert first.committed and not second.committed
    assert second.commit == first.commit == hub_server.head(new_repo_id)
    assert second.files == () and len(second.unchanged) == len(_bundle_set(hub_build.bundle))
    assert len(hf_api.list_repo_commits(new_repo_id)) == 2
    assert [r for r in _writes(hub_server, start) if "/commit/" in r[1] or "lfs" in r[1]] == []
    assert cli_main(["--json", "publish", str(hub_build.bundle), "--repo", new_repo_id]) == 0


def test_stray_remote_files_are_removed_in_the_same_commit(hf_api: HfApi, hub_build: HubBuild, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id, private=True)
    hf_api.upload_file(path_or_fileobj=b"old ir", path_in_repo="unet_refiner/openvino_model.xml", repo_id=new_repo_id)
    hf_api.upload_file(path_or_fileobj=b"# old card\n", path_in_repo="README.md", repo_id=new_repo_id)
    before = len(hf_api.list_repo_commits(new_repo_id))

    result = publish(hub_build.bundle, repo=new_repo_id)
    assert result.deleted == ("unet_refiner/openvino_model.xml",) and "README.md" in result.files
    assert set(_remote_files(hf_api, new_repo_id)) == _bundle_set(hub_build.bundle) | {".gitattributes"}
    assert len(hf_api.list_repo_commits(new_repo_id)) == before + 1


def test_dry_run_lists_the_plan_and_changes_nothing(hub_server: HubServer, hf_api: HfApi, hub_build: HubBuild,
                                                    new_repo_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    start = len(hub_server.requests_log())
    planned = publish(hub_build.bundle, repo=new_repo_id, dry_run=True)
    assert planned.dry_run and not planned.committed and planned.commit is None
    assert sorted(planned.files) == sorted(_bundle_set(hub_build.bundle))
    assert cli_main(["--json", "publish", str(hub_build.bundle), "--repo", new_repo_id, "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dry_run"] is True and sorted(shown["files"]) == sorted(planned.files)
    assert _writes(hub_server, start) == []
    assert not hf_api.repo_exists(new_repo_id)

    published = publish(hub_build.bundle, repo=new_repo_id)
    start = len(hub_server.requests_log())
    again = publish(hub_build.bundle, repo=new_repo_id, dry_run=True)
    assert again.files == () and again.deleted == () and again.commit == published.commit
    assert _writes(hub_server, start) == []


def test_convert_publish_targets_the_recipes_repo_privately(hf_api: HfApi, hub_build: HubBuild, new_repo_id: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe = json.loads((hub_build.bundle / package.BUILD_INFO).read_text())["recipe"]
    artifacts = str(hub_build.workspace.artifacts)
    assert cli_main(["--artifacts", artifacts, "--json", "convert", str(hub_build.recipe), "--publish"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "reused" and shown["bundle"] == str(hub_build.bundle)  # same build id: no rebuild
    assert shown["published"]["repo"] == recipe["publish"]["repo"] and shown["published"]["committed"] is True
    assert hf_api.model_info(recipe["publish"]["repo"]).private is True

    public = publish(hub_build.bundle, repo=new_repo_id, private=False)
    assert hf_api.model_info(public.repo).private is False


# ----------------------------------------------------------------------------- refusals and failures


def test_publish_refuses_a_failing_report(hub_server: HubServer, hub_build: HubBuild, tmp_path: Path,
                                          new_repo_id: str) -> None:
    bundle = _copy(hub_build.bundle, tmp_path / "bundle")
    report = json.loads((bundle / "validation/report.json").read_text())
    report["passed"] = False
    (bundle / "validation/report.json").write_text(json.dumps(report))
    _reseal(bundle)  # a consistent manifest: the refusal must come from the report, not from a changed file
    start = len(hub_server.requests_log())
    with pytest.raises(PublishError) as info:
        publish(bundle, repo=new_repo_id)
    assert str(info.value).startswith(f"{bundle}: refusing to publish: validation did not pass")
    assert str(info.value).endswith("; see validation/report.md; fix the recipe and rebuild")
    assert hub_server.requests_log()[start:] == []


def test_publish_refuses_broken_and_tampered_bundles(hub_server: HubServer, hub_build: HubBuild, tmp_path: Path,
                                                     new_repo_id: str) -> None:
    broken = _copy(hub_build.bundle, tmp_path / "artifacts" / "broken" / hub_build.result.build_id)
    with pytest.raises(PublishError, match=r"refusing to publish a failed build \(it lies under broken/\)"):
        publish(broken, repo=new_repo_id)

    tampered = _copy(hub_build.bundle, tmp_path / "tampered")
    (tampered / "unet" / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(PublishError) as info:
        publish(tampered, repo=new_repo_id)
    assert str(info.value) == (f"{tampered}: refusing to publish: bundle does not verify: unet/openvino_model.xml: "
                               "size 6 != " + str((hub_build.bundle / "unet/openvino_model.xml").stat().st_size)
                               + "; rebuild it with `convert`")
    assert not HfApi().repo_exists(new_repo_id)


def test_server_error_on_commit_leaves_the_remote_and_the_bundle(hub_server: HubServer, hf_api: HfApi,
                                                                 hub_build: HubBuild, new_repo_id: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    hf_api.create_repo(new_repo_id, private=True)
    previous = hf_api.upload_file(path_or_fileobj=b"v0\n", path_in_repo="NOTES.md", repo_id=new_repo_id).oid
    hub_server.fail_next("POST", r"/commit/")

    code = cli_main(["publish", str(hub_build.bundle), "--repo", new_repo_id])
    err = capsys.readouterr().err
    assert code == PublishError.exit_code
    assert f"{new_repo_id}: committing failed: the Hub answered HTTP 500; the repo is unchanged at {previous[:12]}" in err
    assert "retry later; publishing again uploads only what is missing" in err
    assert hub_server.head(new_repo_id) == previous
    assert set(_remote_files(hf_api, new_repo_id)) == {".gitattributes", "NOTES.md"}
    assert hf_api.list_repo_refs(new_repo_id).tags == []
    assert package.verify(hub_build.bundle) == []

    retried = publish(hub_build.bundle, repo=new_repo_id)
    assert retried.committed and retried.deleted == ("NOTES.md",)


def test_a_push_after_planning_fails_the_commit_instead_of_clobbering(hub_server: HubServer, hf_api: HfApi,
                                                                     hub_build: HubBuild, new_repo_id: str) -> None:
    hf_api.create_repo(new_repo_id, private=True)
    api = HfApi()
    plan = plan_publish(hub_build.bundle, repo=new_repo_id, private=None, api=api)
    concurrent = hf_api.upload_file(path_or_fileobj=b"theirs\n", path_in_repo="NOTES.md", repo_id=new_repo_id).oid
    with pytest.raises(PublishError) as info:
        apply_plan(api, plan)
    assert "the repo changed since it was read" in str(info.value) and "run publish again" in str(info.value)
    assert hub_server.head(new_repo_id) == concurrent


def test_the_token_never_reaches_logs_results_or_the_bundle(hub_server: HubServer, hub_build: HubBuild,
                                                            new_repo_id: str, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import HF_TEST_TOKEN

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # the client's own debug lines too
    outputs = [json.dumps(publish(hub_build.bundle, repo=new_repo_id, dry_run=True).to_json()),
               json.dumps(publish(hub_build.bundle, repo=new_repo_id).to_json())]
    hub_server.fail_next("POST", r"/commit/")
    with pytest.raises(PublishError) as info:
        publish(_copy_with_change(hub_build.bundle, tmp_path / "changed"), repo=new_repo_id)
    outputs.append(str(info.value))
    cli_main(["-v", "--json", "publish", str(hub_build.bundle), "--repo", new_repo_id])
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    assert caplog.text and all(HF_TEST_TOKEN not in text for text in outputs)
    assert not [p for p in hub_build.bundle.rglob("*") if p.is_file() and HF_TEST_TOKEN.encode() in p.read_bytes()]


def _copy_with_change(bundle: Path, dest: Path) -> Path:
    copy = _copy(bundle, dest)
    (copy / "validation" / "report.md").write_text("edited\n")
    _reseal(copy)
    return copy
