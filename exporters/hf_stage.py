"""hf stage: source → HF folder at the bundle root (config, safetensors, tokenizer)."""

from __future__ import annotations

from typing import Any

from .pipeline import Stage, StageContext

SHARD_BYTES = 5 * 10**9  # above this, model.safetensors is sharded with an index


def _random_init_state(config, seed: int):
    """Seeded init in HF's scheme (normal(0, initializer_range) matrices, ones for norms),
    generated tensor by tensor on a meta-device skeleton: one copy of the weights at most."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    state = {}
    for name, p in skeleton.state_dict(keep_vars=True).items():
        if name.endswith("norm.weight") or p.dim() == 1 and "norm" in name:
            state[name] = torch.ones(p.shape, dtype=torch.float32)
        elif p.dim() == 1:
            state[name] = torch.zeros(p.shape, dtype=torch.float32)
        else:
            state[name] = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_hf_weights(state: dict, dest, *, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json above `max_shard_bytes`."""
    import json

    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dest / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files + ["model.safetensors.index.json"]


def _run(ctx: StageContext) -> dict[str, Any]:
    from transformers import GenerationConfig

    from .tokenizer import EOS, BOS, PAD, train_bpe

    preset = ctx.source.preset
    config = preset.hf_config()
    ctx.progress(f"hf: random init of {preset.name} (seed {preset.seed})")
    tok_info = train_bpe(preset.tokenizer.vocab_size, ctx.tmp, model_max_length=config.max_position_embeddings)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctx.tmp)
    config.bos_token_id = tok.convert_tokens_to_ids(BOS)
    config.eos_token_id = tok.convert_tokens_to_ids(EOS)
    config.pad_token_id = tok.convert_tokens_to_ids(PAD)
    config.dtype = "float32"
    state = _random_init_state(config, preset.seed)
    files = write_hf_weights(state, ctx.tmp)
    del state
    config.save_pretrained(ctx.tmp)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False, max_length=config.max_position_embeddings,
    ).save_pretrained(ctx.tmp)
    return {"weights": files, "tokenizer": tok_info, "random_init": True}


STAGE = Stage(
    name="hf",
    run=_run,
    inputs=lambda ctx: [],
    versions=("torch", "transformers", "safetensors", "tokenizers"),
)
