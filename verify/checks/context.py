"""What a stage check is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class CheckContext:
    """The bundle, its manifest, the thresholds, a progress callback, and check options
    (e.g. {"long": 64}: the long prefill / past length of the cases)."""

    root: Path
    manifest: dict[str, Any]
    thresholds: dict[str, Any]
    progress: Callable[[str], None] = lambda message: None
    options: dict[str, Any] = field(default_factory=dict)
