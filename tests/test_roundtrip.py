"""nanoGPT .pt → HF folder → `exportline to-checkpoint` → .pt, bit for bit."""

from __future__ import annotations

import pytest
import torch
from sources_fixtures import bits, cli, error_line, nanogpt_args, save_nanogpt


@pytest.mark.parametrize(
    "bias,compiled,dtype",
    [(True, False, torch.float32), (False, True, torch.float32), (True, True, torch.bfloat16)],
    ids=["bias-plain-fp32", "nobias-orig_mod-fp32", "bias-orig_mod-bf16"],
)
def test_nanogpt_round_trip_is_bit_exact(tmp_path, bias, compiled, dtype):
    args = nanogpt_args(bias=bias, n_layer=3)
    save_nanogpt(tmp_path / "ckpt.pt", args, compiled=compiled, iter_num=1234)
    if dtype != torch.float32:  # a checkpoint saved in half precision comes back in it
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        ckpt["model"] = {k: v.to(dtype) for k, v in ckpt["model"].items()}
        wte = next(k for k in ckpt["model"] if k.endswith("transformer.wte.weight"))
        ckpt["model"][wte.replace("transformer.wte.weight", "lm_head.weight")] = ckpt["model"][wte]
        torch.save(ckpt, tmp_path / "ckpt.pt")
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
