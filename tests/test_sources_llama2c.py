"""llama2.c legacy v0 .bin → HF Llama through the CLI, checked against exportline's own
llama2.c forward (interleaved RoPE on the unpermuted q/k)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exportline.exporters.sources.llama2c import convert as llama2c
from exportline.exporters.sources.llama2c.reference import Llama2cReference
from exportline.verify.checks.hf import logit_cases
from exportline.verify.reference import hf_logits, load_hf_model
from exportline.verify.suite import verify_bundle

from sources_fixtures import cli, write_llama2c


def _export(src, out, *extra):
    code, err = cli("export", src, "--stages", "hf", "--out", out, *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.covers("source:llama2c")
@pytest.mark.parametrize("shared", [True, False], ids=["shared-classifier", "own-classifier"])
def test_llama2c_converts_and_verifies(tmp_path, shared):
    write_llama2c(tmp_path / "model.bin", shared=shared)
    manifest = _export(tmp_path / "model.bin", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "reports" / "verify.json").read_text())
    (stage,) = report["stages"]
    assert stage["status"] == "passed" and "llama2.c forward" in stage["reference"]
    assert any("left-padded" in r["case"] for r in stage["rows"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is shared
    assert (config["num_key_value_heads"], config["rms_norm_eps"]) == (2, 1e-5)
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    src = manifest["source"]
    assert src["kind"] == "llama2c" and src["tokenizer"]["kind"] == "none" and src["labels"] == []


def test_conversion_is_exact_once_hf_runs_everything_in_float64(tmp_path, monkeypatch):
    """The 1e-5 bound for llama2.c is HF's doing: LlamaRMSNorm and the rotary tables compute
    in float32 even in a float64 model. Lift them to float64 and the HF model matches the
    reference to float64 rounding, i.e. key map, permute and classifier are exact."""
    from transformers.models.llama import modeling_llama

    def rmsnorm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope64(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angle = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((angle, angle), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm64)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rope64)
    write_llama2c(tmp_path / "model.bin", shared=False, n_kv_heads=1)
    _export(tmp_path / "model.bin", tmp_path / "out", "--no-verify")
    ref = Llama2cReference.from_checkpoint(tmp_path / "model.bin")
    model = load_hf_model(tmp_path / "out", "float64")
    for case in logit_cases(vocab=101, max_positions=96):
        want = ref.logits(case.input_ids, case.attention_mask)
        got = hf_logits(model, case.input_ids, case.attention_mask)
        keep = case.attention_mask.astype(bool)
        assert np.abs(got[keep] - want[keep]).max() / np.abs(want[keep]).max() < 1e-13, case.name


def test_missing_rotary_permute_is_caught_by_the_hf_check(tmp_path, monkeypatch):
    monkeypatch.setattr(llama2c, "permute_rotary", lambda w, n_heads: w)
    write_llama2c(tmp_path / "model.bin")
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--out", tmp_path / "out")
    assert code == 2 and "verification failed: hf: logits" in err
    assert not json.loads((tmp_path / "out" / "reports" / "verify.json").read_text())["passed"]


def test_header_layout_matches_run_c(tmp_path):
    """run.c memory_map_weights: the two RoPE tables are max_seq_len * head_dim / 2 floats
    each and the classifier follows them; a file one float short is refused."""
    t = write_llama2c(tmp_path / "model.bin", shared=False, max_seq_len=40)
    header, tensors = llama2c.read_tensors(tmp_path / "model.bin")
    assert tensors["freqs_cos"].size == 40 * header.head_dim // 2
    assert np.array_equal(tensors["wcls"], t["wcls"]) and np.array_equal(tensors["w2"], t["w2"])
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(llama2c.SourceError, match="truncated"):
        llama2c.read_header(tmp_path / "short.bin")


def test_verify_reports_not_available_when_the_checkpoint_moved(tmp_path):
    write_llama2c(tmp_path / "model.bin")
    _export(tmp_path / "model.bin", tmp_path / "out", "--no-verify")
    (tmp_path / "model.bin").rename(tmp_path / "moved.bin")
    report = verify_bundle(tmp_path / "out", stages=["hf"])
    (stage,) = report.stages
    assert stage.status == "not available" and "not on this machine" in stage.reason


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(200)}  # the model below has 101 embeddings
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    write_llama2c(tmp_path / "model.bin")
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--out", tmp_path / "out",
                    "--tokenizer", tmp_path / "tokenizer.json")
    assert code != 0 and "200 tokens but the model only 101" in err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
