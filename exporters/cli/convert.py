"""CLI commands that convert checkpoints (to-checkpoint)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class CheckpointFormat(str, Enum):
    nanogpt = "nanogpt"


def register(app: typer.Typer) -> None:
    @app.command("to-checkpoint")
    def to_checkpoint(
        folder: Annotated[Path, typer.Argument(help="HF folder (bundle root) exported from a nanoGPT .pt.")],
        out: Annotated[Path, typer.Option("--out", help="Checkpoint file to write, e.g. ckpt.pt.")],
        format: Annotated[CheckpointFormat, typer.Option("--format", help="Checkpoint format.")] = CheckpointFormat.nanogpt,
    ) -> None:
        """Turn an HF folder back into the training checkpoint it came from (bit-exact weights),
        ready for nanoGPT's train.py --init_from=resume."""
        from exportline.exporters.sources.checkpoint_writer import write_checkpoint

        written = write_checkpoint(folder, out, format=format.value)
        typer.echo(f"wrote {written.path}: {written.note}")
