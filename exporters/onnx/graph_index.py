"""Producer/consumer maps and a topological sort over one ONNX graph (no subgraphs).

The fp16 and int8 stages rewrite graphs; the libraries they use append nodes at the end,
and TensorRT's parser (unlike ONNX Runtime) takes nodes in file order, so every rewritten
graph is sorted before it is saved.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque

from exportline.exporters.core.errors import StageError


class GraphIndex:
    """Who produces and who reads each tensor name of `graph`, and which names are constant."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = set(self.initializers) | {
            n.output[0] for n in graph.node if n.op_type == "Constant" and n.output
        }
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def ancestors(self, names: list[str]) -> set[str]:
        """Names of nodes on which the tensors `names` depend (transitively)."""
        seen, todo = set(), deque(names)
        while todo:
            node = self.producer.get(todo.popleft())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            todo.extend(i for i in node.input if i)
        return seen


def topological_sort(graph) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs.

    Stable: of the nodes ready to go, the earliest in the current order goes first, so an
    order that is already topological is kept. (A breadth-first order interleaves a layer's
    branches with the next layer's, and int8's layer-bounded calibration, which cuts the node
    order, then kept attention intermediates across its cuts: 548 vs 275 MB at 10b, 8 layers.)"""
    produced = {o for n in graph.node for o in n.output if o}
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting = {}
    readers = defaultdict(list)
    ready: list[int] = []
    for idx, node in enumerate(graph.node):
        missing = {i for i in node.input if i in produced and i not in available}
        waiting[idx] = len(missing)
        for name in missing:
            readers[name].append(idx)
        if not missing:
            heapq.heappush(ready, idx)
    order = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for out in graph.node[idx].output:
            for reader in readers.pop(out, []):
                waiting[reader] -= 1
                if waiting[reader] == 0:
                    heapq.heappush(ready, reader)
    if len(order) != len(graph.node):
        raise StageError("the rewritten graph has a cycle; this is a bug, please report it")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def remove_dead_nodes(graph) -> int:
    """Drop nodes none of whose outputs is read or is a graph output; returns how many."""
    removed = 0
    while True:
        index = GraphIndex(graph)
        dead = [
            n for n in graph.node
            if not any(o in index.graph_outputs or index.consumers.get(o) for o in n.output if o)
        ]
        if not dead:
            return removed
        ids = {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(keep)
        removed += len(dead)
