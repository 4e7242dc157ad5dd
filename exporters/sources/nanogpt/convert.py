"""nanoGPT checkpoints (karpathy/nanoGPT train.py's `ckpt.pt`) ↔ HF GPT2LMHeadModel.

nanoGPT named its parameters after GPT-2, so the key map is the identity except for
three things: the four Conv1D weights are stored transposed by HF, HF GPT-2 always has
biases (nanoGPT's `bias=False` becomes zeros), and lm_head is tied to wte. Everything
needed to undo the conversion bit for bit is recorded in config.json under `nanogpt`.
The checkpoint is memory-mapped and converted one tensor at a time (`hf_plan` checks it
from metadata, `hf_tensors` makes each HF tensor and drops the pages it read).
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from exportline.exporters.core.errors import SourceError
from exportline.exporters.sources.base import CheckpointSource, Progress
from exportline.exporters.sources.mapped_file import mapped_ranges, release_pages

PREFIX = "_orig_mod."  # torch.compile's wrapper module adds it to every state_dict key
REQUIRED_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
# nanoGPT's nn.Linear stores [out, in]; HF GPT-2's Conv1D stores [in, out].
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYERNORM_EPS = 1e-5  # nanoGPT's LayerNorm: F.layer_norm(..., 1e-5)
CAUSAL_BUFFER = ".attn.bias"  # the tril mask older nanoGPT saved when flash attention was absent
RESAVE_HINT = ("re-save it with plain types only: torch.save({'model': model.state_dict(), "
               "'model_args': dict(model_args), 'iter_num': int(iter_num)}, path)")
_SECRET_KEY = re.compile(r"(secret|passw|api_?key|auth|(^|_)token$)", re.IGNORECASE)


@dataclass
class NanoGPTCheckpoint:
    state: dict  # key (prefix stripped) → tensor, in the file's order
    model_args: dict[str, Any]
    iter_num: int | None
    config: dict[str, Any] | None
    prefix: str  # "_orig_mod." when saved from a torch.compile'd model, else ""
    mapped: tuple[tuple[int, int], ...] = ()  # where the file is memory-mapped (mapped_file.release_pages)
    best_val_loss: float | None = None
    keys: tuple[str, ...] = ()  # the file's top-level keys, in order
    extra: dict[str, Any] | None = None  # every top-level entry but 'model' (kept only when asked)


def load_checkpoint(path: Path, *, keep_training: bool = False) -> NanoGPTCheckpoint:
    """torch.load with weights_only=True: tensors and plain containers only, no code runs.
    `keep_training` keeps the optimizer and every other non-weight entry in `extra`.

    torch.save's zip files (every nanoGPT checkpoint) are memory-mapped: nothing is read
    until a tensor is used, so the optimizer state (twice the weights) is never read and
    the conversion touches one tensor at a time. The older pickle format is read whole."""
    import zipfile

    import torch

    mapped = zipfile.is_zipfile(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            what = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), "a pickled Python object")
            raise SourceError(f"{path}: refused to load, unpickling it would run code ({what.rstrip('.')}); "
                              f"{RESAVE_HINT}") from None
        raise _unreadable(path, exc) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise SourceError(f"{path}: not a nanoGPT checkpoint (no 'model' state dict); {RESAVE_HINT}")
    args = ckpt.get("model_args")
    missing = [k for k in REQUIRED_ARGS if not isinstance(args, dict) or k not in args]
    if missing:
        raise SourceError(f"{path}: nanoGPT checkpoint without model_args {missing}; {RESAVE_HINT}")
    state, prefixes = {}, set()
    for key, value in ckpt["model"].items():
        prefixes.add(key.startswith(PREFIX))
        state[key[len(PREFIX):] if key.startswith(PREFIX) else key] = value
    if len(prefixes) > 1:
        raise SourceError(f"{path}: some state_dict keys have the {PREFIX!r} prefix and some do not; re-save the model")
    iter_num, best = ckpt.get("iter_num"), ckpt.get("best_val_loss")
    return NanoGPTCheckpoint(
        state=state, model_args=dict(args), iter_num=int(iter_num) if iter_num is not None else None,
        config=ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None,
        prefix=PREFIX if prefixes == {True} else "",
        best_val_loss=_scalar(best), keys=tuple(ckpt), mapped=mapped_ranges(path) if mapped else (),
        extra={k: v for k, v in ckpt.items() if k != "model"} if keep_training else None,
    )


def _scalar(value: Any) -> float | None:
    """train.py saves best_val_loss as a 0-dim tensor (a mean of losses); a float also reads."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _unreadable(path: Path, exc: BaseException) -> SourceError:
    detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return SourceError(f"{path}: cannot read it as a torch checkpoint, it is truncated or corrupt ({detail}); "
                       "copy or re-save the file and run again")


def nanogpt_shapes(args: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of nanoGPT's GPT, in nanoGPT's layout ([out, in] for Linear)."""
    e, v, n = int(args["n_embd"]), int(args["vocab_size"]), int(args["n_layer"])
    shapes = {"transformer.wte.weight": (v, e), "transformer.wpe.weight": (int(args["block_size"]), e)}
    layer = {
        "ln_1.weight": (e,), "ln_1.bias": (e,),
        "attn.c_attn.weight": (3 * e, e), "attn.c_attn.bias": (3 * e,),
        "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
        "ln_2.weight": (e,), "ln_2.bias": (e,),
        "mlp.c_fc.weight": (4 * e, e), "mlp.c_fc.bias": (4 * e,),
        "mlp.c_proj.weight": (e, 4 * e), "mlp.c_proj.bias": (e,),
    }
    for i in range(n):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,), "lm_head.weight": (v, e)})
    return shapes


def _is_transposed(key: str) -> bool:
    return key.endswith(TRANSPOSED)


def _check_args(args: dict[str, Any], path: Path) -> None:
    ints = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    if any(not isinstance(args[k], int) or args[k] <= 0 for k in ints) or args["n_embd"] % args["n_head"]:
        raise SourceError(f"{path}: model_args {({k: args[k] for k in ints})} are not positive ints with "
                          "n_embd divisible by n_head; fix model_args and re-save")
    try:
        json.dumps(args)
    except TypeError:
        raise SourceError(f"{path}: model_args hold values other than plain numbers/strings; {RESAVE_HINT}") from None


def hf_plan(ckpt: NanoGPTCheckpoint, path: Path) -> tuple[list[tuple[str, tuple[int, ...], Any]], dict[str, Any]]:
    """The HF GPT2LMHeadModel tensors (name, shape, float32) in state-dict order, and the
    record that undoes the conversion (config.json `nanogpt`). Every tensor's presence, type
    and shape is checked from its metadata; only the tie and causal-mask checks read data."""
    import torch

    args = ckpt.model_args
    _check_args(args, path)
    expected = nanogpt_shapes(args)
    buffers = [k for k in ckpt.state if k.endswith(CAUSAL_BUFFER)]
    unexpected = [k for k in ckpt.state if k not in expected and k not in buffers]
    if unexpected:
        raise SourceError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for a nanoGPT GPT; "
                          "is this a nanoGPT checkpoint?")
    plan, dtypes = [], {}
    for key, shape in expected.items():
        t = ckpt.state.get(key)
        if t is None:
            if key.endswith("bias") and not args["bias"]:
                plan.append((key, shape, torch.float32))  # HF GPT-2 always has biases: zeros
                continue
            if key == "lm_head.weight":
                continue  # tied to wte, as nanoGPT always does
            raise SourceError(f"{path}: tensor {key!r} is missing for model_args {args}; re-save the full state_dict")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SourceError(f"{path}: {key!r} is not a floating-point tensor; re-save the model")
        if tuple(t.shape) != shape:
            raise SourceError(f"{path}: {key!r} has shape {tuple(t.shape)}, model_args say {shape}; "
                              "the checkpoint and its model_args disagree")
        if t.dtype != torch.float32:
            dtypes[key] = str(t.dtype).removeprefix("torch.")
        plan.append((key, shape[::-1] if _is_transposed(key) else shape, torch.float32))
    lm_head = ckpt.state.get("lm_head.weight")
    tied = lm_head is None or _same(ckpt, lm_head, ckpt.state["transformer.wte.weight"])
    if tied:
        plan = [e for e in plan if e[0] != "lm_head.weight"]
    record = {
        "model_args": args, "iter_num": ckpt.iter_num, "best_val_loss": ckpt.best_val_loss, "key_prefix": ckpt.prefix,
        "keys": list(ckpt.state), "dtypes": dtypes, "lm_head": "tied" if tied else "separate",
        "causal_buffers": _causal_buffers(ckpt, buffers), **_plain_config(ckpt.config),
    }
    return plan, record


def hf_tensors(ckpt: NanoGPTCheckpoint, names: list[str]) -> Iterator[tuple[str, Any]]:
    """The HF tensors `names` (from hf_plan), one at a time, fp32, Conv1D weights transposed.
    Once the writer has taken a tensor, its pages of the mapped file are dropped again."""
    import torch

    shapes = nanogpt_shapes(ckpt.model_args)
    for name in names:
        src = ckpt.state.get(name)
        if src is None:  # a bias of a bias=False model
            yield name, torch.zeros(shapes[name], dtype=torch.float32)
            continue
        t = src.to(torch.float32)
        yield name, t.t().contiguous() if _is_transposed(name) else t.contiguous()
        del t
        release_pages(ckpt.mapped, src)  # the writer is done with it


def _same(ckpt: NanoGPTCheckpoint, a, b) -> bool:
    import torch

    same = torch.equal(a, b)
    release_pages(ckpt.mapped, a, b)
    return same


def _causal_buffers(ckpt: NanoGPTCheckpoint, keys: list[str]) -> str:
    """"tril" when every saved attn.bias is the causal mask nanoGPT builds (so it can be
    rebuilt), "absent" when none was saved; anything else cannot be carried."""
    import torch

    if not keys:
        return "absent"
    n = int(ckpt.model_args["block_size"])
    tril = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    for k in keys:
        t = ckpt.state[k]
        same = t.dtype == tril.dtype and torch.equal(t, tril)
        release_pages(ckpt.mapped, t)
        if not same:
            raise SourceError(f"checkpoint buffer {k!r} is not nanoGPT's causal mask; drop the '.attn.bias' keys and re-save")
    return "tril"


def _plain_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """nanoGPT's training config (ints/floats/bools/strs), minus anything that looks like a secret."""
    if config is None:
        return {"config": None}
    kept = {k: v for k, v in config.items() if not _SECRET_KEY.search(str(k))}
    try:
        json.dumps(kept)
    except TypeError:
        return {"config": None, "config_dropped": "not plain JSON values"}
    dropped = sorted(set(config) - set(kept))
    return {"config": kept, **({"config_dropped": dropped} if dropped else {})}


def hf_config(args: dict[str, Any], record: dict[str, Any]):
    from transformers import GPT2Config

    dropout = float(args.get("dropout", 0.0) or 0.0)
    return GPT2Config(
        vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], n_inner=None,
        activation_function="gelu",  # nanoGPT's nn.GELU() is the exact erf form, not HF's tanh default
        layer_norm_epsilon=LAYERNORM_EPS, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        tie_word_embeddings=record["lm_head"] == "tied",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # unknown without GPT-2's tokenizer
        architectures=["GPT2LMHeadModel"], nanogpt=record,
    )


# -- tokenizer: nanoGPT's meta.pkl ------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Dicts, lists, strings and numbers load; any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def read_meta(path: Path) -> dict[str, int]:
    """stoi from nanoGPT's char-level meta.pkl ({'vocab_size', 'itos', 'stoi'})."""
    try:
        with open(path, "rb") as f:
            meta = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise SourceError(f"{path}: not a plain nanoGPT meta.pkl ({exc}); delete it or pass --tokenizer tokenizer.json") from None
    stoi = meta.get("stoi") if isinstance(meta, dict) else None
    if not isinstance(stoi, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in stoi.items()):
        raise SourceError(f"{path}: meta.pkl has no char→id 'stoi' dict; delete it or pass --tokenizer tokenizer.json")
    return stoi


@dataclass
class NanoGPTSource(CheckpointSource):
    kind = "nanogpt"
    architecture = "gpt2"
    carries_training_state = True  # export --with-training-state
    meta_file: Path | None = None  # --meta

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.meta_file is not None:
            self.meta_file = Path(self.meta_file).resolve()
            if not self.meta_file.is_file():
                raise SourceError(f"--meta {self.meta_file}: no such file; pass nanoGPT's data/<dataset>/meta.pkl")

    @cached_property
    def facts(self):
        from exportline.exporters.sources.nanogpt.meta import peek

        return peek(self.path)

    @cached_property
    def _meta_search(self) -> tuple[Path | None, list[Path]]:
        if self.meta_file is not None:
            return self.meta_file, [self.meta_file]
        from exportline.exporters.sources.nanogpt.meta import find_meta

        return find_meta(self.path, self.facts.dataset)

    @property
    def meta_path(self) -> Path | None:
        """The meta.pkl this export uses (None: none found, or another tokenizer was chosen)."""
        if self.tokenizer_file or self.tokenizer_builtin:
            return None
        return self._meta_search[0]

    def own_tokenizer_plan(self) -> dict[str, Any]:
        if self.meta_path is not None:
            return {"kind": "char", "from": "meta.pkl", "path": str(self.meta_path)}
        return {"kind": "none", "reason": "no meta.pkl found (looked beside the .pt and in data/<config dataset>/) "
                                          "and no --tokenizer given; pass --meta meta.pkl, --tokenizer gpt2 "
                                          "or --tokenizer tokenizer.json"}

    def warnings(self) -> list[str]:
        if self.tokenizer_plan()["kind"] != "none":
            return []
        from exportline.exporters.sources.nanogpt.meta import missing_tokenizer_warning

        return [missing_tokenizer_warning(self.facts, self._meta_search[1])]

    def fingerprint(self) -> str:
        import hashlib

        from exportline.exporters.core.bundle import sha256_file

        meta = sha256_file(self.meta_path) if self.meta_path is not None else None
        return hashlib.sha256(f"{super().fingerprint()}:{meta}".encode()).hexdigest()

    def write_tokenizer(self, dest: Path, model_max_length: int) -> dict[str, Any]:
        if self.meta_path is not None:
            from exportline.exporters.sources.tokenizer import write_char_tokenizer

            stoi = read_meta(self.meta_path)
            return {**write_char_tokenizer(stoi, dest, model_max_length), "from": "meta.pkl"}
        return super().write_tokenizer(dest, model_max_length)

    def write_hf(self, dest: Path, progress: Progress, *, training_state: bool = False) -> dict[str, Any]:
        from exportline.exporters.sources.hf_writer import write_config_files, write_hf_converted

        progress(f"hf: reading nanoGPT checkpoint {self.path.name}")
        ckpt = load_checkpoint(self.path, keep_training=training_state)
        plan, record = hf_plan(ckpt, self.path)
        training = None
        if training_state:
            from exportline.exporters.sources.nanogpt.training import write_training_state

            progress("hf: storing the training state (optimizer, iter_num, best_val_loss, config) in training/")
            training = write_training_state(ckpt.extra, list(ckpt.keys), dest, config=record["config"],
                                            mapped=ckpt.mapped)
            ckpt.extra = None
        config = hf_config(record["model_args"], record)
        tok_info = self.write_checked_tokenizer(dest, model_max_length=config.n_positions, vocab_size=config.vocab_size)
        files = write_hf_converted(plan, lambda names: hf_tensors(ckpt, names), dest)
        write_config_files(config, dest)
        return {"weights": files, "tokenizer": tok_info, "random_init": False,
                "iter_num": record["iter_num"], "zero_biases": not record["model_args"]["bias"],
                "lm_head": record["lm_head"], **({"training_state": training} if training else {})}


# -- back to a nanoGPT checkpoint (exportline to-checkpoint --format nanogpt) ------------------
def hf_to_checkpoint(folder: Path) -> tuple[dict[str, Any], str]:
    """The nanoGPT checkpoint dict an HF folder (exported from nanoGPT) came from, every
    tensor bit-identical to the original .pt's, keys and their order restored, ready for
    train.py --init_from=resume; and a note on the training state it carries."""
    import torch

    from exportline.exporters.sources.hf_writer import read_hf_config, read_hf_weights

    record = read_hf_config(folder).get("nanogpt")
    if not isinstance(record, dict):
        raise SourceError(f"{folder}: config.json has no 'nanogpt' record, so this folder was not exported from a "
                          "nanoGPT checkpoint; to-checkpoint --format nanogpt needs one")
    hf = read_hf_weights(folder)
    n = int(record["model_args"]["block_size"])
    model = {}
    for key in record["keys"]:
        if key.endswith(CAUSAL_BUFFER):
            model[key] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            continue
        if key == "lm_head.weight" and record["lm_head"] == "tied":
            continue  # set below to the very wte tensor, so torch.save shares the storage again
        if key not in hf:
            raise SourceError(f"{folder}: weights lack {key!r}; the folder does not match its config.json")
        t = hf[key].t().contiguous() if _is_transposed(key) else hf[key]
        dtype = record["dtypes"].get(key)
        model[key] = t.to(getattr(torch, dtype)) if dtype else t
    if record["lm_head"] == "tied" and "lm_head.weight" in record["keys"]:
        model["lm_head.weight"] = model["transformer.wte.weight"]
    prefix = record.get("key_prefix", "")
    weights = {prefix + k: model[k] for k in record["keys"]}
    return _with_training_state(folder, weights, record)


def _with_training_state(folder: Path, weights: dict, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The stored training state when the bundle has training/, else a fresh optimizer
    (nanogpt_training.FRESH_RESET) around the recorded iter_num, best_val_loss and config."""
    from exportline.exporters.sources.nanogpt.training import (
        FRESH_RESET,
        INITIAL_BEST_VAL_LOSS,
        fresh_optimizer,
        read_training_state,
    )

    stored = read_training_state(folder)
    if stored is not None:
        keys, entries = stored
        ckpt = {k: weights if k == "model" else entries[k] for k in keys if k == "model" or k in entries}
        return ckpt, "training state restored from training/ (optimizer, iter_num, best_val_loss, config)"
    best = record.get("best_val_loss")
    ckpt = {
        "model": weights,
        "optimizer": fresh_optimizer(weights, tied=record["lm_head"] == "tied", config=record.get("config")),
        "model_args": record["model_args"],
        "iter_num": int(record.get("iter_num") or 0),
        "best_val_loss": float(best) if best is not None else INITIAL_BEST_VAL_LOSS,
        "config": record.get("config") or {},
    }
    reset = list(FRESH_RESET) + ([] if best is not None else [f"best_val_loss (unknown: {INITIAL_BEST_VAL_LOSS:g}, as train.py starts)"])
    return ckpt, "no training/ in the bundle, so reset: " + "; ".join(reset)
