"""Trace a few decoder layers, then repeat the last one in the ONNX graph, proven exact.

Tracing cost grows with depth (a 20-layer Llama spends ~30 CPU-s in torch.export and its
decompositions) though every decoder layer runs the same Python code. So the model is
traced with TRACE_LAYERS layers, and layers TRACE_LAYERS..N-1 are copies of the last traced
layer's nodes with its weights, past inputs and present outputs re-indexed.

The copy is checked, not assumed: traced layers 1, 2 and 3 must be identical node for node
(op, attributes, constants) up to that re-indexing, with layer 3 reading layer 2 where
layer 2 reads layer 1 (layer 0 may differ: it computes values later layers reuse). Code
that depends on the layer index (GPT-2's scale_attn_by_inverse_layer_idx puts 1/(i+1) in
the graph) fails the check, as does a config list that singles out some layers
(layer_types); NotReplicable then makes the caller trace every layer.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np

TRACE_LAYERS = 4  # layer 0 may differ (it computes what later layers reuse); 1-3 must not
SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata: the module path it was traced in


class NotReplicable(Exception):
    """The traced layers differ beyond their index: trace every layer instead."""


def decoder_stack(model) -> str:
    """Module path of the decoder layers (`model.layers`, `transformer.h`): the ModuleList
    holding config.num_hidden_layers modules of one class."""
    import torch

    n = model.config.num_hidden_layers
    found = [
        name for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1
    ]
    if len(found) != 1:
        raise NotReplicable(f"{len(found)} candidate decoder stacks")
    return found[0]


@contextlib.contextmanager
def truncated(model, stack: str, keep: int):
    """The model with only its first `keep` decoder layers (and a config saying so)."""
    import torch

    parent_name, _, attr = stack.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layers, config = getattr(parent, attr), model.config
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:keep]))
    config.num_hidden_layers = keep
    if saved[1] is not None:
        config.layer_types = saved[1][:keep]
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        config.num_hidden_layers, layer_types = saved
        if layer_types is not None:
            config.layer_types = layer_types


@dataclass
class _Layers:
    nodes: list[list]  # per traced layer, its nodes in graph order
    owner: dict  # value → (layer, node index, output index) for values made inside a layer


def _partition(graph, scope: str, count: int) -> _Layers:
    """Each node's decoder layer, from the module path torch.onnx records on it."""
    pattern = re.compile(re.escape(scope) + r"\.(\d+)$")
    nodes: list[list] = [[] for _ in range(count)]
    order = []  # layer of each node in graph order, -1 = shared
    layer_of: dict = {}  # value → layer that made it
    for node in graph:
        layer, scopes = -1, _scopes(node)
        for entry in scopes:
            if m := pattern.match(entry):
                layer = int(m.group(1))
        if not scopes:  # made by a rewrite rule (Slices → Split), which drops the scope
            layer = max((layer_of[v] for v in node.inputs if v in layer_of), default=-1)
        order.append(layer)
        if layer >= 0:
            nodes[layer].append(node)
            layer_of.update((v, layer) for v in node.outputs)
    # Shared nodes between two layers would have to be copied too: refuse.
    layered = [i for i, layer in enumerate(order) if layer >= 0]
    if not layered or any(order[i] == -1 for i in range(layered[0], layered[-1])):
        raise NotReplicable("shared nodes between decoder layers")
    if order[layered[0]:layered[-1] + 1] != sorted(order[layered[0]:layered[-1] + 1]):
        raise NotReplicable("decoder layers interleave")
    owner = {}
    for layer, layer_nodes in enumerate(nodes):
        for k, node in enumerate(layer_nodes):
            for o, value in enumerate(node.outputs):
                owner[value] = (layer, k, o)
    return _Layers(nodes, owner)


def _scopes(node) -> list[str]:
    """The node's module path entries, e.g. ['', 'lm', 'lm.model', 'lm.model.layers.1', ...]."""
    raw = node.metadata_props.get(SCOPES, "")
    return [s.strip().strip("'\"") for s in raw.strip("[]").split(",")] if raw else []


def _same_attr(a, b) -> bool:
    import onnx_ir as ir

    if a.type != b.type or a.name != b.name or a.ref_attr_name != b.ref_attr_name:
        return False
    if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise NotReplicable("control flow (subgraph attributes) in a decoder layer")
    if a.type == ir.AttributeType.TENSOR:  # Constant's value
        x, y = a.value.numpy(), b.value.numpy()
        return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    return a.value == b.value


class LayerNames:
    """Names that carry a layer index: weights `….<stack>.<i>.…` (checkpoint keys, with or
    without the base model prefix, `.transposed` when folded) and `past_key_values.<i>.…`."""

    def __init__(self, stack: str):
        last_part = stack.rpartition(".")[2]
        self.weight = re.compile(r"^((?:.*\.)?" + re.escape(last_part) + r"\.)(\d+)(\..+)$")
        self.past = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")

    def reindex(self, name: str | None, src: int, dst: int) -> str | None:
        if not name:
            return None
        if (m := self.weight.match(name)) and int(m.group(2)) == src:
            return f"{m.group(1)}{dst}{m.group(3)}"
        if (m := self.past.match(name)) and int(m.group(1)) == src:
            return f"past_key_values.{dst}.{m.group(2)}"
        return None


class _Reads:
    """What layer `dst` reads where layer `src` reads `value`:

    - a value made earlier in layer src → the matching value of layer dst (`current`);
    - a value of layer src-1 (the residual stream) → the matching value of layer dst-1
      (`previous`);
    - a value of an older layer (made once, reused by every later layer) → the same value;
    - a weight or past input of layer src → ("rename", its name for layer dst);
    - anything else (shared prefix values, constants) → the same value.
    """

    def __init__(self, layers: _Layers, names: LayerNames, src: int, *, dst: int, previous: dict, current: dict):
        self.layers, self.names, self.src, self.dst = layers, names, src, dst
        self.previous, self.current = previous, current

    def __call__(self, value):
        if value is None:
            return None
        owner = self.layers.owner.get(value)
        if owner is not None and owner[0] == self.src:
            return self.current[value]
        if owner is not None and owner[0] == self.src - 1:
            return self.previous[value]
        if owner is not None:
            return value
        renamed = self.names.reindex(value.name, self.src, self.dst)
        return ("rename", renamed) if renamed else value


def _align(a_nodes: list, b_nodes: list) -> dict:
    """Outputs of a_nodes → outputs of b_nodes, if the two are the same ops in the same
    order with equal attributes (constants included)."""
    if len(a_nodes) != len(b_nodes):
        raise NotReplicable(f"decoder layers of {len(a_nodes)} and {len(b_nodes)} nodes")
    mapping = {}
    for a, b in zip(a_nodes, b_nodes):
        if (a.domain, a.op_type, a.overload, len(a.inputs), len(a.outputs)) != (
            b.domain, b.op_type, b.overload, len(b.inputs), len(b.outputs)
        ):
            raise NotReplicable(f"{a.op_type} vs {b.op_type}")
        if set(a.attributes) != set(b.attributes) or not all(
            _same_attr(a.attributes[k], b.attributes[k]) for k in a.attributes
        ):
            raise NotReplicable(f"{a.op_type} attributes differ between layers")
        mapping.update(zip(a.outputs, b.outputs))
    return mapping


def check_periodic(layers: _Layers, names: LayerNames, weights: set) -> dict:
    """Layer L-1 is layer L-2 with every index moved by one, reading layer L-2 where layer
    L-2 reads layer L-3 (L = traced layers). Returns the L-2 → L-1 value map."""
    last = len(layers.nodes) - 1
    previous = _align(layers.nodes[last - 2], layers.nodes[last - 1])
    current = _align(layers.nodes[last - 1], layers.nodes[last])
    reads = _Reads(layers, names, last - 1, dst=last, previous=previous, current=current)
    for a, b in zip(layers.nodes[last - 1], layers.nodes[last]):
        for x, y in zip(a.inputs, b.inputs):
            want = reads(x)
            if isinstance(want, tuple):
                if y is None or y.name != want[1]:
                    raise NotReplicable(f"layer {last} reads {y and y.name}, expected {want[1]}")
            elif want is not y and (want in weights or y in weights or not _equal_constants(want, y)):
                raise NotReplicable(f"layer {last} reads {y and y.name} where {want and want.name} was expected")
    return current


def _equal_constants(x, y) -> bool:
    if x is None or y is None or x.const_value is None or y.const_value is None:
        return False
    u, v = x.const_value.numpy(), y.const_value.numpy()
    return u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v)


def uniform_layer_config(config) -> None:
    """Per-layer config lists (layer_types, …) must not single any layer out."""
    n = config.num_hidden_layers
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n and len({repr(v) for v in value}) > 1:
            raise NotReplicable(f"config.{key} differs between layers")


def _copy_attr(attr):
    import onnx_ir as ir

    return ir.Attr(attr.name, attr.type, attr.value, ref_attr_name=attr.ref_attr_name, doc_string=attr.doc_string)


class _Copier:
    """The graph inputs and initializers a copied layer reads in place of layer `last`'s:
    its own past inputs, and its own checkpoint tensors (same transpose as layer `last`)."""

    def __init__(self, graph, model, *, prefix: str, names: LayerNames, sources: dict, weights):
        self.graph, self.prefix, self.names, self.sources, self.weights = graph, prefix, names, sources, weights
        self.buffers = dict(model.named_buffers(remove_duplicate=False))
        self.new_inputs: dict[str, object] = {}

    def value_for(self, original, name: str, src: int, *, dst: int):
        import onnx_ir as ir

        from exportline.exporters.onnx.weights import WeightSource, lazy_weight

        if name.startswith("past_key_values."):
            if name not in self.new_inputs:
                self.new_inputs[name] = ir.Value(name=name, shape=original.shape, type=original.type)
            return self.new_inputs[name]
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        if original.name in self.sources:
            source = self.sources[original.name]
            key = self.names.reindex(source.key, src, dst)
            stored = self.weights.tensors.get(key)
            if stored is None or stored.shape != self.weights.tensors[source.key].shape:
                raise NotReplicable(f"no checkpoint tensor {key} shaped like {source.key}")
            self.sources[name] = WeightSource(key, source.perm)
            data = lazy_weight(self.weights, self.sources[name], original.dtype, shape=original.shape.numpy(), name=name)
        elif name[len(self.prefix):] in self.buffers:  # a layer's own non-persistent buffer
            data = ir.Tensor(self.buffers[name[len(self.prefix):]].detach().cpu().numpy(), name=name)
        else:
            raise NotReplicable(f"{original.name} of layer {src} has no counterpart {name}")
        value = ir.Value(name=name, shape=original.shape, type=original.type, const_value=data)
        self.graph.register_initializer(value)
        return value


def replicate(graph, model, *, prefix: str, stack: str, total: int, sources: dict, weights) -> None:
    """Grow a graph traced with TRACE_LAYERS decoder layers to `total` layers, in place.

    `sources` (initializer name → checkpoint tensor) gains the copied layers' weights.
    Graph inputs/outputs end in shapes.py order; name_io gives them their final names.
    """
    import onnx_ir as ir

    layers = _partition(graph, f"{prefix}{stack}", TRACE_LAYERS)
    names = LayerNames(stack)
    last = TRACE_LAYERS - 1
    weight_values = {v for name, v in graph.initializers.items() if name in sources}
    step = check_periodic(layers, names, weight_values)  # layer last-1 → layer last
    presents = {v.name: v for v in graph.outputs if v.name and v.name.startswith("present.")}
    for kind in ("key", "value"):
        if layers.owner.get(presents.get(f"present.{last}.{kind}"), (None,))[0] != last:
            raise NotReplicable(f"present.{last}.{kind} is not made inside decoder layer {last}")
    suffix = _suffix_reads(graph, layers, last)
    copier = _Copier(graph, model, prefix=prefix, names=names, sources=sources, weights=weights)
    anchor, made_by = layers.nodes[last][-1], {last: {v: v for n in layers.nodes[last] for v in n.outputs}}
    for j in range(TRACE_LAYERS, total):
        # Layer j reads layer j-1 where layer `last` reads layer last-1.
        previous = {v: made_by[j - 1][step[v]] for v in step}
        made: dict = {}
        reads = _Reads(layers, names, last, dst=j, previous=previous, current=made)
        clones = []
        for node in layers.nodes[last]:
            inputs = [
                copier.value_for(x, w[1], last, dst=j) if isinstance(w := reads(x), tuple) else w for x in node.inputs
            ]
            clone = ir.Node(
                node.domain, node.op_type, inputs, [_copy_attr(a) for a in node.attributes.values()],
                overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                name=f"{node.name}__layer{j}" if node.name else None,
            )
            for old, new in zip(node.outputs, clone.outputs):
                new.name = f"{old.name}__layer{j}" if old.name else None
                new.shape, new.type = old.shape, old.type
            made.update(zip(node.outputs, clone.outputs))
            clones.append(clone)
        graph.insert_after(anchor, clones)
        anchor, made_by[j] = clones[-1], made
    _rewire(graph, suffix, made_by, presents=presents, copier=copier, last=last, total=total)


def _suffix_reads(graph, layers: _Layers, last: int) -> list[tuple]:
    """(node, input index, value) for shared nodes after the layers reading a layer's output."""
    in_layers = {id(n) for layer in layers.nodes for n in layer}
    reads = []
    for node in graph:
        if id(node) in in_layers:
            continue
        for i, value in enumerate(node.inputs):
            if value not in layers.owner:
                continue
            if layers.owner[value][0] == last:
                reads.append((node, i, value))
            elif value.producer().op_type != "Constant":  # torch shares equal constants graph-wide
                raise NotReplicable(f"{node.op_type} after the layers reads layer {layers.owner[value][0]}")
    return reads


def _rewire(graph, suffix, made_by: dict[int, dict], *, presents: dict, copier: _Copier, last: int, total: int) -> None:
    """The final norm and lm_head read the new last layer; inputs/outputs cover every layer."""
    for node, i, value in suffix:
        node.replace_input_with(i, made_by[total - 1][value])
    for j in range(TRACE_LAYERS, total):
        for kind in ("key", "value"):
            presents[f"present.{j}.{kind}"] = made_by[j][presents[f"present.{last}.{kind}"]]
    head = [v for v in graph.inputs if not v.name.startswith("past_key_values.")]
    past = {v.name: v for v in graph.inputs if v.name.startswith("past_key_values.")}
    past.update(copier.new_inputs)
    outputs = [v for v in graph.outputs if not (v.name or "").startswith("present.")]
    kinds = ("key", "value")
    graph.inputs.clear()
    graph.inputs.extend(head + [past[f"past_key_values.{i}.{k}"] for i in range(total) for k in kinds])
    graph.outputs.clear()
    graph.outputs.extend(outputs + [presents[f"present.{i}.{k}"] for i in range(total) for k in kinds])
