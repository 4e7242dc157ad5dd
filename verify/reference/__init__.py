"""Float64 references for the hf stage (DESIGN.md §6).

A source kind with an independent forward (nanoGPT, llama2.c) brings its own
(exporters/sources/<kind>/reference.py); presets and HF folders have no second
implementation, so their reference is the HF model in float64 (HFReference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import NotAvailable
from exportline.exporters.sources import SOURCE_KINDS
from exportline.exporters.sources.reference import Reference, position_ids_from_mask


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


def load_hf_model(root: Path, dtype: str, trust_remote_code: bool = False, *, streamed: bool = True):
    """The bundle's HF model; `streamed` (verify's way): weights read per module as it runs
    (verify/runtime/streamed.py), so a 1B float64 model holds ~0.5 GB of weights, not 8 GB."""
    import torch
    from transformers import AutoModelForCausalLM

    from exportline.exporters.sources.hf_writer import quiet_transformers
    from exportline.verify.runtime.streamed import streamed_model

    if streamed:
        return streamed_model(root, dtype, trust_remote_code=trust_remote_code)
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


def load_reference(root: Path, manifest: dict[str, Any]) -> Reference:
    """The float64 reference for the bundle's source; NotAvailable when it cannot be built."""
    source = manifest.get("source", {})
    kind = SOURCE_KINDS.get(source.get("kind"))
    if kind is None:
        raise NotAvailable(f"no reference for source kind {source.get('kind')!r}")
    if kind.reference is None:
        return HFReference.from_bundle(Path(root), bool(source.get("trust_remote_code")))
    return kind.reference(_checkpoint_path(source))
