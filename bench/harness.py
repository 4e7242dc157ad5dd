"""`run_bench`: every backend over the workload grid, in one process, one run (DESIGN.md §7).

Backends run one after another; each is opened through the runner registry, timed on
every point, then closed before the next is opened, so two models never share memory or
cores. Speedups and % of roofline are computed after all backends ran, from this run only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from exportline.bench import roofline
from exportline.bench.backends import REFERENCE, RunnerFactory, close_backend, open_backend
from exportline.bench.compare import Comparison, compare, load_report
from exportline.bench.environment import environment, load_average, physical_cores
from exportline.bench.report import FORMAT, write_reports
from exportline.bench.stats import PERCENTILE_METHOD, percentile, summarize
from exportline.bench.timing import Device, time_runs
from exportline.bench.workloads import WORKLOADS, Point, grid, prepare
from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.errors import ArtifactError, ConfigError, ExportlineError, NotAvailable
from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.sources.custom.model import bundle_io, is_custom
from exportline.verify.runtime.backends import BACKENDS, make_runner

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = ("torch", "onnx", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8")
    device: str = "cpu"
    batches: tuple[int, ...] = (1, 8)
    prompt_lens: tuple[int, ...] = (128, 512)
    decode_len: int = 64
    warmup: int = 2
    repeat: int = 10
    workloads: tuple[str, ...] = WORKLOADS
    threads: int | None = None  # CPU threads for torch and ONNX Runtime; None = physical cores
    rounds: int = 1  # passes over the backends, alternating order (ABBA), samples pooled
    seed: int = 0

    def check(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: expected cpu or cuda")
        if not self.batches or min(self.batches) < 1 or not self.prompt_lens or min(self.prompt_lens) < 1:
            raise ConfigError("--batch and --prompt-len need positive integers, e.g. --batch 1,8 --prompt-len 128")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: expected ≥ 1 (default: the physical core count)")
        if self.decode_len < 1 or self.repeat < 1 or self.warmup < 0 or self.rounds < 1:
            raise ConfigError("--decode-len, --repeat and --rounds must be ≥ 1 and --warmup ≥ 0")
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ConfigError(f"--workloads: unknown {', '.join(unknown) or '(none)'}; known: {','.join(WORKLOADS)}")


@dataclass
class BackendRun:
    backend: str
    status: str  # "ok" | "not available" | "failed"
    reason: str = ""
    session: dict | None = None
    rss_before_bytes: int = 0
    rss_after_activate_bytes: int = 0
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "rows"}
        return {**out, "precision": BACKENDS[self.backend].precision}


def _require_bundle(root: Path) -> Bundle:
    bundle = Bundle(root)
    if not bundle.manifest_path.is_file() or not (root / "config.json").is_file():
        raise ArtifactError(f"{root} is not an exported bundle (no manifest.json/config.json); "
                            f"export it first: exportline export MODEL --out {root}")
    return bundle


def _load_model(root: Path):
    bundle = _require_bundle(root)
    from exportline.exporters.sources.hf_writer import load_config

    bundle.require_intact(["config.json"], fast=True)
    config = load_config(root)  # a config file only: no code runs
    return bundle.read_manifest(), config


def _check_lengths(config, cfg: BenchConfig) -> None:
    longest = max(cfg.prompt_lens) + (cfg.decode_len if "generate" in cfg.workloads else 1)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise ConfigError(f"--prompt-len {max(cfg.prompt_lens)} + --decode-len {cfg.decode_len} exceeds the model's "
                          f"max_position_embeddings {limit}; choose shorter lengths")


def run_bench(
    root: Path, cfg: BenchConfig, *, factory: RunnerFactory | None = None, progress: Progress = lambda m: None,
    command: str = "",
) -> dict:
    """Benchmark every backend of `cfg` on the bundle at `root`; returns the report dict
    (see report.py) without writing it."""
    cfg.check()
    root = Path(root)
    if is_custom(root):  # the user's own module: its declared I/O, no KV cache
        return _run_forward_bench(root, cfg, factory=factory or make_runner, progress=progress, command=command)
    manifest, config = _load_model(root)
    _check_lengths(config, cfg)
    device = Device(cfg.device)
    if device.is_cuda:
        import torch

        if not torch.cuda.is_available():
            raise NotAvailable("--device cuda: no CUDA GPU visible to torch; run on a GPU host or use --device cpu")
    layout = KVLayout.from_config(config)
    cost = roofline.model_cost(config)
    ceilings = roofline.measure_ceilings() if device.is_cuda else None
    if ceilings:
        progress(f"ceilings: {ceilings.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
                 f"{ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s {ceilings.matmul_dtype}")
    points = grid(list(cfg.workloads), batches=list(cfg.batches), lengths=list(cfg.prompt_lens),
                  decode_len=cfg.decode_len)
    factory = factory or make_runner
    cfg = replace(cfg, threads=cfg.threads or physical_cores())
    prep = lambda point, runner: prepare(point, layout, runner, seed=cfg.seed)  # noqa: E731
    with torch_threads(cfg.threads):
        env = environment(root, manifest, cfg.device)
        runs = _run_rounds(root, points, prep=prep, cfg=cfg, device=device, factory=factory, progress=progress)
    results = [row for run in runs for row in run.rows]
    _add_derived(results, cost=cost, ceilings=ceilings)
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "settings": {**asdict(cfg), "percentile_method": PERCENTILE_METHOD,
                     "timing": "wall clock per run, device-synchronized on GPU; numpy in/out (runner contract)"},
        "environment": {**env, "load_average_at_end": load_average()},
        "model": cost.to_dict(),
        "ceilings": ceilings.to_dict() if ceilings else roofline.CPU_RUN,
        "backends": [run.summary() for run in runs],
        "results": results,
        "baseline": None,
    }


NO_COST_MODEL = "not available: no roofline cost model for a custom module"


def _run_forward_bench(root: Path, cfg: BenchConfig, *, factory, progress, command) -> dict:
    """A custom module's bundle: the `forward` workload at the declared dims' opt and max
    sizes (bench/forward.py), every backend, same rounds, statistics and speedups."""
    from exportline.bench.forward import WORKLOAD, custom_factory, forward_feed, forward_points
    from exportline.bench.workloads import PreparedPoint

    bundle = _require_bundle(root)
    bundle.require_intact(["config.json"], fast=True)
    io, _ = bundle_io(root)
    device = Device(cfg.device)
    if device.is_cuda:
        import torch

        if not torch.cuda.is_available():
            raise NotAvailable("--device cuda: no CUDA GPU visible to torch; run on a GPU host or use --device cpu")
    points = forward_points(io)
    progress(f"custom module: the forward workload at {', '.join(p.key for p in points)} "
             "(the declared dims; --batch/--prompt-len/--decode-len/--workloads apply to built-in LMs)")
    cfg = replace(cfg, threads=cfg.threads or physical_cores(), workloads=(WORKLOAD,))
    factory = custom_factory(factory)

    def prep(point, runner):
        feed = forward_feed(io, point, seed=cfg.seed)  # built outside the timed region
        return PreparedPoint(point=point, run=lambda: runner.infer(feed))

    with torch_threads(cfg.threads):
        env = environment(root, bundle.read_manifest(), cfg.device)
        runs = _run_rounds(root, points, prep=prep, cfg=cfg, device=device, factory=factory, progress=progress)
    results = [row for run in runs for row in run.rows]
    _add_derived(results, cost=None, ceilings=None)
    roof = NO_COST_MODEL if device.is_cuda else roofline.CPU_RUN
    for row in results:
        row["roofline"] = roof
    return {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "settings": {**asdict(cfg), "percentile_method": PERCENTILE_METHOD,
                     "timing": "wall clock per run, device-synchronized on GPU; numpy in/out (runner contract)"},
        "environment": {**env, "load_average_at_end": load_average()},
        "model": {"kind": "custom", "declared_io": io.to_dict()},
        "ceilings": roof, "backends": [run.summary() for run in runs], "results": results, "baseline": None,
    }


@contextmanager
def torch_threads(n: int):
    """torch and ONNX Runtime get the same number of CPU threads, so a speedup compares
    kernels, not core counts; torch's process-wide setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_backend(root, name, points, *, prep, cfg, device, factory, progress, registry=BACKENDS) -> BackendRun:
    progress(f"{name}: opening")
    opened = open_backend(root, name, device=cfg.device, threads=cfg.threads, factory=factory, registry=registry)
    run = BackendRun(name, "ok" if opened.runner else "not available", opened.reason, opened.session,
                     opened.rss_before_bytes, opened.rss_after_activate_bytes)
    if opened.runner is None:
        progress(f"{name}: not available: {opened.reason}")
        return run
    try:
        for point in points:
            prepared = prep(point, opened.runner)
            timing = time_runs(prepared.run, warmup=cfg.warmup, repeat=cfg.repeat, device=device)
            stats = summarize(timing.samples_s)
            row = {
                "backend": name, "precision": registry[name].precision, "key": point.key, "workload": point.workload,
                "batch": point.batch, "length": point.length, "new_tokens": point.new_tokens, "status": "ok",
                "stats": stats.to_dict(), "samples_s": timing.samples_s,
                "tokens": point.tokens, "tokens_per_s": point.tokens / stats.median_s,
                "peak_rss_bytes": timing.peak_rss_bytes, "device_peak_bytes": timing.device_peak_bytes,
            }
            if hasattr(point, "row_extra"):  # forward: the sizes and the fed shapes
                row.update(point.row_extra())
            if prepared.splits:  # generate: the timed calls are the last `repeat` ones
                row["splits"] = prepared.splits[-cfg.repeat:]
            run.rows.append(row)
            progress(f"{name} {point.key}: median {stats.median_s * 1e3:.2f} ms, p90 {stats.p90_s * 1e3:.2f} ms")
    except ExportlineError as exc:
        run.status, run.reason = "failed", str(exc)
    except Exception as exc:  # a backend that crashes mid-run must not hide the others' numbers
        run.status, run.reason = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        close_backend(opened)
    if run.status == "failed":
        progress(f"{name}: failed: {run.reason}")
    return run


def _run_rounds(root, points, *, prep, cfg, device, factory, progress, registry=BACKENDS) -> list:
    """Every backend over the points, `cfg.rounds` times in alternating (ABBA) order; each
    backend's rounds pooled into one run, in the order the user named the backends.
    `registry` maps a backend name to its Backend record (bench/peers.py passes its peers')."""
    passes = []
    for r in range(cfg.rounds):
        order = cfg.backends if r % 2 == 0 else tuple(reversed(cfg.backends))
        say = progress if cfg.rounds == 1 else (lambda m, r=r: progress(f"[round {r + 1}/{cfg.rounds}] {m}"))
        passes.append({name: _run_backend(root, name, points, prep=prep, cfg=cfg, device=device,
                                          factory=factory, progress=say, registry=registry) for name in order})
    return [_pool([p[name] for p in passes]) for name in cfg.backends]


def _pool(runs: list[BackendRun]) -> BackendRun:
    """One backend's rounds as one run: samples concatenated, statistics recomputed, peaks
    maximized. A round that was not "ok" decides the status (and keeps its reason)."""
    first = runs[0]
    bad = next((r for r in runs if r.status != "ok"), None)
    pooled = BackendRun(first.backend, bad.status if bad else "ok", bad.reason if bad else "", first.session,
                        first.rss_before_bytes, max(r.rss_after_activate_bytes for r in runs))
    if bad:
        return pooled
    for row in first.rows:
        same = [next(x for x in r.rows if x["key"] == row["key"]) for r in runs]
        samples = [t for x in same for t in x["samples_s"]]
        stats = summarize(samples)
        devices = [x["device_peak_bytes"] for x in same if x["device_peak_bytes"] is not None]
        if "splits" in row:
            row = {**row, "splits": [t for x in same for t in x["splits"]]}
        pooled.rows.append({
            **row, "stats": stats.to_dict(), "samples_s": samples, "tokens_per_s": row["tokens"] / stats.median_s,
            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in same),
            "device_peak_bytes": max(devices) if devices else None,
        })
    return pooled


def _add_derived(results: list[dict], *, cost, ceilings) -> None:
    """Speedup over torch on the same point of this run, and % of roofline on GPU."""
    reference = {r["key"]: r["stats"]["median_s"] for r in results if r["backend"] == REFERENCE}
    for r in results:
        if r.get("splits"):  # generate: time to first token and steady decode rate, medians
            r["ttft_median_s"] = percentile([x["prefill_s"] for x in r["splits"]], 50)
            steps = r["new_tokens"] - 1
            decode = percentile([x["decode_s"] for x in r["splits"]], 50)
            r["decode_tokens_per_s"] = r["batch"] * steps / decode if steps and decode > 0 else None
        ref = reference.get(r["key"])
        r["speedup_vs_torch"] = (ref / r["stats"]["median_s"]) if ref else (
            f"not measured: {REFERENCE} not measured in this run")
        if ceilings is None:
            r["roofline"] = roofline.CPU_RUN
        else:
            point = Point(r["workload"], r["batch"], r["length"], r["new_tokens"])
            r["roofline"] = roofline.percent_of_roofline(
                point, r["stats"]["median_s"], cost=cost, ceilings=ceilings, precision=r["precision"])


@dataclass
class BenchOutcome:
    report: dict
    files: list[Path]
    comparison: Comparison | None = None

    @property
    def failed_backends(self) -> list[dict]:
        return [b for b in self.report["backends"] if b["status"] == "failed"]


def bench_bundle(
    root: Path, cfg: BenchConfig, *, baseline: Path | None = None, threshold: float = 0.05,
    factory: RunnerFactory | None = None, progress: Progress = lambda m: None, command: str = "",
) -> BenchOutcome:
    """Run, compare with `baseline` if given, and write reports/bench.{json,md,png}.

    The baseline is read before the (long) run, so a bad path fails at once. The bundle
    lock keeps an export from replacing artifacts while they are being timed.
    """

    root = Path(root)
    cfg.check()
    old = load_report(baseline) if baseline else None
    bundle = _require_bundle(root)
    with bundle.lock():
        report = run_bench(root, cfg, factory=factory, progress=progress, command=command)
        comparison = compare(report, old, threshold=threshold, baseline_name=str(baseline)) if old else None
        report["baseline"] = comparison.to_dict() if comparison else None
        files = write_reports(report, root / "reports")
        bundle.write_manifest(bundle.read_manifest(), only_under="reports/")
    return BenchOutcome(report, files, comparison)
