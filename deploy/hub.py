"""Push a bundle (or a dataset) to the Hugging Face Hub as ONE atomic commit, then tag it.

A push compares the remote tree with the manifest's checksums first: unchanged files are not
sent, an unchanged bundle makes no commit, and LFS objects a previous interrupted run already
uploaded are skipped by the Hub's batch API. The commit names the head it was planned against
(`parent_commit`), so a concurrent change makes it fail instead of being overwritten.
The token is passed to the client and nowhere else: not logged, not written.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from exportline.deploy.card import README
from exportline.deploy.card_check import check_card
from exportline.deploy.prepare import plan_prepared, prepare_locked
from exportline.deploy.scan import find_secret_bytes, refuse_secrets
from exportline.exporters.core.bundle import MANIFEST, REGENERATED, Bundle, sha256_file
from exportline.exporters.core.errors import ArtifactError, ConfigError, HubError

GROUPS = ("hf", "onnx", "trt", "reports", "training")  # training/: nanoGPT optimizer state (--with-training-state)
ALWAYS = (README, MANIFEST)  # the card and the checksums travel with every push
KEEP_REMOTE = (".gitattributes",)  # created by the Hub with the repo; not a bundle file
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
RESUME = "the commit did not happen; run the same command again to finish (files already uploaded are not sent twice)"


@dataclass(frozen=True)
class UploadFile:
    path: str
    bytes: int
    sha256: str


@dataclass
class PushResult:
    repo_id: str
    repo_type: str
    files: list[UploadFile]  # what the push covers (dry run: what would be uploaded)
    dry_run: bool = False
    url: str = ""
    commit: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    tag: str | None = None
    tag_created: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def group_of(rel: str) -> str:
    head = rel.split("/", 1)[0] if "/" in rel else ""
    return head if head in GROUPS else "hf"


def parse_include(text: str | None) -> tuple[str, ...]:
    if not text:
        return GROUPS
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ConfigError(f"--include {text!r}: unknown group {', '.join(unknown) or '(none)'}; groups are {','.join(GROUPS)}")
    return groups


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or ""):
        raise ConfigError(f"repo id {repo_id!r} is not ORG/NAME (letters, digits, '-', '_', '.'); e.g. --repo-id my-org/tiny-llama")
    return repo_id


def resolve_token(token: str | None) -> str | None:
    """--token, else HF_TOKEN, else the token saved by `hf auth login`."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def hub_api(token: str | None):
    from huggingface_hub import HfApi

    try:
        version = metadata.version("exportline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return HfApi(token=token, library_name="exportline", library_version=version)


@contextlib.contextmanager
def hub_errors(what: str, repo_id: str, next_step: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line HubErrors (never the token, never a signed URL)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except RepositoryNotFoundError:
        raise HubError(f"{what}: {repo_id} not found, or private and not visible with this token; "
                       "check --repo-id and the token (--token, HF_TOKEN or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: {repo_id} has no such revision; list its tags on the Hub and pass one with --revision") from None
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 412:  # parent_commit is no longer the head
            raise HubError(f"{what}: {repo_id} changed on the Hub while this ran (another commit landed first), so "
                           "nothing was overwritten; look at that commit, then run the same command again to push on "
                           "top of it") from None
        raise HubError(f"{what}: {_http_problem(exc, repo_id)}; {next_step}") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise HubError(f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}); "
                       f"check the network or HF_ENDPOINT; {next_step}") from None
    except RuntimeError as exc:  # the client wraps failed LFS uploads: "Error while uploading 'x' to the Hub."
        cause = exc.__cause__
        # Upload URLs are pre-signed storage URLs: name the status, never the URL.
        detail = _http_problem(cause, repo_id, target=False) if isinstance(cause, HfHubHTTPError) else type(cause or exc).__name__
        raise HubError(f"{what}: {_one_line(str(exc))} ({detail}); {next_step}") from None
    except (ValueError, OSError) as exc:
        raise HubError(f"{what}: {_one_line(str(exc))}; {next_step}") from None


def _http_problem(exc, repo_id: str, *, target: bool = True) -> str:
    response = exc.response
    status = response.status_code if response is not None else "?"
    if status == 401:
        return "the Hub refused the token (401); pass a valid one with --token or HF_TOKEN, or run `hf auth login`"
    if status == 403:
        return f"the token has no write access to {repo_id} (403)"
    server = response.headers.get("X-Error-Message", "") if response is not None else ""
    request = response.request if response is not None and target else None
    where = f" to {request.method} {request.url.path}" if request is not None else ""
    reason = response.reason_phrase if response is not None else ""
    return f"the Hub answered {status} {reason}{where}" + (f" ({_one_line(server)})" if server else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# -- push a bundle ------------------------------------------------------------------------------
def push_bundle(
    root: Path, *, repo_id: str, private: bool = False, tag: str | None = None, include: tuple[str, ...] = GROUPS,
    dry_run: bool = False, token: str | None = None, progress: Callable[[str], None] = lambda m: None,
) -> PushResult:
    """Prepare the bundle (card, hubconf, manifest), refuse secrets, then commit what differs."""
    check_repo_id(repo_id)
    if tag is not None and not _TAG.match(tag):
        raise ConfigError(f"--tag {tag!r} is not a valid tag name; use e.g. v1.0.0")
    bundle = Bundle(root)
    token = resolve_token(token)
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{bundle.root} is not an exportline bundle (no manifest.json); export one first: "
                            f"exportline export SOURCE --out {bundle.root}")
    if dry_run:
        _require_published_files(bundle, progress)
        return _dry_run(bundle, repo_id=repo_id, tag=tag, include=include, token=token)
    with bundle.lock():
        _require_published_files(bundle, progress)
        progress("preparing README.md, hubconf.py and manifest.json")
        manifest = prepare_locked(bundle, repo_id=repo_id)
        problems = check_card(bundle.root)
        if problems:  # e.g. a report text carrying "TODO" into the card
            raise ArtifactError(f"the generated model card fails its check: {problems[0]}; fix the report it comes "
                                f"from, then push again (exportline card check {bundle.root} lists all)")
        listed = [f["path"] for f in manifest["files"]]
        refuse_secrets(bundle.root, listed + [MANIFEST], token)
        files = [UploadFile(f["path"], f["bytes"], f["sha256"]) for f in manifest["files"]
                 if f["path"] in ALWAYS or group_of(f["path"]) in include]
        files.append(UploadFile(MANIFEST, bundle.manifest_path.stat().st_size, sha256_file(bundle.manifest_path)))
        result = PushResult(repo_id, "model", files, tag=tag)
        if not token:
            raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
        keep = set(listed) | {MANIFEST}

        def gone(p: str) -> bool:  # a remote file of a pushed group that the bundle no longer has
            return p not in keep and p not in KEEP_REMOTE and (p in ALWAYS or group_of(p) in include)

        _sync(hub_api(token), result, bundle.root, private=private, delete=gone,
              message=f"exportline push: {manifest.get('name', bundle.root.name)}", progress=progress)
    return result


def _require_published_files(bundle: Bundle, progress: Callable[[str], None]) -> None:
    """A push publishes the checksums: every listed file is hashed now, whatever its mtime
    says (README.md and hubconf.py are regenerated by the push anyway)."""
    progress("checking every file against manifest.json (sha256)")
    listed = [f["path"] for f in bundle.read_manifest().get("files", []) if f["path"] not in REGENERATED]
    bundle.require_intact(listed, fast=False)


def _dry_run(bundle: Bundle, *, repo_id: str, tag: str | None, include: tuple[str, ...], token: str | None) -> PushResult:
    """What a push would send, with the same checks, computed without writing into the bundle
    (no README.md, hubconf.py or manifest.json rewrite, no lock file)."""
    plan = plan_prepared(bundle, repo_id=repo_id)
    readme = plan.texts[README]
    problems = check_card(bundle.root, text=readme, manifest=plan.manifest)
    if problems:
        raise ArtifactError(f"the generated model card would fail its check: {problems[0]}; fix the report it "
                            f"comes from, then push again (exportline card check {bundle.root} lists all)")
    generated = {rel: text.encode() for rel, text in plan.texts.items()}
    on_disk = [f["path"] for f in plan.manifest["files"] if f["path"] not in generated]
    refuse_secrets(bundle.root, on_disk, token)
    for rel, data in generated.items():
        _refuse_secret_text(rel, data, token)
    files = [UploadFile(f["path"], f["bytes"], f["sha256"]) for f in plan.manifest["files"]
             if f["path"] in ALWAYS or group_of(f["path"]) in include]
    manifest = plan.manifest_bytes(bundle)
    _refuse_secret_text(MANIFEST, manifest, token)
    files.append(UploadFile(MANIFEST, len(manifest), hashlib.sha256(manifest).hexdigest()))
    return PushResult(repo_id, "model", files, dry_run=True, tag=tag)


def _refuse_secret_text(rel: str, data: bytes, token: str | None) -> None:
    at = find_secret_bytes(data, token)
    if at is not None:
        raise ArtifactError(f"refused: {rel} would contain a string that looks like a Hugging Face token (at byte {at}); "
                            "remove it from the reports it comes from (and revoke the token if it is real), then run again")


def _sync(api, result: PushResult, root: Path, *, private: bool, delete: Callable[[str], bool], message: str,
          progress: Callable[[str], None]) -> None:
    """Create the repo if needed, commit what differs in one commit against the current head, tag."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    repo_id, repo_type = result.repo_id, result.repo_type
    with hub_errors(f"creating {repo_id}", repo_id, "run the same command again"):
        url = api.create_repo(repo_id, repo_type=repo_type, private=private or None, exist_ok=True)
        info = api.repo_info(repo_id, repo_type=repo_type)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, repo_type=repo_type, recursive=True, revision=info.sha)
                  if isinstance(f, RepoFile)}
    result.url = str(url)
    if private and not info.private:
        raise HubError(f"{repo_id} already exists and is public, but --private was given; nothing was pushed. "
                       "Make it private on the Hub first, or push without --private")
    changed = [f for f in result.files if not _same_as_remote(remote.get(f.path), f, root)]
    stale = sorted(p for p in remote if delete(p))
    if changed or stale:
        progress(f"committing {len(changed)} changed file(s), {len(stale)} removal(s) on top of {info.sha[:12]}")
        ops = [CommitOperationAdd(f.path, str(root / f.path)) for f in changed]
        ops += [CommitOperationDelete(p) for p in stale]
        with hub_errors(f"push to {repo_id}", repo_id, RESUME):
            result.commit = api.create_commit(repo_id, ops, repo_type=repo_type, commit_message=message,
                                              parent_commit=info.sha).oid
        result.uploaded, result.deleted = [f.path for f in changed], stale
    else:
        progress(f"{repo_id} already matches the bundle at {info.sha[:12]}: no commit")
        result.commit = info.sha
    if result.tag:
        with hub_errors(f"tagging {repo_id}", repo_id, "run the same command again to create the tag"):
            result.tag_created = _ensure_tag(api, repo_id, repo_type, tag=result.tag, commit=result.commit)


def _same_as_remote(remote, local: UploadFile, root: Path) -> bool:
    if remote is None:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256 and remote.lfs.size == local.bytes
    if remote.size != local.bytes:
        return False
    from huggingface_hub.utils.sha import git_hash

    return remote.blob_id == git_hash((root / local.path).read_bytes())  # regular files are small


def _ensure_tag(api, repo_id: str, repo_type: str, *, tag: str, commit: str) -> bool:
    """Create `tag` at `commit`; an existing tag there is fine, elsewhere it is an error."""
    existing = {t.name: t.target_commit for t in api.list_repo_refs(repo_id, repo_type=repo_type).tags}
    if tag in existing:
        if existing[tag] == commit:
            return False
        raise HubError(f"tag {tag} already points to commit {existing[tag][:12]} of {repo_id}; the files were pushed "
                       f"(commit {commit[:12]}) but not tagged: run again with a new version tag")
    api.create_tag(repo_id, repo_type=repo_type, tag=tag, revision=commit, tag_message=f"exportline {tag}")
    return True


# -- push a dataset -----------------------------------------------------------------------------
def push_dataset(
    path: Path, *, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> PushResult:
    """A file or folder as a dataset repo (repo_type="dataset"), in one commit; nothing is deleted remotely."""
    check_repo_id(repo_id)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    root = path if path.is_dir() else path.parent
    rels = [path.name] if path.is_file() else sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not rels:
        raise ConfigError(f"{path} has no files to push")
    token = resolve_token(token)
    refuse_secrets(root, rels, token)
    files = [UploadFile(r, (root / r).stat().st_size, sha256_file(root / r)) for r in rels]
    result = PushResult(repo_id, "dataset", files, dry_run=dry_run)
    if dry_run:
        return result
    if not token:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    _sync(hub_api(token), result, root, private=private, delete=lambda p: False,
          message=f"exportline push-dataset: {path.name}", progress=progress)
    return result

