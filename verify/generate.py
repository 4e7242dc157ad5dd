"""Generation over any Runner with the KV cache: one prefill, then one token per step.

The prefix is never recomputed: each step feeds the last token and the previous step's
present.* back as past_key_values.*. Prompts are left-padded into one batch; a finished
sequence (EOS) keeps receiving the pad token, whose outputs are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.shapes import KVLayout
from exportline.verify.cases import positions
from exportline.verify.runtime.base import Runner

# What generate reads besides the backend's own files (the runner checks those).
METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Sampling:
    """greedy=True takes the argmax; otherwise softmax(logits / temperature) over the top_k
    (0 = all) tokens, drawn with numpy's generator seeded by `seed`."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (got {self.temperature}); use --greedy for argmax decoding")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0 (got {self.top_k}); 0 keeps every token")


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including EOS
    finish: list[str]  # per prompt: "eos" or "length"
    batch: int
    prefill_s: float
    decode_s: float
    decode_steps: int  # forward passes after the prefill
    step_s: list[float] = field(default_factory=list)
    window_prefills: int = 0  # steps that re-prefilled a context cropped to the position table

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode steps (every row of the batch) per second."""
        return self.decode_steps * self.batch / self.decode_s if self.decode_s > 0 else float("nan")

    def timings(self) -> dict[str, float]:
        return {
            "prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_steps": self.decode_steps,
            "batch": self.batch, "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [batch, longest prompt], padding at the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return ids, mask


def empty_past(layout: KVLayout, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, layout.num_kv_heads, 0, layout.head_dim)
    return {name: np.zeros(shape, dtype=np.float32) for name in layout.past_names()}


def generate(
    runner: Runner,
    prompts: list[list[int]],
    *,
    layout: KVLayout,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    sampling: Sampling = Sampling(),
) -> Generation:
    """Generate up to `max_new_tokens` per prompt with an activated `runner`.

    Past the model's positions: a learned position table (GPT-2 / nanoGPT) has no entry
    for the next position, so the context is cropped to its last max_positions tokens
    as nanoGPT's sample.py does, and that window is prefilled afresh (its positions start
    at 0 again, so no cached key is valid); a rotary model is refused up front."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be ≥ 1 (got {max_new_tokens})")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rng = np.random.default_rng(sampling.seed)
    ids, mask = left_pad(prompts, pad_token_id)
    check_positions(layout, ids.shape[1], max_new_tokens)
    batch = ids.shape[0]
    feed = _window(layout, ids, mask)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    step_s: list[float] = []
    windows = 0
    for step in range(max_new_tokens):
        start = time.perf_counter()
        out = runner.infer(feed)
        step_s.append(time.perf_counter() - start)
        nxt = pick(out["logits"][:, -1, :], sampling, rng)
        for b in np.flatnonzero(~done):
            tokens[b].append(int(nxt[b]))
            done[b] = int(nxt[b]) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        nxt = np.where(done, pad_token_id, nxt).astype(np.int64)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        position = feed["position_ids"][:, -1:] + 1
        if layout.max_positions is not None and int(position.max()) >= layout.max_positions:
            feed, windows = _window(layout, ids, mask), windows + 1
            continue
        feed = {
            "input_ids": nxt[:, None],
            "attention_mask": np.concatenate([feed["attention_mask"], np.ones((batch, 1), dtype=np.int64)], axis=1),
            "position_ids": position,
            **{p: out[q] for p, q in zip(layout.past_names(), layout.present_names())},
        }
    return Generation(
        tokens=tokens,
        finish=["eos" if t and t[-1] in eos else "length" for t in tokens],
        batch=batch,
        prefill_s=step_s[0],
        decode_s=float(sum(step_s[1:])),
        decode_steps=len(step_s) - 1,
        step_s=step_s,
        window_prefills=windows,
    )


def check_positions(layout: KVLayout, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any work, a rotary model asked past its positions (the last new
    token is never fed, so prompt + new - 1 positions are used). Learned tables crop."""
    limit = layout.max_positions
    need = prompt_len + max_new_tokens - 1
    if limit is None or layout.learned_positions or need <= limit:
        return
    fix = (f"use --max-new-tokens {limit - prompt_len + 1} or fewer" if prompt_len <= limit
           else f"shorten the prompt to at most {limit} tokens")
    raise ConfigError(f"a prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs {need} positions but the "
                      f"model has max_position_embeddings {limit}; rotary positions past it were never trained "
                      f"(llama2.c's run.c stops there too): {fix}")


def _window(layout: KVLayout, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """A prefill feed of the last max_positions columns (all of them when they fit)."""
    if layout.max_positions is not None and ids.shape[1] > layout.max_positions:
        ids, mask = ids[:, -layout.max_positions:], mask[:, -layout.max_positions:]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
            **empty_past(layout, ids.shape[0])}


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [batch, vocab]."""
    logits = np.asarray(logits, dtype=np.float64)
    if sampling.greedy:
        return logits.argmax(-1)
    scaled = logits / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    draws = rng.random(probs.shape[0])[:, None]
    return np.minimum((probs.cumsum(-1) < draws).sum(-1), probs.shape[-1] - 1)


@dataclass
class BundleGeneration:
    lines: list[str]  # one per prompt: decoded prompt + completion, or token ids
    generation: Generation
    used_tokenizer: bool


def generate_from_bundle(
    root: Path,
    *,
    backend: str,
    prompts: list[str] | None = None,
    token_ids: list[list[int]] | None = None,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    progress: Callable[[str], None] = lambda message: None,
) -> BundleGeneration:
    """Text prompts go through the bundle's tokenizer (left padding); `token_ids` bypass it."""
    from exportline.exporters.sources.hf_writer import load_config
    from exportline.verify.runtime.backends import make_runner

    root = Path(root)
    if bool(prompts) == bool(token_ids):
        raise ConfigError("give prompts (--prompt TEXT) or token ids (--token-ids 1,2,3), not both or neither")
    if not (root / "config.json").is_file():
        raise ArtifactError(f"{root} has no config.json; export it first: exportline export SOURCE --out {root}")
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.sources.custom.model import is_custom

    if is_custom(root):  # its graphs have no KV cache and its folder no tokenizer
        raise NotAvailable(f"{root} holds a custom module: `exportline generate` is not available for it; use "
                           "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).generate(...)")
    Bundle(root).require_intact([n for n in METADATA if (root / n).exists()], fast=True)
    config = load_config(root)
    tokenizer = _tokenizer(root) if prompts else None
    if prompts and tokenizer is None:
        raise ConfigError(f"{root} has no tokenizer; pass token ids instead: --token-ids 1,2,3")
    ids = [_encode(tokenizer, p) for p in prompts] if tokenizer else token_ids
    if any(t < 0 or t >= config.vocab_size for row in ids for t in row):
        raise ConfigError(f"token ids must be in [0, {config.vocab_size}) for this model")
    pad = _first_id(getattr(tokenizer, "pad_token_id", None), config.pad_token_id, config.eos_token_id, 0)
    layout = KVLayout.from_config(config)
    width = max(len(row) for row in ids)
    check_positions(layout, width, max_new_tokens)  # before any model loads
    if layout.max_positions is not None and width + max_new_tokens - 1 > layout.max_positions:
        progress(f"generate: past {layout.max_positions} positions (learned position table) the context is cropped "
                 f"to its last {layout.max_positions} tokens and prefilled again each step, as nanoGPT's sample.py does")
    runner = make_runner(root, backend)
    progress(f"generate: {runner.name}, {len(ids)} prompt(s), up to {max_new_tokens} new tokens")
    with runner:
        result = generate(
            runner, ids, layout=layout, max_new_tokens=max_new_tokens,
            eos_token_id=_eos(root, config), pad_token_id=pad, sampling=sampling,
        )
    if tokenizer is None:
        lines = [",".join(map(str, p + t)) for p, t in zip(ids, result.tokens)]
    else:
        # One line per prompt on stdout: newlines inside the text are written as "\n".
        lines = [tokenizer.decode(p + t, skip_special_tokens=True).replace("\n", "\\n") for p, t in zip(ids, result.tokens)]
    return BundleGeneration(lines, result, tokenizer is not None)


def _encode(tokenizer, prompt: str) -> list[int]:
    """A prompt's ids; text that is not UTF-8, or that the vocabulary cannot spell (a
    character-level vocabulary has no unknown token), is a ConfigError naming the culprit."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that were not UTF-8 arrive as lone surrogates
        raise ConfigError(f"--prompt is not valid UTF-8 (byte 0x{ord(prompt[exc.start]) & 0xFF:02x} at character "
                          f"{exc.start}); pass UTF-8 text or --token-ids") from None
    try:
        return tokenizer.encode(prompt)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. "Missing [UNK] token"
        vocab = tokenizer.get_vocab()
        unknown = sorted({c for c in prompt if c not in vocab})
        what = f"characters {''.join(unknown)!r}" if len(unknown) > 1 else (repr(unknown[0]) if unknown else "text")
        raise ConfigError(f"--prompt has {what}, which this bundle's tokenizer cannot encode "
                          f"({str(exc).splitlines()[0][:80]}); use characters of its vocabulary or --token-ids") from None


def _tokenizer(root: Path):
    if not ((root / "tokenizer.json").is_file() or (root / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root, padding_side="left", local_files_only=True)


def _eos(root: Path, config) -> int | list[int] | None:
    from transformers import GenerationConfig

    if (root / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(root, local_files_only=True).eos_token_id
        if eos is not None:
            return eos
    return config.eos_token_id


def _first_id(*candidates) -> int:
    for c in candidates:
        if isinstance(c, list) and c:
            return int(c[0])
        if isinstance(c, int):
            return c
    return 0
