"""Hugging Face transformers in torch, driven by the flat ONNX-named feed of shapes.py.

The float64 instance of this runner is the verification reference (DESIGN.md §6); the
float32 one is "the HF stage" that every exported graph must reproduce token for token.
Verification runs both `streamed` (verify/runtime/streamed.py): weights are read per
module as it runs, so neither holds a whole model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.shapes import KVLayout
from exportline.verify.runtime.base import Runner

DTYPES = ("float32", "float64", "float16", "bfloat16")


class TorchRunner(Runner):
    """`TorchRunner(model_dir)` loads the HF folder in `activate()`; `TorchRunner(model=m)`
    runs an in-memory model (copied first when `dtype` differs, so the caller's is untouched)."""

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        model: Any = None,
        dtype: str = "float32",
        device: str = "cpu",
        exact: bool = True,
        streamed: bool = False,
    ) -> None:
        """`exact` (float64 only): rebind transformers' float32-internal RMSNorm and rotary
        embedding to float64 (verify/reference/float64.py), so the reference is float64 throughout.
        `streamed` (model_dir only): hold one module's weights at a time, read from the
        folder's safetensors as each module runs — bit-identical outputs, every forward
        re-reads the weights."""
        super().__init__()
        if (model_dir is None) == (model is None):
            raise ConfigError("TorchRunner: give exactly one of model_dir or model")
        if streamed and model is not None:
            raise ConfigError("TorchRunner: streamed reads the weights from model_dir; an in-memory model is already held")
        if dtype not in DTYPES:
            raise ConfigError(f"TorchRunner: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.dtype = dtype
        self.device = device
        self.name = f"torch-{dtype}-{device}"
        self._given = model
        self.exact = exact and dtype == "float64"
        self.streamed = streamed
        self.model: Any = None
        self.layout: KVLayout | None = None
        self.float64_rebound: list[str] = []  # what `exact` rebound, for the report

    def activate_impl(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise NotAvailable(f"{self.name}: no CUDA GPU visible to torch; use device='cpu'")
        torch_dtype = getattr(torch, self.dtype)
        if self._given is not None:
            model, param = self._given, next(self._given.parameters())
            if self.exact or param.dtype != torch_dtype or str(param.device) != self.device:
                model = copy.deepcopy(model).to(device=self.device, dtype=torch_dtype)  # the caller's stays as is
        else:
            model = self._load(torch_dtype)
        if self.exact:
            from exportline.verify.reference.float64 import exact_float64

            self.float64_rebound = exact_float64(model)
        self.model = model.eval()
        self.layout = KVLayout.from_config(self.model.config)

    def _load(self, torch_dtype):
        from transformers import AutoModelForCausalLM

        from exportline.verify.runtime.streamed import streamed_model

        if not (self.model_dir / "config.json").is_file():
            raise ArtifactError(f"{self.model_dir} has no config.json; run the hf stage: exportline export SOURCE --stages hf")
        try:
            if self.streamed:
                return streamed_model(self.model_dir, self.dtype, device=self.device)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"cannot load the HF folder {self.model_dir}: {first}; re-run the hf stage with --force") from None
        return model.to(self.device)

    def deactivate_impl(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from transformers import DynamicCache

        layout, dtype = self.layout, getattr(torch, self.dtype)

        def tensor(name: str, float_: bool = False):  # not a parameter's device: streamed ones are on meta
            if name not in feed:
                raise ConfigError(f"{self.name}: the feed has no {name!r}; inputs are named as in exporters/shapes.py")
            t = torch.from_numpy(np.ascontiguousarray(feed[name]))
            return t.to(device=self.device, dtype=dtype if float_ else torch.int64)

        past = [
            (tensor(f"past_key_values.{i}.key", True), tensor(f"past_key_values.{i}.value", True))
            for i in range(layout.num_layers)
        ]
        cache = DynamicCache(ddp_cache_data=past, config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=tensor("input_ids"), attention_mask=tensor("attention_mask"),
                position_ids=tensor("position_ids"), cache=cache, use_cache=True,
            )
        result = {"logits": _to_numpy(out.logits)}
        for i, layer in enumerate(out.cache.layers):
            result[f"present.{i}.key"] = _to_numpy(layer.keys)
            result[f"present.{i}.value"] = _to_numpy(layer.values)
        return result


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 exactly
        t = t.float()
    return t.detach().cpu().numpy()


def torch_bench_options(device: str, threads: int) -> dict[str, Any]:
    """torch takes its thread count from the process (bench sets it), not from the runner."""
    return {"device": device}
