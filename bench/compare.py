"""Point-by-point comparison of a bench.json with a baseline: the CI regression gate.

Points match by (backend, point key), e.g. ("onnx", "decode/batch=1/past=128"); the
metric is the median latency. A point regresses when it is slower than the baseline by
more than the threshold. Points present on one side only are listed, never failed: a new
backend or a grid change is not a regression.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exportline.exporters.core.errors import ConfigError


def parse_threshold(text: str) -> float:
    """'5%' or '5' → 0.05 (a plain number is a percentage too: '--fail-over 5' means 5 %)."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--fail-over {text!r}: expected a percentage such as 5%") from None
    if not 0 <= value < 10_000:
        raise ConfigError(f"--fail-over {text!r}: expected a percentage between 0% and 10000%")
    return value / 100


def median_by_key(report: dict) -> dict[tuple[str, str], float]:
    """(backend, point key) → median seconds, for the points that were measured."""
    out = {}
    for row in report.get("results", []):
        if row.get("status") == "ok":
            out[(row["backend"], row["key"])] = row["stats"]["median_s"]
    return out


@dataclass
class Delta:
    backend: str
    key: str
    baseline_s: float
    current_s: float

    @property
    def change(self) -> float:
        """+0.10 = 10 % slower than the baseline."""
        if self.baseline_s <= 0:  # a zero baseline cannot be beaten; only a zero now matches it
            return 0.0 if self.current_s <= 0 else math.inf
        return self.current_s / self.baseline_s - 1

    def describe(self) -> str:
        return (f"{self.backend} {self.key}: median {self.current_s * 1e3:.3f} ms vs baseline "
                f"{self.baseline_s * 1e3:.3f} ms ({self.change:+.1%})")


@dataclass
class Comparison:
    baseline: str
    threshold: float
    regressions: list[Delta] = field(default_factory=list)
    unchanged: list[Delta] = field(default_factory=list)  # within the threshold, or faster
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def to_dict(self) -> dict:
        def rows(deltas):
            return [{**asdict(d), "change": d.change} for d in deltas]

        return {
            "baseline": self.baseline, "threshold": self.threshold, "failed": self.failed,
            "regressions": rows(self.regressions), "within_threshold": rows(self.unchanged),
            "only_in_baseline": self.only_in_baseline, "only_in_current": self.only_in_current,
        }

    def lines(self) -> list[str]:
        """What the CLI prints: every regression, then the unmatched points."""
        out = [f"REGRESSION {d.describe()} > {self.threshold:.0%}" for d in self.regressions]
        out += [f"missing in this run (baseline only): {k}" for k in self.only_in_baseline]
        out += [f"new in this run (no baseline): {k}" for k in self.only_in_current]
        checked = len(self.regressions) + len(self.unchanged)
        out.append(f"baseline {self.baseline}: {checked} points compared, {len(self.regressions)} regressed "
                   f"beyond {self.threshold:.0%}")
        return out


def load_report(path: Path, what: str = "--baseline") -> dict:
    """A saved bench.json; `what` names it in the error (the option or argument it came from)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file; pass a bench.json from an earlier run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not a readable JSON file ({exc}); pass a bench.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ConfigError(f"{what} {path}: not an exportline bench.json (no 'results'); pass reports/bench.json")
    return data


def compare(current: dict, baseline: dict, *, threshold: float, baseline_name: str = "baseline") -> Comparison:
    now, old = median_by_key(current), median_by_key(baseline)
    result = Comparison(baseline=baseline_name, threshold=threshold)
    for k in sorted(now.keys() | old.keys()):
        label = f"{k[0]} {k[1]}"
        if k not in old:
            result.only_in_current.append(label)
        elif k not in now:
            result.only_in_baseline.append(label)
        else:
            delta = Delta(k[0], k[1], baseline_s=old[k], current_s=now[k])
            (result.regressions if delta.change > threshold else result.unchanged).append(delta)
    return result
