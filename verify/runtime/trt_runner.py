"""TensorRT runner: a bundle's trt/<precision>.sm<cc>.trt<ver>.plan behind the Runner contract.

The constructor is cheap; `activate()` imports TensorRT, refuses an engine built for
another TensorRT version or GPU (before deserializing it), then creates the execution
context. I/O goes through torch CUDA tensors on torch's current stream (data_ptr(),
set_tensor_address, execute_async_v3) — no pycuda (DESIGN.md §5). Each feed picks the
engine's prefill or decode optimization profile from its shapes (trt_meta.select_profile).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exportline.exporters.core.errors import ArtifactError, ConfigError
from exportline.exporters.tensorrt.engines import (
    ENGINE_SOURCES,
    REBUILD,
    collecting_logger,
    find_engine,
    load_tensorrt,
    local_target,
    select_profile,
)
from exportline.verify.runtime.base import Runner

# TensorRT DataType name → torch dtype name; numpy cannot hold bf16, so it is left out.
_TORCH_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
}


class TrtRunner(Runner):
    def __init__(self, bundle_root: Path, precision: str = "fp16"):
        super().__init__()
        if precision not in ENGINE_SOURCES:
            raise ConfigError(f"unknown TensorRT precision {precision!r}; known: {', '.join(ENGINE_SOURCES)}")
        self.root = Path(bundle_root)
        self.precision = precision
        self.name = f"trt-{precision}"
        self.plan: Path | None = None
        self.meta: dict = {}

    def activate_impl(self) -> None:
        trt = load_tensorrt()
        import torch

        self.plan, self.meta = find_engine(self.root, self.precision, local_target())  # refuses a mismatch
        self._logger = collecting_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"TensorRT cannot load {self.plan}: {self._last_error()}; rebuild it: {self._rebuild}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ArtifactError(f"TensorRT cannot create a context for {self.plan.name}: {self._last_error()}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: self._torch_dtype(torch, n) for n in names}
        self._device = torch.device("cuda", torch.cuda.current_device())
        # Every input needs a non-null address, also an empty past (prefill): point those here.
        self._scratch = torch.empty(256, dtype=torch.uint8, device=self._device)
        self._profile: int | None = None

    @property
    def _rebuild(self) -> str:
        return REBUILD.format(bundle=self.root)

    def _last_error(self) -> str:
        return self._logger.errors[-1] if self._logger.errors else "no error reported"

    def _torch_dtype(self, torch, name: str):
        kind = self._engine.get_tensor_dtype(name).name
        if kind not in _TORCH_DTYPES:
            raise ArtifactError(f"{self.plan.name}: tensor {name} has type {kind}, which this runner cannot exchange")
        return getattr(torch, _TORCH_DTYPES[kind])

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._scratch.data_ptr()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        shapes = {name: tuple(np.shape(array)) for name, array in feed.items()}
        profile = select_profile(self.meta["profiles"], shapes, bundle=str(self.root))
        stream = torch.cuda.current_stream(self._device)
        if profile != self._profile:
            # Before set_input_shape, on the stream the engine runs on (TensorRT's rule).
            if not self._context.set_optimization_profile_async(profile, stream.cuda_stream):
                raise ArtifactError(f"TensorRT refused profile {profile} of {self.plan.name}: {self._last_error()}")
            self._profile = profile
        alive = []  # device tensors must outlive the asynchronous execution
        for name in self._inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to(self._device, dtype=self._dtypes[name])
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                raise ConfigError(f"TensorRT refused {name} shape {list(tensor.shape)}: {self._last_error()}")
            self._context.set_tensor_address(name, self._address(tensor))
            alive.append(tensor)
        outputs = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))  # known once every input shape is set
            if any(d < 0 for d in shape):
                raise ArtifactError(f"{self.plan.name}: output {name} has no static shape {shape} for this feed")
            outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
            self._context.set_tensor_address(name, self._address(outputs[name]))
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"TensorRT failed to run {self.plan.name}: {self._last_error()}; rebuild it: {self._rebuild}")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def deactivate_impl(self) -> None:
        # Context before engine before runtime: each depends on the next.
        for attr in ("_context", "_engine", "_runtime", "_scratch"):
            if hasattr(self, attr):
                delattr(self, attr)
        self._profile = None


def trt_bench_options(device: str, threads: int) -> dict:
    """An engine runs on the GPU it was built for; it takes no options."""
    return {}
