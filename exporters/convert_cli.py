"""CLI commands that convert checkpoints (to-checkpoint)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Commands are added here as they are built."""
