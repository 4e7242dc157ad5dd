"""Weights of a traced graph: re-pointed at the checkpoint, folded, optimized, streamed out.

After tracing, each parameter initializer wraps a skeleton tensor whose memory was never
written. `attach_weights` swaps every one of them for a lazy tensor that reads its
checkpoint entry when the data file is written; `fold_weight_transposes` turns the
`Transpose(W)` that torch emits for every Linear into a lazily transposed initializer, so
the file holds W^T as ONNX MatMul wants it and nothing is transposed at session load.
No large weight is read before `save`, which writes one tensor at a time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exportline.exporters.core.errors import SourceError, StageError
from exportline.exporters.onnx.chunked import chunked_tensor
from exportline.exporters.sources.weights_reader import CheckpointWeights

# Tensors up to this many bytes stay inside model.onnx (shape constants, scalars); every
# weight goes to the one data file.
_INLINE_BYTES = 1024
# Threads that read/transpose and write tensors, so reading one overlaps writing another;
# each holds a read buffer the size of the largest tensor and a transpose block.
_WRITERS = 2
# A transposed weight is written in blocks of output rows of about this size.
_TRANSPOSE_BYTES = 32 << 20


@dataclass(frozen=True)
class WeightSource:
    key: str  # checkpoint key
    perm: tuple[int, ...] | None = None  # transpose applied on the way out


class _Scratch(threading.local):
    """Per writer thread: one read buffer (grown to the largest tensor) and one transpose
    block, reused instead of fresh allocations (and their page faults) per tensor."""

    def take(self, slot: str, nbytes: int) -> np.ndarray:
        buf = getattr(self, slot, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            setattr(self, slot, buf)
        return buf[:nbytes]


_SCRATCH = _Scratch()


class _Building:
    """While the graph is built, checkpoint weights are opaque: a pass that asks one for its
    value (constant folding, a rewrite rule testing `x + 0`) is told it is not available,
    as for external data not on disk, and leaves it alone. So the graph's structure never
    depends on weight values — a zero bias at random init must not vanish from a graph the
    graph cache reuses for trained checkpoints (onnx/graph_cache.py)."""

    active = False

    @classmethod
    @contextlib.contextmanager
    def opaque(cls):
        logger = logging.getLogger("onnxscript.optimizer._constant_folding")
        quiet = _DropUnavailable()
        cls.active = True
        logger.addFilter(quiet)
        try:
            yield
        finally:
            cls.active = False
            logger.removeFilter(quiet)


class _DropUnavailable(logging.Filter):
    """The folder warns once per weight it may not read, and once per node it then cannot
    evaluate (Transpose of a tied embedding): that is the point, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("External data for value", "Evaluation failed"))


opaque_weights = _Building.opaque


def lazy_weight(weights: CheckpointWeights, source: WeightSource, dtype, *, shape, name: str):
    """An initializer's data: `source` read (and transposed) only when it is written."""
    import onnx_ir as ir

    def chunks():
        # The writer writes each chunk at once, so the per-thread scratch buffers are safe
        # here; materialize() (the optimizer on small tensors) gets fresh arrays.
        stored = weights.tensors[source.key]
        array = weights.read(source.key, dtype.numpy(), into=_SCRATCH.take("read", stored.nbytes))
        if source.perm is None:
            yield array
            return
        # Transposed a block of output rows at a time: the scratch is _TRANSPOSE_BYTES, not a
        # second copy of the largest weight (lm_head: 262 MB per writer thread on 1b).
        view = array.transpose(source.perm)
        rows = max(1, _TRANSPOSE_BYTES // max(view[0].size * array.itemsize, 1))
        for begin in range(0, view.shape[0], rows):
            block = view[begin:begin + rows]
            out = _SCRATCH.take("transposed", block.size * array.itemsize).view(array.dtype).reshape(block.shape)
            transpose_into(out, block)
            yield out

    def materialize():
        if _Building.active:
            raise FileNotFoundError(errno.ENOENT, "checkpoint weights are not read while the graph is built", name)
        array = weights.read(source.key, dtype.numpy())
        if source.perm is not None:
            view = array.transpose(source.perm)
            array = transpose_into(np.empty(view.shape, view.dtype), view)
        return ir.Tensor(array, name=name)

    return chunked_tensor(chunks, dtype=dtype, shape=ir.Shape(shape), name=name, materialize=materialize,
                          origin=(weights, source))


# Columns per tile of a 2-D transposed copy: a tile's source rows stay in cache while its
# columns are gathered. On the 1b weights (one core) numpy copies a transposed view
# row by row at 0.5-0.6 GB/s, torch's copy_ at 0.53, 64-column tiles at 2.0-3.6 GB/s.
_TILE = 64


def transpose_into(out: np.ndarray, view: np.ndarray) -> np.ndarray:
    """Copy the (transposed, strided) `view` into the contiguous `out`, tile by tile for 2-D.
    numpy only: the warm onnx stage (graph cache hit) never imports torch."""
    if view.ndim != 2:
        np.copyto(out, view)
        return out
    for begin in range(0, view.shape[1], _TILE):
        np.copyto(out[:, begin:begin + _TILE], view[:, begin:begin + _TILE])
    return out


def checkpoint_key(names: list[str], weights: CheckpointWeights, base_prefix: str, *,
                   shape: tuple[int, ...] | None = None) -> str:
    """The stored key of a parameter known by `names`, which must be `shape` when given; a
    one-line SourceError when the checkpoint lacks it or holds another shape."""
    key = weights.key_for(names, base_prefix)
    if key is None:
        raise SourceError(
            f"{weights.folder}: no tensor {names[0]!r} in the safetensors; the weights do not match config.json"
        )
    if shape is not None and tuple(weights.tensors[key].shape) != tuple(shape):
        raise SourceError(f"{weights.folder}: {key} has shape {list(weights.tensors[key].shape)}, config.json implies {list(shape)}")
    return key


def _aliases(model) -> dict[str, list[str]]:
    """Parameter name → every name of that parameter (tied weights have several)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() for n in names}


def check_checkpoint_covers(model, weights: CheckpointWeights) -> None:
    """Every parameter has a checkpoint tensor of its shape: checked before tracing, so a
    mismatched checkpoint fails in a second, not after the trace."""
    aliases = _aliases(model)
    for name, p in model.named_parameters():
        checkpoint_key(aliases[name], weights, model.base_model_prefix, shape=tuple(p.shape))


def attach_weights(graph, model, weights: CheckpointWeights, *, prefix: str) -> dict[str, WeightSource]:
    """Point every parameter initializer at its checkpoint tensor; returns name → source.

    Initializers are renamed to their checkpoint key. Buffers the checkpoint lacks (rotary
    inv_freq) keep the values the skeleton computed.
    """
    import torch

    by_name = _aliases(model)
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    sources: dict[str, WeightSource] = {}
    for value in list(graph.initializers.values()):
        fqn = value.name[len(prefix):] if value.name.startswith(prefix) else value.name
        if fqn in by_name:
            key = checkpoint_key(by_name[fqn], weights, model.base_model_prefix)
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
        value.const_value = lazy_weight(weights, WeightSource(key), value.dtype, shape=stored.shape, name=key)
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
        out.const_value = lazy_weight(weights, WeightSource(source.key, perm), weight.dtype, shape=out.shape.numpy(), name=name)
        graph.register_initializer(out)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        sources[name] = WeightSource(source.key, perm)
        del sources[weight.name]
        folded += 1
    return folded


def simplify(model) -> None:
    """The local half of onnxscript's optimizer (what torch.onnx runs with optimize=True):
    constant folding and its rewrite rules, twice. Checkpoint weights are opaque meanwhile
    (`opaque_weights`), so no weight is read until `save`."""
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter import rewrite

    rules = _structural_rules()
    passes.InlinePass()(model)
    for _ in range(2):
        fold_constants_ir(model, onnx_shape_inference=True)
        rewrite(model, pattern_rewrite_rules=rules)
        passes.RemoveUnusedNodesPass()(model)


def _structural_rules() -> list:
    """onnxscript's default rewrite rules less those that decide on a weight's values (drop an
    all-zero bias, fold a batch norm into a conv): with opaque weights they cannot run, and
    their result would hold for one checkpoint only. onnxscript offers the default list only
    privately; the rules taken out are public names, so a renamed rule fails loudly here."""
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
        remove_optional_bias_from_conv_rule,
        remove_optional_bias_from_conv_transpose_rule,
        remove_optional_bias_from_gemm_rule,
        remove_optional_bias_from_qlinear_conv_rule,
    )

    by_value = {id(r) for r in (
        fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule,
        remove_optional_bias_from_conv_rule, remove_optional_bias_from_conv_transpose_rule,
        remove_optional_bias_from_gemm_rule, remove_optional_bias_from_qlinear_conv_rule)}
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) not in by_value]


def finalize(model) -> None:
    """The graph-wide half of the optimizer, run once every layer is in the graph: constants
    become initializers, equal small ones merge, common subexpressions merge, names fixed.

    Merging equal initializers is graph-wide on purpose and comes after layer copying:
    before it, two layers' equal norm weights would look like one shared tensor."""
    import onnx_ir.passes.common as passes

    for step in (
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        _merge_constants,
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.OutputFixPass(),
        passes.NameFixPass(),
    ):
        step(model)


def _merge_constants(model) -> None:
    """Equal small initializers merge, except checkpoint weights: whether two weights are
    equal is a fact of one checkpoint (random-init norms are all ones), not of the
    architecture, and the graph must not depend on weight values: the graph cache reuses it
    for every checkpoint of the config (onnx/graph_cache.py)."""
    import onnx_ir.passes.common as passes

    hidden = []  # per graph: (initializer order, checkpoint weights taken out)
    for graph in model.graphs():
        weights = {n: v for n, v in graph.initializers.items() if getattr(v.const_value, "origin", None) is not None}
        hidden.append((graph, list(graph.initializers), weights))
        for name in weights:
            graph.initializers.pop(name)
    passes.DeduplicateInitializersPass()(model)
    for graph, order, weights in hidden:
        kept = dict(graph.initializers)
        graph.initializers.clear()
        for name in order:  # in the original order: it is the data file's layout
            if (value := weights.get(name) or kept.get(name)) is not None:
                graph.register_initializer(value)


def save(model, path: Path, data_name: str) -> None:
    """model.onnx + ONE external data file beside it (location relative), tensor by tensor;
    the data file's sha256 is computed while it is written and handed to the bundle's digest
    memo (onnx/write_digest.py), so the manifest does not read it a second time."""
    import onnx_ir as ir

    from exportline.exporters.core.bundle import remember_digest
    from exportline.exporters.onnx import write_digest

    data = Path(path).parent / data_name
    restore = _chunk_external(model)
    hasher = write_digest.start(data)
    try:
        ir.save(model, path, external_data=data_name, size_threshold_bytes=_INLINE_BYTES, max_workers=_WRITERS)
    except OSError as exc:
        from exportline.exporters.core.errors import OutputError

        raise OutputError(f"cannot write {path}: {exc.strerror}; free disk space or pick another --out") from None
    finally:
        write_digest.stop(data)
        digest = hasher.finish()
        restore()
    if digest is not None:
        remember_digest(data, digest)


def _chunk_external(model):
    """Every tensor bound for the data file as a ChunkedTensor, whose writes the hasher sees
    (a constant table folded in memory would otherwise be a gap it waits on); returns the
    function that puts the original tensors back."""
    import onnx_ir as ir

    from exportline.exporters.onnx.chunked import _chunked_class

    swapped = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= _INLINE_BYTES or isinstance(tensor, _chunked_class()):
                continue
            if isinstance(tensor, ir.ExternalTensor):
                continue  # onnx_ir copies it; the hasher reads those bytes in order at the end
            swapped.append((value, tensor))
            value.const_value = chunked_tensor(lambda t=tensor: [t.tobytes()], dtype=tensor.dtype,
                                               shape=tensor.shape, name=tensor.name)

    def restore():
        for value, tensor in swapped:
            value.const_value = tensor

    return restore
