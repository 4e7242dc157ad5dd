"""Verification inputs (DESIGN.md §6): seeded cases whose shapes come from exporters/shapes.py.

Prefill cases start from an empty past. A decode case names a prefill case as its
`prefix`: the reference runs the prefix first and its own present.* become the decode
step's past_key_values.*, so every backend is checked on its cache path with the same,
exact past.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.shapes import BATCH, PAST, SEQUENCE, TOTAL, KVLayout
from exportline.verify.runtime.base import Runner

LONG = 64  # the "long" prefill / past length; ≥ 64 per DESIGN.md §6


@dataclass(frozen=True)
class Case:
    name: str
    input_ids: np.ndarray  # [batch, sequence] int64
    attention_mask: np.ndarray  # [batch, past + sequence] int64, zeros at the left = padding
    position_ids: np.ndarray  # [batch, sequence] int64
    prefix: "Case | None" = None  # run first; its present.* are this case's past

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def sequence(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def past(self) -> int:
        return int(self.attention_mask.shape[1]) - self.sequence

    def query_mask(self) -> np.ndarray:
        """[batch, sequence]: 1 where the position is a real token (logits are compared there)."""
        return self.attention_mask[:, -self.sequence:]

    def feed(self, layout: KVLayout, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The feed for this case; without `past`, zero-length past tensors (a prefill)."""
        size = {BATCH: self.batch, SEQUENCE: self.sequence, PAST: self.past, TOTAL: self.past + self.sequence}
        feed: dict[str, np.ndarray] = {}
        for spec in layout.inputs():
            shape = tuple(d if isinstance(d, int) else size[d] for d in spec.dims)
            if spec.name in ("input_ids", "attention_mask", "position_ids"):
                feed[spec.name] = getattr(self, spec.name)
            elif past is not None:
                feed[spec.name] = past[spec.name]
            elif self.past == 0:
                feed[spec.name] = np.zeros(shape, dtype=np.float32)
            else:
                raise ValueError(f"case {self.name}: past of {self.past} needs the prefix's present.*")
            if tuple(feed[spec.name].shape) != shape:
                raise ValueError(f"case {self.name}: {spec.name} has shape {feed[spec.name].shape}, expected {shape}")
        return feed


def positions(mask: np.ndarray) -> np.ndarray:
    """position_ids of a left-padded batch: count of real tokens before, clipped at 0 for pads."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def prefill(name: str, rng: np.random.Generator, vocab: int, *, batch: int, length: int, pads: list[int] | None = None) -> Case:
    """`pads[b]` pad tokens at the left of row b (token 0; masked anyway)."""
    pads = pads or [0] * batch
    ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return Case(name, ids, mask, positions(mask))


def decode(name: str, rng: np.random.Generator, vocab: int, *, prefix: Case) -> Case:
    """One new token per row after `prefix`."""
    ids = rng.integers(0, vocab, size=(prefix.batch, 1), dtype=np.int64)
    mask = np.concatenate([prefix.attention_mask, np.ones((prefix.batch, 1), dtype=np.int64)], axis=1)
    pos = prefix.position_ids[:, -1:] + (prefix.query_mask()[:, -1:] > 0)  # after the last real token
    return Case(name, ids, mask, pos.astype(np.int64), prefix=prefix)


def build_cases(layout: KVLayout, *, seed: int = 0, long: int = LONG) -> list[Case]:
    """Batch 1 and 3; prefill 1 and `long`; a left-padded batch; decode after a past of
    0, 1 and `long` (the last one left-padded). `long` shrinks to fit the model's
    positions: the decode after it sits at position `long`, so at most max_positions - 1
    (nanoGPT's block_size 64 gets 63, not an index past its position table)."""
    long = layout.fit(long, used=1)
    if long < 4:
        raise ConfigError(f"the long case length must be ≥ 4 (got {long}); DESIGN.md §6 asks ≥ 64")
    rng = np.random.default_rng(seed)
    v = layout.vocab_size
    p1 = prefill("batch1 prefill 1", rng, v, batch=1, length=1)
    p_long = prefill(f"batch1 prefill {long}", rng, v, batch=1, length=long)
    padded = prefill(f"batch3 prefill {long} left-padded", rng, v, batch=3, length=long, pads=[0, max(1, long // 8), long // 2])
    empty = prefill("batch3 decode past 0", rng, v, batch=3, length=1)
    return [
        p1,
        p_long,
        padded,
        empty,
        decode("batch1 decode past 1", rng, v, prefix=p1),
        decode(f"batch3 decode past {long} left-padded", rng, v, prefix=padded),
    ]


class Materialized:
    """Runs cases on a reference runner: feeds (with the reference's past) and its outputs.

    Prefix outputs are memoised, so a prefix that is also a case runs once.
    """

    def __init__(self, reference: Runner, layout: KVLayout):
        self.reference = reference
        self.layout = layout
        self._outputs: dict[str, dict[str, np.ndarray]] = {}

    def run(self, case: Case) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        past = None
        if case.prefix is not None:
            pre = self._run_cached(case.prefix)
            past = {p: pre[q] for p, q in zip(self.layout.past_names(), self.layout.present_names())}
        feed = case.feed(self.layout, past)
        if case.name not in self._outputs:
            self._outputs[case.name] = self.reference.infer(feed)
        return feed, self._outputs[case.name]

    def _run_cached(self, case: Case) -> dict[str, np.ndarray]:
        if case.name not in self._outputs:
            self.run(case)
        return self._outputs[case.name]


def output_mask(case: Case, name: str) -> np.ndarray:
    """The positions of output `name` that real tokens produced: [batch, sequence] for
    logits, [batch, past + sequence] for present.* (compare them as [b, pos, heads, dim])."""
    return case.query_mask() if name == "logits" else case.attention_mask


def positions_first(name: str, value: np.ndarray) -> np.ndarray:
    """present.* are [batch, heads, pos, dim]; the masks index [batch, pos]."""
    return value if name == "logits" else np.swapaxes(value, 1, 2)
