"""Decode latency of several ONNX graphs of one model, and where ORT spends it, per op type.

    python -m exportline.bench.decode_profile A/model.onnx B/model.onnx --past 128 --threads 2 --rounds 6

Two passes over the graphs, one session open at a time:
1. timing — bench/peers.py's measure_latency with the decode point only: each graph gets a
   prefill of --past tokens (untimed) and then one decode step timed --repeat times, in
   --rounds alternating (ABBA) passes; median and min over the pooled samples. Feeds are
   built from each session's declared inputs as bench-peers builds them (a graph without
   position_ids, e.g. genai's, is not fed one). Each graph's last-position decode logits are
   compared with the first graph's (max |Δ|, greedy token).
2. profile — one more session per graph with ORT's profiler on (SessionOptions.enable_profiling):
   the same prefill, then --repeat decode steps; the kernel events inside those decode runs
   (ORT's `model_run` windows, the prefill's excluded) summed per op type, per step. The node
   count per op type is the kernels ORT ran after its graph optimizations, so fusions show.
   Profiling adds per-node overhead: its times explain the timing pass, they do not replace it.

Shapes come from one config.json (--config, default: the folder of the first graph or its
parent), as bench-peers shapes every peer's feeds from one HF folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

FORMAT = "exportline-decode-profile/1"


@dataclass
class OpRow:
    op: str
    ms_per_step: float  # summed kernel time of this op type in one decode step, averaged over steps
    nodes: int  # kernels of this op type that ran in one decode step (after ORT's fusions)


@dataclass
class GraphProfile:
    label: str
    path: str
    step_ms: float  # ORT's model_run duration, mean over the profiled decode steps
    kernel_ms: float  # sum of every kernel in a step (the rest: ORT's scheduling, copies of outputs)
    ops: list[OpRow]

    @property
    def nodes(self) -> int:
        return sum(o.nodes for o in self.ops)


def graph_labels(paths: list[Path]) -> dict[str, Path]:
    """Short unique names: `folder/model.onnx`, with more of the path where two would clash."""
    for depth in range(2, 64):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, paths))
    from exportline.exporters.core.errors import ConfigError

    raise ConfigError("the same graph is named twice; pass each model.onnx once")


def find_config(paths: list[Path], given: Path | None) -> Path:
    """The folder whose config.json shapes the feeds."""
    from exportline.exporters.core.errors import ConfigError

    candidates = [given] if given else [paths[0].parent, paths[0].parent.parent]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(f"no config.json in {' or '.join(str(c) for c in candidates)}; pass --config HF_FOLDER "
                      "(the model's Hugging Face folder, e.g. the bundle root)")


def summarize_profile(events: list[dict], *, steps: int) -> tuple[float, float, list[OpRow]]:
    """(step ms, kernel ms, rows by time) of the last `steps` model runs in ORT's profile events."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[-steps:]
    if not runs:
        raise ValueError("the profile holds no model_run event")
    total: dict[str, float] = defaultdict(float)
    names: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue  # fence_before/after events time ORT's bookkeeping, not the kernel
        if any(start <= e["ts"] <= end for start, end in runs):
            op = e.get("args", {}).get("op_name", "?")
            total[op] += e["dur"]
            names[op].add(e["name"])
    per_step = 1e-3 / len(runs)  # µs summed over the runs → ms per step
    rows = sorted((OpRow(op, total[op] * per_step, len(names[op])) for op in total), key=lambda r: -r.ms_per_step)
    step_ms = sum(end - start for start, end in runs) * per_step
    return step_ms, sum(r.ms_per_step for r in rows), rows


def round_medians(samples_s: list[float], *, repeat: int) -> list[float]:
    """Per-round medians (ms) of pooled samples, which _run_rounds concatenates round by round.
    The machine's background load changes over minutes, so a ratio of two graphs' medians in
    the same round (seconds apart) is steadier than a ratio of their pooled medians."""
    import numpy as np

    chunks = [samples_s[i:i + repeat] for i in range(0, len(samples_s), repeat)]
    return [float(np.median(c)) * 1e3 for c in chunks]


def profile_graph(label: str, path: Path, *, config: Path, settings: dict) -> GraphProfile:
    """One profiled session: the bench's decode preparation, then `repeat` profiled decode steps."""
    from exportline.bench.peers import _runner_class
    from exportline.bench.workloads import Point, prepare
    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.sources.hf_writer import load_config
    from exportline.verify.runtime.onnx_runner import ort_session_options

    layout = KVLayout.from_config(load_config(config))
    with tempfile.TemporaryDirectory(prefix="exportline-profile-") as tmp:
        options = {**ort_session_options(settings["threads"]), "enable_profiling": True,
                   "profile_file_prefix": os.path.join(tmp, "ort")}
        runner = _runner_class()(path, peer=label, session_options=options)
        with runner:
            prepared = prepare(Point("decode", settings["batch"], settings["past"], 1), layout, runner, seed=0)
            for _ in range(settings["warmup"] + settings["repeat"]):
                prepared.run()
            events = json.loads(Path(runner.session.end_profiling()).read_text())
    step_ms, kernel_ms, rows = summarize_profile(events, steps=settings["repeat"])
    return GraphProfile(label, str(path), step_ms, kernel_ms, rows)


def run(paths: list[Path], *, config: Path | None, settings: dict, progress) -> dict:
    """Time the graphs (alternating), then profile each; the report as a dict."""
    import numpy as np

    from exportline.bench.environment import load_average
    from exportline.bench.peers import measure_latency

    graphs = graph_labels(paths)
    folder = find_config(paths, config)
    load_start = load_average()
    timing_settings = {**settings, "prompt": settings["past"]}
    runs, logits = measure_latency(folder, graphs, settings=timing_settings, progress=progress, workloads=("decode",))
    decode = next(iter(logits.values()), {})
    first = next(iter(graphs))
    ref = decode.get(first)
    rounds = {label: round_medians(run.rows[0]["samples_s"], repeat=settings["repeat"])
              for label, run in runs.items() if run.status == "ok"}
    rows = []
    for label, path in graphs.items():
        row: dict = {"graph": label, "path": str(path), "status": runs[label].status, "reason": runs[label].reason}
        if row["status"] == "ok":
            stats = runs[label].rows[0]["stats"]
            row.update(median_ms=stats["median_s"] * 1e3, min_ms=stats["min_s"] * 1e3,
                       samples=len(runs[label].rows[0]["samples_s"]), round_medians_ms=rounds[label])
            if first in rounds:
                row["paired_ratio_vs_first"] = float(np.median(np.divide(rounds[label], rounds[first])))
            if ref is not None and label in decode:
                row["max_abs_diff_vs_first"] = float(np.abs(decode[label] - ref).max())
                row["greedy_equals_first"] = bool(np.array_equal(decode[label].argmax(-1), ref.argmax(-1)))
        rows.append(row)
    load_mid = load_average()
    profiles = []
    if settings["profile"]:
        for row in rows:
            if row["status"] == "ok":
                progress(f"{row['graph']}: profiling {settings['repeat']} decode steps")
                profiles.append(profile_graph(row["graph"], Path(row["path"]), config=folder, settings=settings))
    return {"format": FORMAT, "settings": {**settings, "config": str(folder)},
            "load_average": {"start": load_start, "after_timing": load_mid, "end": load_average()},
            "graphs": rows, "profiles": [{**asdict(p), "nodes": p.nodes} for p in profiles]}


def print_report(report: dict, *, top: int) -> None:
    s = report["settings"]
    typer.echo(f"decode: batch {s['batch']}, past {s['past']}, {s['threads']} threads, {s['rounds']} rounds ABBA "
               f"× {s['repeat']} runs; ORT CPU")
    typer.echo(f"{'graph':<40} {'median ms':>10} {'min ms':>8} {'paired ÷ first':>15} {'max|Δ| vs first':>16} "
               f"{'greedy = first':>15}")
    for r in report["graphs"]:
        if r["status"] != "ok":
            typer.echo(f"{r['graph']:<40} {r['status']}: {r['reason']}")
            continue
        diff = r.get("max_abs_diff_vs_first")
        same = r.get("greedy_equals_first")
        paired = r.get("paired_ratio_vs_first")
        typer.echo(f"{r['graph']:<40} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
                   f"{'—' if paired is None else f'{paired:.3f}':>15} "
                   f"{'—' if diff is None else f'{diff:.2e}':>16} {'—' if same is None else ('yes' if same else 'NO'):>15}")
    typer.echo("paired ÷ first: the median over rounds of (graph's round median ÷ the first graph's round median)")
    for p in report["profiles"]:
        typer.echo(f"\nprofile {p['label']}: step {p['step_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms, "
                   f"{p['nodes']} nodes run")
        for o in p["ops"][:top]:
            typer.echo(f"  {o['op']:<36} {o['ms_per_step']:>8.3f} ms {o['nodes']:>6} nodes")
    load = report["load_average"]
    typer.echo(f"load average (1/5/15 min): start {load['start']}, after timing {load['after_timing']}, end {load['end']}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    graphs: Annotated[list[Path], typer.Argument(help="model.onnx files of one model (the first is the reference).")],
    *, past: Annotated[int, typer.Option(help="Past tokens of the decode step.")] = 128,
    threads: Annotated[int, typer.Option(help="ORT intra-op threads.")] = 2,
    rounds: Annotated[int, typer.Option(help="Passes over the graphs, alternating order.")] = 6,
    repeat: Annotated[int, typer.Option(help="Timed (and profiled) decode steps per round.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps per round.")] = 2,
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = 1,
    config: Annotated[Optional[Path], typer.Option(help="HF folder whose config.json shapes the feeds.")] = None,
    profile: Annotated[bool, typer.Option(help="Also profile each graph with ORT's profiler.")] = True,
    top: Annotated[int, typer.Option(help="Op types listed per profile.")] = 15,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report here.")] = None,
) -> None:
    """Decode median/min per graph in alternating rounds, then ORT's time per op type."""
    from exportline.exporters.core.errors import ConfigError, ExportlineError

    settings = {"batch": batch, "past": past, "threads": threads, "rounds": rounds, "repeat": repeat,
                "warmup": warmup, "profile": profile}
    try:
        if min(batch, past, threads, rounds, repeat) < 1 or warmup < 0:
            raise ConfigError("--batch, --past, --threads, --rounds and --repeat must be ≥ 1, --warmup ≥ 0")
        missing = [str(p) for p in graphs if not p.is_file()]
        if missing:
            raise ConfigError(f"no such graph: {', '.join(missing)}; pass model.onnx files (e.g. out/NAME/onnx/model.onnx)")
        report = run(graphs, config=config, settings=settings, progress=lambda m: typer.echo(m, err=True))
    except ExportlineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    print_report(report, top=top)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {json_out}")
    if any(r["status"] != "ok" for r in report["graphs"]):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
