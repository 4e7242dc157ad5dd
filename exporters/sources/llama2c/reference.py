"""llama2.c's forward in float64, from karpathy/llama2.c model.py and run.c, on the .bin's own tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exportline.exporters.sources.reference import Reference, attention, position_ids_from_mask


class Llama2cReference(Reference):
    description = ("llama2.c forward written in exportline (exporters/sources/llama2c/reference.py) from llama2.c's model.py/run.c, "
                   "float64 on CPU, on the .bin's own tensors (interleaved RoPE, unpermuted q/k)")
    # HF's LlamaRMSNorm and rotary tables compute in float32 even in a float64 model, so
    # the HF side cannot be closer than fp32 rounding.
    bounds_key = "fp32"

    def __init__(self, header, tensors: dict[str, np.ndarray]):
        import torch

        self.h = header
        if header.version == 2:  # the bound is then against the dequantised weights, as the manifest says
            self.description = f"{self.description}; weights {header.weights_precision}"
        self.w = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in tensors.items()
                  if not k.startswith("freqs_")}  # RoPE tables are recomputed in float64

    @classmethod
    def from_checkpoint(cls, path: Path) -> "Llama2cReference":
        from exportline.exporters.sources.llama2c.convert import read_tensors

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
            y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask=mask)
            x = x + y.transpose(1, 2).reshape(b, s, -1) @ w["wo"][i].T
            t = self._rmsnorm(x, w["ffn_norm"][i])
            gate = t @ w["w1"][i].T
            x = x + (gate * torch.sigmoid(gate) * (t @ w["w3"][i].T)) @ w["w2"][i].T
        x = self._rmsnorm(x, w["norm"])
        return (x @ w.get("wcls", w["token_embedding"]).T).numpy()
