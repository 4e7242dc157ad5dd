"""Readers of reports/verify.json and reports/bench.json for the model card.

verify.json is VerifyReport.to_json (verify/report.py). bench.json is written by bench/, whose
format is its own: `bench_points` is the one place that interprets it, kept small and
defensive so it can follow that format as it settles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.core.layout import BENCH_JSON, VERIFY_JSON

# Worst value of each metric over a stage's rows: larger is worse for errors, smaller for agreement.
_WORST = {"rel_l2": max, "max_abs_over_max_ref": max, "top1": min, "cosine": min}


@dataclass(frozen=True)
class StageSummary:
    stage: str
    status: str
    checks_passed: int
    checks: int
    worst: dict[str, float | None]  # metric → worst value over the rows (None: not measured)
    reference: str = ""
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # scalar facts (e.g. perplexities)


@dataclass(frozen=True)
class VerifySummary:
    passed: bool
    stages: list[StageSummary]


@dataclass(frozen=True)
class BenchPoint:
    backend: str
    workload: str
    median_ms: float | None
    tokens_per_s: float | None
    speedup: float | None
    status: str = "measured"  # or "not available"
    reason: str = ""


@dataclass(frozen=True)
class BenchSummary:
    points: list[BenchPoint]
    device: str = ""


def _load(root: Path, rel: str) -> Any | None:
    path = Path(root) / rel
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run the step that writes it") from None


def read_verify(root: Path) -> VerifySummary | None:
    """None when the bundle has no reports/verify.json."""
    data = _load(root, VERIFY_JSON)
    if data is None:
        return None
    stages = []
    for s in data.get("stages", []):
        rows = s.get("rows", [])
        worst = {}
        for metric, pick in _WORST.items():
            values = [r["metrics"][metric] for r in rows if _is_number(r.get("metrics", {}).get(metric))]
            worst[metric] = float(pick(values)) if values else None
        extra = {k: v for k, v in (s.get("extra") or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        stages.append(StageSummary(
            stage=s["stage"], status=s.get("status", "unknown"), checks_passed=sum(bool(r.get("passed")) for r in rows),
            checks=len(rows), worst=worst, reference=s.get("reference", ""), reason=s.get("reason", ""), extra=extra,
        ))
    return VerifySummary(passed=bool(data.get("passed")), stages=stages)


def read_bench(root: Path) -> BenchSummary | None:
    """None when the bundle has no reports/bench.json."""
    data = _load(root, BENCH_JSON)
    if data is None:
        return None
    env = data.get("environment") if isinstance(data, dict) else None
    env = env if isinstance(env, dict) else {}
    device = env.get("device") or env.get("gpu") or env.get("cpu") or ""
    return BenchSummary(points=bench_points(data), device=str(device))


def bench_points(data: Any) -> list[BenchPoint]:
    """Points of a bench report: a list under "points" (or "results"), or the top-level list.

    Each point names its backend and workload; latency is "median_ms" (or "latency_ms":
    {"median": …}, or "median_s"); throughput "tokens_per_s" (or "tokens_per_second");
    "speedup" is a ratio measured in the same run; "status": "not available" + "reason"
    lists a backend that could not run.
    """
    raw = data if isinstance(data, list) else (data.get("points") or data.get("results") or [])
    points = []
    for p in raw:
        if not isinstance(p, dict):
            continue
        latency = p.get("median_ms")
        if latency is None and isinstance(p.get("latency_ms"), dict):
            latency = p["latency_ms"].get("median")
        if latency is None and _is_number(p.get("median_s")):
            latency = p["median_s"] * 1000.0
        tps = p.get("tokens_per_s", p.get("tokens_per_second"))
        points.append(BenchPoint(
            backend=str(p.get("backend", "?")), workload=str(p.get("workload") or p.get("name") or "?"),
            median_ms=_float(latency), tokens_per_s=_float(tps), speedup=_float(p.get("speedup")),
            status=str(p.get("status") or "measured"), reason=str(p.get("reason") or ""),
        ))
    return points


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is not a result


def _float(v: Any) -> float | None:
    return float(v) if _is_number(v) else None
