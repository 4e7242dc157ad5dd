"""LoRA adapters for a custom module: read (a PEFT adapter folder, or a .pth of lora_A /
lora_B tensors with the alpha given), merged into the module's Linear weights, or written
back as a PEFT adapter folder for the remote-code HF model (`PeftModel.from_pretrained`).

W' = W + scale · B @ A with scale = alpha / r (alpha / √r with rsLoRA), computed in float64.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import ConfigError, NotAvailable, SourceError

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"  # in the bundle: PeftModel.from_pretrained(model, BUNDLE/adapter)


@dataclass
class LoraAdapter:
    path: Path
    pairs: dict[str, tuple[Any, Any]]  # module path in the user's module → (A [r, in], B [out, r])
    rank: int
    alpha: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def sha256(self) -> str:
        files = sorted(p for p in self.path.iterdir() if p.is_file()) if self.path.is_dir() else [self.path]
        return hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256(), "rank": self.rank, "alpha": self.alpha,
                "rslora": self.rslora, "modules": sorted(self.pairs)}


def read_adapter(path: Path, *, alpha: float | None = None, rank: int | None = None) -> LoraAdapter:
    path = Path(path).resolve()
    if path.is_dir():
        return _read_peft(path)
    if not path.is_file():
        raise SourceError(f"--adapter {path}: no such PEFT adapter folder or .pth file")
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(f"--adapter {path.name} cannot be read with weights_only=True ({str(exc).splitlines()[0][:120]})") from None
    pairs = _pairs({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}, where=path.name)
    found = {int(a.shape[0]) for a, _ in pairs.values()}
    if len(found) != 1 or (rank is not None and found != {rank}):
        raise ConfigError(f"--adapter {path.name}: lora_A ranks {sorted(found)}" + (f" differ from --lora-rank {rank}" if rank else " differ"))
    if alpha is None:
        raise ConfigError(f"--adapter {path.name}: a .pth of lora_A/lora_B tensors needs --lora-alpha (and optionally --lora-rank)")
    return LoraAdapter(path, pairs, found.pop(), float(alpha))


def _read_peft(folder: Path) -> LoraAdapter:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise SourceError(f"--adapter {folder}: no adapter_config.json (a PEFT adapter folder has one)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SourceError(f"--adapter {folder}: only plain LoRA (no DoRA, no per-module rank/alpha patterns) can be merged here")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise SourceError(f"--adapter {folder}: no adapter_model.safetensors; save it with save_pretrained(safe_serialization=True)")
    from safetensors.torch import load_file

    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in load_file(str(weights)).items()}
    return LoraAdapter(folder, _pairs(state, where=folder.name), int(config["r"]), float(config["lora_alpha"]),
                       bool(config.get("use_rslora")))


def _pairs(state: dict, *, where: str) -> dict[str, tuple[Any, Any]]:
    """`<module>.lora_A[.weight]` / `<module>.lora_B[.weight]` → {module: (A, B)}."""
    found: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        name = key.removesuffix(".weight").removesuffix(".default")
        module, _, which = name.rpartition(".")
        if which in ("lora_A", "lora_B"):
            found.setdefault(module, {})[which] = tensor
    broken = [m for m, d in found.items() if len(d) != 2]
    if not found or broken:
        raise SourceError(f"--adapter {where}: " + (f"{broken[0]} has only one of lora_A/lora_B" if broken
                                                    else "no lora_A/lora_B tensors"))
    return {m: (d["lora_A"], d["lora_B"]) for m, d in found.items()}


def resolve_modules(model, adapter: LoraAdapter) -> dict[str, tuple[Any, Any]]:
    """Adapter module paths → paths in the user's module (an adapter trained on the HF
    wrapper has a leading `model.`), each checked to be an nn.Linear of the right shape."""
    import torch

    names = dict(model.named_modules())
    out = {}
    for path, (a, b) in adapter.pairs.items():
        target = path if path in names else path.removeprefix("model.")
        module = names.get(target)
        if not isinstance(module, torch.nn.Linear):
            raise SourceError(f"--adapter: {path} is {'not in the module' if module is None else type(module).__name__}; "
                              "LoRA is merged into nn.Linear layers only")
        if tuple(a.shape) != (adapter.rank, module.in_features) or tuple(b.shape) != (module.out_features, adapter.rank):
            raise SourceError(f"--adapter: {path} lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit Linear("
                              f"{module.in_features}, {module.out_features}) at rank {adapter.rank}")
        out[target] = (a, b)
    return out


def merge_into(model, adapter: LoraAdapter) -> None:
    import torch

    with torch.no_grad():
        for path, (a, b) in resolve_modules(model, adapter).items():
            weight = model.get_submodule(path).weight
            weight.copy_((weight.double() + adapter.scale * (b.double() @ a.double())).to(weight.dtype))


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls transformers' deprecated is_gradient_checkpointing (a FutureWarning
    about their APIs, not the user's input); library code does not print it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def write_peft_adapter(hf_folder: Path, adapter: LoraAdapter, model, *, dest: Path, base_name: str) -> list[str]:
    """The adapter as a PEFT folder for the remote-code model in `hf_folder` (module paths
    under the wrapper's `model.`), written by peft itself."""
    try:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    except ImportError:
        raise NotAvailable("LoRA adapter bundles need peft: pip install peft (or pass --merge-adapter)") from None
    from transformers import AutoModel

    from exportline.exporters.sources.hf_writer import quiet_transformers

    modules = resolve_modules(model, adapter)
    with quiet_transformers():
        base = AutoModel.from_pretrained(str(hf_folder), trust_remote_code=True)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, use_rslora=adapter.rslora, lora_dropout=0.0,
                        target_modules=[f"model.{p}" for p in modules])
    with quiet_peft():
        peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # not the stage's temporary folder
    state = {f"{PEFT_PREFIX}model.{p}.lora_{w}.weight": t.contiguous() for p, (a, b) in modules.items()
             for w, t in (("A", a), ("B", b))}
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise SourceError(f"--adapter: peft did not place {result.unexpected_keys[0]}; this is a bug, please report it")
    # no embedding layers to save (LoRA on Linear only); "auto" would look the base name up on the Hub
    peft_model.save_pretrained(str(dest), save_embedding_layers=False)
    return sorted(p.relative_to(dest.parent).as_posix() for p in dest.rglob("*") if p.is_file())
