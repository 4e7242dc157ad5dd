"""Calibration feeds of a KV-cache LM: each batch as a prefill, then decode steps on the model's own cache.

The int8 stage calibrates on these (exporters/precision/int8_graph.py); a custom module's
declared I/O has its own reader (exporters/precision/declared_calibration.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

BATCH = 8  # sequences per calibration feed
DECODE_STEPS = 8  # decode feeds after each prefill


class KVCalibrationReader:
    """onnxruntime CalibrationDataReader: per batch, one prefill feed (empty past) and then
    DECODE_STEPS one-token feeds with the past the fp32 model itself produced.

    `observe=(names, callback)`: the model at `model_path` has these extra outputs, and the
    reader hands their values for every feed to `callback` (the SmoothQuant statistics pass
    runs this way, so one session both produces the past and measures the activations)."""

    def __init__(self, model_path: Path, chunks: list[list[int]], layout, *, decode_steps: int = DECODE_STEPS,
                 observe: tuple[list[str], Callable] | None = None, level=None):
        self.model_path, self.chunks, self.layout, self.decode_steps = model_path, chunks, layout, decode_steps
        self.observe, self.level = observe, level  # level: onnxruntime GraphOptimizationLevel (None: its default)
        self.feeds = 0
        self._it = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._generate()
        return next(self._it, None)

    def __iter__(self):
        return self._generate()

    def drain(self) -> None:
        for _ in self._generate():
            pass

    def plan(self) -> list[dict]:
        """Every feed in order: a prefill (empty past), then one-token decode steps whose past
        is segmented_stats.Recurrent — the previous feed's presents, of the shape given."""
        import numpy as np

        from exportline.exporters.precision.segmented_stats import Recurrent

        feeds = []
        for start in range(0, len(self.chunks), BATCH):
            ids = np.asarray(self.chunks[start : start + BATCH], dtype=np.int64)
            batch, total = ids.shape
            prefill = total - self.decode_steps
            for begin, end in [(0, prefill)] + [(p, p + 1) for p in range(prefill, total)]:
                cache = (batch, self.layout.num_kv_heads, begin, self.layout.head_dim)
                feeds.append({
                    "input_ids": ids[:, begin:end],
                    "attention_mask": np.ones((batch, end), np.int64),
                    "position_ids": np.tile(np.arange(begin, end, dtype=np.int64), (batch, 1)),
                    **{name: np.zeros(cache, np.float32) if begin == 0 else Recurrent(cache)
                       for name in self.layout.past_names()},
                })
        return feeds

    def recurrence(self) -> dict[str, str]:
        """past input → the present output it is fed from."""
        return dict(zip(self.layout.past_names(), self.layout.present_names()))

    def _generate(self):
        """The whole fp32 graph in one session over plan(): the reference the segmented
        statistics are tested against, and onnxruntime's calibrators' reader."""
        import onnxruntime as ort

        from exportline.exporters.precision.segmented_stats import Recurrent

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.level is not None:
            opts.graph_optimization_level = self.level
        session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        presents = self.layout.present_names()
        observed, callback = self.observe or ([], None)
        feeds, past = self.plan(), {}
        for k, planned in enumerate(feeds):
            feed = {n: past[n] if isinstance(v, Recurrent) else v for n, v in planned.items()}
            self.feeds += 1
            yield feed
            following = feeds[k + 1] if k + 1 < len(feeds) else None
            recurs = following is not None and any(isinstance(v, Recurrent) for v in following.values())
            if recurs or callback:  # the next step's past, and what is observed
                values = session.run(presents + observed, feed)
                past = dict(zip(self.layout.past_names(), values))
                if callback:
                    callback(values[len(presents):])

