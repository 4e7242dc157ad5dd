"""The files outside tools read (exporters/core/consumer_files.py, sources/hf_compat.py), without the tools:
fast checks of what the slow tests/test_consumers.py proves end to end."""

from __future__ import annotations

import json

import pytest

from exportline.exporters.core.consumer_files import genai_overlay, transformers_js_config, write_consumer_files
from exportline.exporters.core.layout import GRAPHS
from exportline.exporters.sources.hf_compat import legacy_rope_fields, portable_config, portable_tokenizer_config

from bundle_helpers import mismatched


def test_legacy_rope_fields_beside_rope_parameters():
    assert legacy_rope_fields({"rope_theta": 1e6, "rope_type": "default"}) == {"rope_theta": 1e6, "rope_scaling": None}
    llama3 = legacy_rope_fields({"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "partial_rotary_factor": 0.5})
    assert llama3 == {"rope_theta": 5e5, "partial_rotary_factor": 0.5,
                      "rope_scaling": {"rope_type": "llama3", "type": "llama3", "factor": 8.0}}
    config = portable_config({"model_type": "qwen2", "dtype": "float32", "rope_parameters": {"rope_theta": 1e6}})
    assert config["rope_theta"] == 1e6 and config["torch_dtype"] == "float32"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert portable_tokenizer_config({"tokenizer_class": "TokenizersBackend"})["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert portable_tokenizer_config({"tokenizer_class": "LlamaTokenizer"})["tokenizer_class"] == "LlamaTokenizer"


def test_consumer_files_name_only_graphs_that_exist(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2).save_pretrained(tmp_path)
    assert write_consumer_files(tmp_path) == []  # no graph: nothing to name
    (tmp_path / "onnx").mkdir()
    for name in ("model.onnx", "model.onnx_data", "model_int8.onnx", "model_int8.onnx_data", "model_fp16.onnx"):
        (tmp_path / "onnx" / name).write_bytes(b"x")  # fp16 without its data file does not count
    assert set(write_consumer_files(tmp_path)) == {"config.json", "genai_config.json"}
    assert write_consumer_files(tmp_path) == []  # idempotent: a rerun changes nothing
    block = json.loads((tmp_path / "config.json").read_text())["transformers.js_config"]
    assert block == transformers_js_config({"fp32": "onnx/model.onnx", "int8": "onnx/model_int8.onnx"})
    assert block["use_external_data_format"] == {"model.onnx": 1, "model_int8.onnx": 1}
    assert block["dtype"] == "fp32" and block["device_config"]["wasm"]["dtype"] == "int8"
    genai = json.loads((tmp_path / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["filename"] == "onnx/model.onnx" and genai["type"] == "qwen2"
    assert (genai["decoder"]["num_key_value_heads"], genai["decoder"]["head_size"], genai["context_length"]) == (2, 8, 128)
    assert json.loads(genai_overlay("int8"))["model"]["decoder"]["filename"] == GRAPHS["int8"].path
    for p in (tmp_path / "onnx").iterdir():
        p.unlink()
    write_consumer_files(tmp_path)  # graphs gone: so are the configs naming them
    assert "transformers.js_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "genai_config.json").exists()


@pytest.mark.slow
def test_adding_a_graph_reruns_no_earlier_stage(tmp_path):
    """config.json gains a transformers.js entry when fp16 lands; the stages that read
    config.json hash it without that block, so nothing before fp16 runs again."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.core.presets import load_preset
    from exportline.exporters.sources.preset.source import PresetSource
    from exportline.exporters.stages import parse_stages

    source = PresetSource(load_preset("tiny"))
    run_pipeline(Bundle(tmp_path), source, stages=parse_stages("hf,onnx"))
    before = json.loads((tmp_path / "config.json").read_text())["transformers.js_config"]
    ran = run_pipeline(Bundle(tmp_path), source, stages=parse_stages("hf,onnx,fp16")).ran
    assert [r.get("cached", False) for r in ran] == [True, True, False]
    after = json.loads((tmp_path / "config.json").read_text())["transformers.js_config"]
    assert set(before["use_external_data_format"]) == {"model.onnx"}
    assert set(after["use_external_data_format"]) == {"model.onnx", "model_fp16.onnx"}
    assert mismatched(tmp_path) == []  # the manifest records the rewritten config.json


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_genai_config_read_as_json_equals_transformers(arch, tmp_path):
    """The JSON short cut (no transformers import) gives what transformers' config gives, and
    a config.json missing a field (qwen2 saves no head_dim, gpt2 has its n_embd names) is
    read by transformers."""
    from transformers import AutoConfig

    from exportline.exporters.core import consumer_files

    kwargs = {"gpt2": dict(n_embd=32, n_layer=2, n_head=4)}.get(
        arch, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    AutoConfig.for_model(arch, vocab_size=64, **kwargs).save_pretrained(tmp_path)
    fast = consumer_files._hf_config(tmp_path)
    assert (type(fast).__name__ == "SimpleNamespace") == (arch == "llama")
    slow = consumer_files._transformers_config(tmp_path)
    assert consumer_files.genai_config(fast, filename="m") == consumer_files.genai_config(slow, filename="m")
