"""Running a custom module by its declared inputs and outputs (shapes.DeclaredIO): the
flat form the ONNX exporter traces and the verifier runs (positional inputs in declared
order → a tuple of the declared outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError, StageError
from exportline.exporters.core.shapes import DeclaredIO, declared_io


def is_custom(root: Path) -> bool:
    """A bundle whose HF folder holds a custom module (config.json has exportline_io)."""
    try:
        return "exportline_io" in json.loads((Path(root) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def bundle_io(root: Path) -> tuple[DeclaredIO, str]:
    """The declared I/O and the task recorded in the bundle's config.json."""
    try:
        config = json.loads((Path(root) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root}/config.json cannot be read ({exc}); re-run the hf stage") from None
    return declared_io(config["exportline_io"], where=f"{root}/config.json exportline_io"), config["exportline_task"]


def output_tuple(out: Any, names: list[str]) -> tuple:
    """The module's return value → the declared outputs in order: a tensor is the first,
    a tuple/list is matched by position (None entries, e.g. a loss, dropped), a dict by name."""
    import torch

    if isinstance(out, torch.Tensor):
        values = [out]
    elif isinstance(out, dict) or hasattr(out, "keys"):
        missing = [n for n in names if n not in out]
        if missing:
            raise StageError(f"the module returned a dict without {', '.join(missing)}; --inputs outputs: must name its keys")
        return tuple(out[n] for n in names)
    elif isinstance(out, (tuple, list)):
        values = [v for v in out if v is not None]
    else:
        raise StageError(f"the module returned a {type(out).__name__}; return a tensor, a tuple or a dict of tensors")
    if len(values) < len(names):
        raise StageError(f"the module returned {len(values)} tensors but --inputs declares {len(names)} outputs")
    return tuple(values[: len(names)])


def flat_module(module, io: DeclaredIO):
    """nn.Module: forward(*declared inputs) → tuple of declared outputs."""
    import torch

    names = [s.name for s in io.outputs()]

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *inputs):
            return output_tuple(self.module(*inputs), names)

    return Flat().eval()


def load_bundle_module(root: Path, dtype: str = "float32"):
    """The bundle's HF model (its remote code: the user's module copied by the hf stage),
    returned as the inner user module in `dtype`, eval mode."""
    import torch
    from transformers import AutoModel

    from exportline.exporters.sources.hf_writer import quiet_transformers

    with quiet_transformers():
        model = AutoModel.from_pretrained(str(root), trust_remote_code=True, dtype=getattr(torch, dtype))
    return model.model.eval()


def run_module(module, io: DeclaredIO, feed: dict) -> dict:
    """numpy feed → numpy outputs (float64 for float outputs) of the flat module, no grad.
    Float inputs follow the module's dtype (the float64 reference gets float64 inputs)."""
    import numpy as np
    import torch

    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    args = []
    for spec in io.inputs():
        t = torch.from_numpy(np.ascontiguousarray(feed[spec.name]))
        args.append(t.to(dtype) if t.is_floating_point() else t)
    with torch.no_grad():
        outs = flat_module(module, io)(*args)
    return {s.name: o.detach().to(torch.float64).numpy() if o.is_floating_point() else o.numpy()
            for s, o in zip(io.outputs(), outs)}
