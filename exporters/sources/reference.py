"""What a float64 reference is (DESIGN.md §6), and the numerics the source kinds share.

A source kind with its own reference (nanoGPT, llama2.c) writes the forward from the
published architecture and runs it on the checkpoint's own tensors in their own layout —
no HF class is involved, so a wrong key, transpose, permute or activation in the
conversion shows up as a difference.
"""

from __future__ import annotations

import math

import numpy as np

MASKED = -1e30  # finite, so a row with no visible key (a left pad) stays finite instead of NaN


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only, as generation does with left padding;
    pads get 0 (their outputs are not compared)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)


class Reference:
    """`logits(input_ids, attention_mask=None) -> np.ndarray[float64] [batch, seq, vocab]`."""

    description = ""
    independent = True  # False: the reference IS the HF model (presets, HF folders)
    bounds_key = "float64"  # the thresholds.yaml section the HF float64 model is held to

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def teacher_forced(self, prompt: np.ndarray, tokens: list[int]) -> list[np.ndarray]:
        """The logits a greedy run from the [1, n] `prompt` sees at each step had it produced
        `tokens`: ONE forward over prompt + tokens[:-1], step i's logits at position n - 1 + i.
        Where `tokens` first differs from this model's argmax is exactly where this model's
        own greedy run would first diverge from them (the prefixes agree up to there), and
        those logits give the margin — what a greedy run would report, for one forward
        instead of one per token."""
        ids = np.concatenate([np.asarray(prompt, np.int64), np.asarray([tokens[:-1]], np.int64)], axis=1)
        logits = self.logits(ids)[0]
        start = np.asarray(prompt).shape[1] - 1
        return [logits[start + i] for i in range(len(tokens))]


def attention(q, k, v, *, attention_mask):
    """Causal softmax attention in float64; q [b,h,s,d], k/v [b,h,s,d], mask [b,s] (1 = real)."""
    import torch

    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & torch.as_tensor(attention_mask, dtype=torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~allowed, MASKED)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ v
