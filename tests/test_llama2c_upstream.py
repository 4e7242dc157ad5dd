"""llama2.c as its users run it: checkpoints written by export.py (file versions 0, 1, 2),
vocabularies trained with sentencepiece as tinystories.py does and written to tokenizer.bin
by tokenizer.py, and greedy text compared with a compiled port of run.c."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llama2c_upstream import (
    ModelArgs,
    TinyLlama2c,
    dequantised_copy,
    export_tokenizer_bin,
    legacy_export,
    run_c_encode,
    run_c_generate,
    train_vocab,
    version1_export,
    version2_export,
)

from exportline.exporters.sources.llama2c import convert as llama2c
from exportline.exporters.sources.spm_tokenizer import write_spm_tokenizer
from exportline.exporters.sources.tokenizer import default_corpus

from sources_fixtures import cli, error_line

WRITERS = {0: legacy_export, 1: version1_export, 2: version2_export}
# Unicode the vocabulary knows, some it does not (byte fallback), and whitespace runs.
UNICODE = "Zoë's café — naïve façade: 東京 and Москва, tabs\tand  double  spaces,\n\n   indented lines.\n"
PROBES = ["Hello world", "  two leading spaces", "trailing   ", "multi\n\nline\n  x", "emoji 😀 and 漢字 ok",
          "tab\there", "", " ", "a  b   c    d", "Zoë's café", "東京 Москва", "digits 12345 and 3.14159"]
PROMPT = "Zoë's café was"


def _corpus(lines: int) -> list[str]:
    text = default_corpus().read_text(encoding="utf-8")
    return text[100_000:].split("\n")[:lines]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A 512-piece BPE trained with llama2.c's train_vocab settings, and its tokenizer.bin."""
    d = tmp_path_factory.mktemp("vocab")
    model = train_vocab(default_corpus().read_text(encoding="utf-8")[:100_000] + UNICODE * 5, d / "tok512")
    return model, export_tokenizer_bin(model)


@pytest.mark.parametrize("args", [ModelArgs(), ModelArgs(dim=48, hidden_dim=128)], ids=["gs64", "gs-backoff-16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-classifier"])
def test_file_versions_read_as_export_py_writes_them(tmp_path, args, shared):
    """v1 holds v0's fp32 weights in another order; v2 reads back as exactly the fp32 values
    quantize_q80 dequantises to (what runq.c computes with)."""
    model = TinyLlama2c(args, shared=shared)
    for version, write in WRITERS.items():
        write(model, tmp_path / f"v{version}.bin")
    group_size = version2_export(model, tmp_path / "v2.bin")
    legacy_export(dequantised_copy(model, group_size), tmp_path / "dq.bin")
    _, v0 = llama2c.read_tensors(tmp_path / "v0.bin")
    h1, v1 = llama2c.read_tensors(tmp_path / "v1.bin")
    h2, v2 = llama2c.read_tensors(tmp_path / "v2.bin")
    _, dq = llama2c.read_tensors(tmp_path / "dq.bin")
    assert (h1.version, h2.version, h2.group_size) == (1, 2, 64 if args.dim == 64 else 16)
    assert h1.shared_classifier is h2.shared_classifier is shared
    assert set(v1) == set(v2) == {k for k in v0 if not k.startswith("freqs_")}
    for name in v1:
        assert np.array_equal(v1[name], v0[name]), name
        assert np.array_equal(v2[name], dq[name]), name
    assert 0 < np.abs(v2["wq"] - v0["wq"]).max() < 0.01  # really quantized, and not garbled


@pytest.mark.parametrize("defect", ["version-3", "truncated-v2", "group-size-0"])
def test_bad_versioned_files_are_refused_in_one_line(tmp_path, defect):
    version2_export(TinyLlama2c(ModelArgs()), tmp_path / "model.bin")
    data = bytearray((tmp_path / "model.bin").read_bytes())
    if defect == "version-3":
        data[4:8] = (3).to_bytes(4, "little")
    elif defect == "truncated-v2":
        data = data[:-1]
    else:
        data[37:41] = (0).to_bytes(4, "little")
    (tmp_path / "model.bin").write_bytes(bytes(data))
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--out", tmp_path / "out")
    line = error_line(err)
    want = {"version-3": "file version 3 (magic 'ak42') is unknown", "truncated-v2": "but the file has",
            "group-size-0": "group size 0 does not divide"}[defect]
    assert code != 0 and want in line and "export.py" in line
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("collapse", [True, False], ids=["train_vocab-defaults", "llama2-whitespace"])
def test_tokenizers_encode_like_sentencepiece_and_run_c(tmp_path, collapse):
    """tokenizer.model → sentencepiece's ids (its normalizer spec, as the model was trained on);
    tokenizer.bin → run.c's encode() (which never collapses whitespace). With Llama 2's
    `remove_extra_whitespaces: false` the two agree, whitespace runs included."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = default_corpus().read_text(encoding="utf-8")[:100_000] + UNICODE * 5
    model = train_vocab(text, tmp_path / "tok", **({} if collapse else {"remove_extra_whitespaces": False}))
    tokenizer_bin = export_tokenizer_bin(model)
    texts = PROBES + _corpus(60) + [UNICODE]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    want_sp = [[1] + sp.encode(t) for t in texts]
    want_c = run_c_encode(tokenizer_bin, sp.vocab_size(), texts, tmp_path)
    assert (want_sp == want_c) is (not collapse)  # the probes really exercise whitespace runs
    byte_ids = {t for ids in want_sp for t in ids if 3 <= t < 259}
    assert byte_ids  # and byte fallback
    for path, want in ((model, want_sp), (tokenizer_bin, want_c)):
        write_spm_tokenizer(path, tmp_path / path.suffix[1:], model_max_length=4096)
        tok = AutoTokenizer.from_pretrained(tmp_path / path.suffix[1:])
        got = [tok.encode(t) for t in texts]
        bad = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
        assert not bad, (path.name, bad[:2])
        assert tok.decode(tok.encode("Zoë's café 😀"), skip_special_tokens=True) == "Zoë's café 😀"


def _export_and_generate(tmp_path, model_file, tokenizer, *stages, backend="torch", new=24):
    from exportline.verify.generate import generate_from_bundle

    out = tmp_path / "out"
    code, err = cli("export", model_file, "--stages", ",".join(stages), "--out", out, "--tokenizer", tokenizer)
    assert code == 0, err
    report = json.loads((out / "reports" / "verify.json").read_text())
    assert report["passed"] and all(s["status"] == "passed" for s in report["stages"]), report
    result = generate_from_bundle(out, backend=backend, prompts=[PROMPT], max_new_tokens=new)
    manifest = json.loads((out / "manifest.json").read_text())
    return {**manifest, "verify": report}, result


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("tok_kind", ["model", "bin"])
def test_greedy_text_equals_run_c(tmp_path, vocab, version, tok_kind):
    """export → verify → greedy 24 tokens through the HF bundle == the run.c port on the same
    weights (for v2: the dequantised weights, written as v0 for run.c)."""
    model_spm, tokenizer_bin = vocab
    model = TinyLlama2c(ModelArgs(), shared=version != 1, seed=version)
    WRITERS[version](model, tmp_path / "model.bin")
    reference = dequantised_copy(model, 64) if version == 2 else model
    legacy_export(reference, tmp_path / "run_c.bin")
    prompt_ids, want_ids, want_text = run_c_generate(tmp_path / "run_c.bin", tokenizer_bin, PROMPT, 24)

    manifest, result = _export_and_generate(tmp_path, tmp_path / "model.bin",
                                            model_spm if tok_kind == "model" else tokenizer_bin, "hf")
    src = manifest["source"]
    assert src["file_version"] == version and src["tokenizer"]["file"].endswith(tok_kind)
    assert ("int8 (Q8_0, group size 64" in src["weights_precision"]) is (version == 2)
    (hf_check,) = manifest["verify"]["stages"]
    assert ("int8 (Q8_0" in hf_check["reference"]) is (version == 2)  # the bound is against those weights
    assert manifest["stages"]["hf"]["info"]["tokenizer"]["kind"] == "sentencepiece"
    assert result.generation.tokens == [want_ids] and len(want_ids) == 24
    assert result.lines == [want_text.replace("\n", "\\n")]
    assert result.lines[0].startswith(PROMPT) and len(prompt_ids) > 2


@pytest.mark.slow
def test_greedy_text_through_onnx_equals_run_c(tmp_path, vocab):
    """The same for a v2 file and tokenizer.bin through the ONNX KV-cache graph."""
    _, tokenizer_bin = vocab
    model = TinyLlama2c(ModelArgs(), shared=False, seed=3)
    version2_export(model, tmp_path / "model.bin")
    legacy_export(dequantised_copy(model, 64), tmp_path / "run_c.bin")
    _, want_ids, want_text = run_c_generate(tmp_path / "run_c.bin", tokenizer_bin, PROMPT, 32)
    manifest, result = _export_and_generate(tmp_path, tmp_path / "model.bin", tokenizer_bin, "hf", "onnx",
                                            backend="onnx", new=32)
    assert set(manifest["stages"]) == {"hf", "onnx"}
    assert result.generation.tokens == [want_ids]
    assert result.lines == [want_text.replace("\n", "\\n")]


@pytest.mark.parametrize("defect", ["not-a-model", "unigram", "truncated-bin", "bin-without-bos"])
def test_bad_tokenizer_files_are_refused_in_one_line(tmp_path, vocab, defect):
    model_spm, tokenizer_bin = vocab
    legacy_export(TinyLlama2c(ModelArgs()), tmp_path / "model.bin")
    if defect == "not-a-model":
        (tok := tmp_path / "tokenizer.model").write_bytes(b"\xff" * 64)
    elif defect == "unigram":
        tok = train_vocab(default_corpus().read_text(encoding="utf-8")[:20_000], tmp_path / "uni", vocab_size=400,
                          model_type="unigram")
    elif defect == "truncated-bin":
        (tok := tmp_path / "tokenizer.bin").write_bytes(tokenizer_bin.read_bytes()[:-3])
    else:
        data = bytearray(tokenizer_bin.read_bytes())
        at = data.index(b"\n<s>\n")
        data[at:at + 5] = b"\n<S>\n"
        (tok := tmp_path / "tokenizer.bin").write_bytes(bytes(data))
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--out", tmp_path / "out", "--tokenizer", tok)
    want = {"not-a-model": "not a sentencepiece model", "unigram": "only BPE", "truncated-bin": "truncated after",
            "bin-without-bos": "are not llama2.c's BOS/EOS"}[defect]
    assert code != 0 and want in error_line(err)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_generation_stops_at_bos_as_run_c_does(tmp_path, vocab):
    """run.c ends a sequence when the model emits BOS (1). Make BOS the greedy choice where
    the model would emit its 6th token (its classifier row 1.5× that token's row, so its
    logit is 1.5× the winning, positive logit): run.c and the bundle both stop there."""
    import torch

    _, tokenizer_bin = vocab
    model = TinyLlama2c(ModelArgs(), shared=False, seed=5)
    legacy_export(model, tmp_path / "run_c.bin")
    _, ids, _ = run_c_generate(tmp_path / "run_c.bin", tokenizer_bin, PROMPT, 24)
    with torch.no_grad():
        model.output.weight[1] = 1.5 * model.output.weight[ids[5]]
    legacy_export(model, tmp_path / "run_c.bin")
    version1_export(model, tmp_path / "model.bin")
    _, want_ids, want_text = run_c_generate(tmp_path / "run_c.bin", tokenizer_bin, PROMPT, 24)
    assert want_ids[-1] == 1 and len(want_ids) <= 6
    _, result = _export_and_generate(tmp_path, tmp_path / "model.bin", tokenizer_bin, "hf")
    assert result.generation.tokens == [want_ids] and result.generation.finish == ["eos"]
    assert result.lines == [want_text.replace("\n", "\\n")]
