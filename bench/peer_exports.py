"""The three exports bench/peers.py compares, each of the same HF folder, each in a fresh
child process measured from outside: wall time (start-up and imports included, as a user
waits for it) and peak RSS (the child's ru_maxrss from wait4; the kernel folds in the
descendants it waited for, so a tool that forks workers is counted whole).

- exportline: the onnx stage (fp32, KV cache), forced, through bench/export_cost.py's child,
              twice: cold (an empty graph cache: it traces) and warm (the cache the cold run
              filled), two rows;
- optimum:    `optimum-cli export onnx --model HF --task text-generation-with-past OUT`
              (its default post-processing and validation, as a user runs it), from the
              transformers-4.x venv it pins;
- genai:      `python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32 -e cpu -c CACHE`
              from its own venv (0.18 imports transformers 5 model classes and onnx_ir).

This module imports nothing heavy: the parent must stay small while the children run, or
Linux's ru_maxrss of a child (kept across exec) would start from the parent's size.
A peer that cannot run is "not available: <one line>", never a number.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ("exportline", "optimum", "genai")
_CACHE = Path(os.environ.get("EXPORTLINE_TEST_CACHE", "~/.cache/exportline-tests")).expanduser()
# Where `python tests/consumer_envs.py peers` (make bench-peers) installs each peer's venv.
DEFAULT_PYTHON = {"optimum": _CACHE / "optimum-venv" / "bin" / "python",
                  "genai": _CACHE / "genai-builder-venv" / "bin" / "python"}
PYTHON_ENV = {"optimum": "EXPORTLINE_OPTIMUM_PYTHON", "genai": "EXPORTLINE_GENAI_PYTHON"}


@dataclass
class Export:
    peer: str
    status: str  # "ok" | "not available"
    reason: str = ""
    wall_s: float | None = None  # the child process, start to exit
    peak_rss_bytes: int | None = None  # its ru_maxrss
    files: dict[str, int] = field(default_factory=dict)  # relative to `folder` → bytes
    folder: str = ""
    graph: str = ""  # the fp32 model.onnx the latency runs time
    command: list[str] = field(default_factory=list)
    stage_wall_s: float | None = None  # exportline: the onnx stage alone (its pipeline record), without start-up
    graph_cache: str = ""  # exportline: its record's graph cache status (stored = traced cold, hit = warm)
    sha256: dict[str, str] = field(default_factory=dict)  # exportline: the manifest's digests of its files

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def peer_python(peer: str, given: Path | None) -> Path:
    """--optimum-python / --genai-python, else $EXPORTLINE_{OPTIMUM,GENAI}_PYTHON, else the cache."""
    return Path(given or os.environ.get(PYTHON_ENV[peer]) or DEFAULT_PYTHON[peer])


def run_measured(cmd: list[str], *, log: Path, cwd: Path | None = None) -> tuple[int, float, int]:
    """Run `cmd` with its output in `log`; (exit code, wall s, peak RSS bytes of it + waited-for children)."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, wall, usage.ru_maxrss * 1024


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    text = (errors or lines or ["(no output)"])[-1]
    return text if len(text) <= 200 else text[:200] + "…"


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def export_exportline(source: str, bundle: Path, *, overrides: list[str], env: dict | None = None,
                      peer: str = "exportline") -> Export:
    """The onnx stage, forced, in a fresh interpreter (bench/export_cost.py's child); the
    files are the ones its stage record lists, i.e. what manifest.json says it wrote.

    Its source is the HF folder itself (the bundle root, which continues the export its hf
    stage recorded), as the other peers are given it, not the preset name: a preset is
    validated against transformers' config classes first, an import (torch with it) that is
    no part of exporting a folder."""
    from exportline.bench.export_cost import _run_child
    from exportline.exporters.core.errors import ExportlineError

    del source, overrides  # already applied by ensure_hf_folder: the folder is the source now
    _remove_previous_outputs(bundle)
    cmd = [sys.executable, "-m", "exportline.bench.export_cost", str(bundle), "--stages", "onnx", "--out", str(bundle)]
    try:
        record, wall, usage = _run_child(str(bundle), "onnx", bundle, overrides=[], force=True, env=env)
    except ExportlineError as exc:
        return Export(peer, "not available", f"onnx stage failed: {exc}", command=cmd)
    files = {rel: (bundle / rel).stat().st_size for rel in record.get("outputs", [])}
    manifest = json.loads((bundle / "manifest.json").read_text())
    digests = {f["path"]: f["sha256"] for f in manifest.get("files", []) if f["path"] in files}
    return Export(peer, "ok", wall_s=round(wall, 2), peak_rss_bytes=usage.ru_maxrss * 1024, files=files,
                  folder=str(bundle), graph=str(bundle / "onnx" / "model.onnx"), command=cmd,
                  stage_wall_s=record.get("wall_s"), sha256=digests,
                  graph_cache=str(record.get("info", {}).get("tracing", {}).get("graph_cache", "not recorded")))


def _remove_previous_outputs(bundle: Path) -> None:
    """The onnx stage's files of an earlier run, deleted before the timed run as the other
    peers' output folders are: replacing a 4 GB file makes the kernel free its pages (2.4 s
    at 1b here), a cost of the earlier run's leftovers, not of exporting."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return
    record = json.loads(manifest.read_text()).get("stages", {}).get("onnx") or {}
    for rel in record.get("outputs", []):
        (bundle / rel).unlink(missing_ok=True)


WARM = "exportline-warm"  # the second exportline row: the same export with the graph cache the first filled


def export_exportline_cold_warm(source: str, bundle: Path, *, overrides: list[str], cache: Path) -> tuple[Export, Export]:
    """exportline twice: cold (an empty graph cache, so it traces) and warm (the cache the cold
    run filled): two rows, so a warm figure is never read as a cold one. The cache folder is
    `cache`, emptied before and removed after; the user's own cache is not touched."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env = {**os.environ, "EXPORTLINE_CACHE": str(cache)}
    env.pop("EXPORTLINE_GRAPH_CACHE", None)  # measure the cache as users get it
    try:
        cold = export_exportline(source, bundle, overrides=overrides, env=env)
        if cold.status != "ok":
            return cold, Export(WARM, "not available", "the cold export failed; nothing to reuse", command=cold.command)
        warm = export_exportline(source, bundle, overrides=overrides, env=env, peer=WARM)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return cold, warm


def _tool_command(peer: str, python: Path, hf: Path, *, out: Path, cache: Path) -> list[str]:
    if peer == "optimum":  # the console script beside the venv's python is what users type
        return [str(python.parent / "optimum-cli"), "export", "onnx", "--model", str(hf),
                "--task", "text-generation-with-past", str(out)]
    return [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
            "-p", "fp32", "-e", "cpu", "-c", str(cache)]


_HOW_TO_INSTALL = "install it with: python tests/consumer_envs.py peers (or make bench-peers), or pass --{}-python PATH"


def export_tool(peer: str, hf: Path, work: Path, *, python: Path) -> Export:
    """optimum-cli or the genai builder on `hf`, writing `work/<peer>/` afresh."""
    out, cache, log = work / peer, work / f"{peer}-cache", work / f"{peer}.log"
    cmd = _tool_command(peer, python, hf, out=out, cache=cache)
    if not Path(cmd[0]).is_file():
        return Export(peer, "not available", f"{cmd[0]} not found; " + _HOW_TO_INSTALL.format(peer), command=cmd)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    try:
        code, wall, peak = run_measured(cmd, log=log, cwd=work)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # the builder's scratch, not part of its output
    graph = out / "model.onnx"
    if code != 0 or not graph.is_file():
        what = f"exited {code}" if code != 0 else "wrote no model.onnx"
        return Export(peer, "not available", f"{Path(cmd[0]).name if peer == 'optimum' else 'genai builder'} {what}: "
                      f"{_last_line(log)} (log: {log})", command=cmd)
    return Export(peer, "ok", wall_s=round(wall, 2), peak_rss_bytes=peak, files=_files(out), folder=str(out),
                  graph=str(graph), command=cmd)


def ensure_hf_folder(source: str, bundle: Path, *, overrides: list[str]) -> None:
    """exportline's hf stage into `bundle` (cached when already there): the HF folder all
    three peers read, so they export the very same weights and config."""
    from exportline.bench.export_cost import ensure_hf

    ensure_hf(source, bundle, overrides)
