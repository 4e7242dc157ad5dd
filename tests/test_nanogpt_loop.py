"""nanoGPT's loop (issue 12): a train.py run folder → export → verify → generate past
block_size → to-checkpoint → train.py-style resume, and the same through the Hub.

Inputs are written the way nanoGPT writes them (tests/nanogpt_train.py: out/ckpt.pt +
data/<dataset>/meta.pkl, block_size 64), never with exportline's own writer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanogpt_train import TEXT, make_run, resume, train_config
from sources_fixtures import bits, cli, error_line, nanogpt_args, save_nanogpt, write_llama2c


def _stages(bundle) -> dict:
    report = json.loads((bundle / "reports" / "verify.json").read_text())
    return {s["stage"]: s for s in report["stages"]}


def sample_py_greedy(model, prompt: list[int], new: int) -> list[int]:
    """nanoGPT model.py generate() with argmax instead of sampling: crop the context to
    block_size, full forward, append; in float64."""
    block = model.transformer.wpe.weight.shape[0]
    idx = torch.tensor([prompt])
    model = model.double().eval()
    with torch.no_grad():
        for _ in range(new):
            cond = idx if idx.size(1) <= block else idx[:, -block:]
            idx = torch.cat([idx, model(cond)[:, -1, :].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt):].tolist()


def _generate_ids(bundle, *rows: list[int], new: int, backend: str = "onnx") -> tuple[list[list[int]], str]:
    import contextlib
    import io
    import sys

    from exportline.exporters.cli.app import main

    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["exportline", "generate", str(bundle), "--backend", backend, "--greedy", "--max-new-tokens", str(new)]
    for row in rows:
        sys.argv += ["--token-ids", ",".join(map(str, row))]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:  # typer exits when the command returns
                assert not exc.code, err.getvalue()
    finally:
        sys.argv = argv
    return [[int(t) for t in line.split(",")] for line in out.getvalue().splitlines()], err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True), (False, False)],
                         ids=["bias-plain", "nobias-orig_mod", "nobias-plain"])
def test_train_py_run_exports_verifies_and_generates_past_block_size(tmp_path, monkeypatch, bias, compiled):
    run = make_run(tmp_path / "nanoGPT", bias=bias, compiled=compiled)
    monkeypatch.chdir(tmp_path / "nanoGPT")  # where nanoGPT's README runs everything
    # nanoGPT's CPU example as its README gives it, once with every stage (the default)
    every = bias and not compiled
    code, err = cli("export", "out/ckpt.pt", *([] if every else ["--stages", "hf,onnx,fp16"]), "--out", tmp_path / "bundle")
    assert code == 0, err
    assert "Traceback" not in err and "warning" not in err  # meta.pkl found in data/shakespeare_char/
    stages = _stages(tmp_path / "bundle")
    assert {k: stages[k]["status"] for k in ("hf", "onnx", "fp16")} == {"hf": "passed", "onnx": "passed", "fp16": "passed"}
    if every:  # English calibration text has characters a 34-char vocabulary cannot encode
        manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
        assert manifest["stages"]["int8"]["status"] == "skipped"
        assert "--calibration-data" in manifest["stages"]["int8"]["reason"]
        assert not any(s["status"] == "failed" for s in stages.values())
    # every case fits the 64 positions: the long one is 63 so its decode step sits at 63
    assert "batch3 decode past 63 left-padded" in {r["case"] for r in stages["onnx"]["rows"]}

    prompt = [run.meta["stoi"][c] for c in "First Citizen:\n"]
    (got,), err = _generate_ids(tmp_path / "bundle", prompt, new=100)
    assert len(got) == len(prompt) + 100
    assert got[len(prompt):] == sample_py_greedy(run.model, prompt, 100)
    assert "cropped to its last 64 tokens" in err


def test_generate_crops_each_row_of_a_left_padded_batch_like_sample_py(tmp_path, monkeypatch):
    run = make_run(tmp_path / "nanoGPT", bias=True, compiled=False, block_size=16)
    monkeypatch.chdir(tmp_path / "nanoGPT")
    code, err = cli("export", "out/ckpt.pt", "--stages", "hf,onnx", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    long_prompt, short_prompt = list(range(20)), [3, 1, 4]  # the first is already past block_size 16
    rows, err = _generate_ids(tmp_path / "bundle", long_prompt, short_prompt, new=30)
    assert rows[0][20:] == sample_py_greedy(run.model, long_prompt, 30)
    assert rows[1][3:] == sample_py_greedy(run.model, short_prompt, 30)


def test_rotary_model_past_its_positions_is_refused_in_one_line(tmp_path):
    write_llama2c(tmp_path / "model.bin", max_seq_len=32)
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    code, err = cli("generate", tmp_path / "bundle", "--backend", "torch", "--token-ids", "1,2,3", "--max-new-tokens", "100")
    line = error_line(err)
    assert code != 0 and "max_position_embeddings 32" in line and "--max-new-tokens 30" in line
    code, err = cli("generate", tmp_path / "bundle", "--backend", "torch", "--token-ids", "1,2,3", "--max-new-tokens", "30")
    assert code == 0, err  # exactly up to the last position


def test_cases_and_greedy_lengths_fit_the_positions():
    from exportline.exporters.core.shapes import KVLayout
    from exportline.verify.cases import build_cases
    from exportline.verify.checks.hf import greedy_steps

    for limit in (8, 16, 64, 65):
        layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, vocab_size=50, max_positions=limit)
        for case in build_cases(layout):
            assert case.position_ids.max() < limit and case.past + case.sequence <= limit, (limit, case.name)
        assert 7 + greedy_steps(7, limit) - 1 <= limit
    assert max(c.past + c.sequence for c in build_cases(KVLayout(1, 2, 4, 50, max_positions=1024))) == 65


# -- resume training ---------------------------------------------------------------------------
def _same(a, b, where="") -> None:
    """Equal values, tensors bit for bit, tuples still tuples, dict keys in the same order."""
    assert type(a) is type(b) or isinstance(a, dict) and isinstance(b, dict), where  # OrderedDict reads as dict
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "orig_mod"])
def test_training_state_round_trips_exactly_and_resumes_identically(tmp_path, compiled):
    run = make_run(tmp_path / "nanoGPT", bias=False, compiled=compiled)
    code, err = cli("export", run.ckpt, "--stages", "hf", "--with-training-state", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    assert (tmp_path / "bundle" / "training" / "state.safetensors").is_file()
    code, err = cli("to-checkpoint", tmp_path / "bundle", "--out", tmp_path / "back.pt")
    assert code == 0, err

    orig = torch.load(run.ckpt, weights_only=True)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    _same(orig, back)  # every key, the optimizer's int-keyed state, betas as a tuple, best_val_loss tensor

    command_line = train_config(init_from="resume")
    a = resume(run.ckpt, command_line, run.data)
    b = resume(tmp_path / "back.pt", command_line, run.data)
    assert a.iter_num == b.iter_num == 250 and a.losses == b.losses and all(np.isfinite(a.losses))
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name  # 3 AdamW steps from the restored moments = from the original
    _same(a.optimizer.state_dict(), b.optimizer.state_dict())


def test_without_training_state_the_checkpoint_resumes_with_a_fresh_optimizer(tmp_path):
    run = make_run(tmp_path / "nanoGPT", bias=True, compiled=True)
    code, err = cli("export", run.ckpt, "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    assert not (tmp_path / "bundle" / "training").exists()
    import contextlib
    import io

    from exportline.exporters.sources.checkpoint_writer import write_checkpoint

    written = write_checkpoint(tmp_path / "bundle", tmp_path / "back.pt", format="nanogpt")
    assert "reset: optimizer" in written.note and "best_val_loss" not in written.note  # recorded, so kept
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["iter_num"] == 250 and back["best_val_loss"] == pytest.approx(1.4693)
    assert back["optimizer"]["state"] == {}
    groups = back["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["betas"] == (0.9, 0.99)

    with contextlib.redirect_stdout(io.StringIO()):
        resumed = resume(tmp_path / "back.pt", train_config(init_from="resume", bias=True), run.data)
    assert len(resumed.losses) == 3 and all(np.isfinite(resumed.losses))
    steps = {float(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
    assert steps == {3.0}  # the moments started from zero at resume
    orig = torch.load(run.ckpt, weights_only=True)
    for key, t in orig["model"].items():
        assert torch.equal(bits(back["model"][key]), bits(t)), key


def test_to_checkpoint_refuses_a_training_state_changed_after_export(tmp_path):
    run = make_run(tmp_path / "nanoGPT", bias=True, compiled=False)
    code, err = cli("export", run.ckpt, "--stages", "hf", "--with-training-state", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    state = tmp_path / "bundle" / "training" / "state.json"
    data = json.loads(state.read_text())
    assert data["tree"]["iter_num"] == {"value": 250}
    data["tree"]["iter_num"] = {"value": 999}
    state.write_text(json.dumps(data))
    code, err = cli("to-checkpoint", tmp_path / "bundle", "--out", tmp_path / "back.pt")
    line = error_line(err)
    assert code != 0 and "training/state.json" in line and "manifest" in line and "rebuild it" in line
    assert not (tmp_path / "back.pt").exists()


def test_with_training_state_is_refused_for_a_source_without_one(tmp_path):
    write_llama2c(tmp_path / "model.bin")
    code, err = cli("export", tmp_path / "model.bin", "--stages", "hf", "--with-training-state", "--out", tmp_path / "b")
    assert code != 0 and "carries no optimizer state" in error_line(err)


# -- tokenizers: meta.pkl in nanoGPT's layout, --meta, GPT-2 -------------------------------------
def test_meta_pkl_is_found_under_data_dataset_from_anywhere(tmp_path, monkeypatch):
    run = make_run(tmp_path / "nanoGPT", bias=True, compiled=False)
    monkeypatch.chdir(tmp_path)  # not the run folder: found through the checkpoint's parents
    code, err = cli("export", run.ckpt, "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0 and "warning" not in err, err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "bundle")
    assert tok(TEXT, add_special_tokens=False).input_ids == [run.meta["stoi"][c] for c in TEXT]


def test_char_model_without_its_meta_warns_and_meta_option_fixes_it(tmp_path, monkeypatch):
    run = make_run(tmp_path / "nanoGPT", bias=True, compiled=False, dataset="tiny_char")
    moved = tmp_path / "elsewhere" / "meta.pkl"
    moved.parent.mkdir()
    (tmp_path / "nanoGPT" / "data" / "tiny_char" / "meta.pkl").rename(moved)
    monkeypatch.chdir(tmp_path)
    code, err = cli("export", run.ckpt, "--stages", "hf", "--out", tmp_path / "b1", "--no-verify")
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "character-level" in warning[0] and "--meta" in warning[0]
    assert not (tmp_path / "b1" / "tokenizer.json").exists()

    code, err = cli("export", run.ckpt, "--stages", "hf", "--out", tmp_path / "b2", "--no-verify", "--meta", moved)
    assert code == 0 and "warning" not in err, err
    assert json.loads((tmp_path / "b2" / "manifest.json").read_text())["source"]["tokenizer"]["kind"] == "char"
    code, err = cli("export", run.ckpt, "--stages", "hf", "--out", tmp_path / "b3", "--meta", tmp_path / "nope.pkl")
    assert code != 0 and "--meta" in error_line(err)


def _tiktoken_gpt2():
    """tiktoken's own "gpt2" encoding, from the same two files on disk (no download)."""
    from tiktoken.core import Encoding
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from exportline.exporters.sources.gpt2_tokenizer import FILES, gpt2_files

    files = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=FILES["vocab.bpe"], encoder_json_hash=FILES["encoder.json"])
    return Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def test_tokenizer_gpt2_ships_gpt2_bpe_identical_to_tiktoken(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from exportline.exporters.sources.tokenizer import default_corpus

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken reads the local files, caches nothing
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args(vocab_size=50304, n_embd=16, n_head=2, n_layer=1, block_size=64))
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "plain", "--no-verify")
    assert code == 0 and "--tokenizer gpt2" in err, err  # the warning names the fix
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--tokenizer", "gpt2", "--out", tmp_path / "b")
    assert code == 0 and "warning" not in err, err
    assert _stages(tmp_path / "b")["hf"]["status"] == "passed"

    tok, ref = AutoTokenizer.from_pretrained(tmp_path / "b"), _tiktoken_gpt2()
    text = default_corpus().read_text()[:20000] + "\n  naïve café — 東京 🤖  tabs\t\tand   spaces\n\n'll 're 2024"
    lines = text.splitlines(keepends=True)
    assert [tok(t, add_special_tokens=False).input_ids for t in lines] == [ref.encode_ordinary(t) for t in lines]
    assert tok("Hello world").input_ids == [15496, 995] and tok.eos_token_id == 50256
    assert tok.decode(tok(text).input_ids) == text


# -- through the Hub -------------------------------------------------------------------------------
@pytest.mark.slow
def test_pull_to_checkpoint_gives_a_resumable_checkpoint(local_hub, tmp_path):
    run = make_run(tmp_path / "nanoGPT", bias=False, compiled=True)
    code, err = cli("export", run.ckpt, "--stages", "hf,onnx", "--with-training-state", "--out", tmp_path / "bundle",
                    "--no-verify")
    assert code == 0, err
    pushed = local_hub.cli("push", str(tmp_path / "bundle"), "--repo-id", "org/shakespeare", env_token=local_hub.token)
    assert pushed.returncode == 0, pushed.stderr
    got = local_hub.cli("pull", "org/shakespeare", "--to-checkpoint", "nanogpt", "--out", str(tmp_path / "new" / "ckpt.pt"),
                        env_token=local_hub.token)
    assert got.returncode == 0, got.stderr
    assert "training state restored" in got.stdout
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["ckpt.pt"]  # the download is gone
    downloaded = [req for _, req, _ in local_hub.state.log if req.startswith("GET")]
    assert downloaded and not any("onnx" in req for req in downloaded)  # only what a checkpoint needs
    _same(torch.load(run.ckpt, weights_only=True), torch.load(tmp_path / "new" / "ckpt.pt", weights_only=True))
    code, err = cli("handoff", tmp_path / "bundle", "--triton", tmp_path / "triton")
    assert code == 0, err
    handed = [p.relative_to(tmp_path / "triton").as_posix() for p in (tmp_path / "triton").rglob("*") if p.is_file()]
    assert handed and not any("training" in p or "state" in p for p in handed)  # inference only
    resumed = resume(tmp_path / "new" / "ckpt.pt", train_config(init_from="resume"), run.data)
    assert resumed.iter_num == 250 and len(resumed.losses) == 3
