"""Warm up, then time repeated runs; on a GPU every run is bracketed by a device sync.

Wall-clock with a synchronize on both sides measures what a caller waits for (host work,
transfers, kernels), which is what the runner contract exposes; CUDA events alone would
miss the host side of a numpy-in/numpy-out runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from exportline.exporters.core.measure import measure


@dataclass
class Timing:
    samples_s: list[float]
    peak_rss_bytes: int
    device_peak_bytes: int | None  # None on CPU


class Device:
    """`cpu` or `cuda`: how to synchronize and how to read peak device memory."""

    def __init__(self, kind: str):
        self.kind = kind

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        if not self.is_cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())


def time_runs(run: Callable[[], object], *, warmup: int, repeat: int, device: Device) -> Timing:
    """`warmup` untimed calls, then `repeat` timed ones; peak memory covers both."""
    device.reset_peak()
    samples = []
    with measure() as m:
        for _ in range(warmup):
            run()
        device.synchronize()
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            device.synchronize()
            samples.append(time.perf_counter() - start)
    return Timing(samples_s=samples, peak_rss_bytes=m.peak_rss_bytes, device_peak_bytes=device.peak_bytes())
