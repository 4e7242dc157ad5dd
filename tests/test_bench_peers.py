"""bench/peers.py: exportline, optimum-cli and the onnxruntime-genai builder export one HF
folder (the tiny preset) and ONNX Runtime times each graph; the peers' venvs are the cached
ones of tests/consumer_envs.py, driven for real. A peer that cannot run is a row, not a crash."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from consumer_envs import genai_builder_python, v4_python


def _peers(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "exportline.bench.peers", "tiny", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_three_peers_export_and_time_the_same_model(tmp_path):
    out = tmp_path / "peers"
    proc = _peers(out, "--rounds", "2", "--repeat", "3", "--warmup", "1",
                  "--optimum-python", str(v4_python()), "--genai-python", str(genai_builder_python()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "peers.json").read_text())
    rows = {r["peer"]: r for r in report["peers"]}
    assert list(rows) == ["exportline", "exportline-warm", "optimum", "genai"]
    # exportline twice, cold (empty graph cache) and warm; the tiny preset is a Llama, whose
    # graph is written by hand (onnx/llama_graph.py): neither row traces or uses the cache,
    # and both write the same files.
    cold, warm = rows["exportline"], rows.pop("exportline-warm")
    assert (cold["graph_cache"], warm["graph_cache"]) == ("not used (nothing traced)",) * 2
    assert warm["status"] == "ok" and warm["same_files_as_cold"] and warm["sha256"] == cold["sha256"]
    assert _positive(warm["wall_s"]) and _positive(warm["stage_wall_s"]) and warm["peak_rss_bytes"] > 20 * 2**20
    assert "prefill_ms" not in warm and warm["latency"].startswith("not timed: the very graph of the cold row")
    assert "exportline cold" in proc.stdout and "exportline warm" in proc.stdout
    for peer, row in rows.items():
        assert row["status"] == "ok", row["reason"]
        for key in ("wall_s", "peak_rss_bytes", "total_bytes", "prefill_ms", "decode_ms", "prefill_min_ms", "decode_min_ms",
                    "prefill_ratio_vs_exportline", "decode_ratio_vs_exportline"):
            assert _positive(row[key]), (peer, key, row[key])
        if peer != "exportline":
            assert row["peak_rss_bytes"] > 100 * 2**20  # a child that imported torch, not the parent
        else:  # the graph written by hand imports no torch: a child's own peak, below the peers'
            assert 20 * 2**20 < row["peak_rss_bytes"] < min(rows[p]["peak_rss_bytes"] for p in ("optimum", "genai"))
        assert row["total_bytes"] == sum((Path(row["folder"]) / f).stat().st_size for f in row["files"])
        # two rounds × three runs per point, pooled
        assert all(len(w["samples_s"]) == 6 for w in row["latency"].values())
        # Each graph was fed right: its logits on both points are exportline's up to fp32 rounding.
        for point, check in row["logits_check"].items():
            assert check["greedy_equals_exportline"] and check["rel_max_diff_vs_exportline"] < 1e-4, (peer, point, check)
        assert peer in proc.stdout
    assert rows["exportline"]["prefill_ratio_vs_exportline"] == 1.0
    assert 0 < rows["exportline"]["stage_wall_s"] < rows["exportline"]["wall_s"]
    # The exportline row is the onnx stage: the files its manifest record lists, at their sizes.
    manifest = json.loads((out / "exportline" / "manifest.json").read_text())
    stage_files = manifest["stages"]["onnx"]["outputs"]
    assert sorted(rows["exportline"]["files"]) == sorted(stage_files) == ["onnx/model.onnx", "onnx/model.onnx_data"]
    listed = {f["path"]: f["bytes"] for f in manifest["files"]}
    assert rows["exportline"]["files"] == {f: listed[f] for f in stage_files}
    assert "model.onnx.data" in rows["genai"]["files"] and "model.onnx" in rows["optimum"]["files"]
    assert "ABBA" in proc.stdout and "load average" in proc.stdout


def test_a_missing_or_failing_peer_is_a_row_not_a_crash(tmp_path):
    failing = tmp_path / "builder-python"  # stands in for a venv whose builder rejects the model
    failing.write_text("#!/bin/sh\necho 'NotImplementedError: The tiny model is not currently supported.' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = tmp_path / "peers"
    proc = _peers(out, "--peers", "optimum,genai", "--optimum-python", str(tmp_path / "absent" / "python"),
                  "--genai-python", str(failing))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["peer"]: r for r in json.loads((out / "peers.json").read_text())["peers"]}
    assert rows["optimum"]["status"] == "not available" and "optimum-cli not found" in rows["optimum"]["reason"]
    assert rows["genai"]["status"] == "not available"
    assert "exited 1" in rows["genai"]["reason"] and "not currently supported" in rows["genai"]["reason"]
    assert all(r["wall_s"] is None and "prefill_ms" not in r for r in rows.values())  # no made-up numbers
    assert proc.stdout.count("not available:") == 2


def test_an_unknown_peer_is_a_one_line_error(tmp_path):
    proc = _peers(tmp_path / "peers", "--peers", "exportline,vllm")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: --peers 'exportline,vllm': unknown vllm; known: exportline,optimum,genai"]
    assert not (tmp_path / "peers").exists()
