"""Where a nanoGPT checkpoint's meta.pkl (char vocabulary) is, in nanoGPT's own layout.

nanoGPT's train.py writes `out/ckpt.pt`; the dataset's prepare.py wrote
`data/<dataset>/meta.pkl`, and the checkpoint's config['dataset'] names it (sample.py
opens `data/<config['dataset']>/meta.pkl` relative to the working folder). Looked at, in
order: --meta, beside the .pt, data/<dataset>/ under the working folder, then under each
folder above the checkpoint (so `out/ckpt.pt` finds `../data/<dataset>/meta.pkl` from
anywhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's BPE, and nanoGPT's padding of it to a multiple of 64
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one folder name, never a path


@dataclass(frozen=True)
class CheckpointFacts:
    """What the meta.pkl search needs from the .pt, read without loading the weights."""

    dataset: str | None
    vocab_size: int | None


def peek(path: Path) -> CheckpointFacts:
    """config['dataset'] and model_args['vocab_size'], memory-mapped (the tensors are not read)."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError):
        return CheckpointFacts(None, None)  # unreadable: the hf stage reports why
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    args = ckpt.get("model_args") if isinstance(ckpt, dict) else None
    dataset = config.get("dataset") if isinstance(config, dict) else None
    vocab = args.get("vocab_size") if isinstance(args, dict) else None
    return CheckpointFacts(dataset if isinstance(dataset, str) and _DATASET.match(dataset) else None,
                           vocab if isinstance(vocab, int) else None)


def candidates(checkpoint: Path, dataset: str | None, cwd: Path | None = None) -> list[Path]:
    """Every place meta.pkl may be, in the order they are tried."""
    checkpoint = Path(checkpoint).resolve()
    places = [checkpoint.with_name("meta.pkl")]
    if dataset:
        rel = Path("data") / dataset / "meta.pkl"
        places.append((cwd or Path.cwd()).resolve() / rel)
        places += [parent / rel for parent in checkpoint.parents]
    unique: list[Path] = []
    for p in places:
        if p not in unique:
            unique.append(p)
    return unique


def find_meta(checkpoint: Path, dataset: str | None) -> tuple[Path | None, list[Path]]:
    """The first meta.pkl that exists, and the places looked at."""
    places = candidates(checkpoint, dataset)
    return next((p for p in places if p.is_file()), None), places


def missing_tokenizer_warning(facts: CheckpointFacts, places: list[Path]) -> str:
    """The console warning for a checkpoint exported without any tokenizer."""
    shown = ", ".join(str(p) for p in places[:4]) + (f" and {len(places) - 4} folders above" if len(places) > 4 else "")
    if facts.vocab_size in GPT2_VOCAB_SIZES:
        return (f"no tokenizer shipped: vocab_size {facts.vocab_size} is nanoGPT's GPT-2 BPE; "
                "pass --tokenizer gpt2 to ship GPT-2's tokenizer")
    dataset = f"data/{facts.dataset}/meta.pkl" if facts.dataset else "meta.pkl"
    return (f"no tokenizer shipped: this looks like a character-level model (vocab_size {facts.vocab_size}) but no "
            f"meta.pkl was found (looked at {shown}); text prompts will not work: pass --meta path/to/{dataset}")
