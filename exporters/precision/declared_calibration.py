"""Calibration feeds for a custom module's int8 graph: inputs sampled from its declared
I/O (shapes.DeclaredIO) at the sizes the verifier does not use for judging, or the user's
own arrays (`--calibration-inputs FILE.npz`: one array per declared input, axis 0 = batch,
fed in slices of CALIBRATION_BATCH rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.shapes import DeclaredIO

SAMPLED_FEEDS = 16
CALIBRATION_BATCH = 4
SEED = 1000  # the verifier's cases use seeds 1..; calibration never sees those inputs


def declared_feeds(io: DeclaredIO, npz: Path | None) -> list[dict[str, np.ndarray]]:
    if npz is not None:
        return npz_feeds(io, npz)
    sizes = [io.trace_sizes(), *io.case_sizes()]
    return [io.sample(sizes[i % len(sizes)], seed=SEED + i) for i in range(SAMPLED_FEEDS)]


def npz_feeds(io: DeclaredIO, path: Path) -> list[dict[str, np.ndarray]]:
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--calibration-inputs {path}: not a readable .npz ({exc})") from None
    names = [s.name for s in io.inputs()]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConfigError(f"--calibration-inputs {path}: no array for input {', '.join(missing)} (has {', '.join(arrays)})")
    rows = {len(arrays[n]) for n in names}
    if len(rows) != 1:
        raise ConfigError(f"--calibration-inputs {path}: arrays differ in axis 0 (batch) length: {sorted(rows)}")
    total = rows.pop()
    return [{n: arrays[n][i : i + CALIBRATION_BATCH] for n in names} for i in range(0, total, CALIBRATION_BATCH)]


class DeclaredCalibrationReader:
    """One session of the whole graph over fixed feeds; `observe=(names, callback)`: the model
    at `model_path` has these extra outputs, and their values for every feed go to `callback`."""

    def __init__(self, model_path: Path, feeds: list[dict], *, observe: tuple[list[str], Callable] | None = None):
        self.model_path, self.all_feeds, self.observe = model_path, feeds, observe
        self.feeds = 0

    def drain(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        observed, callback = self.observe or ([], None)
        types = {i.name: i.type for i in session.get_inputs()}
        for feed in self.all_feeds:
            cast = {k: (v.astype(np.float32) if types.get(k) == "tensor(float)" else v) for k, v in feed.items() if k in types}
            self.feeds += 1
            if callback:
                callback(session.run(observed, cast))
