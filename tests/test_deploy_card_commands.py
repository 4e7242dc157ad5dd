"""Every command the pushed model card shows under "How to use" runs as written, for someone who
has only the repo id: the card is pushed to the local Hub-compatible server (tests/hub_server.py),
then each ```python block runs in a fresh folder with a fresh Hugging Face cache and each line of
the ```bash block runs as a shell command would."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
from test_deploy_triton import parse_config

from deploy_bundle import exportline_cmd

REPO = "org/tiny"
pytestmark = pytest.mark.slow  # one push, six subprocesses that import torch/transformers


def how_to_use_blocks(card: str) -> list[tuple[str, str]]:
    section = card.split("\n## How to use", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.fixture
def pushed_card(local_hub, deploy_bundle):
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert proc.returncode == 0, proc.stderr
    card = local_hub.state.repo(REPO).resolve("main").files["README.md"].data.decode()
    return card


def test_every_card_command_runs_for_a_repo_id(local_hub, pushed_card, tmp_path):
    blocks = how_to_use_blocks(pushed_card)
    assert [lang for lang, _ in blocks] == ["python", "python", "python", "bash", "python"]
    env = {**local_hub.env(), "EXPORTLINE_CACHE": str(tmp_path / "exportline-cache")}
    ran, not_run = [], []
    for i, (lang, code) in enumerate(blocks):
        cwd = tmp_path / f"block{i}"
        cwd.mkdir()
        if lang == "python":
            if "import tensorrt" in code and importlib.util.find_spec("tensorrt") is None:
                not_run.append("TensorRT block: not available: tensorrt is not installed")
                continue
            proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"block {i} failed:\n{code}\n{proc.stderr[-2000:]}"
            ran.append(code.splitlines()[0])
            continue
        for line in code.splitlines():
            args = shlex.split(line, comments=True)
            assert args[0] == "exportline", line
            proc = subprocess.run([*exportline_cmd(), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
            ran.append(line)
            if args[1] == "generate":
                assert proc.stdout.strip(), "generate printed no text"
    assert len(ran) == 6, ran  # 3 python blocks (transformers, onnxruntime, torch.hub) + pull, generate, handoff
    assert not_run == [] or not_run == ["TensorRT block: not available: tensorrt is not installed"]
    bash = next(i for i, (lang, _) in enumerate(blocks) if lang == "bash")
    config = parse_config(tmp_path / f"block{bash}" / "model_repository" / "tiny" / "config.pbtxt")
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx"


def test_repo_id_is_pulled_once_into_the_cache_with_checksums(local_hub, pushed_card, tmp_path):
    env = {**local_hub.env(), "EXPORTLINE_CACHE": str(tmp_path / "cache")}
    cmd = [*exportline_cmd(), "generate", REPO, "--token-ids", "1,2,3", "--max-new-tokens", "4"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    head = local_hub.state.repo(REPO).branches["main"]
    cached = tmp_path / "cache" / "hub" / REPO / head
    assert (cached / "manifest.json").is_file() and f"pulling {REPO}@{head[:12]}" in first.stderr
    downloads = local_hub.state.count("resolve")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "pulled earlier" in second.stderr
    assert second.stdout == first.stdout and local_hub.state.count("resolve") == downloads


def test_tampered_repo_is_refused_and_nothing_is_cached(local_hub, deploy_bundle, pushed_card, tmp_path):
    data = (deploy_bundle / "onnx" / "model.onnx_data").read_bytes()
    local_hub.state.tamper(REPO, "onnx/model.onnx_data", data[:-8] + b"tampered")
    env = {**local_hub.env(), "EXPORTLINE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([*exportline_cmd(), "handoff", REPO, "--triton", str(tmp_path / "repo")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "onnx/model.onnx_data does not match manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*")) and not (tmp_path / "repo" / "tiny").exists()


def test_neither_folder_nor_repo_id_is_one_line_error(tmp_path):
    proc = subprocess.run([*exportline_cmd(), "generate", str(tmp_path / "no" / "such" / "dir"), "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not a Hub repo id" in proc.stderr and "Traceback" not in proc.stderr
