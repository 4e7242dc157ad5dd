"""nanoGPT training state (optimizer, iter_num, best_val_loss, config) in a bundle's
`training/` folder, and the checkpoint nanoGPT's `train.py --init_from=resume` reads back.

train.py's resume path reads `model_args` (n_layer, n_head, n_embd, block_size, bias,
vocab_size), `model` (stripping `_orig_mod.`), `iter_num`, `best_val_loss`, and
`optimizer`, which it loads into the AdamW of `configure_optimizers`: one group of the
parameters with ≥ 2 dims (weight decay), one of the rest (none), in named_parameters order.

`export --with-training-state` stores everything of the .pt except the weights as
safetensors (every tensor) + JSON (the structure around them, so dict keys keep their
int/str type and tuples stay tuples), and to-checkpoint restores it exactly. Without it,
to-checkpoint writes a fresh AdamW in those two groups (see FRESH_RESET).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from exportline.exporters.core.errors import ArtifactError, SourceError
from exportline.exporters.sources.mapped_file import Ranges, release_pages

TRAINING_DIR = "training"  # inside the bundle; no inference handoff (Triton, torch.hub) reads it
TENSORS = "state.safetensors"
TREE = "state.json"
FORMAT = "exportline-nanogpt-training/1"
# nanoGPT train.py's defaults, used when the checkpoint's config does not say.
TRAIN_DEFAULTS = {"learning_rate": 6e-4, "weight_decay": 1e-1, "beta1": 0.9, "beta2": 0.95}
INITIAL_BEST_VAL_LOSS = 1e9  # what train.py starts from when it trains from scratch
FRESH_RESET = ("optimizer (AdamW moments and step count start at zero; lr, betas and weight decay "
               "come from the checkpoint's config)",)


# -- the JSON + safetensors encoding ------------------------------------------------------------
def encode(value: Any, tensors: dict, path: str) -> Any:
    """JSON for `value`; every tensor goes to `tensors` under its path and is referenced."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"tensor": path}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise SourceError(f"training state {path}: dict keys other than str/int cannot be stored; "
                              "export without --with-training-state")
        return {"dict": [[k, encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise SourceError(f"training state {path}: a {type(value).__name__} cannot be stored as safetensors + JSON; "
                      "export without --with-training-state")


def decode(node: Any, tensors: dict) -> Any:
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: decode(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [decode(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    return body


# -- writing and reading training/ -----------------------------------------------------------------
def write_training_state(extra: dict[str, Any], keys: list[str], dest: Path, *, config: dict | None,
                         mapped: Ranges = ()) -> dict[str, Any]:
    """training/state.safetensors + state.json for the checkpoint's non-weight entries
    (`extra`, in the file's key order `keys`); `config` is the secret-free copy of its config.

    The tensors are written one at a time, in save_file's layout (the file is byte for byte
    what save_file writes from all of them): with a memory-mapped checkpoint, `mapped` its
    ranges, each tensor's pages are dropped once written, so AdamW's two moments (twice the
    weights) are never resident together."""
    from exportline.exporters.sources.hf_writer import safetensors_dtype, write_safetensors_streamed

    extra = {**extra, **({"config": config} if "config" in extra else {})}
    tensors: dict = {}
    tree = {k: encode(v, tensors, k) for k, v in extra.items()}
    for name, t in tensors.items():
        if safetensors_dtype(t.dtype) is None:
            raise SourceError(f"training state {name}: dtype {str(t.dtype).removeprefix('torch.')} cannot be stored "
                              "in safetensors; export without --with-training-state")
    folder = dest / TRAINING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    write_safetensors_streamed(plan, lambda names: _one_at_a_time(tensors, names, mapped), folder / TENSORS)
    (folder / TREE).write_text(json.dumps({"format": FORMAT, "keys": keys, "tree": tree}, indent=1) + "\n")
    return {"stored": [k for k in keys if k in extra], "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def _one_at_a_time(tensors: dict, names: list[str], mapped: Ranges) -> Iterator[tuple[str, Any]]:
    for name in names:
        t = tensors[name]
        yield name, t.detach()
        release_pages(mapped, t)  # the writer is done with it


def read_training_state(folder: Path) -> tuple[list[str], dict[str, Any]] | None:
    """(key order, entries) stored by write_training_state, or None when the bundle has none."""
    from safetensors.torch import load_file

    tree_path = Path(folder) / TRAINING_DIR / TREE
    if not tree_path.is_file():
        return None
    try:
        data = json.loads(tree_path.read_text())
        tensors = load_file(str(tree_path.with_name(TENSORS)))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        entries = {k: decode(v, tensors) for k, v in data["tree"].items()}
    except Exception as exc:  # JSON, safetensors' own error, a missing tensor
        raise ArtifactError(f"{tree_path.parent} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            "re-export with --with-training-state --force") from None
    return list(data["keys"]), entries


# -- a fresh optimizer when the bundle carries none ---------------------------------------------
def fresh_optimizer(model: dict, *, tied: bool, config: dict | None) -> dict[str, Any]:
    """The state_dict of the AdamW nanoGPT's configure_optimizers builds for these weights,
    before any step: the parameter count of each group is what load_state_dict checks."""
    import torch

    from exportline.exporters.sources.nanogpt.convert import CAUSAL_BUFFER, PREFIX

    cfg = {**TRAIN_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in TRAIN_DEFAULTS}}
    decay, nodecay = [], []
    for key, tensor in model.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(CAUSAL_BUFFER) or (tied and name == "lm_head.weight"):
            continue  # a buffer, or the same Parameter as wte (named_parameters yields it once)
        (decay if tensor.dim() >= 2 else nodecay).append(torch.nn.Parameter(torch.empty(0)))
    groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])},
              {"params": nodecay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=float(cfg["learning_rate"]),
                                  betas=(float(cfg["beta1"]), float(cfg["beta2"])))
    return optimizer.state_dict()
