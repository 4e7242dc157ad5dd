"""A Hugging Face model folder as a source: loaded with transformers (custom code only with
--trust-remote-code) and re-saved at the bundle root as fp32 safetensors, its tokenizer
files copied as they are (but for the v5-only tokenizer_class name, see hf_compat)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import SourceError
from exportline.exporters.sources.base import CheckpointSource, Progress

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
)
TRUST_HINT = "pass --trust-remote-code if you trust the folder's Python files"


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; invalid bytes, invalid JSON or another JSON type is a SourceError."""
    import json

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SourceError(f"{path} is not valid UTF-8 JSON ({str(exc).splitlines()[0][:120] or 'empty'}); "
                          "re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        raise SourceError(f"{path} is not a transformers config (a JSON object with model_type); "
                          "re-save the model with save_pretrained")
    return config


@dataclass
class HFFolderSource(CheckpointSource):
    kind = "hf"
    architecture = ""  # whatever config.json says; see describe()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.path / "config.json").is_file():
            raise SourceError(f"{self.path}: a folder without config.json is not an HF model folder; "
                              "pass a folder saved with save_pretrained, a nanoGPT .pt or a llama2.c .bin")
        read_config(self.path)  # a broken config.json is refused here, before anything is written
        if not any(self.path.glob("*.safetensors")) and not any(self.path.glob("pytorch_model*.bin")):
            raise SourceError(f"{self.path}: no *.safetensors or pytorch_model*.bin weights in the folder; "
                              "save the model with save_pretrained first")

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "architecture": read_config(self.path).get("model_type", "unknown")}
        recorded, why = self.recorded_verification
        if recorded is None:
            return {**described, **({"bounds_note": why} if why else {})}
        labels = list(recorded.get("labels") or (["random-init"] if recorded.get("random_init") else []))
        described.update(
            random_init=bool(recorded.get("random_init")), labels=labels,
            # a preset that names this folder as its `checkpoint:` keeps its own overrides on top
            thresholds={**(recorded.get("thresholds") or {}), **self.thresholds},
            inherited_from=why,
        )
        for key in ("preset", "seed"):
            described[key] = described.get(key) or recorded.get(key)
        return described

    @cached_property
    def recorded_verification(self) -> tuple[dict[str, Any] | None, str]:
        """(bounds and labels, where from) when this folder is an exportline bundle whose
        manifest.json still lists the very config.json and weight files it holds; else
        (None, why not, or "" when there is no manifest). The manifest's sha256s are the
        proof: a label copied into config.json would survive fine-tuning + save_pretrained
        and then mislabel trained weights."""
        path = self.path / "manifest.json"
        if not path.is_file():
            return None, ""
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None, f"{path} is unreadable; bounds not inherited"
        recorded = manifest.get("verification") or _legacy_verification(manifest.get("source") or {})
        if not recorded:
            return None, ""
        listed = {f.get("path"): f.get("sha256") for f in manifest.get("files", [])}
        model_files = [n for n in self.folder_sha256 if n == "config.json" or _is_weight_file(n)]
        changed = [n for n in model_files if listed.get(n) != self.folder_sha256[n]]
        if changed:
            return None, f"{path} does not list {changed[0]} as it is now; its bounds and labels were not inherited"
        source = manifest.get("source") or {}
        return {**recorded, "preset": source.get("preset"), "seed": source.get("seed")}, \
            f"{path} (config.json and weights match its sha256)"

    def own_tokenizer_plan(self) -> dict[str, Any]:
        files = [n for n in TOKENIZER_FILES if (self.path / n).is_file()]
        if files:
            return {"kind": "copied", "files": files}
        return {"kind": "none", "reason": "the folder has no tokenizer files; pass --tokenizer tokenizer.json"}

    def write_tokenizer(self, dest: Path, model_max_length: int) -> dict[str, Any]:
        plan = self.tokenizer_plan()
        if plan["kind"] == "copied":
            for name in plan["files"]:
                shutil.copyfile(self.path / name, dest / name)
            return plan
        return super().write_tokenizer(dest, model_max_length)

    def load_model(self, dtype=None):
        """The folder's model via AutoModelForCausalLM (fp32 unless `dtype` says otherwise).
        A weight missing or misshapen in the files is an error: transformers would fill it
        with random values and only warn."""
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        from exportline.exporters.sources.hf_writer import quiet_transformers

        try:
            with quiet_transformers():
                model, info = AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=dtype or torch.float32, trust_remote_code=self.trust_remote_code,
                    output_loading_info=True,
                )
        except (ValueError, KeyError) as exc:  # unknown model_type, custom code not trusted, not a causal LM
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = TRUST_HINT if "trust_remote_code" in str(exc) else "check that it is a causal LM saved with save_pretrained"
            raise SourceError(f"{self.path}: transformers cannot load it as a causal LM ({first[:200]}); {hint}") from None
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met a class or function
            raise SourceError(f"{self.path}: refused to load pytorch_model*.bin, unpickling it would run code "
                              f"({str(exc).splitlines()[0][:120]}); re-save the weights as safetensors where you trust "
                              "the file: model.save_pretrained(DIR, safe_serialization=True)") from None
        except (OSError, SafetensorError, RuntimeError, EOFError, IndexError, struct.error) as exc:
            raise SourceError(f"{self.path}: cannot load the model ({str(exc).splitlines()[0][:200]}); "
                              "check that the weight files are complete") from None
        bad = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
        if bad:
            raise SourceError(f"{self.path}: the weight files lack or misshape {len(bad)} tensors of its config "
                              f"(first: {bad[0]}); the folder's weights and config.json disagree")
        return model.eval()

    def write_hf(self, dest: Path, progress: Progress) -> dict[str, Any]:
        from exportline.exporters.sources.hf_compat import make_portable
        from exportline.exporters.sources.hf_writer import SHARD_BYTES, quiet_transformers, translate_write_error

        progress(f"hf: loading HF folder {self.path.name}")
        model = self.load_model()
        max_length = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        tok_info = self.write_tokenizer(dest, model_max_length=max_length)
        model.config.dtype = "float32"
        try:
            with quiet_transformers():
                model.save_pretrained(dest, max_shard_size=SHARD_BYTES)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports I/O errors as SafetensorError
            raise translate_write_error(exc, dest) from None
        make_portable(dest)  # after save_pretrained: transformers 4.x reads the same model
        files = sorted(p.name for p in dest.glob("model*.safetensors*"))
        return {"weights": files, "tokenizer": tok_info, "random_init": False,
                "model_type": model.config.model_type, "trust_remote_code": self.trust_remote_code}


def _is_weight_file(name: str) -> bool:
    return name.startswith(("model", "pytorch_model")) and (".safetensors" in name or name.endswith((".bin", ".bin.index.json")))


def _legacy_verification(source: dict[str, Any]) -> dict[str, Any] | None:
    """A bundle written before manifests recorded `verification`: its preset source block."""
    if source.get("kind") != "preset":
        return None
    return {"thresholds": source.get("thresholds") or {}, "random_init": bool(source.get("random_init")),
            "labels": list(source.get("labels") or [])}
