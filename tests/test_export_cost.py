"""bench/export_cost.py: a stage measured in a fresh process (tiny preset, onnx stage)."""

from __future__ import annotations

from exportline.bench.export_cost import ensure_hf, measure_stage, report


def test_onnx_stage_cost_of_tiny_preset(tmp_path):
    out = tmp_path / "tiny"
    ensure_hf("tiny", out, [])
    cost = measure_stage("tiny", "onnx", out, overrides=[])
    assert set(cost.files) == {"onnx/model.onnx", "onnx/model.onnx_data"}
    assert cost.folder_files == {"onnx": 2}
    assert cost.weight_bytes == sum(p.stat().st_size for p in out.glob("*.safetensors")) - _header(out)
    # The child really ran the stage: torch alone is hundreds of MB resident.
    assert cost.process_peak_rss_bytes > 100 * 2**20 and cost.process_wall_s >= cost.stage_wall_s > 0
    assert cost.rss_over_weights == cost.process_peak_rss_bytes / cost.weight_bytes
    assert "peak RSS / weights" in report(cost)


def _header(out) -> int:
    import struct

    with open(out / "model.safetensors", "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]
