"""Stage 7: put a verified, validated bundle on the Hub as one atomic, tagged commit.

Why one commit with `parent_commit`: a reader of the repo must never see half a bundle
(new UNet, old VAE), and a concurrent push must make us fail rather than be clobbered.
Why compare before uploading: re-publishing the same build must not create a commit, and
files that are on the Hub but not in the bundle (an older build's extra component) must go,
or the repo would no longer match the manifest it carries.

Only the bundle's own files are read and uploaded; nothing is written into the bundle, so its
manifest still verifies afterwards. The token comes from the client's usual sources
(HF_TOKEN, the login cache) and is never logged, stored or put in a message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert import package
from convert.errors import PackageError, PublishError
from convert.hub import HubFile, file_sha256, http_status, hub_files, same_content
from convert.recipe_rules import hub_repo_id

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import ModelInfo

log = logging.getLogger(__name__)

#: Files the Hub keeps in every repo; never deleted as "stray".
HUB_OWNED = frozenset({".gitattributes"})
REPORT = "validation/report.json"


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RemoteState:
    """A repo's head and its files, read in one call so they belong together; head None = no repo yet."""

    head: str | None
    files: dict[str, HubFile] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishPlan:
    """What a publish changes on the remote: the diff of the bundle against the repo's head."""

    repo: str
    bundle: Path
    build_id: str
    recipe_name: str
    private: bool
    local: tuple[LocalFile, ...]
    remote: RemoteState
    uploads: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deletions: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return f"build-{self.build_id}"

    @property
    def changes(self) -> bool:
        return bool(self.uploads or self.deletions)


@dataclass(frozen=True)
class PublishResult:
    repo: str
    commit: str | None  # the remote head after publishing (None: dry run of a repo that does not exist)
    tag: str
    committed: bool
    dry_run: bool
    files: tuple[str, ...]  # uploaded (or, in a dry run, to upload): new or changed files
    deleted: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    created_repo: bool = False
    url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "url": self.url,
            "commit": self.commit,
            "tag": self.tag,
            "committed": self.committed,
            "dry_run": self.dry_run,
            "created_repo": self.created_repo,
            "files": list(self.files),
            "deleted": list(self.deleted),
            "unchanged": len(self.unchanged),
        }


def publish(bundle: Path, repo: str | None = None, dry_run: bool = False, private: bool | None = None) -> PublishResult:
    """Upload a bundle to `repo` (default: the recipe's publish.repo) in one commit and tag it.

    Refuses bundles that do not verify, did not pass validation or were moved to broken/.
    A dry run reads the remote and reports the plan without changing anything.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    plan = plan_publish(bundle, repo=repo, private=private, api=api)
    return apply_plan(api, plan, dry_run=dry_run)


def apply_plan(api: HfApi, plan: PublishPlan, *, dry_run: bool = False) -> PublishResult:
    """Carry out a plan; the commit's parent is the head the plan was computed against, so a push since fails it."""
    _log_plan(plan, dry_run)
    if dry_run:
        return _result(plan, api, commit=plan.remote.head, committed=False, dry_run=True)
    created = plan.remote.head is None
    if created:
        _create_repo(api, plan)
        plan = with_remote(plan, read_remote(api, plan.repo))
    commit, committed = (_commit(api, plan), True) if plan.changes else (plan.remote.head, False)
    if commit is None:
        raise PublishError(f"{plan.repo}: the Hub returned no head commit", hint="retry; check the repo on the Hub")
    _tag(api, plan, commit)
    if committed:
        log.info("published %s to %s at %s (tag %s)", plan.bundle, plan.repo, commit, plan.tag)
    else:
        log.info("%s already holds build %s at %s: no new commit", plan.repo, plan.build_id, commit)
    return _result(plan, api, commit=commit, committed=committed, dry_run=False, created=created)


# ----------------------------------------------------------------------------- planning


def plan_publish(bundle: Path, *, repo: str | None, private: bool | None, api: HfApi) -> PublishPlan:
    """Check the bundle may be published, then diff it against the remote head."""
    loaded = _load_publishable(bundle)
    info = _build_info(loaded)
    settings = info.recipe.publish
    target = repo or (settings.repo if settings else None)
    if not target:
        raise PublishError("no target repo", path=bundle, hint="pass --repo ORG/NAME or set publish.repo in the recipe")
    try:
        hub_repo_id(target)  # the recipe's rule: huggingface_hub's validator, as owner/name
    except ValueError as e:
        raise PublishError(str(e)) from None
    visibility = private if private is not None else (settings.private if settings else True)
    plan = PublishPlan(
        repo=target, bundle=loaded.path, build_id=loaded.build_id, recipe_name=info.recipe.name,
        private=visibility, local=tuple(local_files(loaded)), remote=RemoteState(head=None),
    )
    return with_remote(plan, read_remote(api, target))


def _load_publishable(bundle: Path) -> package.Bundle:
    folder = bundle.resolve()
    if "broken" in (folder.parent.name, folder.parent.parent.name):
        raise PublishError("refusing to publish a failed build (it lies under broken/)", path=bundle,
                           hint="fix the recipe and rebuild; failed builds are kept for inspection only")
    try:
        loaded = package.load_bundle(folder)
    except PackageError as e:
        raise PublishError(f"refusing to publish: {e.message}", path=bundle, hint=e.hint) from e
    if REPORT not in loaded.files:
        raise PublishError(f"refusing to publish: no {REPORT}", path=bundle, hint="rebuild it with `convert`; publish needs a validated bundle")
    report = json.loads((folder / REPORT).read_text())
    if report.get("passed") is not True:
        failures = "; ".join(str(c.get("name", "?")) for c in report.get("checks", []) if c.get("gating") and not c.get("passed"))
        raise PublishError(f"refusing to publish: validation did not pass{f' ({failures})' if failures else ''}",
                           path=bundle, hint="see validation/report.md; fix the recipe and rebuild")
    return loaded


def _build_info(bundle: package.Bundle) -> package.BuildInfo:
    if package.BUILD_INFO not in bundle.files:
        raise PublishError(f"refusing to publish: no {package.BUILD_INFO}", path=bundle.path, hint="rebuild it with `convert`")
    try:
        info = package.read_build_info(bundle.path)
    except PackageError as e:
        raise PublishError(f"refusing to publish: {e.message}", path=bundle.path, hint=e.hint) from e
    if info.build_id != bundle.build_id:
        raise PublishError(
            f"refusing to publish: {package.BUILD_INFO} names build {info.build_id}, the manifest {bundle.build_id}",
            path=bundle.path, hint="rebuild it with `convert`",
        )
    return info


def local_files(bundle: package.Bundle) -> list[LocalFile]:
    """Every manifest-listed file plus the manifest itself: exactly what the repo must hold."""
    files = [LocalFile(rel, int(e["size"]), str(e["sha256"])) for rel, e in sorted(bundle.files.items())]
    manifest = bundle.path / package.MANIFEST
    return [*files, LocalFile(package.MANIFEST, manifest.stat().st_size, file_sha256(manifest))]


def read_remote(api: HfApi, repo: str) -> RemoteState:
    from huggingface_hub import errors as hf_errors

    try:
        info = api.model_info(repo, files_metadata=True)
    except hf_errors.RepositoryNotFoundError as e:
        if isinstance(e, hf_errors.GatedRepoError) or http_status(e) in (401, 403):
            raise _publish_error(e, repo, "reading the repo", "nothing was published") from e
        return RemoteState(head=None)
    except Exception as e:  # wrapped into one line by _publish_error
        raise _publish_error(e, repo, "reading the repo", "nothing was published") from e
    return _remote_state(info)


def _remote_state(info: ModelInfo) -> RemoteState:
    return RemoteState(head=info.sha, files={f.path: f for f in hub_files(info.siblings or [])})


def with_remote(plan: PublishPlan, remote: RemoteState) -> PublishPlan:
    """The plan against `remote`: new/changed files to upload, remote files not in the bundle to delete."""
    uploads, unchanged = [], []
    for f in plan.local:
        (unchanged if _same(f, remote.files.get(f.path), plan.bundle) else uploads).append(f.path)
    wanted = {f.path for f in plan.local}
    deletions = sorted(p for p in remote.files if p not in wanted and p not in HUB_OWNED)
    return replace(plan, remote=remote, uploads=tuple(uploads), unchanged=tuple(unchanged), deletions=tuple(deletions))


def _same(local: LocalFile, remote: HubFile | None, bundle: Path) -> bool:
    """Equal content: LFS files by sha256 (the manifest's, no re-hash); regular files by git blob id."""
    if remote is None or remote.size != local.size:
        return False
    if remote.sha256 is not None:
        return remote.sha256 == local.sha256
    return same_content(bundle / local.path, remote)


def _log_plan(plan: PublishPlan, dry_run: bool) -> None:
    prefix = "dry run: would publish" if dry_run else "publishing"
    target = plan.remote.head[:12] if plan.remote.head else "new repo"
    log.info("%s %s to %s (%s): %d to upload, %d to delete, %d unchanged", prefix, plan.bundle, plan.repo, target,
             len(plan.uploads), len(plan.deletions), len(plan.unchanged))
    for path in plan.uploads:
        log.info("  upload %s", path)
    for path in plan.deletions:
        log.info("  delete %s", path)


# ----------------------------------------------------------------------------- Hub writes


def _create_repo(api: HfApi, plan: PublishPlan) -> None:
    with _hub_errors(plan.repo, "creating the repo", "nothing was published"):
        api.create_repo(plan.repo, private=plan.private, exist_ok=True)
    log.info("created %s repo %s", "private" if plan.private else "public", plan.repo)


def _commit(api: HfApi, plan: PublishPlan) -> str:
    """One commit: every new/changed file added, every stray file deleted, on top of the head we compared with."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(plan.bundle / p)) for p in plan.uploads]
    operations += [CommitOperationDelete(path_in_repo=p) for p in plan.deletions]
    with _hub_errors(plan.repo, "committing", f"the repo is unchanged at {str(plan.remote.head)[:12]}"):
        info = api.create_commit(
            plan.repo,
            operations,
            commit_message=f"{plan.recipe_name or 'bundle'}: build {plan.build_id}",
            commit_description=f"Published by sdxl-convert from a verified bundle ({len(plan.uploads)} files uploaded, "
                               f"{len(plan.deletions)} removed). Every file's sha256 is in {package.MANIFEST}.",
            parent_commit=plan.remote.head,
        )
    return str(info.oid)


def _tag(api: HfApi, plan: PublishPlan, commit: str) -> None:
    """Tag the build so it stays downloadable after later builds; an existing tag of this build is kept."""
    from huggingface_hub import errors as hf_errors

    after = f"the commit {commit[:12]} is on the Hub but not tagged; run publish again to tag it"
    try:
        api.create_tag(plan.repo, tag=plan.tag, revision=commit, tag_message=f"build {plan.build_id}")
    except hf_errors.HfHubHTTPError as e:
        if http_status(e) != 409:
            raise _publish_error(e, plan.repo, f"tagging {plan.tag}", after) from e
        with _hub_errors(plan.repo, f"reading the refs of {plan.tag}", after):
            refs = api.list_repo_refs(plan.repo)
        existing = next((t.target_commit for t in refs.tags if t.name == plan.tag), None)
        log.info("tag %s already exists (at %s); kept", plan.tag, existing)
    except Exception as e:  # wrapped into one line by _publish_error
        raise _publish_error(e, plan.repo, f"tagging {plan.tag}", after) from e


def _result(plan: PublishPlan, api: HfApi, *, commit: str | None, committed: bool, dry_run: bool,
            created: bool = False) -> PublishResult:
    return PublishResult(
        repo=plan.repo, commit=commit, tag=plan.tag, committed=committed, dry_run=dry_run, files=plan.uploads,
        deleted=plan.deletions, unchanged=plan.unchanged, created_repo=created, url=f"{api.endpoint}/{plan.repo}",
    )


# ----------------------------------------------------------------------------- errors


@contextmanager
def _hub_errors(repo: str, action: str, state: str) -> Iterator[None]:
    """Wrap client exceptions of one Hub call; `state` tells the user where the remote was left."""
    try:
        yield
    except Exception as e:  # wrapped into one line by _publish_error
        raise _publish_error(e, repo, action, state) from e


def _publish_error(error: Exception, repo: str, action: str, state: str) -> PublishError:
    """One line per failure: what failed, where the remote was left, what to do; never request headers (the token)."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    where = f"{repo}: {action} failed"
    status = http_status(error)
    if isinstance(error, hf_errors.GatedRepoError):
        return PublishError(f"{where}: the repo is gated", hint="accept its licence on the Hub or publish elsewhere")
    if status == 412:
        return PublishError(f"{where}: the repo changed since it was read; {state}",
                            hint="run publish again: it compares with the new head and never overwrites a concurrent push")
    if status in (401, 403) or isinstance(error, hf_errors.RepositoryNotFoundError):
        return PublishError(f"{where}: not allowed (HTTP {status}); {state}",
                            hint=f"set HF_TOKEN to a token with write access to '{repo.split('/')[0]}'")
    if status is not None:
        hint = "retry later; publishing again uploads only what is missing" if status >= 500 else "check the repo id and your rights on it"
        return PublishError(f"{where}: the Hub answered HTTP {status}; {state}", hint=hint)
    if isinstance(error, ValueError) and "README.md" in str(error):
        return PublishError(f"{where}: the Hub rejected the model card metadata; {state}",
                            hint="check the YAML front matter of README.md in the bundle and rebuild")
    if isinstance(error, (OSError, ConnectionError)):
        return PublishError(f"{where}: the Hub is unreachable at {constants.ENDPOINT}; {state}",
                            hint="check the network or HF_ENDPOINT and retry")
    first_line = str(error).splitlines()[0] if str(error) else ""
    return PublishError(f"{where}: {type(error).__name__}: {first_line}; {state}", hint="retry; run with -v for details")
