"""What an export stage costs: `python -m exportline.bench.export_cost PRESET [--stages onnx]`.

The hf stage runs first if the bundle lacks it (not timed). Each requested stage then runs,
forced, in a FRESH Python process, so its peak resident memory is its own (the kernel's
ru_maxrss of that child, from wait4) and nothing is warm from an earlier stage. Reported per
stage: the process's wall time (start-up, imports and manifest hashing included), the
stage's own wall time and sampled peak RSS (its pipeline record), the checkpoint's weight
bytes, peak RSS / weight bytes, and the files the stage wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

_RECORD = "EXPORT-COST-RECORD "  # prefix of the child's one line of output for the parent


@dataclass(frozen=True)
class StageCost:
    stage: str
    process_wall_s: float  # fresh interpreter to exit
    process_peak_rss_bytes: int  # ru_maxrss of that process
    stage_wall_s: float  # the stage alone (pipeline record)
    stage_peak_rss_bytes: int  # sampled during the stage (pipeline record)
    weight_bytes: int  # tensor bytes in the checkpoint's safetensors
    files: dict[str, int]  # files the stage wrote → bytes
    folder_files: dict[str, int]  # folder the stage wrote into → how many files it holds

    @property
    def rss_over_weights(self) -> float:
        return self.process_peak_rss_bytes / self.weight_bytes if self.weight_bytes else float("nan")


def _source(preset: str, overrides: list[str]):
    from exportline.exporters.core.presets import parse_overrides
    from exportline.exporters.sources import resolve_source

    return resolve_source(preset, parse_overrides(overrides))


def _run_child(preset: str, stage: str, out: Path, *, overrides: list[str], force: bool, env: dict | None = None):
    """Run one stage in a fresh interpreter; returns its record, wall time and rusage.

    The parent stays a small process: a child's ru_maxrss starts from the RSS of the
    process it was forked from (Linux keeps the high-water mark across exec), so running
    the hf stage here first would inflate the figure of the stage measured next. `env`:
    the child's environment (default: this one's), e.g. another EXPORTLINE_CACHE.
    """
    cmd = [sys.executable, "-m", "exportline.bench.export_cost", preset, "--stages", stage, "--out", str(out),
           "--child", "--force" if force else "--no-force"]
    for pair in overrides:
        cmd += ["--set", pair]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in stdout.splitlines() if line.startswith(_RECORD)]
    if child.returncode != 0 or not lines:
        from exportline.exporters.core.errors import StageError

        raise StageError(f"stage {stage} failed in its child process (exit {child.returncode}); its error is above")
    return json.loads(lines[-1][len(_RECORD):]), wall, usage


def ensure_hf(preset: str, out: Path, overrides: list[str]) -> None:
    """The HF folder the stages read (cached by the pipeline when already there)."""
    _run_child(preset, "hf", out, overrides=overrides, force=False)


def measure_stage(preset: str, stage: str, out: Path, *, overrides: list[str]) -> StageCost:
    """Run `stage` (forced) in a child interpreter and measure that process."""
    record, wall, usage = _run_child(preset, stage, out, overrides=overrides, force=True)
    info = record.get("info", {})
    files = {rel: (out / rel).stat().st_size for rel in record.get("outputs", [])}
    folders = {str(Path(rel).parent) for rel in files}
    folder_files = {f: sum(1 for p in (out / f).iterdir() if p.is_file()) for f in sorted(folders)}
    return StageCost(
        stage=stage, process_wall_s=round(wall, 2), process_peak_rss_bytes=usage.ru_maxrss * 1024,
        stage_wall_s=record["wall_s"], stage_peak_rss_bytes=record["peak_rss_bytes"],
        weight_bytes=info.get("weight_bytes") or _safetensors_bytes(out), files=files, folder_files=folder_files,
    )


def _safetensors_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def _child(preset: str, stage: str, out: Path, *, overrides: list[str], force: bool) -> None:
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.stages import STAGES

    result = run_pipeline(Bundle(out), _source(preset, overrides), stages=[STAGES[stage]], force=force)
    print(_RECORD + json.dumps(result.ran[-1], default=str), flush=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def report(cost: StageCost) -> str:
    return "\n".join([
        f"stage {cost.stage}",
        f"  wall               {cost.stage_wall_s:.1f} s (fresh process, start-up to exit: {cost.process_wall_s:.1f} s)",
        f"  peak RSS           {_size(cost.process_peak_rss_bytes)} (process ru_maxrss; sampled during the stage: "
        f"{_size(cost.stage_peak_rss_bytes)})",
        f"  weight bytes       {_size(cost.weight_bytes)} ({cost.weight_bytes:,} B)",
        f"  peak RSS / weights {cost.rss_over_weights:.2f}",
        f"  files written      {len(cost.files)}: " + ", ".join(f"{k} ({_size(v)})" for k, v in cost.files.items()),
        *(f"  files in {folder}/ {' ' * max(0, 8 - len(folder))}{n}" for folder, n in cost.folder_files.items()),
    ])


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    preset: Annotated[str, typer.Argument(help="Preset to export, e.g. 1b.")],
    stages: Annotated[str, typer.Option(help="Comma-separated stages to measure (after hf).")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(help="Bundle folder (default: out/<preset>).")] = None,
    *, set_: Annotated[Optional[list[str]], typer.Option("--set", help="Preset override key=value.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON here.")] = None,
    child: Annotated[bool, typer.Option(hidden=True)] = False,
    force: Annotated[bool, typer.Option("--force/--no-force", hidden=True)] = True,
) -> None:
    """Measure wall time and peak memory of export stages, each in a fresh process."""
    from exportline.exporters.core.errors import ExportlineError
    from exportline.exporters.stages import parse_stages

    out = out or Path("out") / preset
    try:
        names = [s.name for s in parse_stages(stages)]
        if child:
            return _child(preset, names[0], out, overrides=set_ or [], force=force)
        ensure_hf(preset, out, set_ or [])
        costs = [measure_stage(preset, name, out, overrides=set_ or []) for name in names if name != "hf"]
    except ExportlineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    for cost in costs:
        typer.echo(report(cost))
    if json_out:
        json_out.write_text(json.dumps([asdict(c) | {"rss_over_weights": c.rss_over_weights} for c in costs], indent=2))


if __name__ == "__main__":
    app()
