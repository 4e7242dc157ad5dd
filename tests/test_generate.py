"""Generation with the KV cache (verify/generate.py) and `exportline generate`."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from exportline.exporters.core.errors import ConfigError
from exportline.verify.cases import positions
from exportline.verify.generate import Sampling, empty_past, generate, left_pad, pick
from exportline.verify.runtime import make_runner

from verify_helpers import copy_bundle, exportline_cmd, shared_bundle

PROMPTS = [[5, 17, 301, 44, 9, 250, 3], [77, 12]]  # different lengths: the batch is left-padded


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def runner(request, bundle):
    with make_runner(bundle, request.param) as r:
        yield r


@pytest.fixture(scope="module")
def layout(bundle):
    from transformers import AutoConfig

    from exportline.exporters.core.shapes import KVLayout

    return KVLayout.from_config(AutoConfig.from_pretrained(bundle))


def recompute_greedy(runner, layout, prompt: list[int], n: int) -> list[int]:
    """No cache: every step is a fresh prefill of the whole sequence so far."""
    seq = list(prompt)
    for _ in range(n):
        ids = np.array([seq], dtype=np.int64)
        mask = np.ones_like(ids)
        out = runner.infer({"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
                            **empty_past(layout, 1)})
        seq.append(int(out["logits"][0, -1].argmax()))
    return seq[len(prompt):]


def test_cache_path_equals_full_recompute(runner, layout):
    n = 24
    cached = generate(runner, PROMPTS, layout=layout, max_new_tokens=n)
    for prompt, tokens in zip(PROMPTS, cached.tokens):
        assert tokens == recompute_greedy(runner, layout, prompt, n)
    assert cached.decode_steps == n - 1 and cached.finish == ["length", "length"]
    assert cached.prefill_s > 0 and cached.decode_tokens_per_s > 0


def test_left_padded_batch_equals_each_prompt_alone(runner, layout):
    batch = generate(runner, PROMPTS, layout=layout, max_new_tokens=16).tokens
    alone = [generate(runner, [p], layout=layout, max_new_tokens=16).tokens[0] for p in PROMPTS]
    assert batch == alone


def test_matches_transformers_generate(bundle, layout):
    """Our loop over the torch runner reproduces HF's own greedy `generate`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPTS[0]])
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    with make_runner(bundle, "torch") as r:
        ours = generate(r, [PROMPTS[0]], layout=layout, max_new_tokens=20).tokens[0]
    assert ours == hf[0, len(PROMPTS[0]):].tolist()


def test_eos_stops_each_sequence(runner, layout):
    free = generate(runner, PROMPTS, layout=layout, max_new_tokens=12).tokens
    eos = free[0][4]
    stop = free[0].index(eos)  # first occurrence of that token
    result = generate(runner, PROMPTS, layout=layout, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert result.tokens[0] == free[0][: stop + 1] and result.finish[0] == "eos"
    if eos not in free[1]:  # the other sequence runs on, unchanged by its finished neighbour
        assert result.tokens[1] == free[1] and result.finish[1] == "length"


def test_sampling_reproducible_with_seed(runner, layout):
    s = Sampling(greedy=False, temperature=1.3, top_k=20, seed=7)
    a = generate(runner, PROMPTS, layout=layout, max_new_tokens=16, sampling=s).tokens
    b = generate(runner, PROMPTS, layout=layout, max_new_tokens=16, sampling=s).tokens
    c = generate(runner, PROMPTS, layout=layout, max_new_tokens=16, sampling=Sampling(False, 1.3, 20, seed=8)).tokens
    greedy = generate(runner, PROMPTS, layout=layout, max_new_tokens=16).tokens
    assert a == b and a != c and a != greedy


def test_pick_top_k_and_temperature():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.6, 0.3]] * 4000))
    draws = pick(logits, Sampling(greedy=False, top_k=2), rng)
    assert set(draws.tolist()) == {1, 2}  # top-2 never draws token 0
    assert abs((draws == 1).mean() - 0.6 / 0.9) < 0.03
    assert (pick(logits, Sampling(greedy=False, top_k=1), rng) == 1).all()
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(greedy=False, temperature=0)


def test_left_pad_layout():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ConfigError):
        left_pad([[1], []], pad_token_id=0)


def test_cli_generate_text_on_stdout_timings_on_stderr(bundle):
    run = _cli("generate", str(bundle), "--backend", "onnx", "--prompt", "The module", "--prompt", "Return",
               "--max-new-tokens", "8", "--greedy")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("The module") and lines[1].startswith("Return")
    assert "tokens/s" in run.stderr and "tokens/s" not in run.stdout
    again = _cli("generate", str(bundle), "--backend", "torch", "--prompt", "The module", "--prompt", "Return",
                 "--max-new-tokens", "8")
    assert again.stdout == run.stdout  # torch fp32 and ONNX Runtime agree greedily


def test_cli_generate_without_tokenizer_takes_token_ids(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).unlink()
    text = _cli("generate", str(root), "--prompt", "hello")
    assert text.returncode == 1 and "--token-ids" in text.stderr.strip().splitlines()[-1]
    ids = _cli("generate", str(root), "--token-ids", "1,2,3", "--max-new-tokens", "4", "--temperature", "0.7",
               "--seed", "3")
    assert ids.returncode == 0, ids.stderr
    out = [int(t) for t in ids.stdout.strip().split(",")]
    assert out[:3] == [1, 2, 3] and 3 < len(out) <= 7
    assert "no tokenizer" in ids.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*exportline_cmd(), *args], capture_output=True, text=True, timeout=300)
