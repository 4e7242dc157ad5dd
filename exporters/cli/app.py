"""The `exportline` command. It parses and prints; the library does the work and raises
ExportlineError with a one-line message, which becomes `error: ...` and a non-zero exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from exportline.exporters.cli.options import ForceOpt, OutOpt, SetOpt, TrustOpt, err
from exportline.exporters.core.errors import ConfigError, ExportlineError, Interrupted

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
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer to ship with a checkpoint that has none: tokenizer.json, a sentencepiece tokenizer.model, llama2.c's tokenizer.bin, or 'gpt2' (GPT-2's BPE, nanoGPT's default encoding).")] = None,
    meta: Annotated[Optional[Path], typer.Option("--meta", help="nanoGPT meta.pkl (char vocabulary) when it is not found beside the .pt or in data/<dataset>/.")] = None,
    with_training_state: Annotated[bool, typer.Option("--with-training-state", help="nanoGPT: also store optimizer, iter_num, best_val_loss, config in training/ (for to-checkpoint).")] = False,
    trust_remote_code: TrustOpt = False,
    model_class: Annotated[Optional[str], typer.Option(
        help="FILE.py:ClassName — export SOURCE (a state dict) as this nn.Module of yours. RUNS YOUR CODE: "
             "importing FILE.py is the only place exportline executes user code, and only with this flag "
             "(recorded in the manifest).", rich_help_panel="Your own nn.Module")] = None,
    model_args: Annotated[Optional[Path], typer.Option(
        help="YAML/JSON of constructor kwargs (default: model_args/config stored in the checkpoint).",
        rich_help_panel="Your own nn.Module")] = None,
    inputs: Annotated[Optional[Path], typer.Option(
        help="Input spec YAML: dims (min/opt/max), inputs (dtype, shape, values|distribution), outputs. "
             "Default for causal-lm: input_ids → logits.", rich_help_panel="Your own nn.Module")] = None,
    task: Annotated[str, typer.Option(help="causal-lm (AutoModelForCausalLM, generate) or forward (AutoModel).",
                                      rich_help_panel="Your own nn.Module")] = "causal-lm",
    expect_params: Annotated[Optional[str], typer.Option(
        help="Refuse a parameter count off this, e.g. 15.8M or 15.8M±5%, before anything is written.",
        rich_help_panel="Your own nn.Module")] = None,
    variants: Annotated[Optional[Path], typer.Option(
        help="YAML with `variants:` name → {model_args, params}; use with --variant.",
        rich_help_panel="Your own nn.Module")] = None,
    variant: Annotated[Optional[str], typer.Option(help="Row of --variants to export.",
                                                   rich_help_panel="Your own nn.Module")] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        help="LoRA adapter: a PEFT adapter folder, or a .pth of lora_A/lora_B tensors (with --lora-alpha). "
             "Written as adapter/ for peft.PeftModel.from_pretrained, or merged with --merge-adapter.",
        rich_help_panel="Your own nn.Module")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="alpha of a .pth adapter.", rich_help_panel="Your own nn.Module")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="rank of a .pth adapter (checked against lora_A).",
                                                     rich_help_panel="Your own nn.Module")] = None,
    merge_adapter: Annotated[bool, typer.Option("--merge-adapter", help="Merge the adapter into the weights; every stage runs on the merged model.",
                                                rich_help_panel="Your own nn.Module")] = False,
    calibration_inputs: Annotated[Optional[Path], typer.Option(
        help="int8 of a custom module: .npz of input arrays to calibrate on (default: sampled from the spec).",
        rich_help_panel="Your own nn.Module")] = None,
) -> None:
    """Run the export pipeline for SOURCE into a bundle folder."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import ExportOptions, run_pipeline
    from exportline.exporters.core.presets import parse_overrides
    from exportline.exporters.sources import resolve_source
    from exportline.exporters.sources.base import BUILTIN_TOKENIZERS
    from exportline.exporters.stages import parse_stages

    if calibration_data is not None and not calibration_data.is_file():
        raise ConfigError(f"--calibration-data {calibration_data}: no such file; pass a UTF-8 text file")
    if tokenizer is not None and not tokenizer.is_file() and str(tokenizer) not in BUILTIN_TOKENIZERS:
        raise ConfigError(f"--tokenizer {tokenizer}: no such file; pass a tokenizer.json (or tokenizer.model / tokenizer.bin "
                          "for llama2.c), or gpt2 for GPT-2's BPE")
    if meta is not None and not meta.is_file():
        raise ConfigError(f"--meta {meta}: no such file; pass nanoGPT's data/<dataset>/meta.pkl")
    stage_list = parse_stages(stages)
    custom = None
    if model_class:
        custom = {"model_class": model_class, "model_args": model_args, "inputs": inputs, "task": task,
                  "expect_params": expect_params, "variants": variants, "variant": variant, "adapter": adapter,
                  "lora_alpha": lora_alpha, "lora_rank": lora_rank, "merge_adapter": merge_adapter}
    elif merge_adapter or any(v is not None for v in (model_args, inputs, expect_params, variants, variant, calibration_inputs,
                                                      adapter, lora_alpha, lora_rank)):
        raise ConfigError("--model-args, --inputs, --expect-params, --variants, --calibration-inputs and --adapter "
                          "need --model-class FILE.py:Class")
    src = resolve_source(source, parse_overrides(set_ or []), tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                         custom=custom, meta=meta)
    for warning in getattr(src, "warnings", list)():
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    bundle = Bundle(out or Path("out") / src.name)
    options = ExportOptions(
        calibration_data=calibration_data, calibration_inputs=calibration_inputs, trt_max_batch=trt_max_batch, trt_max_sequence=trt_max_sequence,
        trt_workspace_gib=trt_workspace_gib, with_training_state=with_training_state,
    )
    with err.status("exporting…") as status:
        result = run_pipeline(
            bundle, src, stages=stage_list, options=options, force=force,
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
    """Every exception ends here as one `error:` line and a non-zero exit; `--debug`
    (anywhere on the command line) or EXPORTLINE_DEBUG=1 adds the traceback."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("EXPORTLINE_DEBUG") == "1"
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    # transformers/huggingface_hub draw tqdm bars on stderr; the CLI reports progress itself.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from exportline.exporters.core.bundle import forget_digests

    forget_digests()  # each file is hashed once per command, and again by the next command
    previous = signal.signal(signal.SIGINT, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        app()
    except ExportlineError as exc:
        _fail(str(exc), exc.exit_code, debug)
    except Interrupted:
        err.print("interrupted; rerun to resume", highlight=False)
        sys.exit(130)
    except Exception as exc:  # not one of ours: still one line, the traceback only on request
        _fail(_unexpected(exc), 1, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _interrupt(signum, frame) -> None:
    raise Interrupted()


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    err.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _unexpected(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or first}; check that the path exists and is readable/writable"
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''}; "
            "rerun with --debug for the traceback and report it")
