"""`exportline pull`: download a pushed bundle and trust it only after every checksum matches.

The download goes to a hidden folder beside --out; only when every file matches manifest.json
is it renamed to --out. A mismatch removes the download and names the file, so nothing that
looks like a verified bundle is left behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exportline.deploy.engines import EngineCheck, check_engines
from exportline.deploy.hub import KEEP_REMOTE, REPO_ID, check_repo_id, hub_api, hub_errors, resolve_token
from exportline.exporters.core.bundle import MANIFEST, Bundle, file_digests
from exportline.exporters.core.errors import ArtifactError, ConfigError, OutputError
from exportline.exporters.core.layout import cache_root

HUB_METADATA = ".cache"  # huggingface_hub's bookkeeping inside a local_dir download


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit: str
    out: Path
    files: int
    bytes: int
    missing: list[str] = field(default_factory=list)  # in the manifest, not in the repo (partial push)
    engines: list[EngineCheck] = field(default_factory=list)


def pull_bundle(
    repo_id: str, *, out: Path, revision: str | None = None, token: str | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> PullResult:
    check_repo_id(repo_id)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} exists and is not empty; choose another --out or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent}: {exc.strerror}; pick a writable --out") from None
    tmp = out.parent / f".{out.name}.pull-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    revision = revision or "main"
    try:
        commit = _download(repo_id, revision, tmp, token=resolve_token(token), progress=progress)
        progress("checking every file against manifest.json")
        manifest, missing = verify_download(tmp, repo_id)
        engines = check_engines(tmp, bundle_arg=str(out))
        manifest["pulled"] = {"repo_id": repo_id, "revision": revision, "commit": commit, "missing": missing,
                              "engines": {e.path: e.as_dict() for e in engines}}
        manifest = Bundle(tmp).write_manifest(manifest)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = manifest["files"]
    return PullResult(repo_id, revision, commit, out, len(files), sum(f["bytes"] for f in files), missing, engines)


def _download(repo_id: str, revision: str, dest: Path, *, token: str | None, progress: Callable[[str], None],
              allow_patterns: list[str] | None = None) -> str:
    """snapshot_download pinned to the commit `revision` resolves to; returns that commit."""
    from huggingface_hub import snapshot_download

    with hub_errors(f"pulling {repo_id}", repo_id, "run the same command again"):
        commit = hub_api(token).repo_info(repo_id, revision=revision).sha
        progress(f"downloading {repo_id}@{revision} (commit {commit[:12]})")
        snapshot_download(repo_id, revision=commit, local_dir=dest, token=token, allow_patterns=allow_patterns)
    shutil.rmtree(dest / HUB_METADATA, ignore_errors=True)
    for rel in KEEP_REMOTE:
        (dest / rel).unlink(missing_ok=True)
    return commit


def verify_download(root: Path, repo_id: str) -> tuple[dict[str, Any], list[str]]:
    """Check every downloaded file against manifest.json; returns the manifest with this
    machine's mtimes (so later runs trust the checksums) and the files it lists that are absent."""
    bundle = Bundle(root)
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{repo_id} has no manifest.json: it is not an exportline bundle; push one with exportline push")
    manifest = bundle.read_manifest()
    listed = {f["path"]: f for f in manifest.get("files", [])}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    unknown = sorted(present - listed.keys())
    if unknown:
        raise ArtifactError(f"{unknown[0]} is in {repo_id} but not in its manifest.json (added after the push); "
                            "nothing was kept: ask the owner to re-push the bundle with exportline push")
    verified = []
    digests = file_digests([root / rel for rel in present])
    for rel in sorted(present):
        want, path = listed[rel], root / rel
        got = digests[path]
        if path.stat().st_size != want["bytes"] or got != want["sha256"]:
            raise ArtifactError(
                f"{rel} does not match manifest.json (sha256 {got[:16]}… instead of {want['sha256'][:16]}…): the file "
                f"was changed after the push; nothing was kept. Pull a revision you trust (--revision) or ask the owner to re-push"
            )
        verified.append({**want, "mtime_ns": path.stat().st_mtime_ns})
    manifest["files"] = verified
    return manifest, sorted(listed.keys() - present)


# -- a repo id where a bundle folder is expected ------------------------------------------------
def bundle_or_pull(
    arg: str, *, revision: str | None = None, token: str | None = None, progress: Callable[[str], None] = lambda m: None,
) -> Path:
    """A bundle folder as given, or, for a Hub repo id ORG/NAME that is not a local folder, the
    bundle pulled into the cache (<cache>/hub/ORG/NAME/<commit>), checksums verified by
    pull_bundle. A commit already pulled is reused, so only the first run downloads."""
    path = Path(arg)
    if path.exists():
        return path
    if not REPO_ID.match(arg):
        raise ConfigError(f"{arg}: no such bundle folder, and not a Hub repo id (ORG/NAME); give one of the two")
    token = resolve_token(token)
    with hub_errors(f"looking up {arg}", arg, "check the repo id, or pull it first: exportline pull ORG/NAME --out DIR"):
        commit = hub_api(token).repo_info(arg, revision=revision or "main").sha
    dest = cache_root() / "hub" / arg / commit
    if (dest / MANIFEST).is_file():
        progress(f"using {arg}@{commit[:12]} pulled earlier: {dest}")
        return dest
    progress(f"pulling {arg}@{commit[:12]} into {dest}")
    pull_bundle(arg, out=dest, revision=commit, token=token, progress=progress)
    return dest


# What to-checkpoint reads: the weights, their config and the training state; not ONNX/TRT.
CHECKPOINT_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                       "training/*", MANIFEST]


@dataclass
class PulledCheckpoint:
    repo_id: str
    revision: str
    commit: str
    files: int  # downloaded and checked against manifest.json
    checkpoint: Any  # exporters.checkpoint_writer.WrittenCheckpoint


def pull_checkpoint(
    repo_id: str, *, out: Path, format: str, revision: str | None = None, token: str | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> PulledCheckpoint:
    """`pull --to-checkpoint`: only the files a training checkpoint needs, each checked against
    the manifest, turned into `out` (e.g. nanoGPT's ckpt.pt); the download is then removed."""
    from exportline.exporters.core.errors import ConfigError
    from exportline.exporters.sources.checkpoint_writer import FORMATS, write_checkpoint

    check_repo_id(repo_id)
    if format not in FORMATS:
        raise ConfigError(f"--to-checkpoint {format!r}: formats are {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; with --to-checkpoint give the checkpoint file, e.g. out/ckpt.pt")
    revision = revision or "main"
    tmp = out.parent / f".{out.name}.pull-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        commit = _download(repo_id, revision, tmp, token=resolve_token(token), progress=progress,
                           allow_patterns=CHECKPOINT_PATTERNS)
        progress("checking the downloaded files against manifest.json")
        verify_download(tmp, repo_id)
        written = write_checkpoint(tmp, out, format=format)
        files = sum(1 for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PulledCheckpoint(repo_id, revision, commit, files, written)
