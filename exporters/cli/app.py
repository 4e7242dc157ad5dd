"""The `exportline` command. It parses and prints; the library does the work and raises
ExportlineError with a one-line message, which becomes `error: ...` and a non-zero exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from exportline.exporters.cli.options import ForceOpt, OutOpt, SetOpt, TrustOpt, err
from exportline.exporters.core.errors import ExportlineError

app = typer.Typer(
    name="exportline",
    help="Checkpoint → HF → ONNX (fp32/fp16/int8, KV cache) → TensorRT, verified and benchmarked.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Preset name, nanoGPT .pt, llama2.c .bin, or HF folder.")],
    out: OutOpt = None,
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run.")] = "hf,onnx,fp16,int8,trt",
    force: ForceOpt = False,
    require: Annotated[str, typer.Option(help="Stages whose skip (e.g. no TensorRT) is an error.")] = "",
    calibration_data: Annotated[Optional[Path], typer.Option(help="Text file for int8 calibration.")] = None,
    set_: SetOpt = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every stage run and write reports/.")] = True,
    trt_max_batch: Annotated[Optional[int], typer.Option(help="TensorRT engines: largest batch (default 8).")] = None,
    trt_max_sequence: Annotated[Optional[int], typer.Option(help="TensorRT engines: largest past + sequence (default: max_position_embeddings, at most 2048).")] = None,
    trt_workspace_gib: Annotated[Optional[float], typer.Option(help="TensorRT builder workspace limit in GiB (default 4).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to ship with a checkpoint that has none: tokenizer.json, a sentencepiece tokenizer.model or llama2.c's tokenizer.bin.")] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Run the export pipeline for SOURCE into a bundle folder."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import ExportOptions, run_pipeline
    from exportline.exporters.core.presets import parse_overrides
    from exportline.exporters.sources import resolve_source
    from exportline.exporters.stages import parse_stages

    src = resolve_source(source, parse_overrides(set_ or []), tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    bundle = Bundle(out or Path("out") / src.name)
    options = ExportOptions(
        calibration_data=calibration_data, trt_max_batch=trt_max_batch, trt_max_sequence=trt_max_sequence,
        trt_workspace_gib=trt_workspace_gib,
    )
    with err.status("exporting…") as status:
        result = run_pipeline(
            bundle, src, stages=parse_stages(stages), options=options, force=force,
            require=tuple(s.name for s in parse_stages(require, flag="--require")) if require else (),
            progress=lambda msg: (status.update(msg), err.print(msg)),
        )
    report = None
    if verify:
        from exportline.verify.suite import verify_bundle

        report = verify_bundle(bundle.root, stages=[r["name"] for r in result.ran], progress=err.print)
        err.print(report.summary())
    from exportline.deploy.prepare import prepare_bundle

    prepare_bundle(bundle.root)  # model card (README.md) + hubconf.py from manifest and reports
    if report:
        report.raise_for_failure()
    err.print(f"bundle: {bundle.root}")


@app.command()
def presets() -> None:
    """List the built-in presets with architecture and parameter count."""
    from rich.table import Table

    from exportline.exporters.core.presets import load_preset, preset_names

    table = Table("name", "architecture", "parameters", "checkpoint", "description")
    for name in preset_names():
        p = load_preset(name)
        table.add_row(name, p.architecture, f"{p.parameter_count():,}", p.checkpoint or "random-init", p.description)
    Console().print(table)


@app.command()
def doctor() -> None:
    """Versions of torch, onnx, onnxruntime (+ providers), tensorrt, and the GPU."""
    from exportline.exporters.core.doctor import environment_report

    for key, value in environment_report().items():
        typer.echo(f"{key:<22} {value}")


def _register_subcommands() -> None:
    from exportline.exporters.cli.bench import register as register_bench
    from exportline.exporters.cli.convert import register as register_convert
    from exportline.exporters.cli.deploy import register as register_deploy
    from exportline.exporters.cli.verify import register as register_verify

    for register in (register_convert, register_verify, register_bench, register_deploy):
        register(app)


_register_subcommands()


def main() -> None:
    # transformers/huggingface_hub draw tqdm bars on stderr; the CLI reports progress itself.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except ExportlineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing half-written was left for a rerun to trust")
        sys.exit(130)
