"""The `forward` workload: a custom module's bundle (sources/custom) timed on its declared
I/O (shapes.DeclaredIO, recorded in config.json), not on KV-cache prefill/decode.

Points are the declared dims all at `opt`, then all at `max` (TensorRT's profile corners
that a caller sizes for); feeds are `DeclaredIO.sample`, the sampler the verifier and the
int8 calibration use, so every backend gets the same seeded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.shapes import DeclaredIO, resolve_dims
from exportline.verify.runtime.base import Runner

WORKLOAD = "forward"


@dataclass(frozen=True)
class ForwardPoint:
    """One point: a size per declared dim. Has the attributes harness rows read from a Point."""

    sizes: dict[str, int]
    shapes: dict[str, list[int]] = field(default_factory=dict)  # input name → the fed shape
    workload: str = WORKLOAD
    new_tokens: int = 0
    length: int | None = None

    @property
    def batch(self) -> int:
        return self.sizes.get("batch", 1)

    @property
    def key(self) -> str:
        return WORKLOAD + "/" + "/".join(f"{k}={v}" for k, v in self.sizes.items())

    @property
    def tokens(self) -> int:
        """What items/s counts: rows of the batch (one forward each)."""
        return self.batch

    def row_extra(self) -> dict[str, Any]:
        return {"sizes": dict(self.sizes), "shapes": dict(self.shapes)}


def forward_points(io: DeclaredIO) -> list[ForwardPoint]:
    points = []
    for corner in ("opt", "max"):
        sizes = {d.name: getattr(d, corner) for d in io.dims}
        if all(p.sizes != sizes for p in points):
            shapes = {s.name: list(resolve_dims(s.dims, sizes)) for s in io.inputs()}
            points.append(ForwardPoint(sizes, shapes))
    return points


def forward_feed(io: DeclaredIO, point: ForwardPoint, *, seed: int) -> dict[str, np.ndarray]:
    return io.sample(point.sizes, seed=seed)


class DeclaredTorchRunner(Runner):
    """The bundle's remote-code module in torch fp32 on the declared I/O (the verifier's
    reference path, sources/custom/model.py, in float32 and on the bench device)."""

    name = "torch (custom module)"

    def __init__(self, root: Path, *, device: str = "cpu"):
        super().__init__()
        self.root, self.device = Path(root), device
        self.flat = None

    def activate_impl(self) -> None:
        from exportline.exporters.sources.custom.model import bundle_io, flat_module, load_bundle_module

        self.io, _ = bundle_io(self.root)
        self.flat = flat_module(load_bundle_module(self.root, "float32"), self.io).to(self.device)

    def deactivate_impl(self) -> None:
        self.flat = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in self.io.inputs()]
        with torch.inference_mode():
            outs = self.flat(*args)
        return {s.name: o.detach().cpu().numpy() for s, o in zip(self.io.outputs(), outs)}


def custom_factory(factory):
    """The registry's runners, except torch: its TorchRunner loads a causal LM with a KV
    cache, so a custom bundle's torch backend is the remote-code module above."""

    def make(root: Path, backend: str, **options: Any) -> Runner:
        if backend == "torch":
            from exportline.exporters.core.bundle import Bundle
            from exportline.verify.runtime.backends import hf_files

            Bundle(root).require_intact(hf_files(root), fast=True)
            return DeclaredTorchRunner(root, **options)
        return factory(root, backend, **options)

    return make
