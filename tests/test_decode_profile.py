"""bench/decode_profile.py: decode timing of several graphs in alternating rounds, plus ORT's profile.

Checks that numbers exist and are consistent (a row per graph, positive times, the profile's
kernels inside its decode steps), never how fast anything is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exportline.bench.decode_profile import graph_labels, round_medians, summarize_profile


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory) -> list[Path]:
    """The tiny preset's fp32 graph and a byte copy beside it (same external data file)."""
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.sources import resolve_source
    from exportline.exporters.stages import parse_stages

    root = tmp_path_factory.mktemp("decode-profile") / "tiny"
    run_pipeline(Bundle(root), resolve_source("tiny"), stages=parse_stages("hf,onnx"))
    graph = root / "onnx" / "model.onnx"
    copy = graph.with_name("model_copy.onnx")
    shutil.copyfile(graph, copy)
    return [graph, copy]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exportline.bench.decode_profile", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_row_per_graph_with_positive_times_and_a_profile(tiny_graphs, tmp_path):
    out = tmp_path / "report.json"
    done = _run(*map(str, tiny_graphs), "--past", "8", "--threads", "2", "--rounds", "2", "--repeat", "3",
                "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = {r["graph"]: r for r in report["graphs"]}
    assert list(rows) == ["onnx/model.onnx", "onnx/model_copy.onnx"]
    for label, row in rows.items():
        assert row["status"] == "ok" and 0 < row["min_ms"] <= row["median_ms"]
        assert row["samples"] == 2 * 3  # rounds × repeat, pooled
        assert row["max_abs_diff_vs_first"] == 0.0 and row["greedy_equals_first"]  # the same graph
        assert len(row["round_medians_ms"]) == 2 and min(row["round_medians_ms"]) >= row["min_ms"]
        assert row["paired_ratio_vs_first"] > 0
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith(label + " "))
        assert float(line.split()[1]) == pytest.approx(row["median_ms"], abs=0.006)
    assert [p["label"] for p in report["profiles"]] == list(rows)
    for p in report["profiles"]:
        ops = {o["op"]: o for o in p["ops"]}
        assert p["step_ms"] > 0 and 0 < p["kernel_ms"] <= p["step_ms"]
        # tiny has 2 layers: q/k/v/o + gate/up/down per layer, and lm_head, at least
        assert ops["MatMul"]["nodes"] >= 2 * 7 + 1 and ops["MatMul"]["ms_per_step"] > 0
        assert f"profile {p['label']}: step" in done.stdout


def test_a_missing_graph_is_a_one_line_error(tmp_path):
    done = _run(str(tmp_path / "absent.onnx"), "--rounds", "1")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: no such graph: {tmp_path / 'absent.onnx'}; "
                                                "pass model.onnx files (e.g. out/NAME/onnx/model.onnx)"]


def test_profile_counts_only_kernels_inside_the_last_runs():
    """The prefill's model_run and its kernels precede the decode steps: they must not count."""
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},  # the prefill
        node("mm0", "MatMul", 10, 900),
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 100},
        node("mm0", "MatMul", 2010, 40), node("mm1", "MatMul", 2050, 20), node("sm", "Softmax", 2080, 10),
        {"cat": "Node", "name": "mm0_fence_before", "ts": 2009, "dur": 5, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 3000, "dur": 120},
        node("mm0", "MatMul", 3010, 60), node("mm1", "MatMul", 3070, 20), node("sm", "Softmax", 3100, 10),
    ]
    step_ms, kernel_ms, rows = summarize_profile(events, steps=2)
    assert step_ms == pytest.approx(0.110)
    assert [(r.op, r.nodes) for r in rows] == [("MatMul", 2), ("Softmax", 1)]
    assert rows[0].ms_per_step == pytest.approx(0.070) and rows[1].ms_per_step == pytest.approx(0.010)
    assert kernel_ms == pytest.approx(0.080)


def test_round_medians_split_pooled_samples_by_round():
    samples = [0.001, 0.003, 0.002, 0.010, 0.030, 0.020]  # two rounds of three runs, pooled in order
    assert round_medians(samples, repeat=3) == pytest.approx([2.0, 20.0])


def test_labels_grow_until_unique(tmp_path):
    a, b = tmp_path / "x" / "onnx" / "model.onnx", tmp_path / "y" / "onnx" / "model.onnx"
    assert list(graph_labels([a, b])) == ["x/onnx/model.onnx", "y/onnx/model.onnx"]
    assert list(graph_labels([a, a.with_name("model_a.onnx")])) == ["onnx/model.onnx", "onnx/model_a.onnx"]
