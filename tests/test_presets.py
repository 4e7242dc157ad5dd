"""Presets: parameter counts match their names, overrides, unknown names."""

from __future__ import annotations

import pytest

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.presets import load_preset, parse_overrides, preset_names

SIZES = {"1m": 1e6, "10m": 1e7, "100m": 1e8, "1b": 1e9, "10b": 1e10}


def test_every_sized_preset_is_within_5_percent_of_its_name():
    assert set(SIZES) <= set(preset_names())
    for name, target in SIZES.items():
        count = load_preset(name).parameter_count()
        assert abs(count - target) / target <= 0.05, (name, count)


def test_tiny_is_under_a_million_and_random_init():
    tiny = load_preset("tiny")
    assert tiny.parameter_count() < 1e6
    assert tiny.random_init and tiny.architecture == "llama"


def test_overrides_are_typed_and_nested():
    preset = load_preset("tiny", parse_overrides(["model.num_hidden_layers=3", "seed=7"]))
    assert preset.model["num_hidden_layers"] == 3 and preset.seed == 7
    assert preset.hf_config().num_hidden_layers == 3


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: tiny, 1m"):
        load_preset("huge")


def test_bad_override_says_how():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.hidden_size"])
