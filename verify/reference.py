"""Float64 references for the hf stage (DESIGN.md §6).

nanoGPT and llama2.c forwards are written here from the published architectures
(karpathy/nanoGPT model.py; karpathy/llama2.c model.py and run.c) and run on the
checkpoint's own tensors in their own layout — no HF class is involved, so a wrong key,
transpose, permute or activation in the conversion shows up as a difference. Presets and
HF folders have no second implementation: their reference is the HF model in float64.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..exporters.bundle import sha256_file
from ..exporters.errors import NotAvailable

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

    def greedy(self, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens for a [1, n] prompt by full forwards; also each step's logits."""
        ids, tokens, step_logits = np.asarray(prompt), [], []
        for _ in range(steps):
            last = self.logits(ids)[0, -1]
            tokens.append(int(last.argmax()))
            step_logits.append(last)
            ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
        return tokens, step_logits


def _attention(q, k, v, attention_mask):
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


class NanoGPTReference(Reference):
    description = ("nanoGPT forward written in exportline (verify/reference.py) from nanoGPT's model.py, "
                   "float64 on CPU, on the .pt's own tensors")

    def __init__(self, state: dict, args: dict[str, Any]):
        import torch

        self.w = {k: v.to(torch.float64) for k, v in state.items()}
        self.args = args

    @classmethod
    def from_checkpoint(cls, path: Path) -> "NanoGPTReference":
        from ..exporters.nanogpt import load_checkpoint

        ckpt = load_checkpoint(path)
        return cls(ckpt.state, ckpt.model_args)

    def _linear(self, x, name):
        y = x @ self.w[f"{name}.weight"].T  # nn.Linear: [out, in]
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _layernorm(self, x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as F.layer_norm
        y = (x - mean) / (var + 1e-5).sqrt() * self.w[f"{name}.weight"]
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def logits(self, input_ids, attention_mask=None):
        import torch

        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask)
        pos = torch.as_tensor(position_ids_from_mask(mask))
        b, s = ids.shape
        e, h = self.args["n_embd"], self.args["n_head"]
        x = self.w["transformer.wte.weight"][ids] + self.w["transformer.wpe.weight"][pos]
        for i in range(self.args["n_layer"]):
            p = f"transformer.h.{i}."
            q, k, v = self._linear(self._layernorm(x, p + "ln_1"), p + "attn.c_attn").split(e, dim=2)
            heads = [t.view(b, s, h, e // h).transpose(1, 2) for t in (q, k, v)]
            y = _attention(*heads, mask).transpose(1, 2).reshape(b, s, e)
            x = x + self._linear(y, p + "attn.c_proj")
            m = self._linear(self._layernorm(x, p + "ln_2"), p + "mlp.c_fc")
            m = 0.5 * m * (1.0 + torch.erf(m / math.sqrt(2.0)))  # nn.GELU(): exact erf form
            x = x + self._linear(m, p + "mlp.c_proj")
        x = self._layernorm(x, "transformer.ln_f")
        head = self.w.get("lm_head.weight", self.w["transformer.wte.weight"])
        return (x @ head.T).numpy()


class Llama2cReference(Reference):
    description = ("llama2.c forward written in exportline (verify/reference.py) from llama2.c's model.py/run.c, "
                   "float64 on CPU, on the .bin's own tensors (interleaved RoPE, unpermuted q/k)")
    # HF's LlamaRMSNorm and rotary tables compute in float32 even in a float64 model, so
    # the HF side cannot be closer than fp32 rounding.
    bounds_key = "fp32"

    def __init__(self, header, tensors: dict[str, np.ndarray]):
        import torch

        self.h = header
        self.w = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in tensors.items()
                  if not k.startswith("freqs_")}  # RoPE tables are recomputed in float64

    @classmethod
    def from_checkpoint(cls, path: Path) -> "Llama2cReference":
        from ..exporters.llama2c import read_tensors

        return cls(*read_tensors(path))

    def _rmsnorm(self, x, weight):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight

    def _rope(self, x, pos):
        """x [b, s, heads, hd]: rotate each interleaved pair (2i, 2i+1) by pos * 10000^(-2i/hd)."""
        import torch

        hd = x.shape[-1]
        freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = pos[:, :, None, None].to(torch.float64) * freqs  # [b, s, 1, hd/2]
        re, im = x[..., 0::2], x[..., 1::2]
        out = torch.stack([re * angle.cos() - im * angle.sin(), re * angle.sin() + im * angle.cos()], dim=-1)
        return out.flatten(-2)

    def logits(self, input_ids, attention_mask=None):
        import torch

        hdr, w = self.h, self.w
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask)
        pos = torch.as_tensor(position_ids_from_mask(mask))
        b, s = ids.shape
        hd, rep = hdr.head_dim, hdr.n_heads // hdr.n_kv_heads
        x = w["token_embedding"][ids]
        for i in range(hdr.n_layers):
            t = self._rmsnorm(x, w["attention_norm"][i])
            q = self._rope((t @ w["wq"][i].T).view(b, s, hdr.n_heads, hd), pos)
            k = self._rope((t @ w["wk"][i].T).view(b, s, hdr.n_kv_heads, hd), pos)
            v = (t @ w["wv"][i].T).view(b, s, hdr.n_kv_heads, hd)
            k, v = (z.repeat_interleave(rep, dim=2) for z in (k, v))  # query head j reads kv head j // rep
            y = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
            x = x + y.transpose(1, 2).reshape(b, s, -1) @ w["wo"][i].T
            t = self._rmsnorm(x, w["ffn_norm"][i])
            gate = t @ w["w1"][i].T
            x = x + (gate * torch.sigmoid(gate) * (t @ w["w3"][i].T)) @ w["w2"][i].T
        x = self._rmsnorm(x, w["norm"])
        return (x @ w.get("wcls", w["token_embedding"]).T).numpy()


class HFReference(Reference):
    description = ("the bundle's HF model itself in float64 (no independent implementation for this source; "
                   "weights are compared tensor by tensor with the source instead)")
    independent = False
    bounds_key = "fp32"

    def __init__(self, model):
        self.model = model

    @classmethod
    def from_bundle(cls, root: Path, trust_remote_code: bool = False) -> "HFReference":
        return cls(load_hf_model(root, "float64", trust_remote_code))

    def logits(self, input_ids, attention_mask=None):
        return hf_logits(self.model, input_ids, attention_mask)

    def greedy(self, prompt, steps):
        return hf_greedy(self.model, prompt, steps)


def load_hf_model(root: Path, dtype: str, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from ..exporters.hf_files import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(root, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model.eval()


def hf_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """HF forward with the same position ids the reference uses (GPT-2 would otherwise
    number left pads as positions)."""
    import torch

    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids_from_mask(mask)), use_cache=False)
    return out.logits.to(torch.float64).numpy()


def hf_greedy(model, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding through the model's KV cache (prefill, then one token per step)."""
    import torch

    tokens, step_logits = [], []
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(prompt), dtype=torch.long), use_cache=True)
        for _ in range(steps):
            last = out.logits[0, -1].to(torch.float64).numpy()
            tokens.append(int(last.argmax()))
            step_logits.append(last)
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, step_logits


def _checkpoint_path(source: dict[str, Any]) -> Path:
    path = Path(source.get("path", ""))
    if not path.is_file():
        raise NotAvailable(f"source checkpoint {path} is not on this machine; verify where the export ran")
    if source.get("sha256") and sha256_file(path) != source["sha256"]:
        raise NotAvailable(f"source checkpoint {path} changed since the export; re-export it to verify")
    return path


def _hf_bundle(root: Path, source: dict[str, Any]) -> Reference:
    return HFReference.from_bundle(root, bool(source.get("trust_remote_code")))


# Source kind (manifest `source.kind`) → how to build its reference.
REFERENCES = {
    "nanogpt": lambda root, src: NanoGPTReference.from_checkpoint(_checkpoint_path(src)),
    "llama2c": lambda root, src: Llama2cReference.from_checkpoint(_checkpoint_path(src)),
    "preset": _hf_bundle,
    "hf": _hf_bundle,
}


def load_reference(root: Path, manifest: dict[str, Any]) -> Reference:
    """The float64 reference for the bundle's source; NotAvailable when it cannot be built."""
    source = manifest.get("source", {})
    build = REFERENCES.get(source.get("kind"))
    if build is None:
        raise NotAvailable(f"no reference for source kind {source.get('kind')!r}")
    return build(Path(root), source)
