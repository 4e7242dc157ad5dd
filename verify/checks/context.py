"""What a stage check is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.presets import is_random_init


@dataclass
class CheckContext:
    """The bundle, its manifest, the thresholds, a progress callback, and check options
    (e.g. {"long": 64}: the long prefill / past length of the cases)."""

    root: Path
    manifest: dict[str, Any]
    thresholds: dict[str, Any]
    progress: Callable[[str], None] = lambda message: None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        """The bundle's weights are a seeded random init (recorded when it was made)."""
        return is_random_init(self.manifest)
