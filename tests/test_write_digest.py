"""The data file's sha256 computed while it is written (exporters/onnx/write_digest.py) and
handed to the manifest through the bundle's digest memo, which must never answer for a
file changed since."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

from exportline.exporters.core import bundle as bundle_module
from exportline.exporters.onnx import write_digest

from quant_models import FolderSource, export_bundle


def test_out_of_order_chunks_hash_as_the_whole_file_in_order(tmp_path):
    """Two threads write interleaved chunks out of offset order, a hole is never reported:
    the digest is hashlib's over the final file."""
    final = tmp_path / "data.bin"
    temp_dir = tmp_path / ".data.bin.x"
    temp_dir.mkdir()
    temp = temp_dir / "data.bin"
    rng = random.Random(0)
    chunks = [(offset, rng.randbytes(size)) for offset, size in _layout(rng, 64)]
    hole = chunks.pop(10)  # written, never reported: read in order when the writer is done
    temp.write_bytes(b"")
    os.truncate(temp, chunks[-1][0] + len(chunks[-1][1]))
    hasher = write_digest.start(final)
    try:
        rng.shuffle(chunks)
        halves = [chunks[::2], chunks[1::2]]

        def write(part):
            with open(temp, "r+b") as f:
                assert write_digest.hasher_for(f) is hasher
                for offset, data in part:
                    f.seek(offset)
                    f.write(data)
                    f.flush()
                    hasher.written(f, offset, len(data))

        threads = [threading.Thread(target=write, args=(p,)) for p in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(temp, "r+b") as f:
            f.seek(hole[0])
            f.write(hole[1])
        os.replace(temp, final)
    finally:
        write_digest.stop(final)
    assert hasher.finish() == hashlib.sha256(final.read_bytes()).hexdigest()


def _layout(rng, count):
    offset = 0
    for _ in range(count):
        size = rng.randint(1, 50_000)
        yield offset, size
        offset += size


def _tiny_llama(root):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)


def test_manifest_digest_of_the_data_file_is_hashed_while_written(tmp_path, monkeypatch):
    hashed = []
    real_hash = bundle_module._hash
    monkeypatch.setattr(bundle_module, "_hash", lambda path, chunk: hashed.append(path.name) or real_hash(path, chunk))
    _tiny_llama(tmp_path)
    export_bundle(tmp_path, FolderSource("t", "t"), ["onnx"])
    data = tmp_path / "onnx" / "model.onnx_data"
    listed = {f["path"]: f["sha256"] for f in json.loads((tmp_path / "manifest.json").read_text())["files"]}
    assert listed["onnx/model.onnx_data"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert "model.onnx_data" not in hashed and "model.onnx" in hashed  # no second pass over the data


def test_a_file_changed_after_writing_is_hashed_again(tmp_path):
    _tiny_llama(tmp_path)
    export_bundle(tmp_path, FolderSource("t", "t"), ["onnx"])
    data = tmp_path / "onnx" / "model.onnx_data"
    written = bundle_module.sha256_file(data)
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # same size, and the mtime put back: only ctime tells
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert bundle_module.sha256_file(data) == hashlib.sha256(bytes(raw)).hexdigest() != written


def test_a_write_that_never_reaches_its_final_path_gives_no_digest(tmp_path):
    """A failed write (nothing renamed into place) yields None, so nothing enters the memo."""
    final = tmp_path / "data.bin"
    temp_dir = tmp_path / ".data.bin.x"
    temp_dir.mkdir()
    hasher = write_digest.start(final)
    try:
        with open(temp_dir / "data.bin", "wb") as f:
            f.write(b"x" * 100)
            f.flush()
            hasher.written(f, 0, 100)
    finally:
        write_digest.stop(final)
    assert hasher.finish() is None
