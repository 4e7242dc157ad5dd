"""nanoGPT's forward in float64, from karpathy/nanoGPT model.py, on the .pt's own tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.sources.reference import Reference, attention, position_ids_from_mask


class NanoGPTReference(Reference):
    description = ("nanoGPT forward written in exportline (exporters/sources/nanogpt/reference.py) from nanoGPT's model.py, "
                   "float64 on CPU, on the .pt's own tensors")

    def __init__(self, state: dict, args: dict[str, Any]):
        import torch

        self.w = {k: v.to(torch.float64) for k, v in state.items()}
        self.args = args

    @classmethod
    def from_checkpoint(cls, path: Path) -> "NanoGPTReference":
        from exportline.exporters.sources.nanogpt.convert import load_checkpoint

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
        if pos.numel() and int(pos.max()) >= self.args["block_size"]:
            raise ConfigError(f"position {int(pos.max())} is past nanoGPT's block_size {self.args['block_size']}: "
                              "the model has no embedding for it; use shorter inputs")
        b, s = ids.shape
        e, h = self.args["n_embd"], self.args["n_head"]
        x = self.w["transformer.wte.weight"][ids] + self.w["transformer.wpe.weight"][pos]
        for i in range(self.args["n_layer"]):
            p = f"transformer.h.{i}."
            q, k, v = self._linear(self._layernorm(x, p + "ln_1"), p + "attn.c_attn").split(e, dim=2)
            heads = [t.view(b, s, h, e // h).transpose(1, 2) for t in (q, k, v)]
            y = attention(*heads, attention_mask=mask).transpose(1, 2).reshape(b, s, e)
            x = x + self._linear(y, p + "attn.c_proj")
            m = self._linear(self._layernorm(x, p + "ln_2"), p + "mlp.c_fc")
            m = 0.5 * m * (1.0 + torch.erf(m / math.sqrt(2.0)))  # nn.GELU(): exact erf form
            x = x + self._linear(m, p + "mlp.c_proj")
        x = self._layernorm(x, "transformer.ln_f")
        head = self.w.get("lm_head.weight", self.w["transformer.wte.weight"])
        return (x @ head.T).numpy()
