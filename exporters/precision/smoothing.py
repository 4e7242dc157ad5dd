"""SmoothQuant (Xiao et al. 2023) folded into the fp32 weights before int8 calibration.

Per-tensor int8 activations lose the small channels when a few channels carry outliers
(in Llama, the input of down_proj above all). SmoothQuant divides activation channel j by
s_j and multiplies input row j of the next weight by s_j — the product is unchanged — with
s_j = max|X_j|^α / max|W_j|^(1-α), moving part of the range into the weights, which are
quantized per output channel anyway. The division is folded into the op that produces X,
so the graph gains no node:
- X = norm_weight ⊙ normalized (decomposed RMSNorm read by q/k/v or gate/up): norm_weight /= s;
- X = LayerNormalization(x, scale, bias) (fused norms, e.g. GPT-2): scale /= s, bias /= s;
- X = silu(gate) ⊙ up (the input of down_proj): up_proj's weight columns /= s (a column
  scale, to which up_proj's own per-output-channel quantization is invariant).
A group is smoothed only when every reader of X is a MatMul/Gemm being quantized; anything
else would see the scaled X. This is the "int8_sq" recipe TensorRT's ModelOpt uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exportline.exporters.onnx.graph_index import GraphIndex

# Migration strength. Measured on the trained tiny Llama of tests/quant_models.py (int8 vs
# fp32 top-1 on held-out text): 94.9 % at 0.3, 95.9 % at 0.5, 96.6 % at 0.65, 96.4 % at 0.8,
# with the perplexity ratio falling from 1.0036 to 1.0004; the paper uses 0.5-0.8.
ALPHA = 0.8


_FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


@dataclass
class SmoothGroup:
    activation: str  # the tensor X the MatMuls read
    source: str  # initializer divided by s: a norm weight [C], or up_proj's weight [H, C]
    axis: int  # the axis of `source` indexed by channel (0 for a vector, 1 for columns)
    node: str  # the node producing `activation` (reads `source`, or up_proj's output)
    weights: list[tuple[str, int]] = field(default_factory=list)  # (B initializer, its input-channel axis)
    bias: str | None = None  # a fused norm's bias, divided by s too


def input_axis(node) -> int:
    """The axis of B indexed by input channel: 0 for MatMul [K, N], 1 for Gemm with transB."""
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return 1 if trans_b else 0


def find_groups(model, quantized: set[str]) -> list[SmoothGroup]:
    index = GraphIndex(model.graph)
    groups = []
    for act in dict.fromkeys(n.input[0] for n in model.graph.node if n.name in quantized):
        readers = index.consumers.get(act, [])
        if not readers or any(r.name not in quantized or r.input[0] != act for r in readers):
            continue
        group = _source(index, act)
        if group is None or not group.node:  # an unnamed node could not be found again
            continue
        group.weights = [(r.input[1], input_axis(r)) for r in readers]
        channels = {index.initializers[w].dims[axis] for w, axis in group.weights}
        if channels == {index.initializers[group.source].dims[group.axis]}:  # same C on both sides
            groups.append(group)
    return groups


def _source(index: GraphIndex, act: str) -> SmoothGroup | None:
    node = index.producer.get(act)
    # Gemm reads a 2-D view [batch·sequence, C] of the norm output: channels are unchanged
    while node is not None and node.op_type == "Reshape" and len(index.consumers[node.input[0]]) == 1:
        node = index.producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type in _FUSED_NORMS and node.input[1] in index.initializers:
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in index.initializers else None
        return SmoothGroup(act, node.input[1], 0, node.name, bias=bias)
    if node.op_type != "Mul":
        return None
    for name in node.input:
        init = index.initializers.get(name)
        if init is not None and len(init.dims) == 1:
            return SmoothGroup(act, name, 0, node.name)  # norm weight (apply() unshares it)
        up = index.producer.get(name)
        if (init is None and up is not None and up.op_type == "MatMul" and up.input[1] in index.initializers
                and len(index.consumers[name]) == 1 and len(index.consumers[up.input[1]]) == 1):
            return SmoothGroup(act, up.input[1], 1, node.name)  # up_proj, read by the gating Mul only
    return None


class InMemory:
    """Initializers of a model loaded with its weights: read and rescaled in place."""

    def __init__(self, model):
        self.model = model

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._init(name)).astype(np.float32)

    def scale(self, name: str, value: np.ndarray, factor: np.ndarray, *, divide: bool) -> None:
        _replace(self._init(name), value / factor if divide else value * factor)

    def _init(self, name: str):
        return next(t for t in self.model.graph.initializer if t.name == name)


class Streamed:
    """Initializers still in the source model's data file (a graph loaded without weights):
    read one at a time, and rescaled when the smoothed graph is written (`converts`, for
    external_data.save_streamed): the model is never in memory."""

    def __init__(self, model, source):
        self.model, self.source, self.converts = model, source, {}

    def _where(self, name: str):
        from exportline.exporters.onnx.external_data import slice_of

        t = next(t for t in self.model.graph.initializer if t.name == name)
        return t, slice_of(t, self.source)

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        from exportline.exporters.onnx.external_data import read_external

        t, where = self._where(name)
        if where is None:
            return numpy_helper.to_array(t).astype(np.float32)
        value = read_external(where, "float32", tuple(t.dims)).astype(np.float32)
        pending = self.converts.get(name)  # up_proj is scaled twice: as a source and as a weight
        return pending.function(value) if pending else value

    def scale(self, name: str, value: np.ndarray, factor: np.ndarray, *, divide: bool) -> None:
        from exportline.exporters.onnx.external_data import Convert

        if self._where(name)[1] is None:  # kept inline in the graph: small, rescaled now
            return InMemory(self.model).scale(name, value, factor, divide=divide)
        # The same float32 arithmetic as InMemory, in the same order, when written
        before = self.converts.get(name)

        def scaled(w: np.ndarray) -> np.ndarray:
            w = before.function(w) if before else w
            return (w / factor if divide else w * factor).astype(np.float32)

        self.converts[name] = Convert("float32", scaled, shape=value.shape)


def apply(model, groups: list[SmoothGroup], absmax: dict[str, np.ndarray], *, alpha: float = ALPHA, weights=None):
    """Scale the initializers of `model` (weights loaded, or `weights=Streamed(...)`) in place;
    returns the facts for the record and s per smoothed activation (the smoothed X is X / s)."""
    index = GraphIndex(model.graph)
    access = weights or InMemory(model)
    largest, scales = 1.0, {}
    for g in groups:
        if g.axis == 0:  # norm parameters other norms share (exporters dedupe equal weights)
            g.source = _private(model, index, g.node, init=g.source)
            g.bias = _private(model, index, g.node, init=g.bias) if g.bias else None
        weights_ = [(access.read(w), axis) for w, axis in g.weights]
        w_max = np.max(np.stack([np.abs(w).max(axis=1 - axis) for w, axis in weights_]), axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(absmax[g.activation], alpha) / np.power(w_max, 1.0 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0).clip(1e-5, 1e5).astype(np.float32)
        largest = max(largest, float(s.max() / s.min()))
        scales[g.activation] = s
        for name in (g.source, g.bias):
            if name:
                value = access.read(name)
                access.scale(name, value, s if value.ndim == 1 else s[None, :], divide=True)
        for (name, _), (w, axis) in zip(g.weights, weights_):
            access.scale(name, w, s[:, None] if axis == 0 else s[None, :], divide=False)
    facts = {"method": "SmoothQuant", "alpha": alpha, "groups": len(groups),
             "norm_folds": sum(g.axis == 0 for g in groups), "mlp_folds": sum(g.axis == 1 for g in groups),
             "max_scale_spread": round(largest, 2)}
    return facts, scales


def _private(model, index: GraphIndex, node_name: str, *, init: str) -> str:
    """`init` as read by `node_name` only: a copy when other nodes read it too."""
    readers = index.consumers[init]
    if len(readers) <= 1:
        return init
    node = next(n for n in readers if n.name == node_name)
    private = f"{init}.smooth.{node_name}"
    copy = model.graph.initializer.add()
    copy.CopyFrom(index.initializers[init])
    copy.name = private
    node.input[list(node.input).index(init)] = private
    readers.remove(node)
    return private


def _replace(tensor, value: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
