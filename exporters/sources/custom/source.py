"""CustomSource: the user's own nn.Module (`--model-class FILE.py:Class`) and its checkpoint.

Everything is checked in the constructor, before any stage writes a file: the module file
and its relative imports, the checkpoint's tensors against the module's (one line naming
missing / unexpected / mis-shaped keys), the parameter count against `--expect-params` or
the variant's, and the input spec. Importing FILE.py is the one place exportline runs the
user's code; the manifest records it (`user_code`).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import ConfigError, SourceError
from exportline.exporters.core.presets import ParamExpectation
from exportline.exporters.core.shapes import DeclaredIO, declared_io
from exportline.exporters.sources.base import default_name
from exportline.exporters.sources.custom.adapter import ADAPTER_DIR, merge_into, read_adapter, resolve_modules, write_peft_adapter
from exportline.exporters.sources.custom.checkpoint import key_problems, parameter_count, read_checkpoint
from exportline.exporters.sources.custom.module_file import ModuleFile
from exportline.exporters.sources.custom.remote_code import TASKS, config_json, write_config, write_remote_code

SOURCE_VERSION = 1
SEQUENCE_KWARGS = ("block_size", "max_seq_len", "max_position_embeddings", "n_positions", "max_len", "context_length")


class CustomSource:
    kind = "custom"

    def __init__(self, path: Path, *, model_class: str, model_args: dict | None = None,
                 inputs: dict | None = None, task: str = "causal-lm",
                 expect_params: ParamExpectation | None = None, name: str = "", variant: str | None = None,
                 adapter: Path | None = None, lora_alpha: float | None = None, lora_rank: int | None = None,
                 merge_adapter: bool = False):
        if task not in TASKS:
            raise ConfigError(f"--task {task!r}: use one of {', '.join(TASKS)}")
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise SourceError(f"{path}: no such checkpoint file (a .safetensors or .pt/.pth state dict)")
        self.module_file = ModuleFile.parse(model_class)
        self.task, self.variant, self.expect = task, variant, expect_params
        checkpoint = read_checkpoint(self.path)
        self.kwargs = dict(model_args if model_args is not None else checkpoint.kwargs)
        self.model = self._build(checkpoint.state)
        self.parameters = parameter_count(self.model)
        if expect_params is not None:
            expect_params.check(self.parameters, what=f"{self.path.name} with {self.module_file.class_name}"
                                + (f" (variant {variant})" if variant else ""))
        self.adapter, self.merged = None, merge_adapter
        if merge_adapter and adapter is None:
            raise ConfigError("--merge-adapter needs --adapter PEFT_DIR|LORA.pth")
        if adapter is not None:
            self.adapter = read_adapter(adapter, alpha=lora_alpha, rank=lora_rank)
            resolve_modules(self.model, self.adapter)  # refused now, before anything is written
            if merge_adapter:
                merge_into(self.model, self.adapter)
        self.io = declared_io(inputs) if inputs is not None else self._default_io()
        if task == "causal-lm" and [s.name for s in self.io.inputs()][:1] != ["input_ids"]:
            raise ConfigError("--task causal-lm: the first declared input must be input_ids (token ids → logits)")
        # <base>-lora: the base plus an adapter folder; <base>-sft: the adapter merged in
        tag = "" if self.adapter is None else ("-sft" if merge_adapter else "-lora")
        self.name = name or default_name(self.path) + (f"-{variant}" if variant else "") + tag
        self.thresholds: dict[str, Any] = {}

    def _build(self, state: dict):
        import torch

        cls = self.module_file.load_class()
        self.kwargs = {**_defaults(cls), **self.kwargs}  # recorded in full: config.json must not depend on defaults
        try:
            model = cls(**self.kwargs)
        except TypeError as exc:
            raise SourceError(f"{cls.__name__}(**model args) failed: {exc}; pass the constructor kwargs with "
                              "--model-args ARGS.yaml (or store them as `model_args` in the checkpoint)") from None
        if not isinstance(model, torch.nn.Module):
            raise SourceError(f"{cls.__name__} is not a torch.nn.Module")
        problems = key_problems(model, state)
        if problems:
            raise SourceError(f"{self.path.name} does not fit {cls.__name__}({_short(self.kwargs)}): {problems}")
        model.load_state_dict(state, strict=True)
        return model.eval()

    def _default_io(self) -> DeclaredIO:
        """causal-lm: input_ids [batch, sequence] → logits [batch, sequence, vocab]."""
        import torch

        if self.task != "causal-lm":
            raise ConfigError("--task forward needs --inputs SPEC.yaml (names, dtypes, shapes of the inputs)")
        vocab = self.kwargs.get("vocab_size") or next(
            (m.num_embeddings for m in self.model.modules() if isinstance(m, torch.nn.Embedding)), None)
        longest = next((int(self.kwargs[k]) for k in SEQUENCE_KWARGS if k in self.kwargs), None)
        if not vocab or not longest:
            raise ConfigError("--task causal-lm: cannot tell the vocabulary size or the longest sequence from the "
                              f"model args ({', '.join(SEQUENCE_KWARGS[:3])}…); pass --inputs SPEC.yaml")
        return declared_io({
            "dims": {"batch": {"min": 1, "opt": 2, "max": 8},
                     "sequence": {"min": 1, "opt": min(16, longest), "max": longest}},
            "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "sequence"], "values": [0, int(vocab)]}},
            "outputs": {"logits": {"dtype": "float32", "shape": ["batch", "sequence", int(vocab)]}},
        }, where="the default causal-lm spec")

    # -- identity ------------------------------------------------------------------------------
    @cached_property
    def content_sha256(self) -> str:
        return sha256_file(self.path)

    def fingerprint(self) -> str:
        blob = {"kind": self.kind, "version": SOURCE_VERSION, "sha256": self.content_sha256,
                "module": self.module_file.sha256(), "class": self.module_file.class_name,
                "kwargs": self.kwargs, "task": self.task, "io": self.io.to_dict(),
                "adapter": self.adapter.sha256() if self.adapter else None, "merged": self.merged}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "architecture": self.module_file.class_name, "path": str(self.path),
            "sha256": self.content_sha256, "model_class": f"{self.module_file.path}:{self.module_file.class_name}",
            "module_sha256": self.module_file.sha256(), "model_args": self.kwargs, "task": self.task,
            "parameters": self.parameters, "variant": self.variant,
            "expect_params": self.expect.text if self.expect else None, "io": self.io.to_dict(),
            "adapter": {**self.adapter.describe(), "merged": self.merged} if self.adapter else None,
            "user_code": f"imported {self.module_file.path.name} ({', '.join(p.name for p in self.module_file.siblings) or 'no sibling files'}) "
                         "because --model-class was given: the one place exportline ran the user's code",
            "random_init": False, "labels": [], "preset": None, "trust_remote_code": True,
            "tokenizer": {"kind": "none", "reason": "custom modules carry no tokenizer"}, "thresholds": self.thresholds,
        }

    # -- the hf stage --------------------------------------------------------------------------
    def write_hf(self, dest: Path, progress: Callable[[str], None]) -> dict[str, Any]:
        from exportline.exporters.sources.hf_writer import write_hf_weights

        progress(f"hf: remote-code folder for {self.module_file.class_name} ({self.parameters:,} parameters)")
        first = self.io.inputs()[0].name
        names = write_remote_code(dest, self.module_file, task=self.task, first_input=first)
        config = config_json(names, task=self.task, kwargs=self.kwargs, io=self.io.to_dict())
        files = write_config(dest, config, task=self.task)
        # clone: tied tensors share storage, which safetensors refuses; the wrapper re-ties on load
        state = {f"model.{k}": v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        files += write_hf_weights(state, dest)
        if self.adapter is not None and not self.merged:
            progress(f"hf: LoRA adapter ({len(self.adapter.pairs)} modules, rank {self.adapter.rank}) → {ADAPTER_DIR}/")
            files += write_peft_adapter(dest, self.adapter, self.model, dest=dest / ADAPTER_DIR, base_name=self.name)
        return {"files": files, "architecture": names["wrapper"], "model_type": names["model_type"],
                "parameters": self.parameters, "task": self.task,
                "load_with": f"AutoModel{'ForCausalLM' if self.task == 'causal-lm' else ''}.from_pretrained(DIR, trust_remote_code=True)",
                "kv_cache": False}


def _defaults(cls) -> dict[str, Any]:
    """The constructor's JSON-able keyword defaults."""
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and isinstance(p.default, (int, float, str, bool, type(None), list, tuple))}


def _short(kwargs: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= 80 else text[:77] + "…"
