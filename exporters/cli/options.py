"""Option types shared by the commands, declared once (huggingface_hub's habit), and the
stderr console every command prints progress and errors on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)

BundleArg = Annotated[Path, typer.Argument(help="Bundle folder written by `exportline export`.")]
BundleOrRepoArg = Annotated[str, typer.Argument(
    help="Bundle folder, or a Hub repo id ORG/NAME (pulled into the cache first, every checksum verified).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Bundle folder (default: out/<name>).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun stages whose inputs are unchanged.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run the Python files of an HF folder (off by default).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Preset override key=value, e.g. model.num_hidden_layers=4.")]
RepoIdOpt = Annotated[str, typer.Option("--repo-id", help="Hub repository, ORG/NAME.")]
TokenOpt = Annotated[Optional[str], typer.Option(
    "--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` store). Never printed or written.")]
