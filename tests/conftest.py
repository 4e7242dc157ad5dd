"""Shared fixtures. Deploy: a local Hub-compatible server, and a tiny bundle built once per session."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Variables that would point the client at a real Hub or a real token.
_HUB_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET")

# Before anything imports huggingface_hub (it reads these at import): no test sees the user's
# Hub cache, token or endpoint, and nothing a test does lands in ~/.cache/huggingface.
for _name in _HUB_ENV:
    os.environ.pop(_name, None)
_HF_HOME = tempfile.mkdtemp(prefix="exportline-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# exportline's cache (graph cache, timing cache) for fixtures wider than one test; each test
# gets its own below.
_CACHE = tempfile.mkdtemp(prefix="exportline-tests-cache-")
os.environ["EXPORTLINE_CACHE"] = _CACHE

from deploy_bundle import build_bundle, exportline_cmd  # noqa: E402 (after the environment is isolated)
from hub_server import HubServer, HubState  # noqa: E402


def pytest_unconfigure(config):
    # Every pytest process that imports this file (each xdist worker too) made its own
    # HF_HOME and EXPORTLINE_CACHE above; nothing reads it once the session is over, and /tmp is shared.
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    shutil.rmtree(_CACHE, ignore_errors=True)


@dataclass
class LocalHub:
    url: str
    state: HubState
    token: str  # the one valid write token; looks like a real one (hf_ + 40 characters)
    home: Path

    def env(self, *, token: str | None = None) -> dict[str, str]:
        """Environment for a client process: this server, no xet, a private HF_HOME."""
        env = {k: v for k, v in os.environ.items() if k not in _HUB_ENV}
        env.update(HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.home),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_UPDATE_CHECK="1")
        if token:
            env["HF_TOKEN"] = token
        return env

    def cli(self, *args: str, env_token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `exportline ARGS` in a subprocess against this hub (huggingface_hub reads its
        endpoint at import time, so a fresh process is the honest way to point it here)."""
        return subprocess.run([*exportline_cmd(), *args], env=self.env(token=env_token), capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _private_exportline_cache(tmp_path, monkeypatch):
    """Each test its own $EXPORTLINE_CACHE (child processes inherit it): no test is served a
    graph another test traced (tests that patch tracing must trace), nothing lands in ~/.cache."""
    monkeypatch.setenv("EXPORTLINE_CACHE", str(tmp_path / "exportline-cache"))


@pytest.fixture
def local_hub(tmp_path):
    """A Hub-compatible HTTP server on 127.0.0.1 (tests/hub_server.py), fresh per test.
    `local_hub.state.fail(kind, nth=…)` injects errors; `.state.tamper(...)` corrupts served bytes."""
    token = "hf_" + secrets.token_hex(20)
    with HubServer({token: "tester"}) as server:
        yield LocalHub(server.url, server.state, token, tmp_path / "hf_home")


@pytest.fixture(scope="session")
def deploy_bundle_template(tmp_path_factory) -> Path:
    """The tiny preset's hf stage + stand-ins for onnx/trt/reports, built once per session."""
    return build_bundle(tmp_path_factory.mktemp("deploy") / "tiny")


@pytest.fixture
def deploy_bundle(deploy_bundle_template, tmp_path) -> Path:
    """A private copy (mtimes kept, so manifest checksums stay trusted) a test may change."""
    dest = tmp_path / "tiny"
    shutil.copytree(deploy_bundle_template, dest, ignore=shutil.ignore_patterns(".exportline.lock"))
    return dest
