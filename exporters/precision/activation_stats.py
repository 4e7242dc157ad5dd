"""Per-channel activation maxima of an fp32 graph over calibration feeds, in one pass.

They serve twice in the int8 stage: SmoothQuant's s_j needs max|X_j| per channel, and the
symmetric MinMax range of X (what onnxruntime's MinMax calibrator with symmetric ranges
computes) is max_j max|X_j| — or max_j max|X_j| / s_j once X is smoothed — so one run of
the fp32 graph calibrates both, instead of a second full run on the smoothed copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np


def channel_absmax(
    model_path: Path, graph_only, channels: dict[str, int], *, scratch: Path, run: Callable
) -> dict[str, np.ndarray]:
    """max |X_j| for every tensor X in `channels` (name → size of its last axis).

    The graph (`graph_only`: loaded without weights) gains Reshape→Abs→ReduceMax outputs and
    is written to `scratch` with its weight file hard-linked beside it (same filesystem,
    nothing copied); `run(path, (output_names, callback))` feeds it and hands the values of
    those outputs to `callback` for every feed."""
    import onnx

    aug, outputs = augment(graph_only, channels)
    stats = {tensor: np.zeros(size, np.float32) for tensor, size in channels.items()}
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / model_path.name
    onnx.save(aug, str(path))
    for data in {e.value for t in graph_only.graph.initializer for e in t.external_data if e.key == "location"}:
        link_beside(model_path.parent / data, scratch / data)

    def update(values) -> None:
        for tensor, value in zip(channels, values):
            np.maximum(stats[tensor], value, out=stats[tensor])

    try:
        run(path, (outputs, update))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return stats


def augment(graph_only, channels: dict[str, int]):
    """(a copy of `graph_only` with a Reshape→Abs→ReduceMax output per tensor in `channels`,
    the names of those outputs in the order of `channels`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    aug = onnx.ModelProto()
    aug.CopyFrom(graph_only)
    outputs = []
    after: dict[str, list] = {}  # producer's output → the observer nodes placed right after it
    for k, (tensor, size) in enumerate(channels.items()):
        shape, axes, flat, absval, out = (f"absmax{k}_{s}" for s in ("shape", "axes", "flat", "abs", "max"))
        aug.graph.initializer.extend([numpy_helper.from_array(np.array([-1, size], np.int64), shape),
                                      numpy_helper.from_array(np.array([0], np.int64), axes)])
        after.setdefault(tensor, []).extend([
            helper.make_node("Reshape", [tensor, shape], [flat]),
            helper.make_node("Abs", [flat], [absval]),
            helper.make_node("ReduceMax", [absval, axes], [out], keepdims=0),
        ])
        aug.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [size]))
        outputs.append(out)
    # Each observer right behind its tensor's producer, not at the end: segmented statistics
    # cut the node order, and an observer at the end would keep its tensor alive until then.
    nodes = after.pop("", [])
    nodes += [n for name in [i.name for i in aug.graph.input] for n in after.pop(name, [])]
    for node in aug.graph.node:
        nodes.append(node)
        nodes += [n for name in node.output for n in after.pop(name, [])]
    nodes += [n for rest in after.values() for n in rest]  # initializers observed (none today)
    del aug.graph.node[:]
    aug.graph.node.extend(nodes)
    return aug, outputs


def link_beside(src: Path, dest: Path) -> None:
    """onnxruntime refuses external data outside the model's folder, symlinks included;
    a hard link costs nothing and a copy is the fallback across filesystems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
