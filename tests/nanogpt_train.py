"""nanoGPT's training side, re-typed from karpathy/nanoGPT (train.py, model.py) for tests.

`make_run` lays out a folder the way nanoGPT leaves it after
`python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--block_size=64 ...`: data/<dataset>/meta.pkl (prepare.py) and out/ckpt.pt, saved with
train.py's dict (model, optimizer from configure_optimizers, model_args, iter_num,
best_val_loss as a tensor, config). `resume` is train.py's --init_from=resume path: the
keys it reads, the `_orig_mod.` strip, strict load_state_dict, configure_optimizers +
optimizer.load_state_dict, then optimizer steps with its lr schedule and grad clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from sources_fixtures import NanoGPT, write_meta

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n") * 4
RESUME_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # train.py forces these


def train_config(**over) -> dict:
    """train.py's `config` (every int/float/bool/str global) for the CPU shakespeare_char run."""
    config = dict(
        out_dir="out", eval_interval=250, log_interval=1, eval_iters=20, eval_only=False,
        always_save_checkpoint=False, init_from="scratch", wandb_log=False, wandb_project="shakespeare-char",
        wandb_run_name="mini-gpt", dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=12,
        block_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False, learning_rate=1e-3,
        max_iters=2000, weight_decay=1e-1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True,
        warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4, backend="nccl", device="cpu", dtype="float32",
        compile=False,
    )
    return {**config, **over}


def configure_optimizers(model: torch.nn.Module, weight_decay: float, learning_rate: float, betas) -> torch.optim.AdamW:
    """model.py GPT.configure_optimizers on CPU: ≥2-dim parameters decay, the rest do not."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)  # fused only on CUDA


def get_lr(it: int, c: dict) -> float:
    """train.py's cosine schedule with linear warm-up."""
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it > c["lr_decay_iters"]:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / (c["lr_decay_iters"] - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def batches(data: torch.Tensor, block_size: int, n: int, *, seed: int, batch_size: int = 4):
    """train.py get_batch: random windows x and the next-token targets y."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
        yield (torch.stack([data[i:i + block_size] for i in ix]),
               torch.stack([data[i + 1:i + 1 + block_size] for i in ix]))


def train_steps(model, optimizer, config: dict, iter_num: int, data: torch.Tensor, *, steps: int, seed: int) -> list[float]:
    """train.py's loop body: set lr, forward, backward, clip, step, zero_grad."""
    losses = []
    model.train()
    for x, y in batches(data, model.transformer.wpe.weight.shape[0], steps, seed=seed):
        lr = get_lr(iter_num, config) if config["decay_lr"] else config["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        iter_num += 1
    return losses


@dataclass
class Run:
    root: Path
    ckpt: Path
    meta: dict
    data: torch.Tensor
    config: dict
    model: NanoGPT


def make_run(root: Path, *, bias: bool, compiled: bool, block_size: int = 64, dataset: str = "shakespeare_char",
             iter_num: int = 250, seed: int = 0) -> Run:
    """root/data/<dataset>/meta.pkl and root/out/ckpt.pt after a few real training steps."""
    (root / "data" / dataset).mkdir(parents=True)
    (root / "out").mkdir()
    meta = write_meta(root / "data" / dataset / "meta.pkl", TEXT)
    data = torch.tensor([meta["stoi"][c] for c in TEXT], dtype=torch.long)
    config = train_config(bias=bias, block_size=block_size, compile=compiled, dataset=dataset)
    args = dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"], block_size=block_size,
                bias=bias, vocab_size=meta["vocab_size"], dropout=config["dropout"])
    torch.manual_seed(seed)
    model = NanoGPT(args)
    optimizer = configure_optimizers(model, config["weight_decay"], config["learning_rate"],
                                     (config["beta1"], config["beta2"]))
    train_steps(model, optimizer, config, iter_num - 3, data, steps=3, seed=seed)
    state = model.state_dict()
    if compiled:  # what a torch.compile'd model's state_dict looks like
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": args, "iter_num": iter_num,
                "best_val_loss": torch.tensor(1.4693), "config": config}, root / "out" / "ckpt.pt")
    return Run(root, root / "out" / "ckpt.pt", meta, data, config, model)


@dataclass
class Resumed:
    model: NanoGPT
    optimizer: torch.optim.AdamW
    iter_num: int
    best_val_loss: object
    losses: list[float]


def resume(ckpt_path: Path, command_line: dict, data: torch.Tensor, *, steps: int = 3, seed: int = 1) -> Resumed:
    """train.py --init_from=resume, then `steps` optimizer steps."""
    checkpoint = torch.load(ckpt_path, map_location="cpu")  # torch ≥ 2.6: weights_only=True by default
    model_args = dict(n_layer=command_line["n_layer"], n_head=command_line["n_head"], n_embd=command_line["n_embd"],
                      block_size=command_line["block_size"], bias=command_line["bias"], vocab_size=None,
                      dropout=command_line["dropout"])
    for k in RESUME_KEYS:
        model_args[k] = checkpoint["model_args"][k]
    model = NanoGPT(model_args)
    state_dict = checkpoint["model"]
    unwanted_prefix = "_orig_mod."
    for k in list(state_dict):
        if k.startswith(unwanted_prefix):
            state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    optimizer = configure_optimizers(model, command_line["weight_decay"], command_line["learning_rate"],
                                     (command_line["beta1"], command_line["beta2"]))
    optimizer.load_state_dict(checkpoint["optimizer"])
    checkpoint = None
    losses = train_steps(model, optimizer, command_line, iter_num, data, steps=steps, seed=seed)
    return Resumed(model, optimizer, iter_num, best_val_loss, losses)
