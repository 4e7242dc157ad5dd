"""reports/bench.json (the data; a later run's --baseline), bench.md and bench.png.

The JSON is the source of truth; Markdown and PNG are views of it, so a report can be
re-rendered from an old bench.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from exportline.exporters.core.bundle import write_text_atomic
from exportline.exporters.core.errors import OutputError

FORMAT = "exportline-bench/1"
FILES = ("bench.json", "bench.md", "bench.png")


def write_reports(report: dict, out_dir: Path) -> list[Path]:
    """Write the three files; each appears complete or not at all."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}; check the bundle folder") from None
    write_text_atomic(out_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "bench.md", render_markdown(report))
    write_plot(report, out_dir / "bench.png")
    return [out_dir / name for name in FILES]


# -- Markdown ---------------------------------------------------------------------------------
WORKLOAD_NOTES = {
    "prefill": "One forward pass over batch × prompt tokens with an empty past; tokens/s = batch × prompt ÷ median.",
    "decode": "One token per sequence on a KV cache of `past` tokens (made once by a prefill, reused by every "
              "timed step); tokens/s = batch ÷ median.",
    "generate": "Prefill + greedy decode of {decode_len} tokens carrying the KV cache, end to end; "
                "tokens/s = batch × {decode_len} ÷ median.",
}

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def render_markdown(report: dict) -> str:
    s = report["settings"]
    env = report["environment"]
    lines = [
        f"# Benchmark: {env['bundle']['name']}",
        "",
        f"Command: `{report.get('command', '')}`  ",
        f"Device: **{s['device']}**, {s['threads']} CPU threads for torch and ONNX Runtime; warm-up {s['warmup']}, "
        f"{s['repeat']} timed runs per point" + (f" in each of {s['rounds']} rounds (alternating backend order, "
                                                  "samples pooled)" if s.get("rounds", 1) > 1 else "") + "; "
        f"percentiles: {s['percentile_method']}.  ",
        "Speedup = torch eager fp32 median ÷ backend median, same device, same run.",
        "",
    ]
    busy = _busy_warning(env)
    if busy:
        lines += [busy, ""]
    if env["bundle"].get("random_init"):
        lines += ["Weights: **random-init** (speed is meaningful, generated text is not).", ""]
    lines += _environment_section(report) + _backends_section(report)
    for workload in report["settings"]["workloads"]:
        lines += _workload_section(report, workload)
    if report.get("baseline"):
        lines += _baseline_section(report["baseline"])
    return "\n".join(lines) + "\n"


def _busy_warning(env: dict) -> str:
    """Other processes on the same cores stall multi-threaded kernels (a descheduled thread
    holds up every barrier), so a busy machine's timings are flagged, not silently kept."""
    loads = [env.get("load_average_at_start"), env.get("load_average_at_end")]
    peak = max((load[0] for load in loads if isinstance(load, list)), default=0.0)
    cores = env["cpu"]["logical_cpus"]
    if peak <= cores * 0.75:
        return ""
    return (f"**Warning: the machine was busy** (1-minute load up to {peak} on {cores} CPUs): other processes "
            "competed for the cores, so timings are noisy and multi-threaded backends may be stalled.")


def _environment_section(report: dict) -> list[str]:
    env = report["environment"]
    v = env["versions"]
    rows = [
        ("CPU", f"{env['cpu']['model']} ({env['cpu']['physical_cores']} physical cores, "
                f"{env['cpu']['logical_cpus']} logical)"),
        ("GPU", v.get("gpu", "")), ("GPU driver", env["gpu_driver"]),
        ("torch", f"{v.get('torch')} ({env['torch_threads']['intra_op_threads']} intra-op threads)"),
        ("onnxruntime", f"{v.get('onnxruntime')} ({v.get('onnxruntime providers')})"),
        ("tensorrt", v.get("tensorrt", "")),
        ("load average (1/5/15 min) at start → end",
         f"{env.get('load_average_at_start')} → {env.get('load_average_at_end')}"),
    ]
    ceilings = report["ceilings"]
    if isinstance(ceilings, dict):
        rows += [("measured bandwidth", f"{ceilings['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s"),
                 ("measured matmul peak", f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s "
                                          f"({ceilings['matmul_dtype']})")]
    else:
        rows.append(("roofline", ceilings))
    for engine in env.get("engines", []):
        rows.append((f"engine {engine['path']}", f"sha256 {engine['sha256']}"))
    out = ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_cell(val)} |" for k, val in rows]
    return out + [""]


def _backends_section(report: dict) -> list[str]:
    out = ["## Backends", "", "| backend | precision | status | RSS after load MiB | session |", "|---|---|---|---:|---|"]
    for b in report["backends"]:
        status = "measured" if b["status"] == "ok" else f"{b['status']}: {b['reason']}"
        session = ", ".join(f"{k}={v}" for k, v in (b.get("session") or {}).items()) or "—"
        loaded = _mib(b["rss_after_activate_bytes"]) if b["status"] != "not available" else "—"
        out.append(f"| {b['backend']} | {b['precision']} | {_cell(status)} | {loaded} | {_cell(session)} |")
    return out + [""]


def _forward_section(report: dict) -> list[str]:
    """A custom module's bundle: one forward per point on its declared inputs."""
    rows = [r for r in report["results"] if r["workload"] == "forward"]
    out = ["## forward", "", "One forward pass of the custom module on inputs sampled from its declared I/O "
           "(config.json exportline_io) at the dims' opt and max sizes; items/s = batch ÷ median.", "",
           "| sizes | input shapes | backend | median ms | p90 ms | p99 ms | items/s | speedup | peak RSS MiB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = r["stats"]
        sizes = ", ".join(f"{k}={v}" for k, v in r["sizes"].items())
        shapes = ", ".join(f"{k} {v}" for k, v in r["shapes"].items())
        out.append(f"| {sizes} | {shapes} | {r['backend']} | {_ms(st['median_s'])} | {_ms(st['p90_s'])} | "
                   f"{_ms(st['p99_s'])} | {r['tokens_per_s']:.1f} | {_speedup(r['speedup_vs_torch'])} | "
                   f"{_mib(r['peak_rss_bytes'])} |")
    out += [f"| | | {b['backend']} | {b['status']}: {_cell(b['reason'])} | | | | | |"
            for b in report["backends"] if b["status"] != "ok"]
    return out + [""]


def _workload_section(report: dict, workload: str) -> list[str]:
    if workload == "forward":
        return _forward_section(report)
    rows = [r for r in report["results"] if r["workload"] == workload]
    unavailable = [b for b in report["backends"] if b["status"] != "ok"]
    if not rows and not unavailable:
        return []
    length = {"decode": "past"}.get(workload, "prompt")
    out = [
        f"## {workload}", "", WORKLOAD_NOTES[workload].format(**report["settings"]), "",
        f"| batch | {length} | backend | median ms | p90 ms | p99 ms | tokens/s | speedup | "
        "peak RSS MiB | device peak MiB (torch allocator) | % roofline |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        st = r["stats"]
        out.append(
            f"| {r['batch']} | {r['length']} | {r['backend']} | {_ms(st['median_s'])} | {_ms(st['p90_s'])} | "
            f"{_ms(st['p99_s'])} | {r['tokens_per_s']:.1f} | {_speedup(r['speedup_vs_torch'])} | "
            f"{_mib(r['peak_rss_bytes'])} | {_mib(r['device_peak_bytes'])} | {_roofline_cell(r['roofline'])} |"
        )
    for b in unavailable:
        out.append(f"| | | {b['backend']} | {b['status']}: {_cell(b['reason'])} | | | | | | | |")
    split = [r for r in rows if r.get("ttft_median_s") is not None]
    if split:
        out += ["", "Split of the same runs: time to first token (the prefill) and the decode rate after it.", "",
                "| batch | prompt | backend | TTFT median ms | decode tokens/s (median) |", "|---:|---:|---|---:|---:|"]
        out += [f"| {r['batch']} | {r['length']} | {r['backend']} | {_ms(r['ttft_median_s'])} | "
                f"{_cell(r['decode_tokens_per_s'])} |" for r in split]
    return out + [""]


def _speedup(value) -> str:
    return f"{value:.2f}×" if isinstance(value, float) else _cell(value)


def _roofline_cell(roofline) -> str:
    if isinstance(roofline, str):
        return roofline
    if roofline.get("percent") is None:
        return "n/a (end to end)"
    return f"{roofline['percent']:.1f} % ({roofline['bound']})"


def _baseline_section(cmp: dict) -> list[str]:
    out = ["## Baseline comparison", "",
           f"Baseline `{cmp['baseline']}`, fail over {cmp['threshold']:.0%}: "
           f"**{'FAILED' if cmp['failed'] else 'passed'}**", ""]
    if cmp["regressions"]:
        out += ["| backend | point | baseline ms | now ms | change |", "|---|---|---:|---:|---:|"]
        out += [f"| {d['backend']} | {d['key']} | {_ms(d['baseline_s'])} | {_ms(d['current_s'])} | "
                f"{d['change']:+.1%} |" for d in cmp["regressions"]]
    for label, keys in (("only in baseline", cmp["only_in_baseline"]), ("only in this run", cmp["only_in_current"])):
        if keys:
            out += ["", f"Points {label} (not compared): " + ", ".join(f"`{k}`" for k in keys)]
    return out + [""]


# -- PNG ----------------------------------------------------------------------------------------
def write_plot(report: dict, path: Path) -> None:
    """Median latency (p90 as the whisker) and tokens/s per point, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or the GPU hosts
    import matplotlib.pyplot as plt

    rows = report["results"]
    keys = list(dict.fromkeys(r["key"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, (ax_lat, ax_tps) = plt.subplots(2, 1, figsize=(max(8.0, 1.2 * len(keys) + 3), 8), sharex=True)
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        by_key = {r["key"]: r for r in rows if r["backend"] == backend}
        xs = [k for k, key in enumerate(keys) if key in by_key]
        med = [by_key[keys[k]]["stats"]["median_s"] * 1e3 for k in xs]
        p90 = [by_key[keys[k]]["stats"]["p90_s"] * 1e3 for k in xs]
        tps = [by_key[keys[k]]["tokens_per_s"] for k in xs]
        pos = [x + (i - (len(backends) - 1) / 2) * width for x in xs]
        ax_lat.bar(pos, med, width, label=backend, yerr=[[0] * len(med), [p - m for p, m in zip(p90, med)]])
        ax_tps.bar(pos, tps, width, label=backend)
    ax_lat.set_ylabel("median latency, ms (whisker: p90)")
    ax_tps.set_ylabel("tokens/s")
    for ax in (ax_lat, ax_tps):
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    ax_tps.set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=7)
    ax_lat.legend(title=f"{report['settings']['device']}", fontsize=8)
    missing = [b["backend"] for b in report["backends"] if b["status"] != "ok"]
    title = f"exportline bench: {report['environment']['bundle']['name']}"
    if missing:
        title += f"  (not available: {', '.join(missing)})"
    ax_lat.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}; check the bundle folder") from None
    finally:
        plt.close(fig)
