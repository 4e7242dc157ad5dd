"""Tests never touch the user's Hugging Face cache, token or endpoint (tests/conftest.py)."""

from __future__ import annotations

import os


def test_tests_run_with_a_private_hf_home():
    from huggingface_hub import constants

    home = os.environ["HF_HOME"]
    assert "exportline-tests-hf-home-" in home and constants.HF_HOME == home
    assert not any(os.environ.get(k) for k in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"))
