"""What a stage check is given."""

from __future__ import annotations

import dataclasses
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
    # torch work (references, the hf check) in child processes: verify/runtime/isolated.py
    isolate: bool = False

    @property
    def random_init(self) -> bool:
        """The bundle's weights are a seeded random init (recorded when it was made)."""
        return is_random_init(self.manifest)


def _silent(message: str) -> None:
    """A picklable stand-in for the caller's progress callback (the child relays its own)."""


def _relayed(func: Callable[..., Any], ctx: CheckContext, *args: Any) -> Any:
    """In the torch child: `func` with its progress sent to the parent; already isolated."""
    from exportline.verify.runtime.isolated import to_parent

    return func(dataclasses.replace(ctx, progress=to_parent, isolate=False), *args)


def torch_side(ctx: CheckContext, what: str, func: Callable[..., Any], *args: Any) -> Any:
    """`func(ctx, *args)`, torch work that runs no ONNX Runtime: in a torch child process
    when `ctx.isolate` (verify/runtime/isolated.py), else here. `func` is module-level."""
    if not ctx.isolate:
        return func(ctx, *args)
    from exportline.verify.runtime.isolated import run_isolated

    return run_isolated(what, _relayed, func, dataclasses.replace(ctx, progress=_silent), *args, progress=ctx.progress)
