"""Calibration feeds of a KV-cache LM: each batch as a prefill, then decode steps on the model's own cache.

The int8 stage calibrates on these (exporters/precision/int8_graph.py); a custom module's
declared I/O has its own reader (exporters/precision/declared_calibration.py).
"""

from __future__ import annotations

BATCH = 8  # sequences per calibration feed
DECODE_STEPS = 8  # decode feeds after each prefill


class KVCalibrationFeeds:
    """Per batch of calibration chunks, one prefill feed (empty past) and then DECODE_STEPS
    one-token feeds whose past is what the fp32 model itself produced on the step before
    (teacher-forced on the chunk's own tokens). exporters/precision/segmented_stats.py runs
    the graph over `plan()`; tests/quant_models.py's WholeGraphReader runs it in one session,
    as onnxruntime's calibrators would, and is what the segmented pass is tested against."""

    def __init__(self, chunks: list[list[int]], layout, *, decode_steps: int = DECODE_STEPS):
        self.chunks, self.layout, self.decode_steps = chunks, layout, decode_steps

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
