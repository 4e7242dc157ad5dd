"""config.json and tokenizer_config.json that transformers 4.46+ and 5.x read the same way.

transformers 5 writes only its new forms: `rope_parameters` (4.x ignores it and falls back
to rope_theta 10000, silently changing a Qwen2/Mistral model), `dtype` (4.x < 4.56 reads
`torch_dtype`) and tokenizer_class `TokenizersBackend` (4.x cannot import it). Serving
stacks that still pin 4.x (optimum-onnx, TGI) and tools that dispatch on `architectures`
(vLLM, the onnxruntime-genai builder) read the bundle too, so the legacy fields are written
beside the new ones. 5.x prefers `rope_parameters` when both are present, so nothing it
reads changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exportline.exporters.core.bundle import write_text_atomic

# The v5 name of the fast tokenizer class → the name both 4.x and 5.x import.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# rope_parameters keys that 4.x configs keep at the top level, not inside rope_scaling.
_TOP_LEVEL_ROPE_KEYS = ("partial_rotary_factor",)


def causal_lm_architecture(model_type: str) -> str | None:
    """The class AutoModelForCausalLM builds for a model_type (e.g. "LlamaForCausalLM")."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def legacy_rope_fields(rope: Any) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` (+ top-level keys like partial_rotary_factor) as 4.x
    configs carry them, from a v5 `rope_parameters` dict. Per-layer-type dicts (no
    rope_theta at the top) have no 4.x form and give nothing."""
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    rest = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
    out: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    out.update({k: rest.pop(k) for k in _TOP_LEVEL_ROPE_KEYS if k in rest})
    rope_type = rope.get("rope_type", "default")
    # "type" is the pre-4.45 spelling some 4.x validators still read (phi3 longrope).
    out["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, "type": rope_type, **rest}
    return out


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the 4.x fields added; a field already present is kept as it is."""
    out = dict(config)
    for key, value in legacy_rope_fields(config.get("rope_parameters")).items():
        out.setdefault(key, value)
    if "dtype" in out:
        out.setdefault("torch_dtype", out["dtype"])
    if not out.get("architectures"):
        arch = causal_lm_architecture(out.get("model_type", ""))
        if arch:
            out["architectures"] = [arch]
    return out


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    cls = config.get("tokenizer_class")
    return {**config, "tokenizer_class": PORTABLE_TOKENIZER_CLASSES[cls]} if cls in PORTABLE_TOKENIZER_CLASSES else config


def make_portable(folder: Path) -> None:
    """Rewrite the folder's config.json and tokenizer_config.json (where present) in place."""
    folder = Path(folder)
    for name, convert in (("config.json", portable_config), ("tokenizer_config.json", portable_tokenizer_config)):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        fixed = convert(data)
        if fixed != data:
            write_text_atomic(path, json.dumps(fixed, indent=2, sort_keys=True) + "\n")
