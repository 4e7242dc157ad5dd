"""Make an HF model a true float64 reference.

`model.double()` is not enough: transformers' RMSNorm casts its input to float32 and the
rotary embedding computes its angles, cos and sin in float32, whatever the model dtype.
A reference with float32 steps inside has a float32 error floor, the very thing it is
meant to measure. This rebinds those two forwards to float64 versions of the same formula.

Each rebinding is checked on the spot against the module's own forward (they must agree
to float32 rounding) and kept only then; a variant with a different formula (e.g. Gemma's
`1 + weight`) fails that check and keeps its own forward, and the caller reports which
modules were rebound.
"""

from __future__ import annotations

import types
from typing import Any

_AGREE = 1e-5  # patched vs original, relative: float32 rounding, not a different formula


def exact_float64(model: Any) -> list[str]:
    """Rebind the float32-internal modules of a float64 `model`; returns the kinds rebound."""
    import torch

    kinds: set[str] = set()
    config = getattr(model, "config", None)
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            if _try(module, _rmsnorm64, lambda m: (torch.randn(2, 3, m.weight.shape[-1], dtype=torch.float64),)):
                kinds.add("RMSNorm")
        elif cls.endswith("RotaryEmbedding") and hasattr(module, "inv_freq") and _default_rope(module):
            inv_freq = _inv_freq64(config, module)
            if inv_freq is None:
                continue
            module.inv_freq64 = inv_freq
            if _try(module, _rope64, lambda m: (torch.zeros(1, dtype=torch.float64), torch.arange(70)[None])):
                kinds.add("rotary embedding")
    return sorted(kinds)


def _try(module: Any, forward, make_args) -> bool:
    import torch

    args = make_args(module)
    with torch.no_grad():  # called, not .forward(): a streamed module loads its weights in its hooks
        before = module(*args)
        module.forward = types.MethodType(forward, module)
        after = module(*args)
    pairs = zip(before, after) if isinstance(before, tuple) else [(before, after)]
    if all(float((a - b).norm() / b.norm().clamp_min(1e-300)) <= _AGREE for a, b in pairs):
        return True
    del module.forward  # back to the class's own forward
    return False


def _rmsnorm64(self, hidden_states):
    import torch

    x = hidden_states.to(torch.float64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight.to(torch.float64) * x


def _default_rope(module: Any) -> bool:
    return getattr(module, "rope_type", "default") == "default" and float(getattr(module, "attention_scaling", 1.0)) == 1.0


def _inv_freq64(config: Any, module: Any):
    """1 / theta^(2i/d) computed in float64 from the config (the buffer holds float32 values)."""
    import torch

    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        return None
    dim = 2 * module.inv_freq.shape[-1]
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _rope64(self, x, position_ids):
    import torch

    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq64.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
