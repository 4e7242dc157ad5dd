"""The Llama-family graph written op by op from config.json: no torch, no tracing.

Tracing a 1 B Llama costs ~6 s of torch.export + torch.onnx and ~2 s of imports before a
byte of weights is written, and its graph keeps torch's decomposition (per-layer K/V copies
for grouped-query attention, rsqrt as Reciprocal, computed reshape shapes). Llama, Mistral
and Qwen2 decoder layers are one well-known formula (transformers' modeling_llama.py), so
this module writes that formula directly in standard ONNX ops (opset ≥ 18, ai.onnx only:
TensorRT, transformers.js, optimum and onnxruntime-genai all open it). The graph computes
what transformers' eager attention computes, term for term:

- causal + padding mask: key t is visible from query s when t ≤ past + s and
  attention_mask[b, t] = 1; hidden keys add float32's lowest value before softmax, as HF does;
- rotary: angles position_ids × inv_freq, inv_freq = 1 / θ^(2i/d) rounded once to float32,
  rotate_half folded into a sign-flipped sin table shared by every layer; the queries' tables
  also carry the attention scale 1/√d, so no layer scales its scores;
- RMSNorm as x / sqrt(mean(x²) + eps) · w (the form ONNX Runtime fuses into one kernel);
- grouped-query attention by reshaping the queries of one KV head's group together, so
  K and V are read once per KV head instead of being copied to every query head; the mask is
  tiled to that block once per graph.

Anything this module does not know to be that formula (another rope type, a sliding window
that crops, other activations, a config it cannot read) returns a reason instead of a
graph, and the onnx stage traces the model with torch.onnx as before. Every graph, built or
traced, is checked by `exportline verify` against the float64 reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from exportline.exporters.core.shapes import KVLayout

BUILDER = "exportline Llama-family graph builder (no tracing)"
FAMILIES = ("llama", "mistral", "qwen2")
MIN_OPSET = 18  # Split(num_outputs) and ReduceMean's axes input


@dataclass(frozen=True)
class Plan:
    """What the graph needs from config.json."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    theta: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


def plan_for(config: dict[str, Any]) -> Plan | str:
    """The graph's plan, or why this config is not the formula this module writes."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one of {', '.join(FAMILIES)}"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r} (only silu is written by hand)"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return "rope parameters are not a mapping"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f"rope_type {rope_type!r} (only the default rotary embedding is written by hand)"
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        return "partial rotary embedding"
    if why := _window_crops(config, kind):
        return why
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        plan = Plan(
            layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads, kv_heads=kv_heads,
            head_dim=head_dim, intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            eps=float(config["rms_norm_eps"]), theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tied=bool(config.get("tie_word_embeddings", False)),
            **{flag: _has_bias(config, rule) for flag, rule in zip(("qkv_bias", "o_bias", "mlp_bias"), _BIASES[kind])},
        )
    except (KeyError, TypeError, ValueError) as exc:
        return f"config.json field {exc} missing or not a number"
    if min(plan.layers, plan.heads, plan.kv_heads, plan.head_dim, plan.hidden, plan.vocab) <= 0 or plan.heads % plan.kv_heads \
            or plan.head_dim % 2:
        return "head counts or sizes that transformers would refuse"
    return plan


# Which Linears carry a bias (q/k/v, o, mlp), as transformers' modeling files build them: a
# config key names the flag read, a bool is fixed. Mistral and Qwen2 ignore attention_bias and
# mlp_bias, which a config.json may still carry (save_pretrained keeps unknown keys).
_BIASES: dict[str, tuple[str | bool, str | bool, str | bool]] = {
    "llama": ("attention_bias", "attention_bias", "mlp_bias"),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
}


def _has_bias(config: dict[str, Any], rule: str | bool) -> bool:
    return bool(config.get(rule, False)) if isinstance(rule, str) else rule


def _window_crops(config: dict[str, Any], kind: str) -> str | None:
    """A sliding window shorter than the positions would crop the cache (the traced path
    refuses it with a message); a longer one, or one switched off, changes nothing."""
    window = config.get("sliding_window")
    if kind == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    limit = config.get("max_position_embeddings")
    if window is not None and (limit is None or int(window) < int(limit)):
        return f"sliding_window {window} < max_position_embeddings {limit}"
    if kind == "llama" and any(t != "full_attention" for t in config.get("layer_types") or []):
        return "layer_types other than full_attention"
    return None


def layout_of(config: dict[str, Any]) -> KVLayout:
    return KVLayout.from_config(SimpleNamespace(**config))


class _Weights:
    """Checkpoint tensors as graph initializers, named as the traced graph names them."""

    def __init__(self, weights, tape):
        self.weights, self.tape = weights, tape
        self.made: dict[str, Any] = {}  # initializer name → value (a tied embedding is read twice)

    def key(self, name: str, shape: tuple[int, ...]) -> str:
        from exportline.exporters.onnx.weights import checkpoint_key

        return checkpoint_key([name], self.weights, "model", shape=shape)

    def get(self, name: str, shape: tuple[int, ...], *, transposed: bool = False):
        import onnx_ir as ir

        from exportline.exporters.onnx.weights import WeightSource, lazy_weight

        key = self.key(name, shape)
        perm = (1, 0) if transposed else None
        out_name = f"{key}.transposed" if transposed else key
        if out_name in self.made:
            return self.made[out_name]
        out_shape = tuple(reversed(shape)) if transposed else shape
        tensor = lazy_weight(self.weights, WeightSource(key, perm), ir.DataType.FLOAT, shape=out_shape, name=out_name)
        self.made[out_name] = self.tape.initializer(tensor, name=out_name)
        return self.made[out_name]


def build(hf_dir: Path, weights, *, opset: int):
    """(onnx_ir model, KVLayout, facts) for the HF folder, or a string saying why not."""
    if opset < MIN_OPSET:
        return f"opset {opset} < {MIN_OPSET}"
    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json unreadable ({exc})"
    try:
        plan = plan_for(config)
    except (TypeError, ValueError, AttributeError) as exc:  # odd values: the traced path's config check explains them
        return f"config.json values this builder cannot read ({exc})"
    if isinstance(plan, str):
        return plan
    layout = layout_of(config)
    model = _Builder(plan, layout, weights, opset=opset).model()
    return model, layout, {"builder": BUILDER, "layers_traced": 0, "layers_written": plan.layers}


@dataclass(frozen=True)
class _Rotary:
    """Rotary tables for keys (cos, sin) and for queries (the same times the attention scale)."""

    cos: Any
    sin: Any
    q_cos: Any
    q_sin: Any


class _Builder:
    def __init__(self, plan: Plan, layout: KVLayout, weights, *, opset: int):
        import onnx_ir as ir
        from onnx_ir import tape

        self.ir, self.plan, self.layout, self.opset = ir, plan, layout, opset
        self.tape = tape.Tape()
        self.w = _Weights(weights, self.tape)
        self._consts: dict[tuple, Any] = {}

    # -- small helpers -------------------------------------------------------------------
    def op(self, op_type: str, *inputs, **attributes):
        return self.tape.op(op_type, list(inputs), attributes or None)

    def const(self, values, dtype=np.int64):
        """A small constant initializer, one per distinct value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self._consts[key] = self.tape.initializer(self.ir.tensor(array, name=name), name=name)
        return self._consts[key]

    def input(self, spec):
        """A graph input of `spec`'s type; name_io gives it its name and dims."""
        ir = self.ir
        return ir.Value(type=ir.TensorType(ir.DataType.FLOAT if spec.dtype == "float" else ir.DataType.INT64))

    def linear(self, x, name: str, shape: tuple[int, int], *, bias: bool):
        """x·Wᵀ (+ b) for the checkpoint's Linear `name` with weight [out, in] = `shape`."""
        y = self.op("MatMul", x, self.w.get(f"{name}.weight", shape, transposed=True))
        return self.op("Add", y, self.w.get(f"{name}.bias", shape[:1])) if bias else y

    def rms_norm(self, x, weight: str):
        p = self.plan
        mean = self.op("ReduceMean", self.op("Pow", x, self.const(2.0, np.float32)), self.const([-1]), keepdims=1)
        normalized = self.op("Div", x, self.op("Sqrt", self.op("Add", mean, self.const(p.eps, np.float32))))
        return self.op("Mul", self.w.get(weight, (p.hidden,)), normalized)

    # -- the graph -----------------------------------------------------------------------
    def model(self):
        from exportline.exporters.onnx.export import name_io

        ir, p = self.ir, self.plan
        inputs = [self.input(s) for s in self.layout.inputs()]
        ids, attention_mask, position_ids, past = inputs[0], inputs[1], inputs[2], inputs[3:]
        hidden = self.op("Gather", self.w.get("model.embed_tokens.weight", (p.vocab, p.hidden)), ids, axis=0)
        mask = self.attention_bias(ids, attention_mask, past[0])
        if p.heads > p.kv_heads:  # rows g·S + s of a KV head's query block see what query s sees
            mask = self.op("Tile", mask, self.const([1, 1, p.heads // p.kv_heads, 1]))
        rotary = self.rotary(position_ids)
        presents = []
        for i in range(p.layers):
            hidden, key, value = self.layer(i, hidden, mask=mask, rotary=rotary, past=past[2 * i:2 * i + 2])
            presents += [key, value]
        hidden = self.rms_norm(hidden, "model.norm.weight")
        if p.tied:  # lm_head is the embedding: read through a Transpose, not stored twice
            head = self.op("Transpose", self.w.get("model.embed_tokens.weight", (p.vocab, p.hidden)), perm=[1, 0])
        else:
            head = self.w.get("lm_head.weight", (p.vocab, p.hidden), transposed=True)
        logits = self.op("MatMul", hidden, head)
        outputs = [logits, *presents]
        for value in outputs:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        graph = ir.Graph(inputs, outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports={"": self.opset}, name="main_graph")
        name_io(graph, self.layout)  # shapes.py's names and dims, as on the traced path
        model = ir.Model(graph, ir_version=10, producer_name="exportline")
        import onnx_ir.passes.common as passes

        passes.NameFixPass()(model)
        return model

    def attention_bias(self, ids, attention_mask, past_key):
        """[batch, 1, sequence, past + sequence] float32: 0 where visible, lowest float32 elsewhere."""
        sequence = self.op("Shape", ids, start=1, end=2)
        past = self.op("Shape", past_key, start=2, end=3)
        total = self.op("Add", past, sequence)
        zero, one = self.const(0), self.const(1)
        keys = self.op("Range", zero, self.op("Squeeze", total), one)  # [T]
        queries = self.op("Unsqueeze", self.op("Range", self.op("Squeeze", past), self.op("Squeeze", total), one), self.const([1]))
        causal = self.op("LessOrEqual", keys, queries)  # [S, T]
        padding = self.op("Unsqueeze", self.op("Cast", attention_mask, to=self.ir.DataType.BOOL), self.const([1, 2]))
        visible = self.op("And", causal, padding)  # [B, 1, S, T]
        lowest = np.finfo(np.float32).min
        return self.op("Where", visible, self.const(0.0, np.float32), self.const(lowest, np.float32))

    def rotary(self, position_ids) -> "_Rotary":
        """cos and sign-flipped sin tables [batch, 1, sequence, head_dim], shared by every layer:
        x·cos + rotate_half(x)·sin = x·cos + swap_halves(x)·[-sin, sin]."""
        p = self.plan
        exponents = np.arange(0, p.head_dim, 2, dtype=np.int64).astype(np.float64) / p.head_dim
        inv_freq = (1.0 / (p.theta ** exponents)).astype(np.float32)
        positions = self.op("Unsqueeze", self.op("Cast", position_ids, to=self.ir.DataType.FLOAT), self.const([-1]))
        angles = self.op("Mul", positions, self.const(inv_freq, np.float32))  # [B, S, D/2]
        cos, sin = self.op("Cos", angles), self.op("Sin", angles)
        cos = self.op("Concat", cos, cos, axis=-1)
        sin = self.op("Concat", self.op("Neg", sin), sin, axis=-1)
        cos, sin = self.op("Unsqueeze", cos, self.const([1])), self.op("Unsqueeze", sin, self.const([1]))
        # The attention scale 1/√D applied to the queries through their own tables, once per
        # graph, instead of to every layer's [S, T] scores: (s·q)·k = s·(q·k) up to rounding.
        scale = self.const(p.head_dim ** -0.5, np.float32)
        return _Rotary(cos=cos, sin=sin, q_cos=self.op("Mul", cos, scale), q_sin=self.op("Mul", sin, scale))

    def rotate(self, x, cos, sin):
        first, second = self.tape.op_multi_out("Split", [x], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        swapped = self.op("Concat", second, first, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", swapped, sin))

    def heads(self, x, count: int):
        """[B, S, count·D] → [B, count, S, D]."""
        return self.op("Transpose", self.op("Reshape", x, self.const([0, 0, count, self.plan.head_dim])), perm=[0, 2, 1, 3])

    def layer(self, i: int, hidden, *, mask, rotary: _Rotary, past):
        p = self.plan
        prefix = f"model.layers.{i}"
        x = self.rms_norm(hidden, f"{prefix}.input_layernorm.weight")
        attn = f"{prefix}.self_attn"
        q = self.heads(self.linear(x, f"{attn}.q_proj", (p.heads * p.head_dim, p.hidden), bias=p.qkv_bias), p.heads)
        k = self.heads(self.linear(x, f"{attn}.k_proj", (p.kv_heads * p.head_dim, p.hidden), bias=p.qkv_bias), p.kv_heads)
        v = self.heads(self.linear(x, f"{attn}.v_proj", (p.kv_heads * p.head_dim, p.hidden), bias=p.qkv_bias), p.kv_heads)
        q, k = self.rotate(q, rotary.q_cos, rotary.q_sin), self.rotate(k, rotary.cos, rotary.sin)
        key = self.op("Concat", past[0], k, axis=-2)
        value = self.op("Concat", past[1], v, axis=-2)
        context = self.attention(q, key, value=value, mask=mask)
        out = self.linear(context, f"{attn}.o_proj", (p.hidden, p.heads * p.head_dim), bias=p.o_bias)
        hidden = self.op("Add", hidden, out)
        x = self.rms_norm(hidden, f"{prefix}.post_attention_layernorm.weight")
        mlp = f"{prefix}.mlp"
        gate = self.linear(x, f"{mlp}.gate_proj", (p.intermediate, p.hidden), bias=p.mlp_bias)
        up = self.linear(x, f"{mlp}.up_proj", (p.intermediate, p.hidden), bias=p.mlp_bias)
        act = self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)
        hidden = self.op("Add", hidden, self.linear(act, f"{mlp}.down_proj", (p.hidden, p.intermediate), bias=p.mlp_bias))
        return hidden, key, value

    def attention(self, q, key, *, value, mask):
        """softmax(q·kᵀ + mask)·v (q already scaled) with q [B, H, S, D], key/value [B, KVH, T, D]
        → [B, S, H·D]. With groups, a KV head's G query heads are one [G·S, D] block (a reshape,
        no copy of K or V) and `mask` is tiled to [B, 1, G·S, T] once per graph."""
        p = self.plan
        groups = p.heads // p.kv_heads
        if groups > 1:
            q = self.op("Reshape", q, self.const([0, p.kv_heads, -1, p.head_dim]))
        scores = self.op("Add", self.op("MatMul", q, self.op("Transpose", key, perm=[0, 1, 3, 2])), mask)
        context = self.op("MatMul", self.op("Softmax", scores, axis=-1), value)
        if groups > 1:
            context = self.op("Reshape", context, self.const([0, p.heads, -1, p.head_dim]))
        context = self.op("Transpose", context, perm=[0, 2, 1, 3])
        return self.op("Reshape", context, self.const([0, 0, p.heads * p.head_dim]))
