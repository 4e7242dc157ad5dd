"""The hf stage converts nanoGPT and llama2.c checkpoints tensor by tensor.

Memory is counted by the kernel, not timed: /proc/self/clear_refs resets the process's
peak resident set (VmHWM), so the bytes held are the peak during the conversion above the
resident set before it. That count includes the pages of a memory-mapped checkpoint the
conversion has read, which a count of live tensors would miss. The same model at 2 and at
8 layers: the 8-layer checkpoint is several times bigger, the conversion of either holds
a few of its largest tensors. Checkpoints are written the way upstream writes them
(nanoGPT train.py's torch.save with the optimizer; llama2.c export.py's v0 and v2 files).

The files themselves are byte for byte what safetensors' save_file writes from the whole
state dict (the writer lays them out in its order), sharded or not. nanoGPT's training
state (--with-training-state: AdamW's moments, twice the weights) streams the same way.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys

import pytest
import torch

from exportline.exporters.sources import resolve_source
from exportline.exporters.sources.hf_writer import read_hf_weights, write_hf_converted, write_hf_weights

from sources_fixtures import nanogpt_args, save_nanogpt, write_llama2c

MIB = 1 << 20
SLACK = 6 * MIB  # Python objects, config/JSON writing and allocator rounding around the tensors


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _held_by(fn) -> int:
    """Peak resident bytes above the starting point while `fn` runs. glibc keeps freed heap
    memory resident and reuses it, which would hide what `fn` allocates: it is handed back
    first (malloc_trim), so the start is what is really in use."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pytest.skip("not available: glibc malloc_trim, to start from the memory really in use")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError as exc:
        pytest.skip(f"not available: resetting the peak RSS needs Linux /proc/self/clear_refs ({exc})")
    start = _status("VmRSS")
    fn()
    return _status("VmHWM") - start


def _convert(ckpt, dest) -> int:
    dest.mkdir()
    source = resolve_source(str(ckpt))
    return _held_by(lambda: source.write_hf(dest, lambda msg: None))


def _largest(folder) -> tuple[int, int]:
    """(largest tensor, all tensors) in bytes, from the safetensors header."""
    path = folder / "model.safetensors"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    sizes = [b - a for k, v in header.items() if k != "__metadata__" for a, b in [v["data_offsets"]]]
    return max(sizes), sum(sizes)


def _check_depth_independent(held: dict[int, int], dests: dict) -> None:
    largest2, total2 = _largest(dests[2])
    largest8, total8 = _largest(dests[8])
    assert largest2 == largest8 and total8 > 2.5 * total2  # deeper model, same largest tensor
    bound = 3 * largest8 + SLACK  # the source tensor, its converted copy, one more in flight
    assert held[2] <= bound and held[8] <= bound, (held, bound)
    assert held[8] < total8 / 2, (held, total8)  # far from holding the model
    # does not grow with depth: 8 layers hold at most what 2 layers did (or one tensor, when the
    # 2-layer run reused the warm-up's memory and measured almost nothing: 132 KiB once in CI)
    # plus two tensors in flight
    assert held[8] <= max(held[2], largest8) + 2 * largest8 + SLACK, held


def _nanogpt_ckpts(tmp_path) -> dict:
    """nanoGPT checkpoints with AdamW state (train.py's layout) at 2 and 8 layers, n_embd 384."""
    ckpts = {}
    for layers in (2, 8):
        ckpts[layers] = tmp_path / f"ckpt{layers}.pt"
        save_nanogpt(ckpts[layers], nanogpt_args(n_layer=layers, n_embd=384, n_head=6, vocab_size=256, block_size=64))
    return ckpts


@pytest.mark.skipif(sys.platform != "linux", reason="not available: the peak-RSS reset is Linux /proc")
def test_nanogpt_conversion_holds_a_few_tensors_whatever_the_depth(tmp_path):
    # n_embd 384: c_fc is 2.25 MiB and one layer 6.75 MiB; the .pt also carries AdamW's two
    # moments (twice the weights), which the conversion must not read at all.
    ckpts = _nanogpt_ckpts(tmp_path)
    _convert(ckpts[2], tmp_path / "warm-up")  # imports and first-use allocations are not the conversion's
    held = {layers: _convert(ckpts[layers], tmp_path / f"hf{layers}") for layers in (2, 8)}
    _check_depth_independent(held, {k: tmp_path / f"hf{k}" for k in held})


@pytest.mark.skipif(sys.platform != "linux", reason="not available: the peak-RSS reset is Linux /proc")
@pytest.mark.parametrize("version", [0, 2])
def test_llama2c_conversion_holds_a_few_tensors_whatever_the_depth(tmp_path, version):
    from llama2c_upstream import ModelArgs, TinyLlama2c, version2_export

    def write(path, layers):  # one layer: 6.2 MiB of fp32 weights, w1/w2/w3 1.5 MiB each
        if version == 0:  # v0 as export.py's legacy_export lays it out, written with numpy (fast at this size)
            write_llama2c(path, dim=384, hidden_dim=1024, n_layers=layers, n_heads=6, n_kv_heads=3, vocab_size=256)
        else:  # v2: Q8_0 int8 matrices, dequantised layer by layer
            args = ModelArgs(dim=384, n_layers=layers, n_heads=6, n_kv_heads=3, vocab_size=256, hidden_dim=1024)
            version2_export(TinyLlama2c(args, quiet_ids=range(0)), str(path))

    ckpts = {}
    for layers in (2, 8):
        ckpts[layers] = tmp_path / f"model{layers}.bin"
        write(ckpts[layers], layers)
    _convert(ckpts[2], tmp_path / "warm-up")
    held = {layers: _convert(ckpts[layers], tmp_path / f"hf{layers}") for layers in (2, 8)}
    _check_depth_independent(held, {k: tmp_path / f"hf{k}" for k in held})


# -- the files are save_file's, byte for byte ------------------------------------------------------
def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.w": torch.randn(64, 48, generator=g) for i in (0, 1, 10, 2)}
    state["a.half"] = torch.randn(40, generator=g).to(torch.bfloat16)
    state["z.double"] = torch.randn(8, generator=g, dtype=torch.float64)
    state["b.bias"] = torch.randn(48, generator=g)
    return state


@pytest.mark.parametrize("max_shard_bytes", [10**9, 30_000], ids=["one-file", "sharded"])
def test_converted_files_are_save_files_bytes(tmp_path, max_shard_bytes):
    state = _state()
    (tmp_path / "whole").mkdir()
    (tmp_path / "streamed").mkdir()
    want = write_hf_weights(state, tmp_path / "whole", max_shard_bytes=max_shard_bytes)
    plan = [(k, tuple(t.shape), t.dtype) for k, t in state.items()]
    asked = []

    def tensors(names):
        asked.extend(names)
        for name in names:
            yield name, state[name].clone()  # a fresh tensor, as a converter makes

    got = write_hf_converted(plan, tensors, tmp_path / "streamed", max_shard_bytes=max_shard_bytes)
    assert got == want and (len(want) > 2) == (max_shard_bytes < 10**9)
    for name in want:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(asked) == sorted(state)  # every tensor asked for once
    assert asked != list(state)  # in save_file's order, not the dict's (the test would show nothing otherwise)


def test_a_converter_that_yields_too_many_tensors_is_a_bug(tmp_path):
    from exportline.exporters.core.errors import StageError

    state = {"a": torch.zeros(2)}
    with pytest.raises(StageError, match="more tensors than the plan"):
        write_hf_converted([("a", (2,), torch.float32)], lambda names: iter([("a", state["a"]), ("b", state["a"])]),
                           tmp_path)


@pytest.mark.parametrize("kind", ["nanogpt", "llama2c"])
def test_converted_weights_are_the_checkpoints(tmp_path, kind):
    """Every HF tensor from the streamed conversion equals the one built from the checkpoint
    read whole (nanoGPT: transposed Conv1D, zero biases; llama2.c: permuted q/k)."""
    from exportline.exporters.sources.llama2c import convert as llama2c
    from exportline.exporters.sources.nanogpt.convert import TRANSPOSED

    if kind == "nanogpt":
        ckpt = tmp_path / "ckpt.pt"
        model = save_nanogpt(ckpt, nanogpt_args(bias=False, n_layer=3))
        want = {k: (v.t() if k.endswith(TRANSPOSED) else v) for k, v in model.state_dict().items()
                if k != "lm_head.weight"}
    else:
        ckpt = tmp_path / "model.bin"
        t = write_llama2c(ckpt, n_layers=3, shared=False)
        want = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["norm"],
                "lm_head.weight": t["wcls"]}
        for i in range(3):
            for src, dst in llama2c.LAYER_MAP.items():
                w = t[src][i]
                want[f"model.layers.{i}.{dst}"] = llama2c.permute_rotary(w, 4 if src == "wq" else 2) \
                    if src in llama2c.PERMUTED else w
        want = {k: torch.from_numpy(v.copy()) for k, v in want.items()}
    (tmp_path / "hf").mkdir()
    resolve_source(str(ckpt)).write_hf(tmp_path / "hf", lambda msg: None)
    got = read_hf_weights(tmp_path / "hf")
    zero_biases = {k for k in got if kind == "nanogpt" and k.endswith(".bias") and k not in want}
    assert set(got) == set(want) | zero_biases and (len(zero_biases) > 3) == (kind == "nanogpt")
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    assert all(not got[k].any() for k in zero_biases)


# -- the training state (--with-training-state) streams the same way --------------------------------
def _write_training(ckpt, dest) -> int:
    dest.mkdir()
    source = resolve_source(str(ckpt))
    return _held_by(lambda: source.write_hf(dest, lambda msg: None, training_state=True))


def _sizes(path) -> list[int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [b - a for k, v in header.items() if k != "__metadata__" for a, b in [v["data_offsets"]]]


@pytest.mark.skipif(sys.platform != "linux", reason="not available: the peak-RSS reset is Linux /proc")
def test_nanogpt_training_state_is_written_a_few_tensors_at_a_time(tmp_path):
    # The same checkpoints as above: AdamW's exp_avg and exp_avg_sq are 2x the weights, so
    # writing them whole (as save_file does) would hold ~110 MiB at 8 layers.
    ckpts = _nanogpt_ckpts(tmp_path)
    _write_training(ckpts[2], tmp_path / "warm-up")
    held = {layers: _write_training(ckpts[layers], tmp_path / f"hf{layers}") for layers in (2, 8)}
    state = {k: _sizes(tmp_path / f"hf{k}" / "training" / "state.safetensors") for k in held}
    largest = max(state[8])
    assert largest == max(state[2]) and sum(state[8]) > 2 * _largest(tmp_path / "hf8")[1]  # the moments
    # Relative bounds only: the weights' conversion runs in the same call and the Python heap
    # around it varies with what ran earlier in the process (the old code held 40 / 124 MB).
    assert held[8] <= held[2] + 2 * largest + SLACK, (held, largest)  # does not grow with depth
    assert held[8] < sum(state[8]) / 4, (held, sum(state[8]))  # far from holding the moments


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_file_of_training_state(ckpt, path) -> None:
    """What --with-training-state wrote before it streamed: every non-weight tensor of the
    checkpoint, read whole, through safetensors' save_file."""
    from safetensors.torch import save_file

    from exportline.exporters.sources.nanogpt.training import encode

    tensors: dict = {}
    for key, value in torch.load(ckpt, weights_only=True).items():
        if key != "model":
            encode(value, tensors, key)
    save_file({k: t.clone() for k, t in tensors.items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("extras", [False, True], ids=["train.py", "with-extra-dtypes"])
def test_training_state_file_is_save_files_bytes(tmp_path, extras):
    from nanogpt_train import make_run

    run = make_run(tmp_path / "nanoGPT", bias=False, compiled=False)
    if extras:  # entries forks of train.py add (RNG state, token counters): several dtypes to lay out
        ckpt = torch.load(run.ckpt, weights_only=True)
        ckpt.update(rng_state=torch.get_rng_state(), tokens_seen=torch.tensor(123456, dtype=torch.int64),
                    ema_decay=torch.tensor(0.999, dtype=torch.float64), loss_scale=torch.tensor(2.0**16).to(torch.bfloat16),
                    grad_norms=torch.rand(5).to(torch.float16), empty=torch.zeros(0, 3))
        torch.save(ckpt, run.ckpt)
    (tmp_path / "hf").mkdir()
    resolve_source(str(run.ckpt)).write_hf(tmp_path / "hf", lambda msg: None, training_state=True)
    _save_file_of_training_state(run.ckpt, tmp_path / "whole.safetensors")
    assert _sha256(tmp_path / "hf" / "training" / "state.safetensors") == _sha256(tmp_path / "whole.safetensors")
    assert len(_sizes(tmp_path / "whole.safetensors")) > 8


def test_streamed_file_is_save_files_bytes_for_every_dtype(tmp_path):
    """write_safetensors_streamed lays every dtype out where save_file does (its Rust writer
    orders by its own dtype enum, e.g. BF16 before F16 and I64 before F64, then by name)."""
    from safetensors.torch import save_file

    from exportline.exporters.sources.hf_writer import _SAFETENSORS_DTYPES, write_safetensors_streamed

    g = torch.Generator().manual_seed(0)
    state = {}
    for i, dtype in enumerate(getattr(torch, name) for name in _SAFETENSORS_DTYPES if hasattr(torch, name)):
        for name in (f"a{i}", f"z{i}"):  # names interleave across dtypes: only the dtype order separates them
            state[name] = torch.randint(0, 2, (3, 2), generator=g).to(dtype)
    state.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(0), "ünïcode": torch.ones(2)})
    save_file(state, tmp_path / "whole.safetensors", metadata={"format": "pt"})
    plan = [(k, tuple(t.shape), t.dtype) for k, t in state.items()]
    write_safetensors_streamed(plan, lambda names: ((n, state[n].clone()) for n in names), tmp_path / "streamed.safetensors")
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
