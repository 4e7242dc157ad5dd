"""nanoGPT .pt → HF folder → `exportline to-checkpoint` → .pt, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sources_fixtures import bits, cli, error_line, nanogpt_args, save_nanogpt


def _rewrite(path, dtype, causal_buffers, block_size):
    """Half-precision weights, and/or the attn.bias causal masks that nanoGPT saved when
    PyTorch had no flash attention."""
    ckpt = torch.load(path, weights_only=True)
    model = {k: v.to(dtype) for k, v in ckpt["model"].items()}
    wte = next(k for k in model if k.endswith("transformer.wte.weight"))
    model[wte.replace("transformer.wte.weight", "lm_head.weight")] = model[wte]  # tied again
    if causal_buffers:
        prefix = wte.removesuffix("transformer.wte.weight")
        n_layer = 1 + max(int(k.split(".h.")[1].split(".")[0]) for k in model if ".h." in k)
        tril = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        model.update({f"{prefix}transformer.h.{i}.attn.bias": tril.clone() for i in range(n_layer)})
    ckpt["model"] = model
    torch.save(ckpt, path)


@pytest.mark.parametrize(
    "bias,compiled,dtype,causal_buffers",
    [(True, False, torch.float32, False), (False, True, torch.float32, False),
     (True, True, torch.bfloat16, False), (False, False, torch.float32, True)],
    ids=["bias-plain-fp32", "nobias-orig_mod-fp32", "bias-orig_mod-bf16", "nobias-causal-buffers"],
)
def test_nanogpt_round_trip_is_bit_exact(tmp_path, bias, compiled, dtype, causal_buffers):
    args = nanogpt_args(bias=bias, n_layer=3)
    save_nanogpt(tmp_path / "ckpt.pt", args, compiled=compiled, iter_num=1234)
    if dtype != torch.float32 or causal_buffers:
        _rewrite(tmp_path / "ckpt.pt", dtype, causal_buffers, args["block_size"])
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    code, err = cli("to-checkpoint", tmp_path / "bundle", "--format", "nanogpt", "--out", tmp_path / "back.pt")
    assert code == 0, err

    orig = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    back = torch.load(tmp_path / "back.pt", map_location="cpu", weights_only=True)  # plain types only
    assert list(back["model"]) == list(orig["model"])
    for key, t in orig["model"].items():
        assert back["model"][key].dtype == t.dtype and back["model"][key].shape == t.shape, key
        assert torch.equal(bits(back["model"][key]), bits(t)), key
    assert back["model_args"] == orig["model_args"] and back["iter_num"] == 1234
    assert back["config"] == orig["config"]
    prefix = "_orig_mod." if compiled else ""
    # tied again: one storage for wte and lm_head, as nanoGPT saves it
    wte, head = back["model"][prefix + "transformer.wte.weight"], back["model"][prefix + "lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert not list(tmp_path.glob(".back.pt.*.tmp"))


def test_to_checkpoint_refuses_a_folder_not_from_nanogpt(tmp_path):
    code, err = cli("export", "tiny", "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    code, err = cli("to-checkpoint", tmp_path / "bundle", "--out", tmp_path / "back.pt")
    assert code != 0 and "no 'nanogpt' record" in error_line(err)
    assert not (tmp_path / "back.pt").exists()


def test_to_checkpoint_into_an_unwritable_place_leaves_nothing(tmp_path):
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--out", tmp_path / "bundle", "--no-verify")
    assert code == 0, err
    (tmp_path / "file.txt").write_text("a file, not a folder")
    code, err = cli("to-checkpoint", tmp_path / "bundle", "--out", tmp_path / "file.txt" / "back.pt")
    assert code != 0 and "cannot write" in error_line(err)
    assert (tmp_path / "file.txt").read_text() == "a file, not a folder"
