"""The bundle folder: files, checksums, manifest.json and the lock against concurrent runs.

The manifest is the bundle's promise (DESIGN.md §2): every command that reads a bundle file
checks it against manifest.json first, through `Bundle.require_intact`. This module is the
one place that hashes bundle files: in 1 MiB chunks, on a thread pool (hashlib releases the
GIL while it hashes), and each file at most once per command (`forget_digests` starts a
command; the cache key includes the inode's ctime, which no user can set back).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from exportline.exporters.core.errors import ArtifactError, IntegrityError, OutputError
from exportline.exporters.core.layout import (
    BENCH_JSON,
    CARD,
    GENAI_CONFIG,
    HUBCONF,
    LOCK,
    MANIFEST,
    REPORTS,
    TMP,
    VERIFY_JSON,
    VERIFY_MD,
)

MANIFEST_FORMAT = "exportline-manifest/1"
# Files exportline writes outside the stages; with the stage outputs, the only files a
# manifest lists (and so the only ones a push uploads): a bundle holds nothing foreign.
OWN_FILES = {
    GENAI_CONFIG: "exportline export SOURCE --out {root}",  # written after every stage (consumer_files.py)
    CARD: "exportline card write {root}",
    HUBCONF: "exportline card write {root}",
    VERIFY_JSON: "exportline verify {root}",
    VERIFY_MD: "exportline verify {root}",
    BENCH_JSON: "exportline bench {root}",
    f"{REPORTS}/bench.md": "exportline bench {root}",
    f"{REPORTS}/bench.png": "exportline bench {root}",
}
REGENERATED = (CARD, HUBCONF)  # rewritten by every prepare/push, so never stale
_CHUNK = 1 << 20
_DIGESTS: dict[tuple, str] = {}
_DIGESTS_LOCK = threading.Lock()


def forget_digests() -> None:
    """Start of a command: every file is hashed again (once) from here on."""
    with _DIGESTS_LOCK:
        _DIGESTS.clear()


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    """sha256 of one file, read in chunks (memory stays flat for multi-GB weights)."""
    return file_digests([Path(path)], chunk=chunk)[Path(path)]


def file_digests(paths: Iterable[Path], *, chunk: int = _CHUNK, threads: int | None = None) -> dict[Path, str]:
    """sha256 of every file, several at once; each file is read at most once per command."""
    paths = [Path(p) for p in paths]
    keys = {p: _stat_key(p) for p in paths}
    with _DIGESTS_LOCK:
        found = {p: _DIGESTS[k] for p, k in keys.items() if k in _DIGESTS}
    todo = [p for p in dict.fromkeys(paths) if p not in found]
    if todo:
        workers = threads or min(len(todo), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            for p, digest in zip(todo, pool.map(lambda q: _hash(q, chunk), todo)):
                found[p] = digest
                with _DIGESTS_LOCK:
                    _DIGESTS[keys[p]] = digest
    return found


def remember_digest(path: Path, digest: str) -> None:
    """A writer that hashed `path` while writing it (onnx/write_digest.py) records the digest
    under the file's current stat key: any later change to the file is a new key (a write
    moves mtime and ctime; ctime cannot be set back), so the memo never answers for it."""
    with _DIGESTS_LOCK:
        _DIGESTS[_stat_key(Path(path))] = digest


def carry_digest(src: Path, dest: Path, action) -> None:
    """Run `action` (a rename of src to dest, a chmod of src == dest) and keep a digest the
    memo holds for src's exact stat key: rename and chmod change ctime, not the bytes. Only
    exportline's own move is carried; the key before it must match exactly."""
    try:
        before = _stat_key(Path(src))
    except OSError:
        before = None
    action()
    with _DIGESTS_LOCK:
        digest = _DIGESTS.get(before) if before else None
    if digest is not None:
        remember_digest(dest, digest)


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash(path: Path, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """One manifest entry against the disk: status ok | missing | size | sha256."""

    path: str
    bytes: int
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def write_text_atomic(path: Path, text: str) -> None:
    """Write next to the target and rename: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}; {_disk_hint(exc)}") from None


def _disk_hint(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full: free space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return "pick a writable folder with --out"
    return "check the output folder and run again"


def stamped(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as written now: its format and an "updated" stamp."""
    return {**manifest, "format": MANIFEST_FORMAT, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def manifest_text(manifest: dict[str, Any]) -> str:
    """manifest.json's bytes: the one serialization (write_manifest writes it; a dry run shows it)."""
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


class Bundle:
    """One model's output folder (DESIGN.md §2)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- manifest ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"format": MANIFEST_FORMAT, "stages": {}, "files": []}
        redo = "restore it (exportline pull) or export again into a new folder: exportline export SOURCE --out NEWDIR"
        try:
            data = json.loads(self.manifest_path.read_bytes())
        except OSError as exc:
            raise ArtifactError(f"cannot read {self.manifest_path}: {exc.strerror}") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{self.manifest_path} is not valid JSON ({reason}); {redo}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"{self.manifest_path} is not an exportline manifest; export into an empty folder")
        problem = _manifest_problem(data)
        if problem:
            raise ArtifactError(f"{self.manifest_path} is corrupt ({problem}); {redo}")
        return data

    def write_manifest(self, manifest: dict[str, Any], *, only_under: str | None = None) -> dict[str, Any]:
        """Refresh the file list (path, bytes, sha256) and write manifest.json atomically.

        With `only_under="reports/"` only that folder's entries are refreshed; the others stay
        as the stages recorded them, so a changed artifact still shows as changed."""
        files = self.list_files(manifest)
        if only_under is not None:
            kept = [f for f in manifest.get("files", []) if not f["path"].startswith(only_under)]
            files = sorted(kept + [f for f in files if f["path"].startswith(only_under)], key=lambda f: f["path"])
        manifest = stamped({**manifest, "files": files})
        write_text_atomic(self.manifest_path, manifest_text(manifest))
        return manifest

    def owned_paths(self, manifest: dict[str, Any]) -> list[str]:
        """What the manifest may list: outputs of recorded stages and exportline's own files."""
        outputs = {rel for rec in manifest.get("stages", {}).values() for rel in rec.get("outputs", [])}
        return sorted(outputs | set(OWN_FILES))

    def list_files(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """Every file exportline wrote that is on disk, with its checksum; files whose size and
        mtime match the previous entry keep its checksum (callers that publish hash first)."""
        known = {f["path"]: f for f in manifest.get("files", [])}
        present = [rel for rel in self.owned_paths(manifest) if (self.root / rel).is_file()]
        stats = {rel: (self.root / rel).stat() for rel in present}
        fresh = [rel for rel in present if not _same_stat(known.get(rel), stats[rel])]
        digests = file_digests([self.root / rel for rel in fresh])
        return [
            {"path": rel, "bytes": stats[rel].st_size, "mtime_ns": stats[rel].st_mtime_ns,
             "sha256": digests[self.root / rel] if rel in fresh else known[rel]["sha256"]}
            for rel in present
        ]

    # -- integrity ----------------------------------------------------------------------------
    def check(self, rels: Iterable[str] | None = None, *, fast: bool = False,
              manifest: dict[str, Any] | None = None) -> list[FileCheck]:
        """Listed files (all, or those of `rels` the manifest lists) against their entries.
        fast=True trusts a recorded checksum when size and mtime are unchanged: only for
        commands that publish nothing."""
        manifest = manifest if manifest is not None else self.read_manifest()
        listed = {f["path"]: f for f in manifest.get("files", [])}
        wanted = list(listed) if rels is None else [r for r in dict.fromkeys(rels) if r in listed]
        checks: dict[str, FileCheck] = {}
        to_hash = []
        for rel in wanted:
            entry, path = listed[rel], self.root / rel
            if not path.is_file():
                checks[rel] = FileCheck(rel, entry["bytes"], "missing", "is missing")
            elif path.stat().st_size != entry["bytes"]:
                checks[rel] = FileCheck(rel, entry["bytes"], "size", f"has {path.stat().st_size} bytes")
            elif fast and _same_stat(entry, path.stat()):
                checks[rel] = FileCheck(rel, entry["bytes"], "ok")
            else:
                to_hash.append(rel)
        digests = file_digests([self.root / rel for rel in to_hash])
        for rel in to_hash:
            got, want = digests[self.root / rel], listed[rel]["sha256"]
            checks[rel] = FileCheck(rel, listed[rel]["bytes"], "ok" if got == want else "sha256",
                                    "" if got == want else f"has sha256 {got[:16]}…")
        return [checks[rel] for rel in wanted]

    def require_intact(self, rels: Iterable[str] | None = None, *, fast: bool = False) -> dict[str, Any]:
        """The manifest, after checking the files a command is about to read (all by default)
        that it lists; one that differs from its entry is an IntegrityError naming the command
        that rebuilds it. A folder without manifest.json
        (made by hand) is not checked: callers that need a bundle refuse it themselves."""
        if not self.manifest_path.is_file():
            return self.read_manifest()
        manifest = self.read_manifest()
        for c in self.check(rels, fast=fast, manifest=manifest):
            if not c.ok:
                raise IntegrityError(f"{self.root / c.path} {_mismatch(c, _entry(manifest, c.path))}; "
                                     f"rebuild it: {self.rebuild_command(manifest, c.path)}")
        return manifest

    def rebuild_command(self, manifest: dict[str, Any], rel: str) -> str:
        """The command that writes `rel` again."""
        for name, record in manifest.get("stages", {}).items():
            if rel in record.get("outputs", []):
                return f"exportline export {_source_arg(manifest)} --out {self.root} --stages {name} --force"
        if rel in OWN_FILES:
            return OWN_FILES[rel].format(root=self.root)
        return f"exportline export {_source_arg(manifest)} --out {self.root} --force"

    def require_own_folder(self) -> None:
        """Refuse to write into a non-empty folder that is neither a bundle nor an HF model
        folder: its files would end up beside the export. (Files exportline did not write are
        never listed in the manifest, so never pushed, whatever the folder.)"""
        if not self.root.is_dir() or self.manifest_path.is_file() or (self.root / "config.json").is_file():
            return  # a bundle, or an HF model folder (the bundle's own root layout) getting onnx/ beside it
        foreign = sorted(p.name for p in self.root.iterdir() if p.name not in (LOCK, TMP))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"{self.root} is not empty ({foreign[0]}{more}) and is not an exportline bundle "
                              "(no manifest.json); export into a new or empty folder with --out")

    # -- temporary output -------------------------------------------------------------------
    def tmp_dir(self, stage: str) -> Path:
        path = self.root / TMP / f"{stage}-{os.getpid()}"
        if path.exists():
            _rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, tmp: Path) -> list[str]:
        """Move every file of a finished stage from `tmp` into the bundle; returns their paths."""
        moved = []
        try:
            for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = src.relative_to(tmp)
                dest = self.root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                carry_digest(src, dest, lambda src=src, dest=dest: os.replace(src, dest))
                moved.append(rel.as_posix())
        except BaseException:
            # e.g. a read-only onnx/, or Ctrl-C: the files already moved are not recorded
            # anywhere, so they go (a rerun then finds the stage's outputs missing and redoes it).
            for rel in moved:
                (self.root / rel).unlink(missing_ok=True)
            _rmtree(tmp)
            raise
        _rmtree(tmp)
        return moved

    def clean_tmp(self) -> None:
        _rmtree(self.root / TMP)

    # -- lock ---------------------------------------------------------------------------------
    def lock(self) -> "BundleLock":
        return BundleLock(self.root)


class BundleLock:
    """An exclusive flock on `<bundle>/.exportline.lock`; a second run refuses at once.

    The lock file is removed on release, so a finished bundle holds only what exportline
    wrote (a push or a copy never carries it). Removing a lock file races with a run that
    opened it just before: whoever gets the flock checks that the path still names the file
    it locked, and otherwise tries again on the new one."""

    def __init__(self, root: Path):
        self.root = root
        self._fd: int | None = None

    def __enter__(self) -> "BundleLock":
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputError(
                    f"{self.root} is being written by another exportline run (pid {holder}); "
                    "wait for it to finish or choose another --out"
                ) from None
            if _same_file(fd, self.root / LOCK):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return self
            os.close(fd)  # the holder removed it between our open and our flock
        raise OutputError(f"cannot lock {self.root}: other runs keep replacing {LOCK}; try again")

    def _open(self) -> int:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.root}: {exc.strerror}; {_disk_hint(exc)}") from None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                (self.root / LOCK).unlink(missing_ok=True)  # before unlocking: nobody can hold it now
            except OSError:
                pass  # a read-only folder: the lock stays, and is never listed or pushed
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _same_stat(entry: dict[str, Any] | None, st: os.stat_result) -> bool:
    return bool(entry) and entry.get("bytes") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def _mismatch(c: FileCheck, entry: dict[str, Any]) -> str:
    if c.status == "missing":
        return "is missing, but manifest.json lists it"
    if c.status == "size":
        return f"{c.detail} but the manifest records {entry['bytes']} (truncated or changed since it was written)"
    return f"{c.detail} but manifest.json records {entry['sha256'][:16]}… (changed since it was written)"


def _entry(manifest: dict[str, Any], rel: str) -> dict[str, Any]:
    return next(f for f in manifest.get("files", []) if f["path"] == rel)


def _source_arg(manifest: dict[str, Any]) -> str:
    source = manifest.get("source") or {}
    return str(source.get("path") or source.get("preset") or "SOURCE")


def _manifest_problem(data: dict[str, Any]) -> str:
    """Why a parsed manifest cannot be trusted, or "" (shape only; checksums are checked
    against the files by Bundle.check)."""
    if not isinstance(data.get("stages", {}), dict) or not isinstance(data.get("files", []), list):
        return "'stages' must be an object and 'files' a list"
    for f in data.get("files", []):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("bytes"), int) \
                or not isinstance(f.get("sha256"), str) or len(f["sha256"]) != 64:
            return f"bad file entry {str(f)[:80]}"
        parts = Path(f["path"]).parts
        if not parts or Path(f["path"]).is_absolute() or ".." in parts:
            return f"file path {f['path']!r} points outside the bundle"
    for name, record in data.get("stages", {}).items():
        outputs = record.get("outputs", []) if isinstance(record, dict) else None
        if not isinstance(outputs, list) or not all(isinstance(o, str) and ".." not in Path(o).parts
                                                    and not Path(o).is_absolute() for o in outputs):
            return f"bad record for stage {name!r}"
    return ""


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
