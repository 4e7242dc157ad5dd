"""Tests never touch the user's Hugging Face cache, token or endpoint (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_tests_run_with_a_private_hf_home():
    from huggingface_hub import constants

    home = os.environ["HF_HOME"]
    assert "exportline-tests-hf-home-" in home and constants.HF_HOME == home
    assert Path(home).parent == Path(tempfile.gettempdir()) and Path(home).is_dir()
    assert not any(os.environ.get(k) for k in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"))


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "xdist"])
def test_the_private_hf_home_is_removed_when_pytest_exits(tmp_path, workers):
    """A pytest run (and each of its xdist workers) leaves no HF_HOME behind in the temp dir
    its test above ran in."""
    if workers and importlib.util.find_spec("xdist") is None:
        pytest.skip("not available: pytest-xdist is not installed, so there are no workers to check")
    temp = tmp_path / "tmp"
    temp.mkdir()
    test = f"{TESTS / 'test_isolation.py'}::test_tests_run_with_a_private_hf_home"
    args = ["-n", str(workers)] if workers else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, test],
                         cwd=TESTS.parent, env={**os.environ, "TMPDIR": str(temp)}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    assert not list(temp.glob("exportline-tests-hf-home-*")) and not list(temp.glob("exportline-tests-cache-*"))
