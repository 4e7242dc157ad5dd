"""The outside tools tests/test_consumers.py drives, installed once into a cache outside the
repository (~/.cache/exportline-tests, or $EXPORTLINE_TEST_CACHE) and reused:

- a venv with transformers 4.x, as optimum-onnx pins it, plus optimum-onnx and
  onnxruntime-genai (PyPI only; torch pinned to the CPU build, DESIGN.md §8);
- a venv with the onnxruntime-genai model builder: 0.18.0 imports transformers 5 model
  classes (Qwen3_5…) and onnx_ir, so it cannot run beside optimum's transformers 4.57
  (bench/peers.py drives it; the genai runtime the consumer tests use stays in the venv above);
- node_modules with transformers.js, the current major and 3.x (still what many apps ship;
  it needs config.json's `kv_cache_dtype` for fp16 graphs), one folder each
  (`npm install --ignore-scripts`: onnxruntime-node's CPU binaries ship inside the package,
  nothing is downloaded at run time).

`python tests/consumer_envs.py` installs them all ahead of the tests (.ci/run does this);
`python tests/consumer_envs.py peers` only the two venvs of bench/peers.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("EXPORTLINE_TEST_CACHE", "~/.cache/exportline-tests")).expanduser()
# optimum-onnx 0.1.0 pins transformers 4.57: the 4.x line serving stacks still run.
V4_REQUIREMENTS = ("torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "onnxruntime-genai==0.18.0")
# The builder's own imports, at the versions exportline's constraints.txt pins (torch: CPU build).
GENAI_BUILDER_REQUIREMENTS = ("torch==2.13.0", "onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx-ir==1.1.0",
                              "onnx==1.23.2", "safetensors", "tqdm")
JS_VERSIONS = ("4.3.2", "3.8.1")  # @huggingface/transformers


@contextmanager
def _locked(name: str):
    """One installer at a time (pytest-xdist workers or two CI jobs on one cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _venv(name: str, requirements: tuple[str, ...]) -> Path:
    """The cached venv `name` holding `requirements` (torch first: the CPU build), its python."""
    venv = CACHE / name
    marker, wanted = venv / ".exportline-installed", json.dumps(requirements)
    with _locked(name):
        if not (marker.is_file() and marker.read_text() == wanted):
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)])
            python = str(venv / "bin" / "python")
            _run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
            _run([python, "-m", "pip", "install", "-q", requirements[0]])  # the CPU torch first
            _run([python, "-m", "pip", "install", "-q", *requirements])
            marker.write_text(wanted)
    return venv / "bin" / "python"


def v4_python() -> Path:
    """The cached transformers-4.x venv's python (optimum, genai runtime), installed on first use."""
    return _venv("optimum-venv", V4_REQUIREMENTS)


def genai_builder_python() -> Path:
    """The cached venv's python that runs `python -m onnxruntime_genai.models.builder`."""
    return _venv("genai-builder-venv", GENAI_BUILDER_REQUIREMENTS)


def node_dir(version: str) -> Path:
    """The cached folder whose node_modules holds transformers.js `version`, installed on first
    use. Raises when node/npm are missing: CI installs them (.ci/run), so a test must not skip."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found; install Node.js (.ci/run does: apt-get install nodejs npm)")
    folder = CACHE / "node" / f"transformers-{version}"
    marker, package = folder / ".exportline-installed", f"@huggingface/transformers@{version}"
    with _locked("node"):
        if not (marker.is_file() and marker.read_text() == package):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "package.json").write_text(json.dumps({"name": "exportline-consumer-tests", "private": True,
                                                             "type": "module"}))
            _run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", package], cwd=folder)
            marker.write_text(package)
    return folder


if __name__ == "__main__":
    print(v4_python())
    print(genai_builder_python())
    if sys.argv[1:] != ["peers"]:  # `peers`: only the two venvs bench/peers.py drives (make bench-peers)
        for version in JS_VERSIONS:
            print(node_dir(version))
