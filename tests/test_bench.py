"""exportline bench: statistics, the baseline gate, reports on a tiny bundle, the CI workflow.

The end-to-end tests export the tiny preset once (hf + onnx stages) and run the real
command through exporters.cli.main, so exit codes and the one-line errors are the user's.
They check that numbers exist and are consistent, never how fast anything is.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

from exportline.bench.compare import compare, parse_threshold
from exportline.bench.environment import cpu_info
from exportline.bench.roofline import Ceilings, ModelCost, percent_of_roofline
from exportline.bench.stats import percentile, summarize
from exportline.bench.workloads import Point, decode_feed, grid, prefill_feed
from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.shapes import KVLayout
from exportline.exporters.stages import parse_stages

REPO = Path(__file__).resolve().parents[1]
TINY_GRID = ["--batch", "1", "--prompt-len", "8", "--decode-len", "4", "--warmup", "1", "--repeat", "2"]


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`exportline ARGS` in-process through main(): (exit code, stderr + stdout)."""
    from exportline.exporters.cli.app import main

    monkeypatch.setattr(sys, "argv", ["exportline", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.err + out.out


# -- statistics ---------------------------------------------------------------------------------
def test_percentiles_on_known_samples():
    samples = [float(x) for x in range(10, 0, -1)]  # 10..1, unsorted on purpose
    s = summarize(samples)
    assert s.median_s == pytest.approx(5.5)
    assert s.p90_s == pytest.approx(9.1)  # rank 0.9 × 9 = 8.1 → 9 + 0.1 × (10 − 9)
    assert s.p99_s == pytest.approx(9.91)
    assert (s.min_s, s.max_s, s.n) == (1.0, 10.0, 10)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert summarize([0.25]).p99_s == 0.25


def test_percentile_rejects_nothing_to_summarize():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# -- workloads and work model -----------------------------------------------------------------
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, vocab_size=50)


def test_feeds_follow_shapes_declaration():
    import numpy as np

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    pre = prefill_feed(LAYOUT, ids)
    assert set(pre) == {s.name for s in LAYOUT.inputs()}
    assert pre["past_key_values.1.value"].shape == (2, 2, 0, 4)
    past = {n: np.zeros((2, 2, 3, 4), np.float32) for n in LAYOUT.past_names()}
    dec = decode_feed(LAYOUT, np.array([7, 9]), past)
    assert dec["input_ids"].tolist() == [[7], [9]]
    assert dec["attention_mask"].shape == (2, 4)  # past + the new token
    assert dec["position_ids"].tolist() == [[3], [3]]


def test_grid_keys_are_unique_and_count_tokens():
    points = grid(["prefill", "decode", "generate"], batches=[1, 8], lengths=[128, 512], decode_len=64)
    assert len(points) == 12 and len({p.key for p in points}) == 12
    by_key = {p.key: p for p in points}
    assert by_key["prefill/batch=8/prompt=512"].tokens == 8 * 512
    assert by_key["decode/batch=8/past=128"].tokens == 8
    assert by_key["generate/batch=1/prompt=128/new=64"].tokens == 64


def test_roofline_percent_from_work_model():
    cost = ModelCost(params=1000, matmul_params=800, num_layers=2, hidden_size=8, num_kv_heads=2, head_dim=4)
    ceilings = Ceilings(bandwidth_bytes_per_s=1e6, matmul_flops_per_s=1e9, matmul_dtype="bf16", method="test")
    decode = Point("decode", batch=1, length=10, new_tokens=1)
    # weights 800 × 4 B + KV 2 × 2 layers × 1 × 2 heads × 10 × 4 dim × 4 B = 3200 + 1280
    assert cost.decode_bytes(decode, "fp32") == 4480
    r = percent_of_roofline(decode, 4480 / 1e6 * 2, cost=cost, ceilings=ceilings, precision="fp32")
    assert r["bound"] == "bandwidth" and r["percent"] == pytest.approx(50.0)
    prefill = Point("prefill", batch=2, length=3)
    assert cost.flops(prefill) == 2 * 800 * 6 + 4 * 2 * 2 * 9 * 8
    r = percent_of_roofline(prefill, cost.flops(prefill) / 1e9 * 4, cost=cost, ceilings=ceilings, precision="fp32")
    assert r["bound"] == "compute" and r["percent"] == pytest.approx(25.0)


def test_cpu_info_counts_physical_cores_not_hyperthreads():
    text = "\n".join(
        f"processor : {i}\nmodel name : Test CPU\nphysical id : 0\ncore id : {i // 2}\n" for i in range(4)
    )
    info = cpu_info(text)
    assert info["model"] == "Test CPU" and info["physical_cores"] == 2


def test_rounds_pool_samples_and_keep_the_worst_status():
    from exportline.bench.harness import BackendRun, _pool

    def run(samples, peak, status="ok"):
        if status != "ok":
            return BackendRun("onnx", status, "gone")
        row = {"key": "decode/batch=1/past=8", "tokens": 2, "stats": summarize(samples).to_dict(),
               "samples_s": samples, "tokens_per_s": 2 / summarize(samples).median_s,
               "peak_rss_bytes": peak, "device_peak_bytes": None}
        return BackendRun("onnx", status, rows=[row])

    pooled = _pool([run([1.0, 2.0], 10), run([3.0, 4.0], 30)])
    row = pooled.rows[0]
    assert row["samples_s"] == [1.0, 2.0, 3.0, 4.0] and row["stats"]["median_s"] == 2.5
    assert row["tokens_per_s"] == pytest.approx(2 / 2.5) and row["peak_rss_bytes"] == 30
    failed = _pool([run([1.0], 10), run([], 0, status="failed")])
    assert failed.status == "failed" and failed.reason == "gone" and not failed.rows


# -- baseline comparison -------------------------------------------------------------------------
def _report(medians: dict[tuple[str, str], float]) -> dict:
    return {"results": [
        {"backend": b, "key": k, "status": "ok", "stats": {"median_s": m}} for (b, k), m in medians.items()
    ]}


def test_threshold_parsing():
    assert parse_threshold("5%") == pytest.approx(0.05)
    assert parse_threshold("12.5") == pytest.approx(0.125)
    with pytest.raises(ConfigError):
        parse_threshold("five")


def test_compare_flags_only_regressions_beyond_threshold_and_lists_missing_points():
    old = _report({("onnx", "a"): 1.0, ("onnx", "b"): 1.0, ("torch", "gone"): 1.0})
    new = _report({("onnx", "a"): 1.04, ("onnx", "b"): 1.20, ("torch", "new"): 1.0})
    result = compare(new, old, threshold=0.05)
    assert [(d.key, round(d.change, 2)) for d in result.regressions] == [("b", 0.2)]
    assert [d.key for d in result.unchanged] == ["a"]
    assert result.only_in_baseline == ["torch gone"] and result.only_in_current == ["torch new"]
    assert result.failed
    assert not compare(old, old, threshold=0.0).failed


# -- the command on a tiny bundle ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from exportline.exporters.core.bundle import Bundle
    from exportline.exporters.core.pipeline import run_pipeline
    from exportline.exporters.sources import resolve_source

    root = tmp_path_factory.mktemp("bench") / "tiny"
    run_pipeline(Bundle(root), resolve_source("tiny"), stages=parse_stages("hf,onnx"))
    return root


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory) -> dict:
    """One real run: torch + onnx measured, onnx-int8 (not exported) and trt-fp16 not available."""
    from exportline.exporters.cli.app import main

    argv = sys.argv
    sys.argv = ["exportline", "bench", str(tiny_bundle), "--backends", "torch,onnx,onnx-int8,trt-fp16", *TINY_GRID]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None)
    return json.loads((tiny_bundle / "reports" / "bench.json").read_text())


def test_bench_writes_three_reports_with_every_point(bench_run, tiny_bundle):
    reports = tiny_bundle / "reports"
    assert (reports / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["backend"], r["key"]): r for r in bench_run["results"]}
    keys = {"prefill/batch=1/prompt=8", "decode/batch=1/past=8", "generate/batch=1/prompt=8/new=4"}
    assert set(rows) == {(b, k) for b in ("torch", "onnx") for k in keys}
    for r in rows.values():
        st = r["stats"]
        assert st["n"] == 2 and len(r["samples_s"]) == 2
        assert 0 < st["min_s"] <= st["median_s"] <= st["p90_s"] <= st["p99_s"] <= st["max_s"]
        assert r["peak_rss_bytes"] > 0 and r["device_peak_bytes"] is None
        assert r["roofline"] == "not measured: CPU run"
    speedup = rows[("onnx", "decode/batch=1/past=8")]["speedup_vs_torch"]
    torch_med = rows[("torch", "decode/batch=1/past=8")]["stats"]["median_s"]
    assert speedup == pytest.approx(torch_med / rows[("onnx", "decode/batch=1/past=8")]["stats"]["median_s"])
    assert rows[("torch", "decode/batch=1/past=8")]["speedup_vs_torch"] == pytest.approx(1.0)
    env = bench_run["environment"]
    assert env["cpu"]["physical_cores"] >= 1 and env["versions"]["onnxruntime"]
    onnx = next(b for b in bench_run["backends"] if b["backend"] == "onnx")
    assert onnx["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert onnx["session"]["intra_op_num_threads"] == env["cpu"]["physical_cores"]
    md = (reports / "bench.md").read_text()
    assert "## decode" in md and "| 1 | 8 | onnx |" in md


def test_missing_backends_are_listed_not_dropped(bench_run, tiny_bundle):
    status = {b["backend"]: b for b in bench_run["backends"]}
    assert status["onnx-int8"]["status"] == "not available"
    assert "model_int8.onnx" in status["onnx-int8"]["reason"] and "--stages int8" in status["onnx-int8"]["reason"]
    assert status["trt-fp16"]["status"] == "not available" and status["trt-fp16"]["reason"]
    md = (tiny_bundle / "reports" / "bench.md").read_text()
    assert md.count("| onnx-int8 | not available:") == 3  # one line in each workload table


def _scaled(report: dict, factor: float) -> dict:
    scaled = copy.deepcopy(report)
    for r in scaled["results"]:
        r["stats"]["median_s"] *= factor
    return scaled


def test_bench_compare_passes_on_itself_and_fails_on_planted_regression(bench_run, tmp_path, monkeypatch, capsys):
    current = tmp_path / "current.json"
    current.write_text(json.dumps(bench_run))
    code, out = run_cli(["bench-compare", str(current), "--baseline", str(current), "--fail-over", "5%"], monkeypatch, capsys)
    assert code == 0, out
    assert "0 regressed" in out
    faster = tmp_path / "faster_baseline.json"  # the baseline was 20 % faster on every point
    faster.write_text(json.dumps(_scaled(bench_run, 1 / 1.2)))
    code, out = run_cli(["bench-compare", str(current), "--baseline", str(faster), "--fail-over", "5%"], monkeypatch, capsys)
    assert code == 4
    assert "REGRESSION onnx decode/batch=1/past=8" in out and "+20.0%" in out
    assert "error: performance regressed beyond 5%" in out
    code, out = run_cli(["bench-compare", str(current), "--baseline", str(faster), "--fail-over", "25%"], monkeypatch, capsys)
    assert code == 0, out


def test_bench_gate_on_a_real_run(bench_run, tiny_bundle, tmp_path, monkeypatch, capsys):
    """--baseline on `exportline bench` itself: a baseline 1000× faster fails the new run,
    one 1000× slower passes it; either way the reports are written with the comparison."""
    args = ["bench", str(tiny_bundle), "--backends", "torch", "--workloads", "decode", *TINY_GRID]
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps(_scaled(bench_run, 1e-3)))
    code, out = run_cli([*args, "--baseline", str(planted), "--fail-over", "5%"], monkeypatch, capsys)
    assert code == 4, out
    assert "REGRESSION torch decode/batch=1/past=8" in out
    assert "missing in this run (baseline only): onnx" in out  # listed, not failed
    saved = json.loads((tiny_bundle / "reports" / "bench.json").read_text())
    assert saved["baseline"]["failed"] is True
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(_scaled(bench_run, 1e3)))
    code, out = run_cli([*args, "--baseline", str(slow), "--fail-over", "5%"], monkeypatch, capsys)
    assert code == 0, out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not-a-bundle"
    code, out = run_cli(["bench", str(empty), *TINY_GRID], monkeypatch, capsys)
    assert code != 0 and "error:" in out and "exportline export" in out
    assert not empty.exists()
    code, out = run_cli(["bench", str(empty), "--backends", "torch,bogus"], monkeypatch, capsys)
    assert code != 0 and "unknown bogus" in out and "Traceback" not in out
    code, out = run_cli(["bench-compare", str(tmp_path / "nope.json"), "--baseline", str(tmp_path / "nope.json")],
                        monkeypatch, capsys)
    assert code != 0 and "no such file" in out


# -- CI workflow --------------------------------------------------------------------------------
def test_gpu_bench_workflow_structure():
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-bench.yml").read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as True
    assert "workflow_dispatch" in triggers
    job = wf["jobs"]["bench"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert job["strategy"]["matrix"]["model"] == ["tiny", "100m", "1b"]
    steps = job["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "make setup" in runs and "make export MODEL=${{ matrix.model }}" in runs
    assert "make bench MODEL=${{ matrix.model }}" in runs and "--fail-over" in runs
    assert "bench/baselines/${{ matrix.model }}.json" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["uses"] == "actions/upload-artifact@v4"
    assert upload["with"]["path"] == "out/${{ matrix.model }}/reports/" and upload["if"] == "always()"
    assert all(("run" in s) != ("uses" in s) for s in steps)


def test_gpu_bench_workflow_installs_tensorrt_and_requires_it():
    """The GPU job gets TensorRT (the gpu extra) and onnxruntime-gpu, and fails when trt cannot run."""
    import shlex

    steps = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-bench.yml").read_text())["jobs"]["bench"]["steps"]
    runs = [s.get("run", "") for s in steps]
    order = {name: next((i for i, r in enumerate(runs) if needle(r)), None) for name, needle in {
        "setup": lambda r: "make setup" in r,
        "gpu": lambda r: any(".[gpu]" in w for line in r.splitlines() for w in shlex.split(line, comments=True)),
        "export": lambda r: "make export" in r,
    }.items()}
    assert None not in order.values() and order["setup"] < order["gpu"] < order["export"], order
    install = runs[order["gpu"]]
    assert "-c constraints.txt" in install and "onnxruntime-gpu" in install
    # the CPU wheel is removed before the GPU one is installed: both ship the `onnxruntime` module
    assert install.index("uninstall -y onnxruntime") < install.index("install \"onnxruntime-gpu")
    assert "import tensorrt" in install  # the step fails on the runner when the extra did not provide it
    export = shlex.split(runs[order["export"]].split("make export", 1)[1])
    args = next(a for a in export if a.startswith("ARGS="))
    assert shlex.split(args[len("ARGS="):])[:2] == ["--require", "trt"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"tensorrt' in pyproject.split("gpu = [", 1)[1].split("]", 1)[0]
    ort = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.lower().startswith("onnxruntime==")]
    assert len(ort) == 1  # the version the GPU wheel is pinned to
