"""CLI commands of exportline.bench; `register(app)` adds them to the `exportline` command.

`exportline bench DIR …` times every backend and writes DIR/reports/bench.{json,md,png};
`exportline bench-compare NEW.json --baseline OLD.json` applies the same regression gate
to two saved reports without running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from exportline.exporters.cli.options import err
from exportline.exporters.core.errors import BenchmarkFailed, ConfigError
from exportline.verify.runtime.backends import BACKENDS

# Option types declared once (huggingface_hub's habit); both commands share the gate's.
BaselineOpt = Annotated[Optional[Path], typer.Option("--baseline", help="Earlier bench.json to compare with, point by point.")]
FailOverOpt = Annotated[str, typer.Option("--fail-over", help="Exit non-zero when a point's median is slower than the baseline by more than this, e.g. 5%.")]
ALL_BACKENDS = ",".join(BACKENDS)
BackendsOpt = Annotated[str, typer.Option(help=f"Comma-separated backends: {','.join(BACKENDS)}.")]


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers, e.g. {option} 1,8") from None
    if not values:
        raise ConfigError(f"{option}: give at least one value, e.g. {option} 1")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


def _command_line(directory: Path, cfg, baseline: Path | None, fail_over: str) -> str:
    """The canonical command that reproduces this run, recorded in the report."""
    parts = [
        "exportline bench", str(directory), f"--backends {','.join(cfg.backends)}", f"--device {cfg.device}",
        f"--batch {','.join(map(str, cfg.batches))}", f"--prompt-len {','.join(map(str, cfg.prompt_lens))}",
        f"--decode-len {cfg.decode_len}", f"--warmup {cfg.warmup}", f"--repeat {cfg.repeat}",
        f"--workloads {','.join(cfg.workloads)}",
    ]
    if cfg.threads:
        parts.append(f"--threads {cfg.threads}")
    if cfg.rounds > 1:
        parts.append(f"--rounds {cfg.rounds}")
    if baseline:
        parts.append(f"--baseline {baseline} --fail-over {fail_over}")
    return " ".join(parts)


def _gate(lines: list[str], failed: bool, threshold: float, baseline: Path) -> None:
    for line in lines:
        typer.echo(line, err=True)
    if failed:
        raise BenchmarkFailed(f"performance regressed beyond {threshold:.0%} against {baseline} (points listed above)")


def bench(
    directory: Annotated[Path, typer.Argument(help="Exported bundle folder, e.g. out/100m.")],
    backends: BackendsOpt = ALL_BACKENDS,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,8",
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="Prompt lengths (prefill, generate) and past lengths (decode).")] = "128,512",
    decode_len: Annotated[int, typer.Option("--decode-len", help="Tokens generated per sequence in the generate workload.")] = 64,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each point.")] = 2,
    repeat: Annotated[int, typer.Option(help="Timed runs per point.")] = 10,
    workloads: Annotated[str, typer.Option(help="Comma-separated: prefill,decode,generate.")] = "prefill,decode,generate",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch and ONNX Runtime (default: physical cores).")] = None,
    rounds: Annotated[int, typer.Option(help="Passes over the backends in alternating order (ABBA), samples pooled: "
                                               "cancels drift in machine load between backends.")] = 1,
    baseline: BaselineOpt = None,
    fail_over: FailOverOpt = "5%",
) -> None:
    """Time prefill, KV-cache decode and generate for each backend (a custom module's bundle: one
    forward on its declared inputs); write DIR/reports/bench.*."""

    from exportline.bench.compare import parse_threshold
    from exportline.bench.harness import BenchConfig, bench_bundle
    from exportline.verify.runtime.backends import parse_backends

    cfg = BenchConfig(
        backends=tuple(parse_backends(backends)), device=device, batches=_ints("--batch", batch),
        prompt_lens=_ints("--prompt-len", prompt_len), decode_len=decode_len, warmup=warmup, repeat=repeat,
        workloads=_names(workloads), threads=threads, rounds=rounds,
    )
    threshold = parse_threshold(fail_over)
    outcome = bench_bundle(
        directory, cfg, baseline=baseline, threshold=threshold, progress=lambda m: err.print(m, highlight=False),
        command=_command_line(directory, cfg, baseline, fail_over),
    )
    for path in outcome.files:
        typer.echo(f"wrote {path}", err=True)
    for b in outcome.report["backends"]:
        if b["status"] != "ok":
            typer.echo(f"{b['backend']}: {b['status']}: {b['reason']}", err=True)
    if outcome.comparison:
        _gate(outcome.comparison.lines(), outcome.comparison.failed, threshold, baseline)
    if outcome.failed_backends:
        names = ", ".join(b["backend"] for b in outcome.failed_backends)
        raise BenchmarkFailed(f"backend(s) {names} failed mid-run (reason in {outcome.files[1]}); "
                              "the other backends' numbers were written")


def bench_compare(
    current: Annotated[Path, typer.Argument(help="A bench.json to check.")],
    baseline: Annotated[Path, typer.Option("--baseline", help="The bench.json to compare with.")],
    fail_over: FailOverOpt = "5%",
) -> None:
    """Compare two saved bench.json files point by point; exit non-zero on a regression."""
    from exportline.bench.compare import compare, load_report, parse_threshold

    threshold = parse_threshold(fail_over)
    result = compare(load_report(current, "CURRENT"), load_report(baseline), threshold=threshold, baseline_name=str(baseline))
    _gate(result.lines(), result.failed, threshold, baseline)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
    app.command("bench-compare")(bench_compare)
