"""The machine and software a benchmark ran on, recorded beside its numbers (house rule 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from exportline.exporters.core.doctor import environment_report


def cpu_info(cpuinfo: str | None = None) -> dict:
    """Model name, logical CPUs, and physical cores (distinct (package, core) pairs)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, cores, package = "unknown", set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and model == "unknown":
            model = value
        elif key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    logical = os.cpu_count() or 1
    return {"model": model, "logical_cpus": logical, "physical_cores": len(cores) or logical}


def physical_cores() -> int:
    return cpu_info()["physical_cores"]


def gpu_driver() -> str:
    """nvidia-smi's driver version; torch reports the CUDA runtime it was built with, not
    the driver actually loaded."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "not available: nvidia-smi not found"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not available: nvidia-smi failed ({type(exc).__name__})"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "not available: nvidia-smi printed nothing"


def torch_threads() -> dict:
    import torch

    return {
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "cuda_runtime": torch.version.cuda or "not available: CPU build of torch",
    }


def engines(root: Path, manifest: dict) -> list[dict]:
    """Every TensorRT plan in the bundle with its manifest sha256 and the build record
    (trt/<plan>.json) written beside it."""
    files = {f["path"]: f for f in manifest.get("files", [])}
    out = []
    for plan in sorted((root / "trt").glob("*.plan")):
        rel = plan.relative_to(root).as_posix()
        entry = {"path": rel, "sha256": files.get(rel, {}).get("sha256", "not in manifest"),
                 "bytes": plan.stat().st_size}
        record = plan.with_suffix(".json")
        if record.is_file():
            try:
                entry["build"] = json.loads(record.read_text())
            except json.JSONDecodeError:
                entry["build"] = f"not readable: {record.name} is not valid JSON"
        out.append(entry)
    return out


def load_average() -> list[float] | str:
    """1/5/15-minute load: other processes on the same cores make timings noisy, so a run
    records how busy the machine was when it started and ended."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return "not available: no load average on this OS"


def environment(root: Path, manifest: dict, device: str) -> dict:
    return {
        "device": device,
        "load_average_at_start": load_average(),
        "cpu": cpu_info(),
        "gpu_driver": gpu_driver() if device == "cuda" else "not applicable: CPU run",
        "torch_threads": torch_threads(),
        "versions": environment_report(),
        "bundle": {"name": manifest.get("name", root.name), "path": str(root),
                   "random_init": bool(manifest.get("source", {}).get("random_init", False))},
        "engines": engines(root, manifest),
    }
