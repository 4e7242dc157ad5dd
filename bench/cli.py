"""CLI commands of exportline.bench; `register(app)` adds them to the `exportline` command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Commands are added here as they are built."""
