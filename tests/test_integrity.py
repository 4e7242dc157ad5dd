"""The manifest is a promise (DESIGN.md §2): every command that reads a bundle file checks
it against manifest.json first, and a bundle holds only what exportline wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exportline.exporters.core import bundle as bundle_mod
from exportline.exporters.core.bundle import LOCK, Bundle, sha256_file

from bundle_helpers import mismatched
from sources_fixtures import cli, error_line
from verify_helpers import copy_bundle, shared_bundle

DATA = "onnx/model.onnx_data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture
def root(tiny, tmp_path):
    return copy_bundle(tiny, tmp_path / "b")  # copytree keeps mtimes: the manifest's size+mtime still match


def flip_byte(path: Path, *, keep_mtime: bool) -> None:
    """One bit of one byte, same size; keep_mtime restores the timestamps (silent disk corruption)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_hashing_is_chunked_threaded_and_once_per_file_per_command(tmp_path, monkeypatch):
    from exportline.exporters.core.bundle import file_digests, forget_digests

    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(os.urandom(3 << 20) + bytes([i]))
    calls = []
    real = bundle_mod._hash
    monkeypatch.setattr(bundle_mod, "_hash", lambda p, chunk: calls.append(p) or real(p, chunk))
    forget_digests()
    first = file_digests(files)
    assert file_digests(files) == first and sorted(calls) == sorted(files)  # second call: no reads
    import hashlib

    assert first[files[0]] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    forget_digests()  # the next command hashes again
    file_digests(files[:1])
    assert len(calls) == 4


def test_verify_hashes_every_file_exactly_once(root, monkeypatch):
    calls = []
    real = bundle_mod._hash
    monkeypatch.setattr(bundle_mod, "_hash", lambda p, chunk: calls.append(Path(p).relative_to(root).as_posix()) or real(p, chunk))
    code, err = cli("verify", root, "--stage", "hf", "--long", "8")
    assert code == 0, err
    listed = [f["path"] for f in json.loads((root / "manifest.json").read_text())["files"]]
    checked = [c for c in calls if not c.startswith("reports/")]
    assert sorted(checked) == sorted(p for p in listed if not p.startswith("reports/"))  # each once, all of them


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-changed", "mtime-restored"])
def test_verify_refuses_a_flipped_byte_with_the_files_table_first(root, keep_mtime):
    flip_byte(root / DATA, keep_mtime=keep_mtime)
    code, err = cli("verify", root, "--long", "8")
    line = error_line(err)
    assert code == 1 and DATA in line and "--stages onnx --force" in line and "sha256" in line
    table = err[: err.index("error:")]
    assert "config.json" in table and "sha256 mismatch" in table  # the table came before the error
    assert not (root / "reports" / "verify.json").exists()  # nothing that says "passed"


def test_verify_refuses_a_manifest_with_a_changed_checksum(root):
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "config.json")
    entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    (root / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli("verify", root, "--stage", "hf")
    line = error_line(err)
    assert code == 1 and "config.json" in line and "--stages hf --force" in line


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_generate_and_bench_refuse_changed_weights(root, command):
    flip_byte(root / DATA, keep_mtime=False)
    args = (["generate", root, "--backend", "onnx", "--token-ids", "1,2,3", "--max-new-tokens", "2"]
            if command == "generate" else
            ["bench", root, "--backends", "onnx", "--batch", "1", "--prompt-len", "4", "--decode-len", "2",
             "--warmup", "0", "--repeat", "1", "--workloads", "prefill"])
    code, err = cli(*args)
    line = error_line(err)
    assert code != 0 and DATA in line and "rebuild it: exportline export" in line


@pytest.mark.parametrize("damage", ["deleted data", "truncated graph"])
def test_bench_broken_listed_file_is_an_error_not_not_available(root, damage):
    if damage == "deleted data":
        (root / DATA).unlink()
    else:
        graph = root / "onnx" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:100])
    code, err = cli("bench", root, "--backends", "onnx", "--batch", "1", "--prompt-len", "4", "--decode-len", "2",
                    "--warmup", "0", "--repeat", "1", "--workloads", "prefill")
    line = error_line(err)
    assert code == 1 and ("is missing, but manifest.json lists it" in line or "manifest records" in line)
    assert not (root / "reports" / "bench.json").exists()


def test_handoff_refuses_silent_corruption(root, tmp_path):
    flip_byte(root / DATA, keep_mtime=True)
    code, err = cli("handoff", root, "--triton", tmp_path / "repo")
    line = error_line(err)
    assert code == 1 and DATA in line
    assert not (tmp_path / "repo" / "b").exists()


@pytest.mark.parametrize("tamper", ["flipped-byte", "manifest-digit"])
def test_push_refuses_before_publishing(root, tamper):
    if tamper == "flipped-byte":
        flip_byte(root / "model.safetensors", keep_mtime=True)
    else:
        manifest = json.loads((root / "manifest.json").read_text())
        entry = next(f for f in manifest["files"] if f["path"] == DATA)
        entry["sha256"] = entry["sha256"][::-1]
        (root / "manifest.json").write_text(json.dumps(manifest))
    code, err = cli("push", root, "--repo-id", "org/tiny", "--dry-run")
    line = error_line(err)
    assert code == 1 and ("model.safetensors" in line if tamper == "flipped-byte" else DATA in line)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[]", b'{"format": "exportline-manifest/1", "files": [1]}',
                                     b'{"format": "exportline-manifest/1", "files": [{"path": "../x", "bytes": 1, "sha256": "'
                                     + b"0" * 64 + b'"}]}', b""])
@pytest.mark.parametrize("command", ["verify", "generate", "push"])
def test_corrupt_manifest_is_one_line(root, content, command):
    (root / "manifest.json").write_bytes(content)
    args = {"verify": ["verify", root], "push": ["push", root, "--repo-id", "org/tiny", "--dry-run"],
            "generate": ["generate", root, "--token-ids", "1,2", "--max-new-tokens", "1"]}[command]
    code, err = cli(*args)
    line = error_line(err)
    assert code == 1 and "manifest.json" in line


def test_out_folder_of_someone_elses_files_is_refused(tmp_path):
    out = tmp_path / "thesis"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work\n")
    code, err = cli("export", "tiny", "--stages", "hf", "--no-verify", "--out", out)
    line = error_line(err)
    assert code == 1 and "not an exportline bundle" in line and "photos" in line
    assert sorted(p.name for p in out.iterdir()) == ["photos", "thesis.txt"]  # not even a lock file


def test_manifest_never_lists_foreign_files_and_the_lock_is_gone(root):
    (root / "notes.txt").write_text("mine, not exportline's\n")
    (root / "onnx" / "scratch.bin").write_bytes(b"\0" * 10)
    code, err = cli("card", "write", root)
    assert code == 0, err
    listed = {f["path"] for f in json.loads((root / "manifest.json").read_text())["files"]}
    assert "notes.txt" not in listed and "onnx/scratch.bin" not in listed and "README.md" in listed
    assert not (root / LOCK).exists()
    code, err = cli("push", root, "--repo-id", "org/tiny", "--dry-run")
    assert code == 0, err


def test_lock_file_is_removed_after_a_run_and_still_excludes_a_second(tmp_path):
    b = Bundle(tmp_path / "b")
    with b.lock():
        assert (b.root / LOCK).is_file()
        with pytest.raises(Exception, match="another exportline run"):
            Bundle(b.root).lock().__enter__()
    assert not (b.root / LOCK).exists()
    with b.lock():  # and it can be taken again
        pass


def test_changed_source_with_leftover_stages_is_refused_then_replaced_with_force(root):
    assert json.loads((root / "manifest.json").read_text())["stages"]["onnx"]["status"] == "done"
    # The same preset with another seed is another model: its hf stage over this bundle would
    # leave onnx/ describing the old weights.
    code, err = cli("export", "tiny", "--stages", "hf", "--no-verify", "--out", root, "--set", "seed=7",
                    *[f"--set=model.{k}={v}" for k, v in
                      {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "num_hidden_layers": 2}.items()])
    line = error_line(err)
    assert code == 1 and "another source" in line and "onnx" in line and "--force" in line
    assert (root / DATA).is_file()
    code, err = cli("export", "tiny", "--stages", "hf", "--no-verify", "--out", root, "--force", "--set", "seed=7",
                    *[f"--set=model.{k}={v}" for k, v in
                      {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "num_hidden_layers": 2}.items()])
    assert code == 0, err
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"hf"} and not (root / DATA).exists()
    assert mismatched(root) == []
    assert sha256_file(root / "config.json") == next(f["sha256"] for f in manifest["files"] if f["path"] == "config.json")
