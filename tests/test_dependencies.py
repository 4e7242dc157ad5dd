"""Installs that do not drift, and no deprecation the next transformers release turns into a break:
constraints.txt is what `make setup` installs, pyproject bounds the APIs we rely on, and an
export + verify of a tiny model runs with FutureWarning as an error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy_bundle import exportline_cmd

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not a plain pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_and_match_the_venv():
    pins = _constraints()
    assert "exportline" not in pins  # the project itself is installed from the checkout
    requires = [Requirement(r) for r in metadata.requires("exportline") or []]
    wanted = {canonicalize_name(r.name) for r in requires if not r.marker or r.marker.evaluate({"extra": "dev"})}
    assert wanted - set(pins) == set(), "run `make lock`: constraints.txt misses a dependency"
    for name in sorted(wanted):
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name} {installed} installed, constraints.txt pins {pins[name]}; run make setup"


def test_setup_and_ci_install_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    setup = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "constraints.txt" in setup.splitlines()[0]  # editing it re-runs the set-up
    installs = [line for line in setup.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert re.search(r"^lock:", makefile, re.M) and "pip freeze" in makefile.split("\nlock:", 1)[1]
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI installs through make setup


def test_pyproject_bounds_the_apis_we_call():
    import tomllib

    deps = {canonicalize_name(Requirement(r).name): Requirement(r)
            for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    # `cache=` replaced `past_key_values=` in 5.24; a 6.x may change config.json again
    assert "5.23" not in deps["transformers"].specifier and "5.24.0" in deps["transformers"].specifier
    assert "6.0" not in deps["transformers"].specifier
    for name in ("torch", "onnx", "onnxruntime", "numpy", "huggingface-hub"):
        assert any(s.operator == "<" for s in deps[name].specifier), f"{name} has no upper bound"


def test_trace_filter_hides_only_the_known_torch_message():
    from exportline.exporters.onnx.export import _quiet

    with pytest.warns(FutureWarning, match="cache"), _quiet():
        warnings.warn("`past_key_values` is deprecated; use `cache`", FutureWarning, stacklevel=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _quiet():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
    assert seen == []


def test_export_and_verify_of_a_tiny_model_emit_no_future_warning(tmp_path):
    """hf → onnx → fp16 → int8 with every verification (torch runner, float64 greedy through the
    KV cache, ONNX Runtime), FutureWarning turned into an error in the process and its children."""
    env = {**os.environ, "PYTHONWARNINGS": "error::FutureWarning"}
    cmd = exportline_cmd()
    cmd = [sys.executable, "-W", "error::FutureWarning", *cmd[1:]] if cmd[0] == sys.executable else cmd
    proc = subprocess.run([*cmd, "export", "tiny", "--out", str(tmp_path / "b"), "--stages", "hf,onnx,fp16,int8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr
    assert "onnx passed" in proc.stderr + proc.stdout
