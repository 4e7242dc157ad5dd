"""The bundle folder: files, checksums, manifest.json and the lock against concurrent runs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError, OutputError
from exportline.exporters.core.layout import LOCK, MANIFEST, TMP

MANIFEST_FORMAT = "exportline-manifest/1"
_NOT_LISTED = {MANIFEST, LOCK}


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{self.manifest_path} is not valid JSON ({exc}); re-run the export with --force") from None
        if data.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"{self.manifest_path} is not an exportline manifest; export into an empty folder")
        return data

    def write_manifest(self, manifest: dict[str, Any], *, only_under: str | None = None) -> dict[str, Any]:
        """Refresh the file list (path, bytes, sha256) and write manifest.json atomically.

        With `only_under="reports/"` only that folder's entries are refreshed; the others stay
        as the stages recorded them, so a changed artifact still shows as changed."""
        manifest = dict(manifest)
        manifest["format"] = MANIFEST_FORMAT
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        files = self.list_files(previous=manifest.get("files", []))
        if only_under is not None:
            kept = [f for f in manifest.get("files", []) if not f["path"].startswith(only_under)]
            files = sorted(kept + [f for f in files if f["path"].startswith(only_under)], key=lambda f: f["path"])
        manifest["files"] = files
        write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        return manifest

    def refresh_manifest(self) -> dict[str, Any]:
        """Re-list the files (e.g. after reports/ or README.md were written) under the lock."""
        with self.lock():
            return self.write_manifest(self.read_manifest())

    def list_files(self, previous: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Every file in the bundle with its checksum; unchanged files (same size and mtime)
        reuse the checksum already recorded instead of re-reading gigabytes."""
        known = {f["path"]: f for f in previous}
        files = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if not path.is_file() or rel in _NOT_LISTED or rel.split("/")[0] == TMP:
                continue
            st = path.stat()
            old = known.get(rel)
            if old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
                digest = old["sha256"]
            else:
                digest = sha256_file(path)
            files.append({"path": rel, "bytes": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns})
        return files

    def check_files(self, manifest: dict[str, Any] | None = None) -> list[str]:
        """Paths whose bytes differ from the manifest (missing, resized or re-hashed)."""
        manifest = manifest or self.read_manifest()
        bad = []
        for f in manifest.get("files", []):
            path = self.root / f["path"]
            if not path.is_file() or path.stat().st_size != f["bytes"] or sha256_file(path) != f["sha256"]:
                bad.append(f["path"])
        return bad

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
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = src.relative_to(tmp)
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            moved.append(rel.as_posix())
        _rmtree(tmp)
        return moved

    def clean_tmp(self) -> None:
        _rmtree(self.root / TMP)

    # -- lock ---------------------------------------------------------------------------------
    def lock(self) -> "BundleLock":
        return BundleLock(self.root)


class BundleLock:
    """An exclusive flock on `<bundle>/.exportline.lock`; a second run refuses at once."""

    def __init__(self, root: Path):
        self.root = root
        self._fd: int | None = None

    def __enter__(self) -> "BundleLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.root}: {exc.strerror}; {_disk_hint(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"{self.root} is being written by another exportline run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
