"""The three workloads of DESIGN.md §7 as feeds for the runner contract.

prefill  — `batch × prompt` tokens with an empty past (past_sequence = 0);
decode   — one token per sequence on a past of `length` tokens, the past produced once by a
           prefill and reused by every timed step, so each step sees the same shape;
generate — prefill `prompt` tokens, then `new_tokens` greedy single-token steps that carry
           the KV cache forward, end to end (verify/generate.py's loop).

Feeds use the ONNX names of exporters/shapes.py, built from the same KVLayout the exporter
and verifier use (house rule 3). Float feeds are float32: runners cast them to the dtype
their graph declares, so one feed drives fp32, fp16 and int8 backends alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from exportline.exporters.core.shapes import KVLayout
from exportline.verify.generate import empty_past
from exportline.verify.runtime.base import Runner

WORKLOADS = ("prefill", "decode", "generate")
# What the `length` of a point means, per workload; it also names the key's field.
LENGTH_NAME = {"prefill": "prompt", "decode": "past", "generate": "prompt"}


@dataclass(frozen=True)
class Point:
    """One cell of the grid: a workload at one batch and one length."""

    workload: str
    batch: int
    length: int  # prompt tokens (prefill, generate) or past tokens (decode)
    new_tokens: int = 0  # tokens generated per sequence (decode: 1, generate: --decode-len)

    @property
    def key(self) -> str:
        """Stable across runs: the baseline comparison matches points by it."""
        key = f"{self.workload}/batch={self.batch}/{LENGTH_NAME[self.workload]}={self.length}"
        return key + (f"/new={self.new_tokens}" if self.workload == "generate" else "")

    @property
    def tokens(self) -> int:
        """Tokens per timed run that tokens/s counts: processed (prefill) or produced."""
        return self.batch * (self.length if self.workload == "prefill" else self.new_tokens)


def grid(workloads: list[str], *, batches: list[int], lengths: list[int], decode_len: int) -> list[Point]:
    points = []
    for workload in workloads:
        new = {"prefill": 0, "decode": 1, "generate": decode_len}[workload]
        points += [Point(workload, b, n, new) for b in batches for n in lengths]
    return points


def prompt_ids(layout: KVLayout, *, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Seeded token ids; the same prompt for every backend, so their work is identical."""
    rng = np.random.default_rng(seed + 1000 * batch + length)
    return rng.integers(0, layout.vocab_size, size=(batch, length), dtype=np.int64)


def prefill_feed(layout: KVLayout, ids: np.ndarray) -> dict[str, np.ndarray]:
    batch, length = ids.shape
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, length), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(),
        **empty_past(layout, batch),
    }


def decode_feed(layout: KVLayout, token: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One new token per sequence on top of `past` (the presents of the previous call)."""
    batch = token.shape[0]
    past_len = next(iter(past.values())).shape[2]
    return {
        "input_ids": token.reshape(batch, 1).astype(np.int64, copy=False),
        "attention_mask": np.ones((batch, past_len + 1), dtype=np.int64),
        "position_ids": np.full((batch, 1), past_len, dtype=np.int64),
        **past,
    }


def presents_as_past(layout: KVLayout, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {p: outputs[q] for p, q in zip(layout.past_names(), layout.present_names())}


def greedy_next(logits: np.ndarray) -> np.ndarray:
    return logits[:, -1, :].argmax(axis=-1)


@dataclass
class PreparedPoint:
    """A point made ready to time: `run()` is the one timed call, the rest is set-up.
    Generate points also keep each call's prefill (time to first token) and decode split."""

    point: Point
    run: Callable[[], object]
    splits: list[dict[str, float]] = field(default_factory=list)


def prepare(point: Point, layout: KVLayout, runner: Runner, *, seed: int = 0) -> PreparedPoint:
    """Build the feeds (and, for decode, the past) outside the timed region."""
    infer = runner.infer
    ids = prompt_ids(layout, batch=point.batch, length=point.length, seed=seed)
    if point.workload == "prefill":
        feed = prefill_feed(layout, ids)
        return PreparedPoint(point, lambda: infer(feed))
    if point.workload == "decode":
        out = infer(prefill_feed(layout, ids))
        feed = decode_feed(layout, greedy_next(out["logits"]), presents_as_past(layout, out))
        return PreparedPoint(point, lambda: infer(feed))
    if point.workload == "generate":
        return _prepare_generate(point, layout, runner, ids=ids)
    raise ValueError(f"unknown workload {point.workload!r}")


def _prepare_generate(point: Point, layout: KVLayout, runner: Runner, *, ids: np.ndarray) -> PreparedPoint:
    """verify/generate.py's loop, the one `exportline generate` runs; no EOS, so every
    backend produces exactly `new_tokens` tokens per sequence."""
    from exportline.verify.generate import generate

    prompts = ids.tolist()
    prepared = PreparedPoint(point, lambda: None)

    def run() -> None:
        g = generate(runner, prompts, layout=layout, max_new_tokens=point.new_tokens, eos_token_id=None)
        prepared.splits.append({"prefill_s": g.prefill_s, "decode_s": g.decode_s})

    prepared.run = run
    return prepared
