"""Verification results as data: rows → stage reports → reports/verify.json + verify.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.errors import VerificationFailed
from exportline.verify.metrics import compare

# Metrics where larger is better; every other bound is an upper limit.
_AT_LEAST = {"top1", "cosine", "identical_fraction", "decided_top1", "decided_positions"}


@dataclass
class CheckRow:
    stage: str
    case: str  # the input case, e.g. "batch3 left-padded prefill 64"
    output: str  # "logits", "present.0.key", "greedy tokens", "perplexity", …
    shape: list[int]
    metrics: dict[str, float | None]
    bounds: dict[str, float]  # metric name → limit (upper, or lower for _AT_LEAST metrics)
    passed: bool
    note: str = ""

    def failure(self) -> str:
        bad = [
            f"{k}={self.metrics.get(k)!r} (bound {'≥' if k in _AT_LEAST else '≤'} {v:g})"
            for k, v in self.bounds.items()
            if not _within(k, self.metrics.get(k), v)
        ]
        return f"{self.stage}: {self.output} on {self.case} shape {self.shape}: " + ", ".join(bad or [self.note])


def _within(metric: str, value: float | None, bound: float) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return value >= bound if metric in _AT_LEAST else value <= bound


def judge(stage: str, case: str, output: str, *, shape, metrics: dict, bounds: dict, note: str = "") -> CheckRow:
    passed = all(_within(k, metrics.get(k), v) for k, v in bounds.items())
    return CheckRow(stage, case, output, [int(s) for s in shape], metrics, bounds, passed, note)


def tensor_row(
    stage: str, case: str, output: str, *, out, ref, bounds: dict, mask=None, top1: bool = False, shape=None
) -> CheckRow:
    """Compare one output tensor with its reference and judge it against `bounds`.
    `shape` is what the report shows when the arrays were transposed for the mask."""
    metrics = compare(out, ref, mask=mask, top1=top1).as_dict()
    if not top1:
        metrics.pop("top1")
    return judge(stage, case, output, shape=np.shape(ref) if shape is None else shape, metrics=metrics, bounds=bounds)


@dataclass
class StageReport:
    stage: str
    status: str  # "passed" | "failed" | "skipped" | "not available"
    reference: str = ""  # what the stage was compared with
    reason: str = ""
    rows: list[CheckRow] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. perplexities, generated tokens

    @classmethod
    def from_rows(cls, stage: str, rows: list[CheckRow], reference: str, **extra: Any) -> "StageReport":
        return cls(stage, "passed" if rows and all(r.passed for r in rows) else "failed", reference, rows=rows, extra=extra)


@dataclass
class VerifyReport:
    stages: list[StageReport]
    environment: dict[str, str] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)  # path, bytes, sha256 status: checked first

    @property
    def passed(self) -> bool:
        return all(s.status in ("passed", "skipped", "not available") for s in self.stages)

    def first_failure(self) -> str | None:
        for s in self.stages:
            for r in s.rows:
                if not r.passed:
                    return r.failure()
            if s.status == "failed":
                return f"{s.stage}: {s.reason or 'failed'}"
        return None

    def summary(self) -> str:
        return "verify: " + ", ".join(
            f"{s.stage} {s.status}" + (f" ({sum(r.passed for r in s.rows)}/{len(s.rows)} checks)" if s.rows else "")
            + (f": {s.reason}" if s.reason and s.status != "passed" else "")
            for s in self.stages
        )

    def raise_for_failure(self) -> None:
        failure = self.first_failure()
        if failure:
            raise VerificationFailed(f"verification failed: {failure}; see reports/verify.md")

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "environment": self.environment, "files": self.files,
                "stages": [asdict(s) for s in self.stages]}

    def write(self, reports_dir: Path) -> None:
        from exportline.exporters.core.bundle import write_text_atomic

        reports_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(reports_dir / "verify.json", json.dumps(self.to_json(), indent=2, default=float) + "\n")
        write_text_atomic(reports_dir / "verify.md", self.markdown())

    def markdown(self) -> str:
        lines = ["# Verification report", "", f"Overall: **{'PASS' if self.passed else 'FAIL'}**", ""]
        if self.files:
            lines += ["## Files against manifest.json (sha256)", "", "| path | bytes | sha256 |", "|---|---|---|"]
            lines += [f"| `{f['path']}` | {f['bytes']:,} | {f['status']} |" for f in self.files] + [""]
        for s in self.stages:
            lines += [f"## Stage `{s.stage}`: {s.status}", ""]
            if s.reference:
                lines += [f"Reference: {s.reference}", ""]
            if s.reason:
                lines += [f"Reason: {s.reason}", ""]
            if s.rows:
                keys = sorted({k for r in s.rows for k in r.metrics})
                lines.append("| case | output | shape | " + " | ".join(keys) + " | bound | result |")
                lines.append("|" + "---|" * (len(keys) + 5))
                for r in s.rows:
                    vals = " | ".join(_fmt(r.metrics.get(k)) for k in keys)
                    bound = ", ".join(f"{k} {'≥' if k in _AT_LEAST else '≤'} {v:g}" for k, v in r.bounds.items())
                    lines.append(
                        f"| {r.case} | {r.output} | {'×'.join(map(str, r.shape))} | {vals} | {bound} | "
                        f"{_result(r)} |"
                    )
                lines.append("")
            for key, value in s.extra.items():
                lines.append(f"- {key}: {value}")
            if s.extra:
                lines.append("")
        return "\n".join(lines)


def _result(row: CheckRow) -> str:
    """A row without bounds is information, not a check that passed."""
    if not row.bounds:
        return f"reported ({row.note})" if row.note else "reported"
    return "pass" if row.passed else "**FAIL**"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)
