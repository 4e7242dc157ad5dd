"""The bundle layout (DESIGN.md §2): every path in a bundle, declared once, as shapes.py
declares the tensors. Stages, runners, checks, reports and deploy name files through it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card
HUBCONF = "hubconf.py"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's config for the fp32 graph (consumer_files.py)
REPORTS = "reports"
VERIFY_JSON = f"{REPORTS}/verify.json"
VERIFY_MD = f"{REPORTS}/verify.md"
BENCH_JSON = f"{REPORTS}/bench.json"
TRT = "trt"  # engines: trt/<precision>.sm<cc>.trt<ver>.plan (+ .json)
LOCK = ".exportline.lock"
TMP = ".exportline-tmp"


def cache_root() -> Path:
    """exportline's cache outside any bundle (Hub pulls, traced graphs, TensorRT timing
    caches): $EXPORTLINE_CACHE, else $XDG_CACHE_HOME/exportline (~/.cache/exportline)."""
    base = os.environ.get("EXPORTLINE_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exportline"


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the bundle and the stage that writes it (onnx-community naming)."""

    precision: str
    stage: str
    path: str  # e.g. onnx/model_fp16.onnx; its weights are path + "_data"
    description: str

    @property
    def data(self) -> str:
        return self.path + "_data"


GRAPHS: dict[str, Graph] = {g.precision: g for g in (
    Graph("fp32", "onnx", "onnx/model.onnx", "ONNX fp32 with KV cache"),
    Graph("fp16", "fp16", "onnx/model_fp16.onnx", "ONNX fp16"),
    Graph("int8", "int8", "onnx/model_int8.onnx", "ONNX int8 (Q/DQ)"),
)}
