"""Weights of a traced graph: re-pointed at the checkpoint, folded, optimized, streamed out.

After tracing, each parameter initializer wraps a skeleton tensor whose memory was never
written. `attach_weights` swaps every one of them for a lazy tensor that reads its
checkpoint entry when the data file is written; `fold_weight_transposes` turns the
`Transpose(W)` that torch emits for every Linear into a lazily transposed initializer, so
the file holds W^T as ONNX MatMul wants it and nothing is transposed at session load.
Nothing reads a weight before `save`, which writes one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint_weights import CheckpointWeights
from .errors import SourceError, StageError

# Tensors up to this many bytes stay inside model.onnx (shape constants, scalars); every
# weight goes to the one data file.
_INLINE_BYTES = 1024
_WRITERS = 2  # threads that read/transpose and write tensors; this machine has 2 cores


@dataclass(frozen=True)
class WeightSource:
    key: str  # checkpoint key
    perm: tuple[int, ...] | None = None  # transpose applied on the way out


def _lazy(weights: CheckpointWeights, source: WeightSource, dtype, shape, name: str):
    import onnx_ir as ir

    def materialize():
        array = weights.read(source.key, dtype.numpy())
        if source.perm is not None:
            array = np.ascontiguousarray(array.transpose(source.perm))
        return ir.Tensor(array, name=name)

    return ir.LazyTensor(materialize, dtype=dtype, shape=ir.Shape(shape), name=name)


def _checkpoint_key(names: list[str], weights: CheckpointWeights, base_prefix: str) -> str:
    """The checkpoint key of a parameter known by `names` (tied parameters have several);
    checkpoints saved from the base model lack the `model.`/`transformer.` prefix."""
    for name in names:
        stripped = name[len(base_prefix) + 1:] if name.startswith(base_prefix + ".") else None
        for candidate in (name, stripped, f"{base_prefix}.{name}"):
            if candidate and candidate in weights:
                return candidate
    raise SourceError(
        f"{weights.folder}: no tensor {names[0]!r} in the safetensors; the weights do not match config.json"
    )


def attach_weights(graph, model, weights: CheckpointWeights, *, prefix: str) -> dict[str, WeightSource]:
    """Point every parameter initializer at its checkpoint tensor; returns name → source.

    Initializers are renamed to their checkpoint key. Buffers the checkpoint lacks (rotary
    inv_freq) keep the values the skeleton computed.
    """
    import torch

    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    by_name = {n: names for names in aliases.values() for n in names}
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    sources: dict[str, WeightSource] = {}
    for value in list(graph.initializers.values()):
        fqn = value.name[len(prefix):] if value.name.startswith(prefix) else value.name
        if fqn in by_name:
            key = _checkpoint_key(by_name[fqn], weights, model.base_model_prefix)
        elif fqn in persistent and fqn in weights:
            key = fqn
        else:
            continue
        stored = weights.tensors[key]
        if tuple(stored.shape) != tuple(value.shape.numpy()):
            raise SourceError(f"{weights.folder}: {key} has shape {list(stored.shape)}, config.json implies {list(value.shape)}")
        if key in graph.initializers and graph.initializers[key] is not value:
            raise StageError(f"onnx: two initializers map to checkpoint tensor {key}")
        value.name = key
        value.const_value = _lazy(weights, WeightSource(key), value.dtype, stored.shape, key)
        sources[key] = WeightSource(key)
    _refuse_skeleton_data(graph, model, torch)
    return sources


def _refuse_skeleton_data(graph, model, torch) -> None:
    """The skeleton's weights are uninitialized memory: none may reach the file."""
    skeleton = {p.data_ptr() for p in model.parameters()}
    for value in graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.numel() and raw.data_ptr() in skeleton:
            raise StageError(f"onnx: initializer {value.name} has no checkpoint tensor behind it")


def fold_weight_transposes(graph, sources: dict[str, WeightSource], weights: CheckpointWeights) -> int:
    """Replace Transpose(W) by an initializer holding W^T, computed when written.

    Only where the Transpose is W's one use: a tied embedding (read by Gather too) keeps
    its Transpose rather than storing the matrix twice. Returns the number folded.
    """
    import onnx_ir as ir

    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[0]
        if weight is None or weight.name not in sources or len(weight.uses()) != 1:
            continue
        source = sources[weight.name]
        shape = tuple(weight.shape.numpy())
        perm = tuple(node.attributes.get_ints("perm", list(reversed(range(len(shape))))))
        name = f"{source.key}.transposed"
        out = ir.Value(name=name, shape=ir.Shape([shape[i] for i in perm]), type=weight.type)
        out.const_value = _lazy(weights, WeightSource(source.key, perm), weight.dtype, out.shape.numpy(), name)
        graph.register_initializer(out)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        sources[name] = WeightSource(source.key, perm)
        del sources[weight.name]
        folded += 1
    return folded


def optimize(model) -> None:
    """onnxscript's optimizer (what torch.onnx runs with optimize=True): constant folding,
    CSE, dead-code removal. Its folding reads only tensors below its size limit, so the
    large weights stay unread until `save`."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model)


def save(model, path: Path, data_name: str) -> None:
    """model.onnx + ONE external data file beside it (location relative), tensor by tensor."""
    import onnx_ir as ir

    try:
        ir.save(model, path, external_data=data_name, size_threshold_bytes=_INLINE_BYTES, max_workers=_WRITERS)
    except OSError as exc:
        from .errors import OutputError

        raise OutputError(f"cannot write {path}: {exc.strerror}; free disk space or pick another --out") from None
