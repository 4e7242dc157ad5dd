"""The hf stage writes safetensors as the tensors arrive: files the safetensors library and
transformers read back, shards with an index, bf16 when the preset says so, and never more
than one generated tensor alive (counted with weak references, not timed)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.presets import load_preset
from exportline.exporters.sources.hf_writer import write_hf_stream
from exportline.exporters.sources.preset.source import random_init_plan, random_init_tensors, weight_dtype


def _config():
    return load_preset("tiny").hf_config()


def _read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_file_holds_the_random_init(tmp_path, dtype):
    config = _config()
    files = write_hf_stream(random_init_plan(config, dtype), random_init_tensors(config, 0, dtype=dtype), tmp_path)
    assert files == ["model.safetensors"]
    got = _read_all(tmp_path)
    want = dict(random_init_tensors(config, 0, dtype=dtype))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == dtype and torch.equal(got[k], want[k]) for k in want)
    if dtype == torch.bfloat16:  # the same draws, rounded: bf16 is the upper half of the float32
        fp32 = dict(random_init_tensors(config, 0))
        assert all(torch.equal(fp32[k].to(torch.bfloat16), got[k]) for k in got)


def test_shards_and_index_load_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    config = _config()
    plan = random_init_plan(config, torch.float32)
    files = write_hf_stream(plan, random_init_tensors(config, 0), tmp_path, max_shard_bytes=200_000)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    index = json.loads((tmp_path / files[-1]).read_text())
    assert set(index["weight_map"]) == {name for name, _, _ in plan}
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = dict(random_init_tensors(config, 0))
    state = model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    config = _config()
    alive = []

    def tracked():
        for name, tensor in random_init_tensors(config, 0):
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(tensor))
            yield name, tensor

    refs: list = []
    write_hf_stream(random_init_plan(config, torch.float32), tracked(), tmp_path)
    assert len(alive) > 10 and max(alive) == 0  # when a tensor is drawn, no earlier one is held


def test_unknown_weight_dtype_is_one_line():
    with pytest.raises(ConfigError, match="use float32 or bfloat16"):
        weight_dtype("int4")
