"""Per-channel activation maxima of a KV-cache graph, run one slice of layers at a time.

The statistics are those of exporters/precision/activation_stats.py (max |X_j| of every
observed tensor over every calibration feed), but the fp32 graph is never loaded whole: it
is pruned to what the observed tensors and the present.* outputs need (no lm_head), cut in
node order into consecutive segments whose weights stay within about one decoder layer,
and each segment is its own small model over the SAME external data file (offsets
unchanged). Segment k runs over ALL feeds before segment k+1 opens, so one ONNX Runtime
session holds one segment's weights at a time; between segments only the boundary tensors
later segments read are kept, per feed (activations of the calibration batches, which do
not grow with depth).

The decode feeds are teacher-forced on the fp32 model's own cache: a feed's past input is
the present output of the feed before it. That recurrence stays inside a segment — the
node that extends past.i with the new K/V (a Concat) sits in the segment that produces
present.i, asserted below — except for Shape/Size readers of a past elsewhere (the causal
mask's past length), which see only its shape: they get zeros of the shape the feed plan
announces, and every present is checked against that shape when it is produced.

Sessions run with ORT_ENABLE_BASIC: the extended fusions (LayerNorm, GELU, attention) are
what could round differently when a cut splits their pattern; without them each node is
computed alone and the segmented statistics equal the whole graph's at the same level
bit for bit (tests/test_segmented_stats.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exportline.exporters.core.errors import StageError
from exportline.exporters.onnx.graph_index import remove_dead_nodes, topological_sort
from exportline.exporters.precision.activation_stats import augment, link_beside

SHAPE_ONLY = {"Shape", "Size"}  # readers that see a tensor's shape, never its values


@dataclass(frozen=True)
class Recurrent:
    """A feed's past input: the previous feed's matching present, of this shape."""
    shape: tuple[int, ...]


@dataclass
class Segment:
    nodes: list
    weight_bytes: int
    inputs: list[str] = field(default_factory=list)  # read here, made by the feed or an earlier segment
    outputs: list[str] = field(default_factory=list)  # made here, read later or observed


def tensor_bytes(tensor) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    return int(np.prod(tensor.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _node_weights(node, sizes: dict[str, int]) -> set[str]:
    return {i for i in node.input if i in sizes}


def layer_budget(nodes: list, sizes: dict[str, int], presents: set[str]) -> int:
    """About one decoder layer's weight bytes: the most weight read between two consecutive
    nodes that make a present (one layer apart), or the largest single node if larger
    (an embedding table can outweigh a layer; it cannot be cut)."""
    largest = max((sum(sizes[i] for i in _node_weights(n, sizes)) for n in nodes), default=0)
    marks = [k for k, n in enumerate(nodes) if presents & set(n.output)]
    if len(marks) < 2:
        return max(largest, sum(sizes.values()))
    spans = []
    for a, b in zip(marks, marks[1:]):
        names = set().union(*(_node_weights(n, sizes) for n in nodes[a + 1 : b + 1]))
        spans.append(sum(sizes[i] for i in names))
    return max(largest, *spans)


def plan_segments(model, recurrence: dict[str, str], *, budget: int | None = None) -> tuple[list[Segment], int]:
    """Cut `model`'s node order (sorted) into segments of at most `budget` weight bytes
    (default: layer_budget), never between a past's value reader and its present's
    producer; returns the segments with their boundary tensors, and the budget used."""
    graph = model.graph
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH / GRAPHS
        raise StageError("int8: the fp32 graph has control-flow subgraphs, which layer-bounded calibration does not cut; this is a bug, please report it")
    topological_sort(graph)
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    nodes = list(graph.node)
    budget = budget or layer_budget(nodes, sizes, set(recurrence.values()))
    segments, current, held, opened = [], [], set(), set()
    for node in nodes:
        new = _node_weights(node, sizes) - held
        grow = sum(sizes[i] for i in new)
        if current and held and not opened and sum(sizes[i] for i in held) + grow > budget:
            segments.append(Segment(current, sum(sizes[i] for i in held)))
            current, held, new = [], set(), _node_weights(node, sizes)
        current.append(node)
        held |= new
        if node.op_type not in SHAPE_ONLY:
            opened |= {recurrence[i] for i in node.input if i in recurrence}
        opened -= set(node.output)
    segments.append(Segment(current, sum(sizes[i] for i in held)))
    _boundaries(graph, segments, sizes=sizes, recurrence=recurrence)
    return segments, budget


def _boundaries(graph, segments: list[Segment], *, sizes: dict[str, int], recurrence: dict[str, str]) -> None:
    made_in = {o: k for k, s in enumerate(segments) for n in s.nodes for o in n.output if o}
    read_in: dict[str, set[int]] = {}
    for k, seg in enumerate(segments):
        for node in seg.nodes:
            for name in node.input:
                if name and name not in sizes:
                    read_in.setdefault(name, set()).add(k)
                if name in recurrence and node.op_type not in SHAPE_ONLY and made_in[recurrence[name]] != k:
                    raise StageError(f"int8: {name} is read in calibration segment {k} but {recurrence[name]} is made "
                                     f"in segment {made_in[recurrence[name]]}; this is a bug, please report it")
    observed = {o.name for o in graph.output}
    for k, seg in enumerate(segments):
        seg.inputs = sorted(name for name, where in read_in.items() if k in where and made_in.get(name, -1) != k)
        seg.outputs = sorted(name for name, where in made_in.items()
                             if where == k and (name in observed or any(r > k for r in read_in.get(name, ()))))


def segmented_absmax(model_path: Path, graph_only, channels: dict[str, int], *, feeds: list[dict],
                     recurrence: dict[str, str], scratch: Path, budget: int | None = None):
    """(max |X_j| for every tensor in `channels`, facts): activation_stats.channel_absmax's
    statistics over `feeds` (input name → array, or Recurrent for a past), one segment at a
    time. `recurrence`: past input name → the present output it is fed from."""
    import shutil

    import onnx

    aug, observed = augment(graph_only, channels)  # observers + presents are the only outputs: no lm_head
    del aug.graph.output[:]
    aug.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in observed + list(recurrence.values()))
    remove_dead_nodes(aug.graph)
    segments, budget = plan_segments(aug, recurrence, budget=budget)
    stats = {t: np.zeros(size, np.float32) for t, size in channels.items()}
    scratch.mkdir(parents=True, exist_ok=True)
    for data in {e.value for t in aug.graph.initializer for e in t.external_data if e.key == "location"}:
        link_beside(model_path.parent / data, scratch / data)
    run, held = _SegmentRun(aug, segments, feeds=feeds, recurrence=recurrence), []
    try:
        for k in range(len(segments)):
            path = scratch / f"segment{k}.onnx"
            model = run.model(k)
            held.append(sum(tensor_bytes(t) for t in model.graph.initializer))  # what the session loads
            onnx.save(model, str(path))
            del model
            values = run.segment(k, path)
            for tensor, name in zip(channels, observed):
                for value in values.pop(name, ()):
                    np.maximum(stats[tensor], value, out=stats[tensor])
            path.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    facts = {"segments": len(segments), "segment_budget_bytes": budget,
             "largest_segment_weight_bytes": max(held), "weight_bytes": sum(held),
             "boundary_peak_bytes": run.peak_bytes}
    return stats, facts


def segment_weights(graph, segment: Segment) -> list:
    """The initializers `segment`'s nodes read (as stored: external data stays a reference)."""
    read = {i for n in segment.nodes for i in n.input}
    return [t for t in graph.initializer if t.name in read]


class _SegmentRun:
    """Runs the segments in order over every feed, keeping the boundary tensors (per feed)
    until the last segment that reads them, and the bytes they held at the most."""

    def __init__(self, aug, segments: list[Segment], *, feeds: list[dict], recurrence: dict[str, str]):
        self.aug, self.segments, self.feeds, self.recurrence = aug, segments, feeds, recurrence
        self.made_in = {o: k for k, s in enumerate(segments) for o in s.outputs}
        self.last_read = {}
        for k, seg in enumerate(segments):
            for name in seg.inputs:
                source = recurrence.get(name, name)  # a past read elsewhere needs its present kept
                self.last_read[source] = max(self.last_read.get(source, -1), k)
        self.store: dict[tuple[str, int], np.ndarray] = {}
        self.held_bytes = self.peak_bytes = 0  # of the boundary tensors kept between segments

    def model(self, k: int):
        """Segment k as a model: its nodes and weights (external data references unchanged)."""
        from onnx import helper

        seg, graph = self.segments[k], self.aug.graph
        declared = {i.name: i for i in graph.input}
        inputs = [declared[n] if n in declared else
                  helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.store[(n, 0)].dtype), None)
                  for n in seg.inputs]
        body = helper.make_graph(seg.nodes, f"segment{k}", inputs, [helper.make_empty_tensor_value_info(n) for n in seg.outputs],
                                 initializer=segment_weights(graph, seg))
        model = helper.make_model(body, opset_imports=self.aug.opset_import, ir_version=self.aug.ir_version)
        model.functions.extend(self.aug.functions)
        return model

    def segment(self, k: int, path: Path) -> dict[str, list[np.ndarray]]:
        """Run segment k over every feed; returns the observed values it made, per output."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        seg, made = self.segments[k], {}
        observed: dict[str, list[np.ndarray]] = {}
        for f in range(len(self.feeds)):
            values = dict(zip(seg.outputs, session.run(seg.outputs, {n: self._input(n, f, k=k, made=made) for n in seg.inputs})))
            made = {}
            for name, value in values.items():
                if name in self.recurrence.values():
                    self._check_present(name, value, f)
                    made[name] = value
                if self.last_read.get(name, -1) > k:
                    self.store[(name, f)] = value
                    self.held_bytes += value.nbytes
                    self.peak_bytes = max(self.peak_bytes, self.held_bytes)
                elif name not in self.recurrence.values():
                    observed.setdefault(name, []).append(value)
        del session
        for key in [key for key in self.store if self.last_read.get(key[0], -1) <= k]:
            self.held_bytes -= self.store.pop(key).nbytes
        return observed

    def _input(self, name: str, f: int, *, k: int, made: dict) -> np.ndarray:
        value = self.feeds[f][name] if name in self.feeds[f] else self.store[(name, f)]
        if isinstance(value, Recurrent):
            present = self.recurrence[name]
            where = self.made_in[present]
            if where == k:
                value = made[present]
            elif where < k:
                value = self.store[(present, f - 1)]
            else:  # read by Shape/Size only (plan_segments asserts it): its shape is all they see
                value = np.zeros(value.shape, np.float32)
        return value

    def _check_present(self, name: str, value: np.ndarray, f: int) -> None:
        past = next(p for p, q in self.recurrence.items() if q == name)
        following = self.feeds[f + 1].get(past) if f + 1 < len(self.feeds) else None
        if isinstance(following, Recurrent) and tuple(value.shape) != following.shape:
            raise StageError(f"int8: {name} has shape {value.shape} but the next calibration feed expects "
                             f"{following.shape}; this is a bug, please report it")
