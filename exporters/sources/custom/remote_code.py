"""The remote-code HF folder of a custom module: configuration_<name>.py (a PretrainedConfig
holding the constructor kwargs), modeling_<name>.py (the user's file copied verbatim, then a
generated PreTrainedModel wrapper), the user's sibling files, and config.json with auto_map,
so `AutoModel[ForCausalLM].from_pretrained(dir, trust_remote_code=True)` builds it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from exportline.exporters.sources.custom.module_file import ModuleFile

TASKS = ("causal-lm", "forward")

_CONFIG = '''"""Configuration of {cls}, written by exportline: the constructor kwargs of the module."""

from transformers import PretrainedConfig


class {config}(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, module_kwargs=None, exportline_task="forward", exportline_io=None, **kwargs):
        self.module_kwargs = dict(module_kwargs or {{}})  # {cls}(**module_kwargs)
        self.exportline_task = exportline_task
        self.exportline_io = exportline_io  # inputs, outputs and dynamic dims (exportline --inputs)
        super().__init__(**kwargs)
'''

_WRAPPER = '''

# ---- written by exportline: the transformers wrapper around {cls} (everything above is the
# ---- user's own module file, copied verbatim) ----
from transformers import GenerationMixin as _ExportlineGenerationMixin  # noqa: E402
from transformers import PreTrainedModel as _ExportlinePreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput as _ExportlineCausalLMOutput  # noqa: E402

from .configuration_{name} import {config}  # noqa: E402


class {wrapper}({bases}):
    """{cls} as a transformers model; the module itself is `self.model`."""

    config_class = {config}
    base_model_prefix = "model"
    main_input_name = "{first_input}"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.model = {cls}(**config.module_kwargs)
        self.post_init()

    def _init_weights(self, module):
        pass  # the module initialises itself; from_pretrained then loads model.safetensors
{forward}'''

_FORWARD_LM = '''
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # {cls} takes token ids only: attention_mask is ignored (no padding support) and there
        # is no KV cache, so generate() runs the whole sequence at every step.
        out = self.model(input_ids)
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return _ExportlineCausalLMOutput(logits=out)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
'''

_FORWARD_ANY = '''
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
'''


def names_for(class_name: str, taken: set[str], task: str) -> dict[str, str]:
    name = re.sub(r"[^a-z0-9]", "", class_name.lower()) or "custom"
    suffix = "ForCausalLM" if task == "causal-lm" else "Model"
    wrapper, config = f"{class_name}{suffix}", f"{class_name}Config"
    if wrapper in taken or wrapper == class_name:
        wrapper = f"{class_name}HF{suffix}"
    if config in taken:
        config = f"{class_name}HFConfig"
    return {"name": name, "wrapper": wrapper, "config": config, "model_type": f"exportline_{name}"}


def write_remote_code(dest: Path, module: ModuleFile, *, task: str, first_input: str) -> dict[str, str]:
    """configuration_/modeling_ files and the sibling files; returns the names used."""
    import ast

    source = module.path.read_text()
    taken = {n.name for n in ast.parse(source).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    names = names_for(module.class_name, taken, task)
    fill = {**names, "cls": module.class_name, "first_input": first_input}
    (dest / f"configuration_{names['name']}.py").write_text(_CONFIG.format(**fill))
    bases = ("_ExportlinePreTrainedModel, _ExportlineGenerationMixin" if task == "causal-lm"
             else "_ExportlinePreTrainedModel")
    forward = (_FORWARD_LM.replace("{cls}", module.class_name) if task == "causal-lm" else _FORWARD_ANY)
    (dest / f"modeling_{names['name']}.py").write_text(
        source.rstrip("\n") + "\n" + _WRAPPER.format(**fill, bases=bases, forward=forward))
    for sibling in module.siblings:
        shutil.copyfile(sibling, dest / sibling.name)
    return names


def config_json(names: dict[str, str], *, task: str, kwargs: dict[str, Any], io: dict[str, Any]) -> dict[str, Any]:
    import transformers

    auto = {"AutoConfig": f"configuration_{names['name']}.{names['config']}",
            "AutoModel": f"modeling_{names['name']}.{names['wrapper']}"}
    if task == "causal-lm":
        auto["AutoModelForCausalLM"] = auto["AutoModel"]
    config = {
        "architectures": [names["wrapper"]], "model_type": names["model_type"], "auto_map": auto,
        "module_kwargs": kwargs, "exportline_task": task, "exportline_io": io,
        "tie_word_embeddings": False, "use_cache": False, "dtype": "float32", "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    if task == "causal-lm":
        ids = io["inputs"][0]  # input_ids (CustomSource checks it is first)
        config["vocab_size"] = int(ids["values"][1])
        config["max_position_embeddings"] = int(io["dims"][ids["shape"][1]]["max"])
    return config


def write_config(dest: Path, config: dict[str, Any], *, task: str) -> list[str]:
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if task != "causal-lm":
        return ["config.json"]
    generation = {"use_cache": False, "do_sample": False, "transformers_version": config["transformers_version"]}
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return ["config.json", "generation_config.json"]
