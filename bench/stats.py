"""Summary statistics of repeated timings: median and tail percentiles, never the mean alone.

Percentiles use linear interpolation between order statistics (numpy's default, the
"type 7" estimator), so p90 of [1..10] is 9.1, not 9 or 10; the report says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PERCENTILE_METHOD = "linear interpolation between order statistics (numpy default)"


@dataclass(frozen=True)
class Stats:
    n: int
    median_s: float
    p90_s: float
    p99_s: float
    min_s: float
    max_s: float
    mean_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `samples`, linearly interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: list[float]) -> Stats:
    if not samples:
        raise ValueError("no timed runs to summarize; --repeat must be ≥ 1")
    return Stats(
        n=len(samples),
        median_s=percentile(samples, 50),
        p90_s=percentile(samples, 90),
        p99_s=percentile(samples, 99),
        min_s=min(samples),
        max_s=max(samples),
        mean_s=sum(samples) / len(samples),
    )
