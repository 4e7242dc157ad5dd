"""An HF model whose weights stay on disk until the module that owns them runs.

The model is built with its parameters on the meta device (buffers such as the rotary
`inv_freq` are built for real, as transformers computes them). Every module that owns
parameters gets a forward pre-hook that reads them from the bundle's safetensors into fresh
buffers, in the dtype the model was built in, and a forward hook that puts the meta
tensors back. So at most one module's weights are held at once (the embedding or lm_head
is the largest), whatever the depth: a 1B float64 reference needs ~0.5 GB of weights, not
8 GB. The price is that every forward reads every weight again (page cache, usually).

A weight is used where it lies: each tensor gets a mapping of just its own bytes, released
when the module is done with it, so mapped pages count in RSS only while their module runs
(a mapping of the whole file kept open would keep every page touched so far resident). A
float64 model converts from that mapping into a reused buffer. Reading into fresh buffers
instead made every 1B forward copy 4 GB (and fault in 4 GB of new pages); the mapping is
what transformers uses too, so a float32 streamed model is bit-identical to from_pretrained's
(CPU BLAS rounding depends on the operands' alignment, which a mapping preserves). Where
each tensor lies comes from the onnx stage's safetensors reader (exporters/sources/
weights_reader.py), which checks every header against the file's size up front. A tied lm_head reads the embedding's tensor; persistent buffers stored in the files are
loaded once, as from_pretrained does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.sources.weights_reader import CheckpointWeights, StoredTensor

_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(stored: StoredTensor):
    import torch

    return getattr(torch, _TORCH_DTYPES[stored.dtype])


def read_tensor(files: CheckpointWeights, key: str):
    """One tensor as stored, copied into a fresh torch tensor (pread, no mapping)."""
    import torch

    return torch.from_numpy(files.read_stored(key)).view(_torch_dtype(files.tensors[key]))


def mapped_tensor(files: CheckpointWeights, key: str):
    """One tensor's own bytes mapped read-only; freeing the tensor unmaps them."""
    import mmap
    import warnings

    import torch

    e = files.tensors[key]
    dtype = _torch_dtype(e)
    if not e.nbytes:
        return torch.empty(e.shape, dtype=dtype)
    start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(e.file, "rb") as f:
            # MAP_POPULATE: the pages (in the page cache, usually) are mapped in one call rather
            # than one fault per 64 KiB (1b float32 decode step: 0.57 s → 0.47 s, measured)
            region = mmap.mmap(f.fileno(), e.offset + e.nbytes - start, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), offset=start)
    except (OSError, ValueError):
        raise ArtifactError(f"{e.file} ends inside tensor {key}; re-run the hf stage with --force") from None
    with warnings.catch_warnings():  # a read-only buffer: nothing writes to weights in inference
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(region, dtype=dtype, count=e.nbytes // dtype.itemsize, offset=e.offset - start)
    return flat.view(e.shape)  # the tensor holds `region`; freeing it unmaps


@contextlib.contextmanager
def _meta_parameters():
    """Parameters are created on the meta device, buffers for real (what accelerate's
    init_empty_weights(include_buffers=False) does; accelerate is not a dependency)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def streamed_model(root: Path, dtype: str, *, device: str = "cpu", trust_remote_code: bool = False):
    """The bundle's HF causal LM in `dtype`, its weights read per module as it runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exportline.exporters.sources.hf_writer import quiet_transformers

    root = Path(root)
    files = CheckpointWeights(root)
    with quiet_transformers(), _meta_parameters():
        config = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied lm_head shares the embedding's (meta) parameter: one file key for both
    _load_buffers(model, files, device)
    stream_parameters(model, files, device)
    return model.eval()


def _load_buffers(model, files: CheckpointWeights, device: str) -> None:
    """Buffers onto `device` (module.to() would refuse the meta parameters), those stored in
    the files (persistent ones) loaded from them."""
    for name, buf in list(model.named_buffers()):
        key = files.key_for([name], getattr(model, "base_model_prefix", ""))
        owner, _, attr = name.rpartition(".")
        value = read_tensor(files, key) if key is not None else buf
        model.get_submodule(owner)._buffers[attr] = value.to(device=device, dtype=buf.dtype)


def stream_parameters(model, files: CheckpointWeights, device: str) -> StreamStats:
    """Hook every module that owns parameters; returns the counts of bytes held."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    stats = StreamStats()
    for prefix, module in model.named_modules():
        own = {n: p for n, p in module._parameters.items() if p is not None}
        if not own:
            continue
        keys = {}
        for n, p in own.items():
            full = f"{prefix}.{n}" if prefix else n
            key = files.key_for([full, *aliases.get(id(p), [])], getattr(model, "base_model_prefix", ""))
            if key is None:
                raise ArtifactError(f"{files.folder} has no tensor for {full}; re-run the hf stage with --force")
            if tuple(files.tensors[key].shape) != tuple(p.shape):
                raise ArtifactError(f"tensor {key} has shape {list(files.tensors[key].shape)}, the model wants "
                                    f"{list(p.shape)}; re-run the hf stage with --force")
            keys[n] = key
        _hook(module, keys, own, files=files, device=device, stats=stats)
    model.streamed_stats = stats
    return stats


class StreamStats:
    """Bytes of parameters the hooks hold now and at most (the streaming property is
    asserted on counts, not timing), bytes read in all, and the pool's spare buffers."""

    def __init__(self):
        self.now = self.peak = self.read = 0
        self.pool: dict[tuple, Any] = {}

    def buffer(self, dtype, shape, device: str = "cpu"):
        """A spare buffer of this kind, else a new one: converted weights (float64, or on a
        GPU) reuse their buffers, or a 1B float64 forward would allocate 8 GB afresh for the
        kernel to fault in and zero. One spare per (dtype, shape, device): a layer's worth
        plus the embedding's, whatever the depth."""
        import torch

        spare = self.pool.pop((dtype, tuple(shape), device), None)
        return spare if spare is not None else torch.empty(shape, dtype=dtype, device=device)

    def spare(self, t) -> None:
        self.pool[(t.dtype, tuple(t.shape), str(t.device))] = t

    @property
    def pooled(self) -> int:
        return sum(t.nbytes for t in self.pool.values())


def _hook(module, keys: dict[str, str], meta: dict[str, Any], *, files: CheckpointWeights, device: str,
          stats: StreamStats) -> None:
    import torch

    converted: set[str] = set()

    def load(mod, args):
        for n, key in keys.items():
            t = mapped_tensor(files, key)
            stats.read += t.nbytes
            if t.dtype != meta[n].dtype or device != "cpu":  # float32 on disk, float64 model: convert
                t = stats.buffer(meta[n].dtype, t.shape, device).copy_(t)  # as .to(dtype); float32 → float64 is exact
                converted.add(n)
            mod._parameters[n] = torch.nn.Parameter(t, requires_grad=False)
            stats.now += t.nbytes
        stats.peak = max(stats.peak, stats.now)

    def drop(mod, args, output):
        for n, p in meta.items():
            t = mod._parameters[n]
            stats.now -= t.nbytes
            if n in converted:
                stats.spare(t.data)
            mod._parameters[n] = p  # a mapped tensor is freed here, and its mapping with it
        converted.clear()

    module.register_forward_pre_hook(load)
    module.register_forward_hook(drop)
