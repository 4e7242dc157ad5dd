"""A preset (configs/<name>.yaml) without `checkpoint:`: a seeded random init, labelled so.

The HF folder is written tensor by tensor from a meta-device skeleton; the float64
reference is the HF model itself (there is no second implementation of a random init).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from exportline.exporters.core.presets import Preset
from exportline.exporters.sources.base import Progress


@dataclass
class PresetSource:
    preset: Preset
    kind: str = "preset"

    @property
    def name(self) -> str:
        return self.preset.name

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "preset": self.preset.name, "architecture": self.preset.architecture,
            "checkpoint": self.preset.checkpoint, "random_init": self.preset.random_init,
            "labels": ["random-init"] if self.preset.random_init else [],
            "seed": self.preset.seed, "model": self.preset.model, "tokenizer": {"kind": self.preset.tokenizer.kind},
            "thresholds": self.preset.thresholds,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"model": self.preset.model, "seed": self.preset.seed, "tokenizer": vars(self.preset.tokenizer),
             "architecture": self.preset.architecture}, sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from exportline.exporters.sources.hf_writer import write_config_files, write_hf_weights
        from exportline.exporters.sources.tokenizer import BOS, EOS, PAD, train_bpe

        preset = self.preset
        config = preset.hf_config()
        progress(f"hf: random init of {preset.name} (seed {preset.seed})")
        if preset.tokenizer.kind == "none":
            tok_info = {"kind": "none", "reason": f"preset {preset.name} sets tokenizer.kind: none"}
        else:
            tok_info = train_bpe(preset.tokenizer.vocab_size, dest, model_max_length=config.max_position_embeddings)
            tok = AutoTokenizer.from_pretrained(dest)
            config.bos_token_id = tok.convert_tokens_to_ids(BOS)
            config.eos_token_id = tok.convert_tokens_to_ids(EOS)
            config.pad_token_id = tok.convert_tokens_to_ids(PAD)
        state = dict(random_init_tensors(config, preset.seed))
        files = write_hf_weights(state, dest)
        del state
        write_config_files(config, dest)
        return {"weights": files, "tokenizer": tok_info, "random_init": True}


def random_init_tensors(config, seed: int) -> Iterator[tuple[str, Any]]:
    """Seeded init in HF's scheme (normal(0, initializer_range) matrices, ones for norms),
    tensor by tensor from a meta-device skeleton, so a checker can regenerate and compare
    one tensor at a time. Tied lm_head is left out (HF ties it on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in skeleton.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            yield name, torch.ones(p.shape, dtype=torch.float32)
        elif p.dim() == 1:
            yield name, torch.zeros(p.shape, dtype=torch.float32)
        else:
            yield name, torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


# File suffix → source kind; a folder is an HF folder.
