"""Card sections of a custom module's bundle (source kind `custom`): how to load it — its
Python code ships in the folder, so transformers needs trust_remote_code=True — and what
runs where (Python vs graph runtimes)."""

from __future__ import annotations

from typing import Any


def is_custom(manifest: dict[str, Any]) -> bool:
    return manifest.get("source", {}).get("kind") == "custom"


def _io_lines(io: dict[str, Any]) -> list[str]:
    dims = ", ".join(f"`{n}` {r['min']}…{r['max']} (opt {r['opt']})" for n, r in io.get("dims", {}).items())
    lines = [f"- Dynamic dims: {dims or 'none'}"]
    for part in ("inputs", "outputs"):
        for e in io.get(part, []):
            extra = f", values [{e['values'][0]}, {e['values'][1]})" if "values" in e else ""
            lines.append(f"- {part[:-1]} `{e['name']}`: {e.get('dtype', 'float32')} {e['shape']}{extra}")
    return lines


def how_to_use(inp) -> list[str]:
    source, cfg, where = inp.manifest.get("source", {}), inp.config, inp.where
    lm = source.get("task") == "causal-lm"
    auto = "AutoModelForCausalLM" if lm else "AutoModel"
    io = source.get("io") or cfg.get("exportline_io") or {}
    names = [e["name"] for e in io.get("inputs", [])]
    lines = [
        f"This is a custom module (`{source.get('architecture', '?')}`), not a transformers architecture: its "
        f"Python code ships in this folder (`{_modeling(cfg)}`, the author's own file plus a generated wrapper), so "
        "transformers must be told to run it with `trust_remote_code=True`. Read that file first.", "",
        "```python", f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("{where}", trust_remote_code=True)',
    ]
    if lm:
        lines += ["import torch", "ids = torch.tensor([[1, 2, 3]])",
                  "print(model.generate(ids, max_new_tokens=16, do_sample=False))", "```", "",
                  "The module has no KV cache: generate() reruns the whole sequence at every step, and "
                  "attention_mask is ignored (give prompts of one length, no padding)."]
    else:
        lines += [f"outputs = model({', '.join(names)})  # positional, in this order", "```"]
    lines += ["", "Declared inputs and outputs (the one spec behind the ONNX axes, the verification "
              "inputs and the TensorRT profiles):", "", *_io_lines(io), "", "What runs where:", "",
              "- transformers / torch.hub: the Python module in this folder (CPU or GPU, float32 weights).",
              "- ONNX Runtime: `onnx/model.onnx` (fp32), `onnx/model_fp16.onnx`, `onnx/model_int8.onnx`: no Python "
              "code runs; the graph takes the declared inputs by name and returns the declared outputs. "
              "Float inputs and outputs stay float32 in every variant.",
              "- TensorRT: engines built from the fp16/int8 graphs with one optimization profile from the declared dims "
              "(`exportline export DIR --stages trt` on a GPU machine with TensorRT).", "",
              "```python", "import numpy as np, onnxruntime as ort", 'session = ort.InferenceSession("onnx/model.onnx")',
              "feeds = {i.name: ... for i in session.get_inputs()}  # arrays shaped as declared above",
              "outputs = session.run(None, feeds)", "```", "",
              'torch.hub: `torch.hub.load(DIR, "model", source="local", trust_remote_code=True)`'
              + (f' (or `"{source["variant"]}"`, this bundle\'s variant).' if source.get("variant") else ".")]
    return lines


def _modeling(cfg: dict[str, Any]) -> str:
    target = (cfg.get("auto_map") or {}).get("AutoModel", "modeling_?.?")
    return target.rsplit(".", 1)[0] + ".py"


def intended_use(inp) -> list[str]:
    source = inp.manifest.get("source", {})
    return [
        f"- Intended use: whatever `{source.get('architecture', 'the module')}` was trained for; exportline checked "
        "that every artifact computes what the author's module computes in float64 (see Evaluation), not what the "
        "model is good for.",
        f"- Loading runs the Python code in this folder (copied from `{source.get('model_class', '?')}` at export): "
        "trust_remote_code=True is a decision to run it.",
        "- fp16 and int8 differ from fp32 within the bounds in Evaluation; int8 was calibrated on inputs "
        "sampled from the declared spec unless the int8 record names a calibration file.",
    ]


HUBCONF = '''"""torch.hub entry points of an exportline bundle of a custom module (written by exportline).

    torch.hub.load("path/to/bundle", "model", source="local", trust_remote_code=True)

The module's Python code ships in this folder (trust_remote_code=True runs it); the weights
are this folder's model.safetensors; nothing is downloaded.
"""

import os

dependencies = ["torch", "transformers"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def model(**kwargs):
    """{doc}"""
    from transformers import {auto}

    kwargs.setdefault("trust_remote_code", True)
    return {auto}.from_pretrained(_HERE, **kwargs)
'''

VARIANT = '''

def {entry}(**kwargs):
    """The `{variant}` variant: this bundle's model ({params:,} parameters)."""
    return model(**kwargs)
'''


def hubconf_text(manifest: dict[str, Any]) -> str:
    source = manifest.get("source", {})
    auto = "AutoModelForCausalLM" if source.get("task") == "causal-lm" else "AutoModel"
    text = HUBCONF.format(auto=auto, doc=f"{source.get('architecture', 'The module')} with this bundle's weights ({auto}).")
    variant = source.get("variant")
    if variant:  # `<module>_<variant>()`, e.g. stickfiguretransformer_small()
        entry = "".join(c if c.isalnum() else "_" for c in f"{source.get('architecture', 'model')}_{variant}").lower()
        text += VARIANT.format(entry=entry, variant=variant, params=int(source.get("parameters") or 0))
    return text
