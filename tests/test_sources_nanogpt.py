"""nanoGPT .pt → HF GPT-2 through the CLI, checked by the hf-stage verifier and by the
nanoGPT model the checkpoint was saved from."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from exportline.exporters.sources.nanogpt.reference import NanoGPTReference
from exportline.verify.checks.hf import logit_cases
from exportline.verify.reference import hf_logits, load_hf_model
from exportline.verify.suite import verify_bundle

from bundle_helpers import rerecord
from sources_fixtures import cli, error_line, nanogpt_args, save_nanogpt, write_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def _export(ckpt, out, *extra):
    code, err = cli("export", ckpt, "--stages", "hf", "--out", out, *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def _hf_rows(out):
    report = json.loads((out / "reports" / "verify.json").read_text())
    (stage,) = [s for s in report["stages"] if s["stage"] == "hf"]
    return stage


@pytest.mark.covers("source:nanogpt")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "orig_mod"])
def test_nanogpt_converts_and_verifies(tmp_path, bias, compiled):
    args = nanogpt_args(bias=bias)
    model = save_nanogpt(tmp_path / "ckpt.pt", args, compiled=compiled)
    manifest = _export(tmp_path / "ckpt.pt", tmp_path / "out")

    stage = _hf_rows(tmp_path / "out")
    assert stage["status"] == "passed"
    tight = [r for r in stage["rows"] if "HF float64" in r["case"]]
    assert len(tight) == 3 and all(r["metrics"]["rel_l2"] <= 1e-12 for r in tight)
    assert any("left-padded" in r["case"] for r in tight) and any(r["shape"][1] >= 64 for r in tight)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is True
    assert (config["n_positions"], config["vocab_size"]) == (args["block_size"], args["vocab_size"])
    assert manifest["source"]["kind"] == "nanogpt" and manifest["source"]["labels"] == []
    assert manifest["stages"]["hf"]["info"]["zero_biases"] is (not bias)

    # The HF model against the nanoGPT module the checkpoint was saved from (not our reference).
    ids = torch.randint(0, args["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.double()(ids).numpy()
    hf32 = load_hf_model(tmp_path / "out", "float32")
    got = hf_logits(hf32, ids.numpy())
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    ref = NanoGPTReference.from_checkpoint(tmp_path / "ckpt.pt").logits(ids.numpy())
    assert np.abs(ref - want).max() / np.abs(want).max() < 1e-12


def test_padded_vocab_50304_is_kept_and_no_tokenizer_is_invented(tmp_path):
    args = nanogpt_args(vocab_size=50304, n_embd=16, n_head=2, n_layer=1, block_size=64)
    save_nanogpt(tmp_path / "ckpt.pt", args)
    manifest = _export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 50304
    tok = manifest["source"]["tokenizer"]
    assert tok["kind"] == "none" and "--tokenizer" in tok["reason"]
    assert manifest["stages"]["hf"]["info"]["tokenizer"]["kind"] == "none"
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert _hf_rows(tmp_path / "out")["status"] == "passed"


def test_meta_pkl_becomes_a_char_tokenizer_that_autotokenizer_loads(tmp_path):
    from transformers import AutoTokenizer

    meta = write_meta(tmp_path / "meta.pkl", TEXT)
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args(vocab_size=meta["vocab_size"]))
    manifest = _export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert manifest["source"]["tokenizer"]["kind"] == "char"
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert ids == [meta["stoi"][c] for c in TEXT]
    assert tok.decode(ids) == TEXT


def test_tokenizer_file_option_ships_that_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "src").mkdir()
    meta = write_meta(tmp_path / "src" / "meta.pkl", TEXT)
    save_nanogpt(tmp_path / "src" / "ckpt.pt", nanogpt_args(vocab_size=meta["vocab_size"]))
    _export(tmp_path / "src" / "ckpt.pt", tmp_path / "first", "--no-verify")  # its tokenizer.json is the user's file
    (tmp_path / "other").mkdir()
    save_nanogpt(tmp_path / "other" / "ckpt.pt", nanogpt_args(vocab_size=meta["vocab_size"]), seed=3)
    manifest = _export(tmp_path / "other" / "ckpt.pt", tmp_path / "out", "--tokenizer", tmp_path / "first" / "tokenizer.json")
    assert manifest["source"]["tokenizer"] == {"kind": "file", "file": "tokenizer.json"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(tok("Speak, speak.", add_special_tokens=False).input_ids) == "Speak, speak."


def test_meta_pkl_with_a_class_reference_is_refused(tmp_path):
    import collections

    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"stoi": collections.OrderedDict(a=0), "itos": {0: "a"}, "vocab_size": 1}, f)
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "out")
    assert code != 0 and "refused to load collections.OrderedDict" in error_line(err)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_wrong_activation_is_caught_by_the_hf_check(tmp_path):
    """HF's default GPT-2 activation (tanh GELU) instead of nanoGPT's exact GELU: the
    check must fail, so a passing check means something."""
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "out", "--no-verify")
    assert code == 0, err
    cfg = tmp_path / "out" / "config.json"
    cfg.write_text(cfg.read_text().replace('"activation_function": "gelu"', '"activation_function": "gelu_new"'))
    rerecord(tmp_path / "out")  # as if a faulty hf stage wrote it: only the numbers can tell
    report = verify_bundle(tmp_path / "out", stages=["hf"])
    assert not report.passed
    assert "logits" in report.first_failure() and "rel_l2" in report.first_failure()


def test_preset_checkpoint_field_resolves_to_the_checkpoint(tmp_path):
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    manifest = _export("tiny", tmp_path / "out", "--set", f"checkpoint={tmp_path / 'ckpt.pt'}")
    src = manifest["source"]
    assert (src["kind"], src["preset"], src["labels"], manifest["name"]) == ("nanogpt", "tiny", [], "tiny")
    assert _hf_rows(tmp_path / "out")["status"] == "passed"


def test_rerun_is_cached_and_a_changed_checkpoint_reruns(tmp_path):
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    _export(tmp_path / "ckpt.pt", tmp_path / "out", "--no-verify")
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "out", "--no-verify")
    assert code == 0 and "unchanged, skipped" in err
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args(), seed=7)
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "out", "--no-verify")
    assert code == 0 and "hf: done" in err


def test_cases_cover_batch_lengths_and_padding():
    cases = logit_cases(vocab=50, max_positions=96)
    shapes = {c.input_ids.shape for c in cases}
    assert (1, 7) in shapes and (3, 80) in shapes
    padded = [c for c in cases if (c.attention_mask == 0).any()]
    assert padded and all((c.attention_mask[:, -1] == 1).all() for c in padded)
