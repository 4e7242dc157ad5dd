"""What every on-disk source (nanoGPT .pt, llama2.c .bin, HF folder) has in common:
a resolved path, a content hash for the stage cache, the user's tokenizer choice, and the
preset it came from when a preset's `checkpoint:` named it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import SourceError

Progress = Callable[[str], None]

# Bumped when a converter's output changes for the same input, so cached stages rerun.
CONVERTER_VERSION = 2  # 2: nanoGPT's record carries best_val_loss
# --tokenizer NAME values that name a tokenizer exportline builds itself instead of a file.
BUILTIN_TOKENIZERS = ("gpt2",)


@dataclass
class CheckpointSource:
    path: Path
    tokenizer_file: Path | None = None  # --tokenizer: tokenizer.json, sentencepiece .model or llama2.c tokenizer.bin
    trust_remote_code: bool = False
    name: str = ""
    preset: str | None = None  # the preset whose `checkpoint:` named this file
    thresholds: dict[str, Any] = field(default_factory=dict)
    tokenizer_builtin: str | None = None  # --tokenizer gpt2

    kind: ClassVar[str] = "checkpoint"
    architecture: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path).resolve()
        if self.tokenizer_file is not None and str(self.tokenizer_file) in BUILTIN_TOKENIZERS:
            self.tokenizer_builtin, self.tokenizer_file = str(self.tokenizer_file), None  # ./gpt2 names a file
        if self.tokenizer_file is not None:
            self.tokenizer_file = Path(self.tokenizer_file).resolve()
            if not self.tokenizer_file.is_file():
                raise SourceError(f"--tokenizer {self.tokenizer_file}: no such file; pass a tokenizer.json, a "
                                  "sentencepiece tokenizer.model or llama2.c's tokenizer.bin")
        self.name = self.name or default_name(self.path)

    # -- identity ------------------------------------------------------------------------------
    @cached_property
    def content_sha256(self) -> str:
        """sha256 of the checkpoint bytes; a folder: of its top-level files (what
        transformers reads), leaving out an exportline bundle's own bookkeeping."""
        if self.path.is_file():
            return sha256_file(self.path)
        h = hashlib.sha256()
        for name, digest in self.folder_sha256.items():
            h.update(name.encode() + b"\0" + digest.encode())
        return h.hexdigest()

    @cached_property
    def folder_sha256(self) -> dict[str, str]:
        """A folder's top-level files → sha256 (sorted; bookkeeping left out), hashed once."""
        return {
            p.name: sha256_file(p) for p in sorted(q for q in self.path.iterdir() if q.is_file())
            if not (p.name.startswith(".") or p.name == "manifest.json")
        }

    def fingerprint(self) -> str:
        blob = {
            "kind": self.kind, "converter": CONVERTER_VERSION, "sha256": self.content_sha256,
            "tokenizer": sha256_file(self.tokenizer_file) if self.tokenizer_file else self.tokenizer_builtin,
            "trust_remote_code": self.trust_remote_code,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "architecture": self.architecture, "path": str(self.path),
            "sha256": self.content_sha256, "preset": self.preset, "random_init": False, "labels": [],
            "tokenizer": self.tokenizer_plan(), "trust_remote_code": self.trust_remote_code,
            "thresholds": self.thresholds,
        }

    # -- tokenizer -----------------------------------------------------------------------------
    def tokenizer_plan(self) -> dict[str, Any]:
        """Which tokenizer the HF folder will get; `{"kind": "none", "reason": ...}` when
        there is none to ship (nothing is invented)."""
        if self.tokenizer_file:
            return {"kind": "file", "file": self.tokenizer_file.name}
        if self.tokenizer_builtin:
            return {"kind": self.tokenizer_builtin}
        return self.own_tokenizer_plan()

    def warnings(self) -> list[str]:
        """Things the user should see on the console before the export runs."""
        return []

    def own_tokenizer_plan(self) -> dict[str, Any]:
        return {"kind": "none", "reason": f"{self.kind} checkpoints carry no tokenizer; pass --tokenizer tokenizer.json"}

    def write_checked_tokenizer(self, dest: Path, *, model_max_length: int, vocab_size: int) -> dict[str, Any]:
        """write_tokenizer, refusing a tokenizer with ids the model has no embedding for."""
        info = self.write_tokenizer(dest, model_max_length)
        if info["kind"] != "none":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(dest)
            count, top = len(tok), max(tok.get_vocab().values(), default=-1)
            if count > vocab_size or top >= vocab_size:
                raise SourceError(f"the tokenizer has {count} tokens but the model only {vocab_size} embeddings "
                                  f"(largest token id {top}); pass the tokenizer the model was trained with")
        return info

    def write_tokenizer(self, dest: Path, model_max_length: int) -> dict[str, Any]:
        from exportline.exporters.sources.spm_tokenizer import SPM_FILES, write_spm_tokenizer
        from exportline.exporters.sources.tokenizer import write_tokenizer_file

        if self.tokenizer_file and self.tokenizer_file.suffix in SPM_FILES:
            return write_spm_tokenizer(self.tokenizer_file, dest, model_max_length)
        if self.tokenizer_file:
            return write_tokenizer_file(self.tokenizer_file, dest, model_max_length)
        if self.tokenizer_builtin == "gpt2":
            from exportline.exporters.sources.gpt2_tokenizer import write_gpt2_tokenizer

            return write_gpt2_tokenizer(dest, model_max_length)
        return self.own_tokenizer_plan()


def default_name(path: Path) -> str:
    """Bundle name: the file stem, or the folder name for nanoGPT's generic `ckpt.pt`."""
    stem = path.name if path.is_dir() else path.stem
    if stem in ("ckpt", "model", "pytorch_model") and path.parent.name:
        stem = path.parent.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"
