"""SmoothQuant (Xiao et al. 2023) folded into the fp32 weights before int8 calibration.

Per-tensor int8 activations lose the small channels when a few channels carry outliers
(in Llama, the input of down_proj above all). SmoothQuant divides activation channel j by
s_j and multiplies row j of the next weight by s_j — the product is unchanged — with
s_j = max|X_j|^α / max|W_j|^(1-α), moving part of the range into the weights, which are
quantized per output channel anyway. The division is folded into the op that produces X,
so the graph gains no node:
- X = norm_weight ⊙ normalized (RMSNorm/LayerNorm output read by q/k/v or gate/up):
  norm_weight /= s;
- X = silu(gate) ⊙ up (the input of down_proj): up_proj's weight columns /= s (a column
  scale, to which up_proj's own per-output-channel quantization is invariant).
A group is smoothed only when every reader of X is a MatMul being quantized; anything
else would see the scaled X. This is the "int8_sq" recipe TensorRT's ModelOpt uses.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .graph_walk import GraphIndex

# Migration strength. Measured on the trained tiny Llama of tests/quant_models.py (int8 vs
# fp32 top-1 on held-out text): 94.9 % at 0.3, 95.9 % at 0.5, 96.6 % at 0.65, 96.4 % at 0.8,
# with the perplexity ratio falling from 1.0036 to 1.0004; the paper uses 0.5-0.8.
ALPHA = 0.8


@dataclass
class SmoothGroup:
    activation: str  # the tensor X the MatMuls read
    source: str  # initializer divided by s: a norm weight [C], or up_proj's weight [H, C]
    axis: int  # the axis of `source` indexed by channel (0 for a vector, 1 for columns)
    mul: str  # the Mul node producing `activation`
    weights: list[str] = field(default_factory=list)  # MatMul B initializers [C, N], rows × s


def find_groups(model, quantized: set[str]) -> list[SmoothGroup]:
    index = GraphIndex(model.graph)
    groups = []
    for act in dict.fromkeys(n.input[0] for n in model.graph.node if n.name in quantized):
        readers = index.consumers.get(act, [])
        if not readers or any(r.name not in quantized or r.input[0] != act for r in readers):
            continue
        found = _source(index, act)
        if found is not None and found[2]:  # an unnamed Mul could not be found again
            groups.append(SmoothGroup(act, *found, weights=[r.input[1] for r in readers]))
    return groups


def _source(index: GraphIndex, act: str) -> tuple[str, int, str] | None:
    mul = index.producer.get(act)
    if mul is None or mul.op_type != "Mul":
        return None
    for name in mul.input:
        init = index.initializers.get(name)
        if init is not None and len(init.dims) == 1:
            return name, 0, mul.name  # norm weight (apply() unshares it if other norms read it)
        up = index.producer.get(name)
        if (init is None and up is not None and up.op_type == "MatMul" and up.input[1] in index.initializers
                and len(index.consumers[name]) == 1 and len(index.consumers[up.input[1]]) == 1):
            return up.input[1], 1, mul.name  # up_proj, read by the gating Mul only
    return None


def channel_absmax(model_path: Path, graph_only, groups: list[SmoothGroup], feeds, scratch: Path) -> dict[str, np.ndarray]:
    """max |X_j| per channel of every group's activation over `feeds`: one run of the fp32
    graph (`graph_only`: loaded without weights) with ReduceMax(|X|) outputs added; the
    weights are hard-linked into `scratch` (same filesystem), not copied."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    index = GraphIndex(graph_only.graph)
    aug = onnx.ModelProto()
    aug.CopyFrom(graph_only)
    outputs, stats = [], {}
    for g in groups:
        channels = index.initializers[g.weights[0]].dims[0]
        stats[g.activation] = np.zeros(channels, np.float32)
        shape, axes = (f"{g.activation}__smooth_{s}" for s in ("shape", "axes"))
        aug.graph.initializer.extend([numpy_helper.from_array(np.array([-1, channels], np.int64), shape),
                                      numpy_helper.from_array(np.array([0], np.int64), axes)])
        flat, absval, out = (f"{g.activation}__smooth_{s}" for s in ("flat", "abs", "max"))
        aug.graph.node.extend([
            helper.make_node("Reshape", [g.activation, shape], [flat]),
            helper.make_node("Abs", [flat], [absval]),
            helper.make_node("ReduceMax", [absval, axes], [out], keepdims=0),
        ])
        aug.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [channels]))
        outputs.append(out)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / model_path.name
    onnx.save(aug, str(path))
    for data in {e.value for t in graph_only.graph.initializer for e in t.external_data if e.key == "location"}:
        _link(model_path.parent / data, scratch / data)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for feed in feeds:
        for g, value in zip(groups, session.run(outputs, {k: v for k, v in feed.items() if k in names})):
            np.maximum(stats[g.activation], value, out=stats[g.activation])
    del session
    shutil.rmtree(scratch, ignore_errors=True)
    return stats


def _link(src: Path, dest: Path) -> None:
    """onnxruntime refuses external data outside the model's folder, symlinks included;
    a hard link costs nothing and a copy is the fallback across filesystems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def apply(model, groups: list[SmoothGroup], absmax: dict[str, np.ndarray], alpha: float = ALPHA) -> dict:
    """Scale the initializers of `model` (weights loaded) in place; returns facts for the record."""
    from onnx import numpy_helper

    index = GraphIndex(model.graph)
    inits = index.initializers
    largest = 1.0
    for g in groups:
        if g.axis == 0 and len(index.consumers[g.source]) > 1:  # a norm weight other norms share
            g.source = _unshare(model, index, g)
            inits = {t.name: t for t in model.graph.initializer}
        weights = [numpy_helper.to_array(inits[w]).astype(np.float32) for w in g.weights]
        w_max = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
        a_max = absmax[g.activation]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(a_max, alpha) / np.power(w_max, 1.0 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0).clip(1e-5, 1e5).astype(np.float32)
        largest = max(largest, float(s.max() / s.min()))
        source = numpy_helper.to_array(inits[g.source]).astype(np.float32)
        source = source / (s if g.axis == 0 else s[None, :])
        _replace(inits[g.source], source)
        for name, w in zip(g.weights, weights):
            _replace(inits[name], w * s[:, None])
    return {"method": "SmoothQuant", "alpha": alpha, "groups": len(groups),
            "norm_folds": sum(g.axis == 0 for g in groups), "mlp_folds": sum(g.axis == 1 for g in groups),
            "max_scale_spread": round(largest, 2)}


def _unshare(model, index: GraphIndex, g: SmoothGroup) -> str:
    """Give the norm Mul its own copy of the weight (exporters may dedupe equal weights)."""
    mul = next(n for n in model.graph.node if n.name == g.mul)
    private = f"{g.source}.smooth.{g.mul}"
    copy = model.graph.initializer.add()
    copy.CopyFrom(index.initializers[g.source])
    copy.name = private
    mul.input[list(mul.input).index(g.source)] = private
    index.consumers[g.source].remove(next(n for n in index.consumers[g.source] if n.name == g.mul))
    return private


def _replace(tensor, value: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
