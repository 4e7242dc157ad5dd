"""exportline beside its peers: `python -m exportline.bench.peers MODEL` (make bench-peers).

One HF folder (exportline's hf stage of MODEL, a preset or an HF folder) is exported by
exportline's onnx stage, optimum-cli and the onnxruntime-genai model builder, each in a
fresh child process (bench/peer_exports.py: wall time, peak RSS, files). Then ONNX Runtime
(this venv's, CPU EP, the same session options and threads for all) times every graph on
the same points — prefill of --prompt tokens and one decode step on a past of --past
tokens, batch --batch — over --rounds passes in alternating (ABBA) order, samples pooled
per peer (bench/harness.py's _run_rounds), medians (bench/stats.py). Every ratio is a
peer's median over exportline's, from this run.

Feeds: one set of arrays in exportline's names (bench/workloads.py); each session takes the
inputs its metadata declares, cast to the declared dtype (OnnxRuntimeRunner):
- exportline: input_ids, attention_mask, position_ids, past_key_values.{i}.key|value;
- optimum:    the same names (Llama: position_ids included);
- genai:      input_ids, attention_mask, past_key_values.{i}.key|value — no position_ids:
              its GroupQueryAttention derives positions from the attention mask.
A graph declaring any other input (e.g. a builder option adding seqlens_k) is "not
available" with the input's name, not fed a guess. Each peer's last-position logits on
both points are compared with exportline's (greedy token, max |Δ|), so a mis-fed graph
shows up as a disagreement instead of a plausible time.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from exportline.bench.peer_exports import (
    PEERS,
    WARM,
    Export,
    ensure_hf_folder,
    export_exportline_cold_warm,
    export_tool,
    peer_python,
)

_FEEDABLE = re.compile(r"(input_ids|attention_mask|position_ids|past_key_values\.\d+\.(key|value))")
FORMAT = "exportline-bench-peers/1"


def _runner_class():
    from exportline.exporters.core.errors import NotAvailable
    from exportline.verify.runtime.onnx_runner import OnnxRuntimeRunner

    class PeerRunner(OnnxRuntimeRunner):
        """A peer's graph under the same ORT options; refuses inputs the workloads cannot feed."""

        def __init__(self, path: Path, *, peer: str, **options):
            super().__init__(path, **options)
            self.peer, self.name = peer, f"{peer}:{Path(path).name}"

        def activate_impl(self) -> None:
            super().activate_impl()
            unknown = [n for n in self.input_types if not _FEEDABLE.fullmatch(n)]
            if unknown or "logits" not in self.output_names:
                self.session = None
                what = f"graph input(s) {', '.join(unknown)}" if unknown else "no `logits` output"
                raise NotAvailable(f"{self.peer}: {what}, which the prefill/decode feeds do not provide")

    return PeerRunner


def graph_registry(graphs: dict[str, Path]) -> dict:
    """A bench Backend per named graph, all under the same ORT options (bench/decode_profile.py too)."""
    from exportline.verify.runtime.backends import Backend
    from exportline.verify.runtime.onnx_runner import ort_bench_options

    runner = _runner_class()

    def make(peer: str):
        return lambda root, **options: runner(Path(graphs[peer]), peer=peer, **options)

    return {p: Backend(p, f"ONNX Runtime, {p}'s fp32 graph", "fp32", "onnx", make(p), ort_bench_options)
            for p in graphs}


def _last_logits(point, layout, runner, *, seed: int):
    """The point's last-position logits, computed as the timed call computes them."""
    from exportline.bench.workloads import decode_feed, greedy_next, prefill_feed, presents_as_past, prompt_ids

    ids = prompt_ids(layout, batch=point.batch, length=point.length, seed=seed)
    out = runner.infer(prefill_feed(layout, ids))
    if point.workload == "decode":
        out = runner.infer(decode_feed(layout, greedy_next(out["logits"]), presents_as_past(layout, out)))
    return out["logits"][:, -1, :].copy()


def measure_latency(hf: Path, graphs: dict[str, Path], *, settings: dict, progress,
                    workloads: tuple[str, ...] = ("prefill", "decode")) -> tuple[dict, dict]:
    """ORT latency of every graph (name → model.onnx; `hf` holds the config.json that shapes the
    feeds), ABBA over rounds; (runs by name, logits by point/name)."""
    from exportline.bench.harness import BenchConfig, _run_rounds
    from exportline.bench.timing import Device
    from exportline.bench.workloads import Point, prepare
    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.sources.hf_writer import load_config

    layout = KVLayout.from_config(load_config(hf))
    every = {"prefill": Point("prefill", settings["batch"], settings["prompt"], 0),
             "decode": Point("decode", settings["batch"], settings["past"], 1)}
    points = [every[w] for w in workloads]
    cfg = BenchConfig(backends=tuple(graphs), batches=(settings["batch"],), warmup=settings["warmup"],
                      repeat=settings["repeat"], threads=settings["threads"], rounds=settings["rounds"])
    logits: dict[str, dict] = {p.key: {} for p in points}

    def prep(point, runner):
        if runner.peer not in logits[point.key]:  # first round: what the graph computes, untimed
            logits[point.key][runner.peer] = _last_logits(point, layout, runner, seed=0)
        return prepare(point, layout, runner, seed=0)

    registry = graph_registry(graphs)
    runs = _run_rounds(hf, points, prep=prep, cfg=cfg, device=Device("cpu"), progress=progress, registry=registry,
                       factory=lambda root, peer, **options: registry[peer].make(root, **options))
    return {run.backend: run for run in runs}, logits


def _agreement(logits: dict) -> dict:
    """Per point and peer: greedy tokens and max |Δ| / max |exportline| of the logits."""
    import numpy as np

    out = {}
    for key, by_peer in logits.items():
        ref = by_peer.get("exportline")
        out[key] = {}
        for peer, got in by_peer.items():
            row = {"greedy": got.argmax(axis=-1).tolist()}
            if ref is not None:
                row["greedy_equals_exportline"] = bool(np.array_equal(got.argmax(-1), ref.argmax(-1)))
                row["max_abs_diff_vs_exportline"] = float(np.abs(got - ref).max())
                row["rel_max_diff_vs_exportline"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
            out[key][peer] = row
    return out


def _rows(exports: dict[str, Export], runs: dict, agreement: dict) -> list[dict]:
    medians = {p: {r["workload"]: r["stats"]["median_s"] for r in run.rows} for p, run in runs.items()
               if run.status == "ok"}
    ref = medians.get("exportline", {})
    rows = []
    for peer, ex in exports.items():
        row = {"peer": peer, **asdict(ex), "total_bytes": ex.total_bytes}
        run = runs.get(peer)
        if peer == WARM and ex.status == "ok":
            same = bool(ex.sha256) and ex.sha256 == exports["exportline"].sha256
            row["same_files_as_cold"] = same
            row["latency"] = ("not timed: the very graph of the cold row (every file's sha256 equal)" if same else
                              "not timed: its files differ from the cold row's (sha256), so the cold row's times are not its")
        elif run is not None and run.status != "ok":
            row["latency"] = f"{run.status}: {run.reason}"
        elif run is not None:
            row["latency"] = {r["workload"]: {"key": r["key"], "stats": r["stats"], "samples_s": r["samples_s"]}
                              for r in run.rows}
            for r in run.rows:  # the fastest run: what the graph does when no other process takes a core
                row[f"{r['workload']}_min_ms"] = r["stats"]["min_s"] * 1e3
            for w, m in medians[peer].items():
                row[f"{w}_ms"] = m * 1e3
                row[f"{w}_ratio_vs_exportline"] = m / ref[w] if w in ref else "not measured: exportline not timed"
            row["logits_check"] = {k: v.get(peer) for k, v in agreement.items()}
        rows.append(row)
    return rows


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _ms(value) -> str:
    """Three significant digits and no exponent: 0.0412, 95.3, 1250."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}" if value > 0 else "0"


def print_table(rows: list[dict], *, settings: dict, load: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peers: {settings['model']} fp32 — ORT CPU, batch {settings['batch']}, prefill "
                        f"{settings['prompt']}, decode on past {settings['past']}, {settings['threads']} threads, "
                        f"{settings['rounds']} rounds ABBA × {settings['repeat']} runs")
    for col in ("peer", "graph cache", "export wall s", "peak RSS GiB", "files", "MB", "prefill ms", "decode ms", "prefill min",
                "decode min", "prefill ÷ exportline", "decode ÷ exportline", "greedy = exportline"):
        table.add_column(col, justify="left" if col == "peer" else "right")
    for r in rows:
        if r["status"] != "ok":  # the reason goes under the table, whole: a cell would wrap it
            table.add_row(r["peer"], "—", "not available", *["—"] * 10)
            continue
        if isinstance(r.get("latency"), str):
            latency = [r["latency"].split(":")[0], *["—"] * 6]
        else:
            same = [c["greedy_equals_exportline"] for c in r["logits_check"].values() if c]
            latency = [_ms(r.get("prefill_ms")), _ms(r.get("decode_ms")), _ms(r.get("prefill_min_ms")),
                       _ms(r.get("decode_min_ms")),
                       _num(r.get("prefill_ratio_vs_exportline"), ".2f"), _num(r.get("decode_ratio_vs_exportline"), ".2f"),
                       "yes" if same and all(same) else "NO" if same else "—"]
        table.add_row(_label(r["peer"]), _cache_cell(r), _num(r["wall_s"], ".1f"), _num(r["peak_rss_bytes"] / 2**30, ".2f"), str(len(r["files"])),
                      _num(r["total_bytes"] / 1e6, ".1f"), *latency)
    console = Console(width=200)
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"{r['peer']}: not available: {r['reason']}", soft_wrap=True, highlight=False, markup=False)
        elif isinstance(r.get("latency"), str):
            console.print(f"{r['peer']}: latency {r['latency']}", soft_wrap=True, highlight=False, markup=False)
    for own in (r for r in rows if r["peer"] in ("exportline", WARM) and r.get("stage_wall_s")):
        console.print(f"{_label(own['peer'])}'s onnx stage alone: {own['stage_wall_s']:.1f} s of its {own['wall_s']:.1f} s "
                      "(the rest: interpreter start-up, imports, manifest)", highlight=False)
    console.print(f"load average (1/5/15 min): start {load['start']}, end {load['end']}; ms = median (min: fastest "
                  "run) over all rounds; ratios are medians of this run", highlight=False)


def _label(peer: str) -> str:
    return {"exportline": "exportline cold", WARM: "exportline warm"}.get(peer, peer)


def _cache_cell(row: dict) -> str:
    """exportline's graph cache as its record says: a warm row that did not hit says so."""
    if row["peer"] not in ("exportline", WARM):
        return "—"
    status = row.get("graph_cache") or "not recorded"
    return status if len(status) <= 24 else status[:23] + "…"


def run_peers(source: str, out: Path, *, peers: list[str], settings: dict, pythons: dict, overrides: list[str],
              progress) -> dict:
    """Export with every peer, time every graph, return the report (also written to out/peers.json)."""
    from exportline.bench.environment import load_average

    load_start = load_average()
    bundle = out / "exportline"
    out.mkdir(parents=True, exist_ok=True)
    progress(f"hf stage → {bundle}")
    ensure_hf_folder(source, bundle, overrides=overrides)
    exports: dict[str, Export] = {}
    for peer in peers:  # one at a time: each child has the machine's memory and cores to itself
        progress(f"{peer}: exporting" + (" cold (empty graph cache), then warm" if peer == "exportline" else ""))
        if peer == "exportline":
            exports[peer], exports[WARM] = export_exportline_cold_warm(source, bundle, overrides=overrides,
                                                                       cache=out / "graph-cache")
        else:
            exports[peer] = export_tool(peer, bundle, out, python=pythons[peer])
        for name in (peer, WARM) if peer == "exportline" else (peer,):
            ex = exports[name]
            progress(f"{name}: {ex.reason}" if ex.status != "ok" else
                     f"{name}: {ex.wall_s:.1f} s, {ex.peak_rss_bytes / 2**30:.2f} GiB, {len(ex.files)} files")
    # The warm export rewrote the cold one's files: one graph to time (equal bytes: see _rows).
    ready = {p: e for p, e in exports.items() if e.status == "ok" and p != WARM}
    graphs = {p: Path(e.graph) for p, e in ready.items()}
    runs, logits = measure_latency(bundle, graphs, settings=settings, progress=progress) if ready else ({}, {})
    report = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {**settings, "source": source, "hf_folder": str(bundle), "overrides": overrides,
                           "pythons": {k: str(v) for k, v in pythons.items()}, "timing":
                           "medians over rounds × repeat runs, ABBA order; ratio = peer median / exportline median"},
              "load_average": {"start": load_start, "end": load_average()},
              "peers": _rows(exports, runs, _agreement(logits))}
    (out / "peers.json").write_text(json.dumps(report, indent=2))
    return report


def parse_peers(text: str) -> list[str]:
    from exportline.exporters.core.errors import ConfigError

    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ConfigError(f"--peers {text!r}: unknown {', '.join(unknown) or '(none given)'}; known: {','.join(PEERS)}")
    return names


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_PythonOpt = Annotated[Optional[Path], typer.Option(help="That peer's venv python (default: $EXPORTLINE_{OPTIMUM,GENAI}"
                                                         "_PYTHON, else ~/.cache/exportline-tests/…).")]


@app.command()
def main(
    model: Annotated[str, typer.Argument(help="Preset (tiny, 100m, 1b, …) or HF folder.")],
    *, peers: Annotated[str, typer.Option(help="Comma-separated, in ABBA order.")] = ",".join(PEERS),
    rounds: Annotated[int, typer.Option(help="Passes over the peers, alternating order.")] = 2,
    past: Annotated[int, typer.Option(help="Past tokens of the decode step.")] = 128,
    prompt: Annotated[int, typer.Option(help="Prompt tokens of the prefill.")] = 128,
    batch: Annotated[int, typer.Option(help="Batch of both points.")] = 1,
    threads: Annotated[int, typer.Option(help="ORT intra-op threads, every peer.")] = 2,
    repeat: Annotated[int, typer.Option(help="Timed runs per point per round.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed runs per point per round.")] = 2,
    out: Annotated[Optional[Path], typer.Option(help="Work folder (default: out/peers/<model>).")] = None,
    optimum_python: _PythonOpt = None, genai_python: _PythonOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Preset override key=value.")] = None,
) -> None:
    """Export one HF folder with exportline, optimum-cli and the genai builder; time each graph on ORT."""
    from exportline.exporters.core.errors import ConfigError, ExportlineError

    out = out or Path("out") / "peers" / Path(model).name
    settings = {"model": model, "batch": batch, "prompt": prompt, "past": past, "threads": threads,
                "rounds": rounds, "repeat": repeat, "warmup": warmup}
    try:
        names = parse_peers(peers)
        if min(batch, prompt, past, threads, rounds, repeat) < 1 or warmup < 0:
            raise ConfigError("--batch, --prompt, --past, --threads, --rounds and --repeat must be ≥ 1, --warmup ≥ 0")
        pythons = {"optimum": peer_python("optimum", optimum_python), "genai": peer_python("genai", genai_python)}
        report = run_peers(model, out, peers=names, settings=settings, pythons=pythons, overrides=set_ or [],
                           progress=lambda m: typer.echo(m, err=True))
    except ExportlineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    print_table(report["peers"], settings=settings, load=report["load_average"])
    typer.echo(f"wrote {out / 'peers.json'}")
    own = next((r for r in report["peers"] if r["peer"] == "exportline"), None)
    if own is not None and own["status"] != "ok":
        typer.echo(f"error: exportline's own export failed: {own['reason']}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
