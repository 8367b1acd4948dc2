"""params.yaml schema: defaults, overrides, clear errors, presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atric.config import apply_overrides, flatten, load_params, preset_overrides
from atric.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_validate() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.pooling in params.train.poolings
    assert params.features.experts


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_params(path)


def test_bad_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_params(tmp_path / "absent.yaml", ["train.lr=-1"])


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"train": {"lr": 0.01}}, ["train.lr=0.003", "train.experts=[a,b]"])
    assert raw == {"train": {"lr": 0.003, "experts": ["a", "b"]}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_flatten_names_keys_as_dvc_does() -> None:
    flat = flatten(load_params(REPO / "params.yaml").train)
    assert "lr" in flat and "max_frames" in flat


@pytest.mark.parametrize("preset", sorted((REPO / "params").glob("paper-*.yaml")))
def test_paper_presets_are_valid_dvc_flags(preset: Path) -> None:
    overrides = preset_overrides(preset)
    params = load_params(REPO / "params.yaml", overrides)
    assert params.train.epochs == 20 and params.train.lstm_hidden == 2048
    printed = subprocess.run(
        [sys.executable, str(REPO / "src" / "preset.py"), str(preset)],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.split()
    # every flag survives shell word splitting whole: "-S", "key=value" pairs
    assert printed[::2] == ["-S"] * len(overrides) and printed[1::2] == overrides


def test_preset_with_unknown_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        preset_overrides(bad)
