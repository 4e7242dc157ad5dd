"""sha256 of the external data file, computed while the writer threads write it.

The manifest lists every file's sha256 (DESIGN.md §2); hashing 4 GB afterwards is a second
pass over the data (1b: ~2.2 s). Here the writer threads report each chunk they have written
(`ChunkedTensor.tofile`), and one hasher thread reads the file back in offset order as soon
as a prefix is complete and feeds hashlib (which releases the GIL). The file's pages were
just written, so the read is a copy from the page cache, not from disk. Chunks may be
reported in any order (two writer threads write two tensors at once): the hasher never
holds more than one read buffer; out-of-order chunks only wait, on disk, for the gap.

The digest is exactly sha256 of the final file: whatever no chunk reported (alignment
holes, a tensor written some other way) is read in order when the writer is done, so
reports only make the hash earlier, never different. `weights.save` hands the digest to
the bundle's digest memo (core/bundle.remember_digest), keyed by the file's stat, so the
manifest does not read the file again; a change to the file afterwards changes its key.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_READ = 8 << 20  # bytes per read of the hasher thread: all it holds
_ACTIVE: dict[str, "OrderedHasher"] = {}  # final data path → the hasher of its write
_ACTIVE_LOCK = threading.Lock()


class OrderedHasher:
    """Hash one file in offset order while it is being written, from `written` reports."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self._done: dict[int, int] = {}  # start → end of written, not yet hashed ranges
        self._pos = 0  # bytes hashed so far
        self._fd: int | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._sha = hashlib.sha256()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"sha256 {self.final.name}", daemon=True)
        self._thread.start()

    def written(self, file, start: int, length: int) -> None:
        """`length` bytes at `start` of `file` are written (flushed) and final."""
        with self._cond:
            if self._fd is None:
                self._fd = os.open(file.name, os.O_RDONLY)
            self._done[start] = start + length
            self._cond.notify()

    def _next_range(self) -> tuple[int, int] | None:
        with self._cond:
            while True:
                end = self._pos
                while end in self._done:  # merge the written ranges that continue the prefix
                    end = self._done.pop(end)
                if end > self._pos:
                    return self._pos, end
                if self._finished:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        try:
            while (span := self._next_range()) is not None:
                self._hash(*span)
        except BaseException as exc:  # reported by finish(), in the writer's thread
            self._error = exc

    def _hash(self, begin: int, end: int) -> None:
        buf = bytearray(min(_READ, end - begin))
        view = memoryview(buf)
        while begin < end:
            got = os.preadv(self._fd, [view[: min(len(buf), end - begin)]], begin)
            if got <= 0:
                raise OSError(f"{self.final} ended at {begin} while being hashed")
            self._sha.update(view[:got])
            begin += got
            self._pos = begin

    def finish(self) -> str | None:
        """The file's sha256 once the writer is done, or None when it cannot be trusted
        (nothing reported, or the file at `final` is not the one hashed); then the manifest
        hashes it as any other file."""
        with self._cond:
            self._finished = True
            self._cond.notify()
        self._thread.join()
        if self._fd is None:
            return None
        try:
            if self._error is not None:
                return None
            st = os.fstat(self._fd)
            if self._pos < st.st_size:  # ranges nobody reported (holes, other writers): in order now
                self._hash(self._pos, st.st_size)
            final = os.stat(self.final)
        except OSError:  # e.g. the write failed (disk full) and nothing was renamed into place
            return None
        finally:
            os.close(self._fd)
        if (final.st_dev, final.st_ino, final.st_size) != (st.st_dev, st.st_ino, self._pos):
            return None
        return self._sha.hexdigest()


def start(final: Path) -> OrderedHasher:
    hasher = OrderedHasher(final)
    with _ACTIVE_LOCK:
        _ACTIVE[_key(final)] = hasher
    return hasher


def stop(final: Path) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.pop(_key(final), None)


def _key(path) -> str:
    return os.path.realpath(path)


def hasher_for(file) -> OrderedHasher | None:
    """The hasher of the data file `file` is being written into, if any. onnx_ir writes into
    `<dir>/.<name>.XXXX/<name>` and renames it to `<dir>/<name>` when done."""
    name = getattr(file, "name", None)
    if not isinstance(name, str) or not _ACTIVE:
        return None
    temp_dir = os.path.dirname(name)
    with _ACTIVE_LOCK:
        return _ACTIVE.get(_key(os.path.join(os.path.dirname(temp_dir), os.path.basename(name)))) or \
            _ACTIVE.get(_key(name))
