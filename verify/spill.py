"""Objects parked on disk while something large runs: verify's reference data beside an ORT session.

On 1b the float64 reference outputs and feeds of every case are ~100 MB and the graph's
outputs ~50 MB, while the fp32 session alone holds ~3.85 GiB (its weights prepacked, the
embedding table mapped): with them in memory too, verify peaked over 4 GiB. Parked here,
the session runs beside one case's feed and output at a time. Everything written here was
made by this process (pickle of numpy arrays and dicts), read back by it, and removed on close.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any


class Spill:
    """`with Spill() as spill: key = spill.put(obj); obj = spill.get(key)`."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def __enter__(self) -> "Spill":
        self._dir = tempfile.TemporaryDirectory(prefix="exportline-verify-")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def put(self, obj: Any) -> Path:
        path = Path(self._dir.name) / f"{self._count}.pickle"
        self._count += 1
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def get(self, key: Path) -> Any:
        with open(key, "rb") as f:
            return pickle.load(f)  # written by put() above, in this run: not outside data
