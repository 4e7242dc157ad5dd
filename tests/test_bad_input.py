"""Bad input through the real CLI: one `error:` line saying what and what to do, a
non-zero exit, and nothing in the bundle that a rerun would trust."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exportline.exporters.core.bundle import Bundle

from bundle_helpers import mismatched
from sources_fixtures import cli, error_line, nanogpt_args, save_nanogpt, write_llama2c


def _export(src, out, *extra):
    return cli("export", src, "--stages", "hf", "--out", out, *extra)


def _nothing_trusted(out: Path) -> None:
    """No HF weights, no temp folder, and no manifest record of a finished hf stage."""
    assert not (out / "model.safetensors").exists()
    assert not (out / ".exportline-tmp").exists() or not any((out / ".exportline-tmp").iterdir())
    if (out / "manifest.json").exists():
        assert json.loads((out / "manifest.json").read_text())["stages"].get("hf", {}).get("status") != "done"


def test_missing_path(tmp_path):
    code, err = _export(tmp_path / "nope" / "ckpt.pt", tmp_path / "out")
    line = error_line(err)
    assert code != 0 and "no such file or folder" in line and "tiny" in line
    assert not (tmp_path / "out").exists()


def test_missing_path_in_a_subprocess_exits_nonzero_with_one_line():
    exe = Path(sys.executable).with_name("exportline")
    proc = subprocess.run([str(exe), "export", "/nonexistent/ckpt.pt", "--stages", "hf"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: /nonexistent/ckpt.pt: no such file")


def test_truncated_pt(tmp_path):
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    code, err = _export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert code != 0 and "truncated or corrupt" in error_line(err)
    _nothing_trusted(tmp_path / "out")


class _RunsCode:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pt_that_would_execute_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    state = {k: v for k, v in torch.nn.Linear(2, 2).state_dict().items()}
    torch.save({"model": state, "model_args": nanogpt_args(), "hook": _RunsCode(marker)}, tmp_path / "ckpt.pt")
    code, err = _export(tmp_path / "ckpt.pt", tmp_path / "out")
    line = error_line(err)
    assert code != 0 and "refused to load" in line and "torch.save(" in line
    assert not marker.exists()
    _nothing_trusted(tmp_path / "out")


@pytest.mark.parametrize("defect", ["negative-dim", "size-mismatch", "v1-magic", "shorter-than-header"])
def test_wrong_llama2c_header(tmp_path, defect):
    path = tmp_path / "model.bin"
    write_llama2c(path)
    data = bytearray(path.read_bytes())
    if defect == "negative-dim":
        data[0:4] = struct.pack("<i", -32)
    elif defect == "size-mismatch":
        data[8:12] = struct.pack("<i", 3)  # n_layers 2 → 3: the header now promises more bytes
    elif defect == "v1-magic":  # a v0 file behind the v1/v2 magic: its "version" field is hidden_dim, 88
        data[0:4] = struct.pack("<I", 0x616B3432)
    else:
        data = data[:20]
    path.write_bytes(bytes(data))
    code, err = _export(path, tmp_path / "out")
    line = error_line(err)
    assert code != 0 and "export.py" in line  # says how to re-export
    expected = {"negative-dim": "not a llama2.c v0 header", "size-mismatch": "but the file has",
                "v1-magic": "file version 88 (magic 'ak42') is unknown",
                "shorter-than-header": "shorter than the 28-byte"}[defect]
    assert expected in line
    _nothing_trusted(tmp_path / "out")


def test_unknown_preset_lists_known_ones(tmp_path):
    code, err = _export("nosuchpreset", tmp_path / "out")
    line = error_line(err)
    assert code != 0 and "unknown preset 'nosuchpreset'" in line and "tiny" in line and "1b" in line


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_folder(tmp_path, where):
    # We may run as root, for whom chmod 0o500 changes nothing: use places nobody can write.
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "sub" if where == "under-a-file" else Path("/proc/exportline-test-out")
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    code, err = _export(tmp_path / "ckpt.pt", out)
    line = error_line(err)
    assert code != 0 and f"cannot create output folder {out}" in line
    assert "--out" in line or where == "proc"  # /proc answers ENOENT, which gets the generic hint
    assert not out.exists()


def _full_disk_save_file(tensors, filename, metadata=None):
    """What safetensors does on a full disk: part of the file, then SafetensorError."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 1024)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class _FullDiskFile:
    """A file on a full disk: the first KiB goes in, then write raises ENOSPC as the OS does.
    Only files named `full` (others are written normally)."""

    full = ""

    def __init__(self, path, mode):
        self.f = open(path, mode)
        self.limit = 1024 if Path(path).name == self.full else float("inf")

    def write(self, data):
        if self.f.tell() + len(memoryview(data).cast("B")) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("full", ["model.safetensors", "state.safetensors"])
def test_disk_full_while_writing_weights(tmp_path, monkeypatch, full):
    """The model's weights and the training state (--with-training-state) both stream
    through hf_writer's own writes; the disk fills up in one or the other."""
    from exportline.exporters.sources import hf_writer

    monkeypatch.setattr(_FullDiskFile, "full", full)
    monkeypatch.setattr(hf_writer, "open", _FullDiskFile, raising=False)
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_args())
    code, err = _export(tmp_path / "ckpt.pt", tmp_path / "out", "--with-training-state")
    line = error_line(err)
    assert code != 0 and "the disk is full" in line and full in line, line
    _nothing_trusted(tmp_path / "out")
    assert not (tmp_path / "out" / "training").exists()


def test_disk_full_in_safetensors_save_file_is_an_oserror(tmp_path, monkeypatch):
    """Whole state dicts (a custom module's) go through save_file, whose Rust error for a
    full disk is turned back into ENOSPC, which the pipeline reports as a full disk."""
    import safetensors.torch

    from exportline.exporters.sources.hf_writer import save_safetensors

    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_save_file)
    with pytest.raises(OSError) as info:
        save_safetensors({"w": torch.zeros(600)}, tmp_path / "model.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.safetensors")


def test_disk_full_on_a_forced_rerun_keeps_the_previous_bundle_intact(tmp_path, monkeypatch):
    from exportline.exporters.sources import hf_writer as hf_files

    write_llama2c(tmp_path / "model.bin")
    code, err = _export(tmp_path / "model.bin", tmp_path / "out", "--no-verify")
    assert code == 0, err

    def full(config, dest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest / "config.json"))

    monkeypatch.setattr(hf_files, "write_config_files", full)
    code, err = _export(tmp_path / "model.bin", tmp_path / "out", "--no-verify", "--force")
    line = error_line(err)
    assert code != 0 and "No space left on device" in line and "the disk is full" in line
    bundle = Bundle(tmp_path / "out")
    assert mismatched(bundle) == []  # the earlier, complete export is untouched and still verifies
    assert bundle.read_manifest()["stages"]["hf"]["status"] == "done"
    assert not any((tmp_path / "out" / ".exportline-tmp").glob("*"))
