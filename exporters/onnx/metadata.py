"""What every ONNX graph exportline writes says about itself, in `metadata_props`.

ONNX Runtime (`session.get_modelmeta().custom_metadata_map`), Netron and onnx.load show these
keys, so a graph copied out of its bundle still tells where it came from:

    exportline.version        the exportline that wrote it
    exportline.source         the model it was exported from (kind, name, architecture, sha256, labels)
    exportline.precision      fp32 | fp16 | int8
    exportline.io_convention  the inputs/outputs by name and dims (shapes.py; optimum/transformers.js names)
    exportline.made_by        the tools that produced the graph, in order

producer_name/producer_version stay what the tool that emitted the operators wrote: exportline
for the Llama-family graphs it writes op by op (onnx/llama_graph.py), torch's exporter
("pytorch") for traced graphs; the fp16 and int8 graphs keep their fp32 graph's. Where
exportline only edits a graph (layer copies, renames, casts, Q/DQ placement) it does not
claim to be the producer; `exportline.made_by` records the whole chain instead.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

from exportline.exporters.core.shapes import KVLayout

PREFIX = "exportline."
PRECISIONS = ("fp32", "fp16", "int8")


def exportline_version() -> str:
    try:
        return metadata.version("exportline")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_label(source: dict[str, Any]) -> str:
    """One line naming the source, e.g. "preset tiny (llama; random-init)"."""
    kind = source.get("kind", "unknown")
    name = source.get("preset") if kind == "preset" else Path(str(source.get("path") or "")).name
    facts = [source.get("architecture")]
    facts += [f"sha256 {source['sha256']}"] if source.get("sha256") else []
    facts += list(source.get("labels") or [])
    details = "; ".join(str(f) for f in facts if f)
    return f"{kind} {name or '?'}" + (f" ({details})" if details else "")


def io_convention(layout) -> str:
    """The graph's I/O in shapes.py's names and dims, one entry per name pattern (layer i);
    a custom module's declared I/O (shapes.DeclaredIO) as declared."""
    def entries(specs) -> list[str]:
        seen: dict[str, str] = {}
        for spec in specs:
            pattern = re.sub(r"\.\d+\.", ".{i}.", spec.name)
            seen.setdefault(pattern, f"{pattern}[{', '.join(str(d) for d in spec.dims)}]")
        return list(seen.values())

    if not isinstance(layout, KVLayout):
        return (f"inputs: {'; '.join(entries(layout.inputs()))} | outputs: {'; '.join(entries(layout.outputs()))} "
                "| declared by the export's --inputs (custom module, no KV cache)")
    return (f"inputs: {'; '.join(entries(layout.inputs()))} | outputs: {'; '.join(entries(layout.outputs()))} "
            f"| i = 0..{layout.num_layers - 1}; optimum / transformers.js causal-LM-with-past names")


def graph_metadata(*, source: dict[str, Any], precision: str, layout, made_by: list[str]) -> dict[str, str]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return {
        f"{PREFIX}version": exportline_version(),
        f"{PREFIX}source": source_label(source),
        f"{PREFIX}precision": precision,
        f"{PREFIX}io_convention": io_convention(layout),
        f"{PREFIX}made_by": " -> ".join(made_by),
    }


def stamp(model, props: dict[str, str]) -> None:
    """Set `props` on an onnx.ModelProto or an onnx_ir.Model, replacing earlier exportline keys
    (a graph derived from another carries its parent's) and keeping everyone else's."""
    if hasattr(model, "metadata_props") and isinstance(model.metadata_props, dict):  # onnx_ir
        for key in [k for k in model.metadata_props if k.startswith(PREFIX)]:
            del model.metadata_props[key]
        model.metadata_props.update(props)
        return
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def made_by(model) -> list[str]:
    """The chain recorded in a graph exportline wrote (to extend it for a derived graph)."""
    for p in model.metadata_props:
        if p.key == f"{PREFIX}made_by":
            return p.value.split(" -> ")
    return []


def stamp_derived(model, *, ctx, precision: str, step: str, parent: Path) -> None:
    """Stamp a graph a stage derived from `parent` (the fp32 graph): the parent's chain + `step`."""
    import onnx
    from transformers import AutoConfig

    chain = made_by(onnx.load(str(parent), load_external_data=False)) or [f"{parent.name} (no exportline metadata)"]
    from exportline.exporters.sources.custom.model import bundle_io, is_custom

    if is_custom(ctx.bundle.root):
        layout = bundle_io(ctx.bundle.root)[0]
    else:
        layout = KVLayout.from_config(AutoConfig.from_pretrained(str(ctx.bundle.root)))
    stamp(model, graph_metadata(source=ctx.source.describe(), precision=precision, layout=layout, made_by=[*chain, step]))
