"""Pages of a memory-mapped checkpoint, dropped from the process once a tensor is converted.

torch.load(mmap=True) maps the whole file and reads a tensor only when it is used, but
every page read stays in the process's resident set until the map closes: converting a
checkpoint tensor by tensor would still end holding all of it. After each tensor is
written, its pages are handed back with madvise(MADV_DONTNEED): for a file mapping the
kernel refills them from the file (usually still in the page cache) if they are read
again. On anonymous memory the same call would zero the data, so it is only ever applied
inside the address ranges /proc/self/maps lists for the checkpoint file itself; where
there is no /proc or no madvise, nothing is released and the pages stay until unmapped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

Ranges = tuple[tuple[int, int], ...]


def _libc_madvise():
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def mapped_ranges(path: Path) -> Ranges:
    """The address ranges where `path` is memory-mapped in this process (empty without /proc)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return tuple(ranges)


def release_pages(ranges: Ranges, *tensors: Any) -> int:
    """Drop the whole pages of `tensors`' storages that lie inside `ranges` (a file mapping)
    from the resident set; the bytes handed back to the kernel (0 where it cannot be done)."""
    if _MADVISE is None or not ranges:
        return 0
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for low, high in ranges:
            # whole pages only: a partial edge page is shared with the neighbouring tensor
            first, last = -(-max(start, low) // page) * page, min(end, high) // page * page
            if last > first and _MADVISE(first, last - first, mmap.MADV_DONTNEED) == 0:
                released += last - first
    return released
