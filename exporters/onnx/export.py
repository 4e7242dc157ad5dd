"""HF causal LM folder → onnx/model.onnx + ONE model.onnx_data, with a KV cache (DESIGN.md §4).

Llama-family configs get a graph written op by op (onnx/llama_graph.py: no torch, no tracing);
every other model, or a config that module does not know, is traced as follows.
The graph is traced from a skeleton whose parameters are allocated but never written, so
their pages never become resident: torch.export only needs shapes and dtypes. Deep models
are traced with 4 decoder layers and the rest copied in the ONNX graph once the copy is
proven exact (onnx_replicate.py). Each weight initializer is then re-pointed at its tensor
in the checkpoint's safetensors (onnx_weights.py) and the data file is written one tensor
at a time. The tiny test models and a 1 B model take this same path.

Architecture support is data: ARCHITECTURES maps a config's model_type to what it needs;
the I/O names and dynamic dims come from shapes.KVLayout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import SourceError, StageError, UnsupportedArchitecture
from exportline.exporters.core.shapes import BATCH, PAST, SEQUENCE, KVLayout, resolve_dims

OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
EXPORTER = "torch.export (non-strict) + torch.onnx, weights streamed from safetensors"

WRAPPER_PREFIX = "lm."  # traced initializer names are the wrapper's: lm.<parameter fqn>
# Sample sizes for tracing: distinct and > 1, so torch.export neither specializes a dim
# to 0/1 nor mistakes one dynamic dim for another.
_TRACE_SIZES = {BATCH: 2, SEQUENCE: 3, PAST: 5}


@dataclass(frozen=True)
class Architecture:
    """What one model_type needs beyond the common path (empty = nothing)."""

    note: str = ""
    # HF attention implementation traced. "eager" is MatMul + additive mask + Softmax,
    # plain ops every runtime and the fp16/int8 passes handle; SDPA's translation is as
    # exact here but larger (200 vs 178 nodes on a 2-layer Llama).
    attention: str = "eager"


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(note="learned absolute position embeddings, indexed by position_ids"),
    "llama": Architecture(note="rotary, grouped-query attention"),
    "mistral": Architecture(note="llama layout; a sliding window must cover max_position_embeddings"),
    "qwen2": Architecture(note="llama layout with q/k/v biases"),
    "phi3": Architecture(note="fused qkv_proj and gate_up_proj"),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def check_architecture(folder: Path) -> str:
    """The folder's model_type, refused at once (before any weight is looked at) if unsupported."""
    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except FileNotFoundError:
        raise SourceError(f"{folder} has no config.json; run the hf stage first (--stages hf,onnx)") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise SourceError(f"{path} is not a JSON config ({exc}); re-run the hf stage with --force") from None
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported by the onnx stage; supported: {', '.join(supported_architectures())}"
        )
    return model_type


def load_config(folder: Path):
    """The folder's transformers config, refused early if the graph could not honour it."""
    from transformers import AutoConfig

    folder = Path(folder)
    check_architecture(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise SourceError(f"{folder}/config.json cannot be read by transformers: {str(exc).splitlines()[0]}") from None
    if config.model_type not in ARCHITECTURES:  # config.json and transformers disagree
        raise UnsupportedArchitecture(f"architecture {config.model_type!r} is not supported by the onnx stage")
    _refuse_cropping_window(config)
    return config


def _refuse_cropping_window(config) -> None:
    """Sliding-window layers drop old keys from the cache, so present would not be
    past + sequence long as shapes.py declares. A window covering max_position_embeddings
    never drops anything: it is switched off, which changes no output."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedArchitecture(f"{config.model_type} layers of type {', '.join(unknown)} are not supported by the onnx stage")
    if "sliding_attention" not in layer_types:
        return
    window, limit = config.sliding_window, config.max_position_embeddings
    if window < limit:
        raise UnsupportedArchitecture(
            f"{config.model_type} with sliding_window={window} < max_position_embeddings={limit} is not "
            "supported (the KV cache would be cropped); set sliding_window to null in config.json"
        )
    config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)


def build_skeleton(config):
    """The model with weights allocated but never written: tracing reads only shapes.

    `no_init_weights` skips the random init, so the (malloc'd, untouched) weight pages are
    never faulted in; buffers such as rotary inv_freq are still computed for real.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    arch = ARCHITECTURES[config.model_type]
    config.use_cache = True
    with no_init_weights(), torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=arch.attention)
    model.tie_weights()  # init_weights, which ties them, was skipped; ties share ONE initializer
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _kv_wrapper(model):
    import torch
    from transformers.cache_utils import DynamicCache

    class KVCacheLM(torch.nn.Module):
        """Flat tensors in and out, in shapes.KVLayout order, around an HF causal LM."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm  # the attribute name is WRAPPER_PREFIX

        def forward(self, input_ids, attention_mask, position_ids, past_key_values):  # noqa: PLR0917 (torch.export passes inputs positionally)
            cache = DynamicCache(config=self.lm.config)
            # The past becomes each layer's cache as is: `update` would concatenate it to an
            # empty tensor, adding per-layer nodes outside the decoder layers.
            for layer, i in zip(cache.layers, range(0, len(past_key_values), 2)):
                layer.lazy_initialization(past_key_values[i], past_key_values[i + 1])
                layer.keys, layer.values = past_key_values[i], past_key_values[i + 1]
            out = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, return_dict=True,
            )
            presents = []
            for layer in out.cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVCacheLM(model).eval()


def _trace_inputs(layout: KVLayout):
    """Sample tensors and torch.export dynamic shapes, both derived from layout.inputs()."""
    import torch
    from torch.export import Dim

    dims = {BATCH: Dim(BATCH, min=1), SEQUENCE: Dim(SEQUENCE, min=1), PAST: Dim(PAST, min=0)}
    sizes = dict(_TRACE_SIZES)
    tensors, shapes = [], []
    for spec in layout.inputs():
        shape = resolve_dims(spec.dims, sizes)
        if spec.dtype == "float":
            tensors.append(torch.zeros(shape, dtype=torch.float32))
        else:
            tensors.append(torch.ones(shape, dtype=getattr(torch, spec.dtype)))
        # The mask length (past + sequence) is not a linear function of ONE dim, which is
        # all a derived torch Dim can be; left free, the trace itself proves the equality.
        shapes.append({i: dims.get(d, Dim.DYNAMIC) for i, d in enumerate(spec.dims) if isinstance(d, str)})
    n = 3  # input_ids, attention_mask, position_ids; the rest is the past
    args = (tensors[0], tensors[1], tensors[2], tensors[n:])
    dynamic = {"input_ids": shapes[0], "attention_mask": shapes[1], "position_ids": shapes[2],
               "past_key_values": shapes[n:]}
    return args, dynamic


def _copy_plan(model, layout: KVLayout) -> tuple[str | None, dict[str, Any]]:
    """The decoder stack to trace short and copy (onnx_replicate.py), or None and why not."""
    from exportline.exporters.onnx.replicate import TRACE_LAYERS, NotReplicable, decoder_stack, uniform_layer_config

    if layout.num_layers <= TRACE_LAYERS:
        return None, {}
    try:
        uniform_layer_config(model.config)
        return decoder_stack(model), {}
    except NotReplicable as exc:
        return None, {"copy_refused": str(exc)}


def build_graph(model, layout: KVLayout, weights, *, stack: str | None, opset: int = OPSET, lap=lambda name: None):
    """The optimized ONNX graph (onnx_ir model) of `model` with its weights attached lazily.

    With a `stack`, TRACE_LAYERS layers are traced and the rest copied from the last one
    (onnx_replicate.replicate proves the copy exact or raises NotReplicable).
    Returns the model and the tracing facts for the record.
    """
    import dataclasses

    from exportline.exporters.onnx.replicate import TRACE_LAYERS, replicate, truncated
    from exportline.exporters.onnx.weights import attach_weights, finalize, fold_weight_transposes, opaque_weights, simplify

    if stack:
        with truncated(model, stack, TRACE_LAYERS):
            ir_model = _trace(model, dataclasses.replace(layout, num_layers=TRACE_LAYERS), opset)
    else:
        ir_model = _trace(model, layout, opset)
    lap("trace")
    with opaque_weights():  # the structure must not depend on weight values (graph cache)
        sources = attach_weights(ir_model.graph, model, weights, prefix=WRAPPER_PREFIX)
        fold_weight_transposes(ir_model.graph, sources, weights)
        simplify(ir_model)
        if stack:
            replicate(ir_model.graph, model, prefix=WRAPPER_PREFIX, stack=stack, total=layout.num_layers,
                      sources=sources, weights=weights)
        finalize(ir_model)
        name_io(ir_model.graph, layout)
    lap("optimize")
    traced = TRACE_LAYERS if stack else layout.num_layers
    return ir_model, {"layers_traced": traced, "layers_copied": layout.num_layers - traced}


def _trace(model, layout: KVLayout, opset: int):
    """torch.export + torch.onnx translation, without the optimizer (it would read weights)."""
    import torch

    wrapper = _kv_wrapper(model)
    args, dynamic = _trace_inputs(layout)
    with _quiet(), torch.no_grad():
        try:
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, opset_version=opset, optimize=False, verbose=False,
                input_names=[s.name for s in layout.inputs()],
                output_names=[s.name for s in layout.outputs()],
            )
        except Exception as exc:  # torch raises many types; the first line says which step
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(f"onnx: tracing {model.config.model_type} failed: {first}") from exc
    return onnx_program.model


# Warnings torch raises about its own internals while tracing (category, message regex).
# Only these are hidden: any other warning, e.g. a deprecation in how we call transformers,
# must reach the user and the tests.
TRACE_NOISE = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch.export's pytree, torch 2.13
)


@contextlib.contextmanager
def _quiet():
    """Library code does not print: torch.onnx logs about its own internals (missing
    torchvision ops, axis renames) while tracing; none of it is a fact for the user."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in TRACE_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.setLevel(level)


def name_io(graph, layout: KVLayout) -> None:
    """Graph inputs/outputs carry shapes.py's names and dim names, whatever torch chose."""
    import onnx_ir as ir

    for values, specs in ((graph.inputs, layout.inputs()), (graph.outputs, layout.outputs())):
        if len(values) != len(specs):
            raise StageError(f"onnx: traced graph has {len(values)} inputs/outputs, shapes.py declares {len(specs)}")
        for value, spec in zip(values, specs):
            value.name = spec.name
            value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in spec.dims])


@dataclass
class OnnxExport:
    """Facts of one export, for the stage record."""

    opset: int
    exporter: str
    architecture: str
    nodes: int
    initializers: int
    weight_bytes: int  # bytes of the checkpoint's tensors
    files: dict[str, int]  # file name → bytes
    seconds: dict[str, float]  # phase → wall seconds
    tracing: dict[str, Any]  # layers traced / copied (and why a copy was refused)

    def record(self) -> dict[str, Any]:
        return {
            "opset": self.opset, "exporter": self.exporter, "architecture": self.architecture,
            "graph_nodes": self.nodes, "initializers": self.initializers, "weight_bytes": self.weight_bytes,
            "files": self.files, "phase_seconds": self.seconds, "tracing": self.tracing,
        }


def trace_graph(hf_dir: Path, *, opset: int = OPSET, progress: Callable[[str], None] = lambda m: None,
                lap: Callable[[str], None] = lambda name: None):
    """The HF folder's graph with every weight a lazy tensor that reads the checkpoint when
    written; returns (graph_cache.CachedGraph, CheckpointWeights). Nothing large has been read
    yet: `save` (fp32) or the fp16 stage's direct path writes the weights.

    The graph comes from the graph cache when an entry matches (onnx/graph_cache.py: no
    torch, no tracing); otherwise it is traced, stored, and read back the way a hit is."""
    from exportline.exporters.onnx import graph_cache
    from exportline.exporters.sources.weights_reader import CheckpointWeights

    model_type = check_architecture(hf_dir)
    weights = CheckpointWeights(hf_dir)  # headers only: fails fast on a broken checkpoint
    built = _build_by_hand(hf_dir, weights, model_type, opset=opset, progress=progress, lap=lap)
    if not isinstance(built, str):
        return built, weights
    material = graph_cache.key_material(hf_dir, weights, opset=opset)
    key = graph_cache.cache_key(material)
    status = "off (EXPORTLINE_GRAPH_CACHE)"
    if graph_cache.enabled():
        found = graph_cache.read_entry(key)
        status = "stored"
        if found is not None:
            try:
                graph = graph_cache.attach(*found, weights)
                progress(f"onnx: graph from the cache ({graph_cache.cache_root() / 'graphs' / key[:16]}…), no tracing")
                lap("cache")
                return _with_status(graph, "hit", key), weights
            except graph_cache.DamagedEntry as exc:
                status = f"stored (replaced a damaged entry: {exc})"
    ir_model, config, tracing = _trace_checkpoint(hf_dir, weights, opset=opset, progress=progress, lap=lap)
    tracing["not_built_by_hand"] = built
    layout = KVLayout.from_config(config)
    if weights.keys_read:  # folding read a weight: the structure holds this checkpoint's values
        from exportline.exporters.onnx.graph_cache import CachedGraph

        why = f"not stored: building the graph read {len(weights.keys_read)} weight(s), e.g. {min(weights.keys_read)}"
        return _with_status(CachedGraph(ir_model, layout, config.model_type, tracing), why, key), weights
    data, entry = graph_cache.detach(ir_model, key=key, material=material, layout=layout,
                                     architecture=config.model_type, tracing=tracing)
    if graph_cache.enabled():
        status = status if (written := graph_cache.write_entry(key, data, entry)) == "stored" else written
    # The cold export writes what a hit would: the entry read back, weights re-attached.
    return _with_status(graph_cache.attach(data, entry, weights), status, key), weights


BUILDER_SWITCH = "EXPORTLINE_ONNX_BUILDER"  # "trace": always torch.onnx; default "auto"


def _build_by_hand(hf_dir: Path, weights, model_type: str, *, opset: int, progress, lap):
    """The Llama-family graph written without tracing (onnx/llama_graph.py), or why not."""
    import os

    from exportline.exporters.onnx import llama_graph
    from exportline.exporters.onnx.graph_cache import CachedGraph

    if os.environ.get(BUILDER_SWITCH, "auto").strip().lower() == "trace":
        return f"{BUILDER_SWITCH}=trace"
    built = llama_graph.build(hf_dir, weights, opset=opset)
    if isinstance(built, str):
        progress(f"onnx: tracing with torch.onnx ({built})")
        return built
    model, layout, facts = built
    progress(f"onnx: {layout.num_layers}-layer graph written by hand, no tracing")
    lap("build")
    return CachedGraph(model, layout, model_type, {**facts, "graph_cache": "not used (nothing traced)"})


def _with_status(graph, status: str, key: str):
    graph.tracing = {**graph.tracing, "graph_cache": status, "graph_cache_key": key}
    return graph


def _trace_checkpoint(hf_dir: Path, weights, *, opset: int, progress, lap):
    """Skeleton, trace (a few layers, the rest copied), weights attached: (onnx_ir model,
    transformers config, tracing facts)."""
    from exportline.exporters.onnx.replicate import TRACE_LAYERS, NotReplicable
    from exportline.exporters.onnx.weights import check_checkpoint_covers

    config = load_config(hf_dir)
    layout = KVLayout.from_config(config)
    model = build_skeleton(config)
    check_checkpoint_covers(model, weights)
    stack, how = _copy_plan(model, layout)
    lap("skeleton")
    progress(f"onnx: tracing {config.model_type} ({TRACE_LAYERS if stack else layout.num_layers} of {layout.num_layers} layers)")
    try:
        ir_model, traced = build_graph(model, layout, weights, stack=stack, opset=opset, lap=lap)
    except NotReplicable as exc:  # layers differ beyond their index: trace them all
        how["copy_refused"] = str(exc)
        progress(f"onnx: layers are not copies of each other ({exc}); tracing all {layout.num_layers}")
        ir_model, traced = build_graph(model, layout, weights, stack=None, opset=opset, lap=lap)
    del model  # its untouched weight pages are released; the graph reads the checkpoint
    return ir_model, config, {**traced, **how}


def export_onnx(
    hf_dir: Path, out_dir: Path, *, opset: int = OPSET, source: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> OnnxExport:
    """Write out_dir/model.onnx + out_dir/model.onnx_data for the HF folder `hf_dir`; `source`
    (the source's description) goes into the graph's metadata_props (exporters/onnx/metadata.py)."""
    from exportline.exporters.onnx.metadata import graph_metadata, stamp
    from exportline.exporters.onnx.weights import save

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    graph, weights = trace_graph(hf_dir, opset=opset, progress=progress, lap=lap)
    ir_model, layout = graph.model, graph.layout
    progress(f"onnx: writing {weights.nbytes / 2**30:.2f} GiB of weights into {DATA_FILE}")
    stamp(ir_model, graph_metadata(source=source or {"kind": "hf", "path": str(hf_dir)}, precision="fp32", layout=layout,
                                   made_by=graph.made_by()))
    out_dir.mkdir(parents=True, exist_ok=True)
    save(ir_model, out_dir / MODEL_FILE, DATA_FILE)
    lap("write")
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    return OnnxExport(
        opset=opset, exporter=graph.tracing.get("builder") or EXPORTER, architecture=graph.architecture,
        nodes=sum(1 for _ in ir_model.graph), initializers=len(ir_model.graph.initializers),
        weight_bytes=weights.nbytes, files=files, seconds=seconds, tracing=graph.tracing,
    )
