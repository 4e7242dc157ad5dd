"""The traced graph, kept without its weights, for the next export of the same config.

Tracing (torch.export + torch.onnx, layer copies, folding) costs seconds, and its result
depends only on the config, the checkpoint's tensor names/dtypes/shapes, the opset, the
tool versions and exportline's own graph code — not on the weight values. Exporting every
checkpoint of one training run therefore traces the same graph again and again. Here the
finished graph is stored under `$EXPORTLINE_CACHE/graphs/<key>/`:

    graph.onnx   the graph, every checkpoint weight an external reference nothing reads
    entry.json   initializer → (checkpoint key, transpose), the KV layout, the tracing facts,
                 graph.onnx's sha256 and the key's own material (to see why two keys differ)

On a hit the weights are re-attached exactly as `onnx/weights.attach_weights` and
`fold_weight_transposes` attach them, so the data file streams the same bytes. A cold export
stores the entry and then takes the same path as a hit (serialize → deserialize → attach),
so cold and warm outputs are byte-identical by construction, and tested to be.

A graph whose building read any weight value (constant folding of a small weight) is not
stored: its structure would hold one checkpoint's numbers. An unreadable or damaged entry is
a miss that re-traces and replaces it. EXPORTLINE_GRAPH_CACHE=off disables the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from exportline.exporters.core.layout import cache_root
from exportline.exporters.core.shapes import KVLayout

FORMAT = "exportline-graph-cache/1"
ENV_SWITCH = "EXPORTLINE_GRAPH_CACHE"  # "off" / "0" / "no": neither read nor written
GRAPH_FILE, ENTRY_FILE = "graph.onnx", "entry.json"
_UNREAD = "checkpoint-weight"  # location of a weight in graph.onnx: never read, re-attached on load
TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")
# exportline's files that may decide the graph's structure: a change to any of them is a new
# key. All of onnx/ rather than a hand-picked few, so a helper moved between its files (or a
# new one) cannot leave a stale graph behind; a change there that does not alter the graph
# costs one re-trace.
_GRAPH_CODE = (*sorted(f"onnx/{p.name}" for p in (Path(__file__).parent).glob("*.py")),
               "core/shapes.py", "sources/weights_reader.py")


@dataclass
class CachedGraph:
    """A traced graph ready to write: weights attached lazily, plus what the stages record."""

    model: Any  # onnx_ir.Model
    layout: KVLayout
    architecture: str
    tracing: dict[str, Any]  # layers traced/copied (+ copy_refused), graph_cache: hit | stored | …

    def made_by(self) -> list[str]:
        """The tools behind the graph, for metadata_props (onnx/metadata.py)."""
        from exportline.exporters.onnx.metadata import exportline_version

        if self.tracing.get("builder"):
            return [f"exportline {exportline_version()} {self.tracing['builder']}"]
        return [f"torch {tool_version('torch')} torch.export + torch.onnx",
                f"exportline {exportline_version()} graph edits (layer copies, weight folding, I/O names)"]


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "no", "false")


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]  # exporters/
    h = hashlib.sha256()
    for rel in _GRAPH_CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def tool_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def key_material(hf_dir: Path, weights, *, opset: int) -> dict[str, Any]:
    """Everything the traced graph depends on (weight values excluded by design)."""
    from exportline.exporters.core.consumer_files import without_consumer_block

    header = {name: [t.dtype, list(t.shape)] for name, t in sorted(weights.tensors.items())}
    return {
        "format": FORMAT,
        "config": json.loads(without_consumer_block(Path(hf_dir) / "config.json")),
        "checkpoint_header": header,
        "opset": opset,
        "versions": {d: tool_version(d) for d in ("exportline", *TOOLS)},
        "exportline_graph_code": _code_digest(),
    }


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def detach(model, *, key: str, material: dict, layout: KVLayout, architecture: str,
           tracing: dict) -> tuple[bytes, dict]:
    """The freshly traced `model` as an entry: (graph.onnx bytes, entry.json content). Every
    checkpoint weight becomes an unread external reference (the model is edited in place)."""
    import onnx_ir as ir

    sources = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            origin = getattr(value.const_value, "origin", None)  # (CheckpointWeights, WeightSource)
            if origin is None:
                continue
            sources[value.name] = {"key": origin[1].key, "perm": list(origin[1].perm) if origin[1].perm else None}
            value.const_value = ir.ExternalTensor(_UNREAD, 0, value.const_value.nbytes, value.const_value.dtype,
                                                  shape=value.const_value.shape, name=value.name)
    data = ir.serde.serialize_model(model).SerializeToString()
    entry = {"format": FORMAT, "key": key, "graph_sha256": hashlib.sha256(data).hexdigest(), "weights": sources,
             "layout": dataclasses.asdict(layout), "architecture": architecture, "tracing": tracing,
             "material": material}
    return data, entry


def write_entry(key: str, data: bytes, entry: dict) -> str:
    """Write graphs/<key>/ via a temporary folder and a rename; returns what happened (for the
    record). A failure to write is reported, never raised: the export itself succeeded. Two
    exports storing one key at once: the later rename fails or replaces an equal entry."""
    root = cache_root() / "graphs"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=root))
        (tmp / GRAPH_FILE).write_bytes(data)
        (tmp / ENTRY_FILE).write_text(json.dumps(entry, sort_keys=True))
        final = root / key
        if final.exists():  # a damaged entry being replaced: moved aside first (a rename is atomic)
            old = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.old.", dir=root))
            os.replace(final, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        return "stored"
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return f"not stored: {exc.strerror or exc} ({root})"


def read_entry(key: str) -> tuple[bytes, dict] | None:
    """The entry's (graph bytes, entry), or None when absent, unreadable or damaged."""
    folder = cache_root() / "graphs" / key
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text())
        data = (folder / GRAPH_FILE).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        return None
    if entry.get("graph_sha256") != hashlib.sha256(data).hexdigest():
        return None
    return data, entry


class DamagedEntry(Exception):
    """A cache entry that does not fit its graph or checkpoint: a miss, never an error."""


def attach(data: bytes, entry: dict, weights) -> CachedGraph:
    """The entry's graph with every checkpoint weight a lazy tensor reading `weights`, as the
    onnx stage attaches them after tracing. Raises DamagedEntry when the entry does not fit."""
    try:
        return _attach(data, entry, weights)
    except Exception as exc:  # protobuf, onnx_ir and JSON-shape errors alike: the entry is unusable
        raise DamagedEntry(f"{type(exc).__name__}: {exc}") from None


def _attach(data: bytes, entry: dict, weights) -> CachedGraph:
    import onnx
    import onnx_ir as ir

    from exportline.exporters.onnx.weights import WeightSource, lazy_weight

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(data))
    sources = entry["weights"]
    attached = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.name not in sources:
                if isinstance(value.const_value, ir.ExternalTensor):
                    raise ValueError(f"{value.name} has no checkpoint tensor in the entry")
                continue
            perm = sources[value.name]["perm"]
            source = WeightSource(sources[value.name]["key"], tuple(perm) if perm else None)
            stored, shape = weights.tensors[source.key], tuple(value.shape.numpy())
            if tuple(stored.shape[i] for i in (source.perm or range(len(stored.shape)))) != shape:
                raise ValueError(f"{source.key} does not have the shape of {value.name}")
            value.const_value = lazy_weight(weights, source, value.dtype, shape=shape, name=value.name)
            attached += 1
    if attached != len(sources):
        raise ValueError("the entry names initializers the graph lacks")
    return CachedGraph(model, KVLayout(**entry["layout"]), str(entry["architecture"]), dict(entry["tracing"]))
