"""What tools nobody here wrote need to open the bundle's graphs (DESIGN.md §4):

- config.json `transformers.js_config`: transformers.js picks `onnx/model{suffix}.onnx` by
  dtype (fp32 → "", fp16 → "_fp16", int8 → "_int8", its wasm default q8 → "_quantized")
  and fetches `<file>_data` only when `use_external_data_format` says so. The block names
  exactly the graphs that exist, and makes the default dtype one of them.
- onnxruntime-genai: `genai_config.json` at the bundle root, decoder `onnx/model.onnx`, so
  `og.Model("<bundle>")` runs the fp32 graph and `og.Tokenizer` finds tokenizer.json beside
  it. genai reads exactly one `genai_config.json` per folder and refuses ".." in paths, so
  the fp16 and int8 graphs are selected with genai's own overlay, not with more files:
      config = og.Config("<bundle>"); config.overlay(genai_overlay("fp16")); og.Model(config)

Both are derived from the graphs present and config.json; `write_consumer_files` runs after
every stage (pipeline.py), so adding or removing a graph keeps them true.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exportline.exporters.core.bundle import write_text_atomic
from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.core.layout import CONFIG, GENAI_CONFIG, GRAPHS

JS_CONFIG_KEY = "transformers.js_config"
# Graph precision → the transformers.js dtype whose file suffix names that graph.
JS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}
# HF model_type → genai model type. Every one selects genai's DecoderOnly model, which takes
# our I/O names (DESIGN.md §4) with separate key/value caches. genai's own "gpt2" type is a
# different model class that fails on them ("Model input was not found"), so GPT-2 graphs
# run as the generic "decoder"; an architecture not listed does too.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3", "gpt2": "decoder"}


def present_graphs(root: Path) -> dict[str, str]:
    """Precision → graph path in the bundle, for the graphs whose file and external data both exist."""
    root = Path(root)
    return {p: g.path for p, g in GRAPHS.items() if (root / g.path).is_file() and (root / g.data).is_file()}


def transformers_js_config(graphs: dict[str, str]) -> dict[str, Any]:
    """The `transformers.js_config` block for these graphs (each has ONE external data file).

    Without a `dtype`, transformers.js asks for fp32 on CPU/GPU and for q8
    (model_quantized.onnx, which we never write) on wasm; the block makes fp32 the default
    and sends wasm to the int8 graph when there is one. fp16 graphs take the KV cache in
    fp16: `kv_cache_dtype` says so to transformers.js 3.x (4.x reads the graph's input types).
    """
    block: dict[str, Any] = {"use_external_data_format": {Path(graphs[p]).name: 1 for p in graphs}}
    if graphs:  # the first of GRAPHS present: fp32 whenever it exists
        block["dtype"] = JS_DTYPES[next(p for p in GRAPHS if p in graphs)]
    if "int8" in graphs:
        block["device_config"] = {"wasm": {"dtype": JS_DTYPES["int8"]}}
    if "fp16" in graphs:
        block["kv_cache_dtype"] = {JS_DTYPES["fp16"]: "float16"}
    return block


def genai_overlay(precision: str) -> str:
    """The JSON to pass to `og.Config.overlay` to run the `precision` graph instead."""
    return json.dumps({"model": {"decoder": {"filename": GRAPHS[precision].path}}})


def genai_config(hf, *, filename: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for one graph (schema: genai src/config.cpp),
    from the transformers config `hf`."""
    from exportline.exporters.core.shapes import KVLayout

    layout = KVLayout.from_config(hf)
    context = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    eos = hf.eos_token_id if hf.eos_token_id is not None else -1
    pad = hf.pad_token_id if hf.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    model_type = GENAI_TYPES.get(hf.model_type, "decoder")
    decoder = {
        "filename": filename, "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "hidden_size": hf.hidden_size, "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": layout.num_kv_heads, "num_hidden_layers": layout.num_layers,
        "head_size": layout.head_dim,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    model = {"type": model_type, "context_length": context, "vocab_size": layout.vocab_size,
             "eos_token_id": eos, "pad_token_id": pad, "decoder": decoder}
    if hf.bos_token_id is not None:
        model["bos_token_id"] = hf.bos_token_id
    # Our graphs concatenate past and new keys into present (no shared buffer), greedy by default.
    search = {"max_length": context, "min_length": 0, "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": False, "early_stopping": True, "length_penalty": 1.0,
              "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def write_consumer_files(root: Path) -> list[str]:
    """Bring config.json's transformers.js block and genai_config.json in line with the
    graphs present; returns the paths written or removed (nothing when already true)."""
    root = Path(root)
    config_path = root / CONFIG
    if not config_path.is_file():
        return []
    config = _read_config(config_path)
    # a custom module's graphs (declared I/O, no KV cache; config.json `exportline_io`, see
    # sources/custom) are not what transformers.js or genai run: neither file is written
    graphs = {} if "exportline_io" in config else present_graphs(root)
    changed = []
    wanted = dict(config)
    wanted.pop(JS_CONFIG_KEY, None)
    if graphs:
        wanted[JS_CONFIG_KEY] = transformers_js_config(graphs)
    if wanted != config:
        write_text_atomic(config_path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        changed.append(CONFIG)
    path = root / GENAI_CONFIG
    default = next((p for p in GRAPHS if p in graphs), None)
    if default is None:
        if path.is_file():
            path.unlink()
            changed.append(GENAI_CONFIG)
        return changed
    text = json.dumps(genai_config(_hf_config(root), filename=graphs[default]), indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
        changed.append(GENAI_CONFIG)
    return changed


def without_consumer_block(config_path: Path) -> str:
    """config.json as canonical JSON without the transformers.js block: what stages that read
    config.json depend on (the block changes whenever a graph is added)."""
    text = Path(config_path).read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        return text  # a damaged file is hashed as it is; the stage reading it reports the damage
    if isinstance(config, dict):
        config.pop(JS_CONFIG_KEY, None)
    return json.dumps(config, sort_keys=True)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run the export with --force") from None


# Every field genai_config() reads. A config.json that spells them all out (transformers 5
# writes every one for Llama) is read as JSON; any other goes through transformers, whose
# import (torch with it) would be most of a warm re-export's time (onnx/graph_cache.py).
_GENAI_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                 "head_dim", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def _hf_config(root: Path):
    from types import SimpleNamespace

    raw = _read_config(Path(root) / CONFIG)
    if all(key in raw for key in _GENAI_FIELDS) and "attribute_map" not in raw:
        return SimpleNamespace(**{key: raw[key] for key in _GENAI_FIELDS})
    return _transformers_config(root)


def _transformers_config(root: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(root)
