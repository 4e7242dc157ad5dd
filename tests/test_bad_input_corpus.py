"""A corpus of bad inputs, run as a table through the real CLI entry point (in-process):
every case exits non-zero with exactly one `error:` line and no traceback, and leaves
nothing a rerun would trust. Then a seeded, time-bounded fuzz pass over truncations and
byte flips of each input format exportline reads."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from bundle_helpers import mismatched, rerecord
from sources_fixtures import cli, nanogpt_args, save_nanogpt, write_llama2c
from verify_helpers import TINY, copy_bundle, exportline_cmd, shared_bundle

SHRINK = [f"--set=model.{k}={v}" for k, v in TINY["model"].items()]


def one_error_line(code: int, err: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def nothing_trusted(out: Path) -> None:
    """No half-written stage output a rerun would take as done, no temp files, no lock."""
    if not out.exists():
        return
    assert not (out / ".exportline.lock").exists()
    assert not (out / ".exportline-tmp").exists() or not any((out / ".exportline-tmp").iterdir())
    if (out / "manifest.json").is_file():

        assert mismatched(out) == []
    else:
        assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


# -- sources ------------------------------------------------------------------------------------
def _pt_random_bytes(tmp: Path) -> list:
    (tmp / "ckpt.pt").write_bytes(random.Random(0).randbytes(4096))
    return ["export", tmp / "ckpt.pt"]


def _meta_pkl(tmp: Path, payload: bytes) -> list:
    save_nanogpt(tmp / "ckpt.pt", nanogpt_args())
    (tmp / "meta.pkl").write_bytes(payload)
    return ["export", tmp / "ckpt.pt"]


def _meta_huge_frame(tmp: Path) -> list:
    return _meta_pkl(tmp, b"\x80\x04\x95" + struct.pack("<Q", 1 << 62) + b"}q\x00.")


def _meta_ids_beyond_vocab(tmp: Path) -> list:
    stoi = {chr(97 + i): i for i in range(20)}
    stoi["z"] = 500  # the model has 97 embeddings
    return _meta_pkl(tmp, pickle.dumps({"vocab_size": 501, "stoi": stoi, "itos": {v: k for k, v in stoi.items()}}))


def _hf_folder(tmp: Path, *, config: bytes | None, weights: str = "safetensors") -> list:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "hf")
    if weights == "bin-with-code":  # the weights only as a pickle, as older transformers saved them, plus a payload
        from safetensors.torch import load_file

        state = load_file(tmp / "hf" / "model.safetensors")
        (tmp / "hf" / "model.safetensors").unlink()
        torch.save({**state, "hook": RunsCode(tmp / "PWNED")}, tmp / "hf" / "pytorch_model.bin")
    if config is not None:
        (tmp / "hf" / "config.json").write_bytes(config)
    return ["export", tmp / "hf"]


def _tokenizer_garbage(tmp: Path) -> list:
    save_nanogpt(tmp / "ckpt.pt", nanogpt_args())
    (tmp / "tok.json").write_bytes(b"\x00\xff")
    return ["export", tmp / "ckpt.pt", "--tokenizer", tmp / "tok.json"]


class RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _set(*pairs: str) -> Callable[[Path], list]:
    return lambda tmp: ["export", "tiny", *[f"--set={p}" for p in pairs]]


SOURCE_CASES: dict[str, Callable[[Path], list]] = {
    "pt-random-bytes": _pt_random_bytes,
    "meta.pkl-huge-frame": _meta_huge_frame,
    "meta.pkl-ids-beyond-vocab": _meta_ids_beyond_vocab,
    "meta.pkl-a-list": lambda tmp: _meta_pkl(tmp, pickle.dumps([1, 2, 3])),
    "config.json-invalid": lambda tmp: _hf_folder(tmp, config=b"{not json"),
    "config.json-empty": lambda tmp: _hf_folder(tmp, config=b""),
    "config.json-a-list": lambda tmp: _hf_folder(tmp, config=b"[1, 2]"),
    "config.json-not-utf8": lambda tmp: _hf_folder(tmp, config=b'{"model_type": "\xff\xfe"}'),
    "hf-pickle-weights-that-run-code": lambda tmp: _hf_folder(tmp, config=None, weights="bin-with-code"),
    "set-not-an-integer": _set("model.num_hidden_layers=abc"),
    "set-heads-do-not-divide": _set("model.hidden_size=65"),
    "set-typo-key": _set("model.hidden_sizee=128"),
    "set-negative-layers": _set("model.num_hidden_layers=-1"),
    "set-zero-layers": _set("model.num_hidden_layers=0"),
    "set-unknown-top-level": _set("bogus=1"),
    "set-no-equals": _set("model.num_hidden_layers"),
    "set-model-not-a-mapping": _set("model=3"),
    "set-float-vocab": _set("model.vocab_size=1.5"),
    "set-kv-heads-do-not-divide": _set("model.num_key_value_heads=3"),
    "stages-empty": lambda tmp: ["export", "tiny", "--stages", ""],
    "stages-unknown": lambda tmp: ["export", "tiny", "--stages", "hf,gguf"],
    "tokenizer-garbage": lambda tmp: _tokenizer_garbage(tmp),
    "calibration-missing": lambda tmp: ["export", "tiny", "--calibration-data", tmp / "nope.txt"],
}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_bad_source_one_line_and_nothing_written(case, tmp_path):
    args = SOURCE_CASES[case](tmp_path)
    out = tmp_path / "out"
    code, err = cli(*args, "--out", out, "--no-verify", *([] if "--stages" in args else ["--stages", "hf"]))
    line = one_error_line(code, err)
    if case.startswith("set-"):
        assert "--set" in line  # blames the flag, not the preset file
    if case == "stages-empty":
        assert "--stages" in line and "none given" in line  # not "no manifest.json"
    assert not (tmp_path / "PWNED").exists()
    nothing_trusted(out)
    assert not out.exists() or not (out / "config.json").exists()


# -- bundles --------------------------------------------------------------------------------------
def _truncated_graph_recorded(root: Path) -> None:

    graph = root / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:200])
    rerecord(root)  # the manifest agrees: the parser itself must refuse


BUNDLE_CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path, Path], list]]] = {
    "handoff-truncated-graph": (_truncated_graph_recorded, lambda root, tmp: ["handoff", root, "--triton", tmp / "repo"]),
    "generate-truncated-graph": (_truncated_graph_recorded,
                                 lambda root, tmp: ["generate", root, "--token-ids", "1,2", "--max-new-tokens", "1"]),
    "generate-non-utf8-prompt": (lambda root: None, lambda root, tmp: ["generate", root, "--prompt", "caf\udce9"]),
    "generate-token-id-beyond-vocab": (lambda root: None,
                                       lambda root, tmp: ["generate", root, "--token-ids", "1,99999", "--max-new-tokens", "1"]),
    "verify-missing-folder": (lambda root: shutil.rmtree(root), lambda root, tmp: ["verify", root]),
    "bench-missing-folder": (lambda root: shutil.rmtree(root), lambda root, tmp: ["bench", root]),
    "push-missing-folder": (lambda root: shutil.rmtree(root),
                            lambda root, tmp: ["push", root, "--repo-id", "org/x", "--dry-run"]),
    "card-write-missing-folder": (lambda root: shutil.rmtree(root), lambda root, tmp: ["card", "write", root]),
    "verify-unknown-stage": (lambda root: None, lambda root, tmp: ["verify", root, "--stage", "gguf"]),
    "bench-bad-batch": (lambda root: None, lambda root, tmp: ["bench", root, "--batch", "0,x"]),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bad_bundle_input_one_line(case, tiny, tmp_path):
    damage, args = BUNDLE_CASES[case]
    root = copy_bundle(tiny, tmp_path / "b")
    damage(root)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    code, err = cli(*args(root, tmp_path))
    one_error_line(code, err)
    if case.endswith("missing-folder"):
        assert not root.exists()  # push of a missing folder does not create it
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing written


def test_char_outside_a_char_tokenizer_vocabulary(tmp_path):
    stoi = {c: i for i, c in enumerate("abcdefgh \n")}
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(stoi), "stoi": stoi,
                                                      "itos": {v: k for k, v in stoi.items()}}))
    code, err = cli("export", tmp_path / "ckpt.pt", "--stages", "hf", "--no-verify", "--out", tmp_path / "out")
    assert code == 0, err
    code, err = cli("generate", tmp_path / "out", "--backend", "torch", "--prompt", "bad Z", "--max-new-tokens", "1")
    line = one_error_line(code, err)
    assert "'Z'" in line


def test_read_only_output_leaves_no_temp_and_no_traceback(tmp_path, monkeypatch):
    """What a read-only onnx/ does (we may run as root, for whom chmod changes nothing):
    moving the finished files into place fails."""
    import errno

    from exportline.exporters.core import bundle as bundle_mod

    real = os.replace

    def refuse(src, dst, *a, **k):
        if "/.exportline-tmp/" in str(src):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(bundle_mod.os, "replace", refuse)
    out = tmp_path / "out"
    code, err = cli("export", "tiny", *SHRINK, "--stages", "hf", "--no-verify", "--out", out)
    line = one_error_line(code, err)
    assert "Permission denied" in line and "--out" in line
    monkeypatch.undo()
    nothing_trusted(out)


def test_sigint_says_interrupted_and_exits_130(tmp_path):
    proc = subprocess.Popen([*exportline_cmd(), "export", "tiny", "--out", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # Interrupt mid-stage, when there is something to clean up: the hf stage makes its temp
    # folder right after it says it is running, and works ~0.5 s in it. (Polling for the folder
    # alone missed every window on a loaded CI machine once the onnx stage stopped tracing.)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("hf: running"):
            break
    deadline = time.monotonic() + 30
    while not (tmp_path / "out" / ".exportline-tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert (tmp_path / "out" / ".exportline-tmp").exists(), "".join(seen)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; rerun to resume"
    nothing_trusted(tmp_path / "out")


def test_debug_flag_shows_the_traceback(tmp_path):
    code, err = cli("export", "tiny", "--set=model.hidden_size=65", "--out", tmp_path / "o", "--debug")
    assert code != 0 and "Traceback" in err


# -- fuzz -----------------------------------------------------------------------------------------
FUZZ_SECONDS = float(os.environ.get("EXPORTLINE_FUZZ_SECONDS", "6"))


def _mutations(data: bytes, rng: random.Random):
    """Truncations (incl. empty and one byte short), then single-byte flips, forever."""
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        yield f"truncate {cut}", data[:cut]
    while True:
        i = rng.randrange(len(data))
        out = bytearray(data)
        out[i] ^= 1 << rng.randrange(8)
        yield f"flip byte {i}", bytes(out)


def _fuzz(target: Path, run: Callable[[], tuple[int, str]], *, seed: int, after: Callable[[], None] = lambda: None) -> int:
    original = target.read_bytes()
    rng = random.Random(seed)
    stop, n, refused = time.monotonic() + FUZZ_SECONDS, 0, 0
    for what, data in _mutations(original, rng):
        if time.monotonic() > stop and n >= 4:
            break
        target.write_bytes(data)
        after()
        code, err = run()
        assert "Traceback" not in err, f"{target.name} {what}: {err}"
        if code != 0:
            assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, f"{target.name} {what}: {err}"
            refused += 1
        n += 1
    target.write_bytes(original)
    assert refused >= 1  # the empty file at least: the runs did reach the parser
    return n


def _export_cli(src: Path, out: Path) -> Callable[[], tuple[int, str]]:
    def run():
        shutil.rmtree(out, ignore_errors=True)
        return cli("export", src, "--stages", "hf", "--no-verify", "--out", out)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pt", "bin", "safetensors", "config.json"])
def test_fuzz_sources(kind, tmp_path):
    if kind == "pt":
        save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args(n_layer=1, n_embd=16, vocab_size=32, block_size=16))
        target, src = tmp_path / "ckpt.pt", tmp_path / "ckpt.pt"
    elif kind == "bin":
        write_llama2c(tmp_path / "model.bin", dim=16, hidden_dim=32, n_layers=1, vocab_size=32, max_seq_len=16)
        target, src = tmp_path / "model.bin", tmp_path / "model.bin"
    else:
        _hf_folder(tmp_path, config=None)
        src = tmp_path / "hf"
        target = src / ("model.safetensors" if kind == "safetensors" else "config.json")
    assert _fuzz(target, _export_cli(src, tmp_path / "out"), seed={"pt": 11, "bin": 12, "safetensors": 13, "config.json": 14}[kind]) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["manifest.json", "model.onnx"])
def test_fuzz_bundle_files(kind, tiny, tmp_path):

    root = copy_bundle(tiny, tmp_path / "b")
    if kind == "manifest.json":
        n = _fuzz(root / "manifest.json", lambda: cli("verify", root, "--stage", "hf", "--long", "4"), seed=1)
    else:
        # The manifest is refreshed after each mutation, so the ONNX parser (not the checksum) is what is fuzzed.
        n = _fuzz(root / "onnx" / "model.onnx",
                  lambda: cli("generate", root, "--token-ids", "1,2", "--max-new-tokens", "1"),
                  seed=2, after=lambda: rerecord(root))
    assert n >= 4
