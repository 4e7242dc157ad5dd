"""Streamed verification models (verify/runtime/streamed.py): the same outputs as the whole
in-memory model, bit for bit, while holding one module's weights at a time."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from exportline.verify.cases import Materialized, build_cases
from exportline.verify.runtime.torch_runner import TorchRunner

SMALL = dict(vocab_size=320, max_position_embeddings=64)


def _llama(tied: bool = False, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **SMALL))


def _gpt2():  # Conv1D weights, tied lm_head
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2))


def _qwen2():  # q/k/v biases
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **SMALL))


MODELS = {"llama": _llama, "llama-tied": lambda: _llama(tied=True), "gpt2": _gpt2, "qwen2": _qwen2}


def _saved(make, path):
    import torch

    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # biases are zero-initialised: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(path)  # transformers' own writer, as a user's folder would be
    return path


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streamed_runner_is_bit_identical_to_the_whole_model(arch, dtype, tmp_path):
    """Against from_pretrained itself. (A float32 weight copied into a fresh buffer would not
    do: CPU BLAS rounds by the operands' alignment — measured on the tiny GPT-2's lm_head —
    and the streamed tensors are mapped where the file puts them, as transformers maps them.)"""
    root = _saved(MODELS[arch], tmp_path / arch)
    with TorchRunner(root, dtype=dtype) as whole, TorchRunner(root, dtype=dtype, streamed=True) as streamed:
        assert streamed.float64_rebound == whole.float64_rebound  # the rebinding check ran on real weights
        if dtype == "float64" and arch != "gpt2":
            assert streamed.float64_rebound == ["RMSNorm", "rotary embedding"]
        layout = whole.layout
        a, b = Materialized(whole, layout), Materialized(streamed, layout)
        for case in build_cases(layout, long=16):  # prefill, padded batch, decode after a past
            (_, want), (_, got) = a.run(case), b.run(case)
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), (case.name, name)
        assert all(p.is_meta for p in streamed.model.parameters())  # nothing left loaded between forwards


def test_streamed_model_holds_at_most_the_largest_module(tmp_path):
    """Counted by a hook of our own on every module, not by the loader's own bookkeeping."""
    import torch

    from exportline.verify.runtime.streamed import streamed_model

    root = _saved(lambda: _llama(layers=6), tmp_path / "deep")
    model = streamed_model(root, "float64")
    itemsize = torch.finfo(torch.float64).bits // 8
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()) * itemsize
    total = sum(p.numel() for p in model.parameters()) * itemsize
    held = []

    def count(module, args):
        held.append(sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values() if not p.is_meta))

    for module in model.modules():
        module.register_forward_pre_hook(count)  # after the loading hook, so it sees what is loaded
    with torch.no_grad():
        model(input_ids=torch.arange(12)[None])
    assert held and max(held) > 0
    assert max(held) <= largest < total / 6
    assert model.streamed_stats.peak == max(held) and model.streamed_stats.now == 0
    assert model.streamed_stats.read >= total // 2  # every weight read (float32 on disk)


def test_what_streaming_keeps_does_not_grow_with_depth(tmp_path):
    """Held parameters and the spare-buffer pool: the same for 2 and 6 layers."""
    import torch

    from exportline.verify.runtime.streamed import streamed_model

    kept = []
    for layers in (2, 6):
        model = streamed_model(_saved(functools.partial(_llama, layers=layers), tmp_path / str(layers)), "float64")
        with torch.no_grad():
            model(input_ids=torch.arange(12)[None])
        stats = model.streamed_stats
        kept.append((stats.peak, stats.pooled))
        assert stats.read == sum(p.numel() for p in model.parameters()) * 4  # float32 on disk, each read once
    assert kept[0] == kept[1] and kept[0][1] > 0


def test_teacher_forced_reference_sees_what_its_greedy_loop_sees(tmp_path):
    """One forward over the prompt + tokens gives, at each step, the logits the reference's
    own greedy loop (KV cache) computes: same argmax, same values to float64 rounding."""
    from exportline.verify.reference import HFReference, hf_greedy, load_hf_model

    root = _saved(_llama, tmp_path / "m")
    ref = HFReference(load_hf_model(root, "float64"))
    prompt = np.array([[5, 9, 11, 3]])
    tokens, step_logits = hf_greedy(ref.model, prompt, 12)
    forced = ref.teacher_forced(prompt, tokens)
    assert [int(f.argmax()) for f in forced] == tokens
    assert max(float(np.abs(f - s).max()) for f, s in zip(forced, step_logits)) < 1e-12
    other = tokens[:3] + [(tokens[3] + 1) % 320] + tokens[4:]  # a candidate that strays at step 3
    assert [int(f.argmax()) for f in ref.teacher_forced(prompt, other)][:4] == tokens[:4]


def test_a_truncated_safetensors_file_is_a_one_line_error_before_any_forward(tmp_path):
    from exportline.exporters.core.errors import ExportlineError
    from exportline.verify.runtime.streamed import streamed_model

    root = _saved(_llama, tmp_path / "m")
    data = root / "model.safetensors"
    data.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(ExportlineError, match="truncated or corrupt at tensor .*re-run the hf stage"):
        streamed_model(root, "float32")  # every header is checked against the file's size up front
