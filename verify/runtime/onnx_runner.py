"""ONNX Runtime behind the runner contract; `onnxruntime` is imported in `activate()` only.

Before a session is created the files are checked (exporters/onnx_files.py: parses,
external data present and long enough), because ORT's own message for a truncated model
or a missing `.onnx_data` is a multi-line stack that does not say which file to restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.onnx.files_check import check_onnx_files
from exportline.verify.runtime.base import Runner

# ORT type strings of the graph inputs we feed → numpy dtypes.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
# Which export stage writes a file of the onnx-community layout, for the "what next" hint.
_STAGE_OF = {Path(g.path).name: g.stage for g in GRAPHS.values()}


def _reexport(path: Path) -> str:
    stage = _STAGE_OF.get(path.name, "onnx")
    return f"re-export it: exportline export SOURCE --out {path.parent.parent} --stages {stage} --force"


class OnnxRuntimeRunner(Runner):
    """`OnnxRuntimeRunner(path, providers=[...], session_options={"intra_op_num_threads": 2})`.

    Float inputs are cast to the dtype the graph declares, so one feed drives the fp32,
    fp16 and Q/DQ graphs. Feed entries the graph does not declare are ignored.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        providers: list[str] | None = None,
        session_options: dict[str, Any] | None = None,
        config_entries: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.session_options = dict(session_options or {})
        self.config_entries = dict(config_entries or {})
        self.name = f"onnxruntime:{self.path.name}"
        self.session: Any = None
        self.input_types: dict[str, Any] = {}
        self.output_names: list[str] = []

    def activate_impl(self) -> None:
        check_onnx_files(self.path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise NotAvailable("onnxruntime is not installed: pip install onnxruntime") from None
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise NotAvailable(
                f"{self.name}: execution provider {', '.join(missing)} not available here "
                f"(have {', '.join(ort.get_available_providers())})"
            )
        options = ort.SessionOptions()
        for key, value in self.session_options.items():
            if not hasattr(options, key):
                raise ConfigError(f"{self.name}: unknown onnxruntime SessionOptions field {key!r}")
            if key == "graph_optimization_level" and isinstance(value, str):
                value = getattr(ort.GraphOptimizationLevel, value)
            setattr(options, key, value)
        for key, value in self.config_entries.items():
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            raise ArtifactError(f"onnxruntime cannot load {self.path}: {_reason(exc)}; {_reexport(self.path)}") from None
        self.input_types = {}
        for i in self.session.get_inputs():
            if i.type not in _ORT_TYPES:
                raise ConfigError(f"{self.name}: input {i.name} has type {i.type}, which this runner cannot feed")
            self.input_types[i.name] = _ORT_TYPES[i.type]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_types if n not in feed]
        if missing:
            raise ConfigError(f"{self.name}: the feed has no {', '.join(missing)}; inputs are named as in exporters/shapes.py")
        ort_feed = {}
        for name, dtype in self.input_types.items():
            value = np.asarray(feed[name])
            if value.dtype != dtype:
                value = value.astype(dtype)
            ort_feed[name] = value
        values = self.session.run(self.output_names, ort_feed)
        return dict(zip(self.output_names, values))


def _reason(exc: Exception) -> str:
    """ORT's first line is "Load model from X failed: <source path:line> <reason>": keep the
    reason end, which is what says what is wrong."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 240 else "…" + text[-240:]


def ort_session_options(threads: int) -> dict[str, Any]:
    """Intra-op threads = physical cores (hyper-threads only contend for the same FMA units),
    one inter-op thread (a decoder graph is a chain, nothing to run in parallel), every
    graph optimization (fusions for attention, GELU/RMSNorm, Q/DQ → integer kernels)."""
    return {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def ort_bench_options(device: str, threads: int) -> dict[str, Any]:
    # On cuda the CUDA EP is required, not preferred: ORT silently falling back to the CPU
    # would be timed against torch on the GPU. The runner says "not available" without it.
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return {"providers": providers, "session_options": ort_session_options(threads)}
