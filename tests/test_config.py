"""params.yaml schema: defaults, overrides, clear errors, presets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atric.config import (
    Params,
    TrainParams,
    apply_overrides,
    flatten,
    load_params,
    preset_overrides,
    signature_keys,
    train_dvc_params,
)
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
        load_params(tmp_path / "absent.yaml", ["train.lr=-1"], must_exist=False)


def test_missing_params_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml: params file not found"):
        load_params(tmp_path / "absent.yaml")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_at_load(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_params(REPO / "params.yaml", [f"train.lr={value}"])


@pytest.mark.parametrize(("written", "read"), [("no", "no"), ("yes", "yes"), ("auto", "auto")])
def test_cache_in_ram_yes_no_as_documented_unquoted(written: str, read: str) -> None:
    assert load_params(REPO / "params.yaml", [f"train.cache_in_ram={written}"]).train.cache_in_ram == read


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


def test_dvc_train_stage_depends_on_exactly_the_result_params() -> None:
    """dvc.yaml's train params are derived from the schema's roles, not written by hand."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["params"] == train_dvc_params()
    assert stages["train_seed"]["params"] == train_dvc_params()
    assert stages["train_fused"]["do"]["params"] == [*train_dvc_params(), "features.experts"]
    assert "train.precision" in train_dvc_params() and "train.epochs" in train_dvc_params()
    assert "train.device" not in train_dvc_params() and "train.poolings" not in train_dvc_params()


def test_every_train_param_has_a_role_and_the_signature_leaves_out_schedule_and_runtime() -> None:
    roles = {name: (info.json_schema_extra or {}).get("role") for name, info in TrainParams.model_fields.items()}
    assert None not in roles.values(), [k for k, v in roles.items() if v is None]
    assert "epochs" not in signature_keys() and "device" not in signature_keys()
    assert {"pooling", "experts", "margin", "precision"} <= set(signature_keys())


def test_params_yaml_states_the_schema_defaults() -> None:
    """One default per param: the committed params.yaml says what the schema defaults are."""
    from_file = flatten(load_params(REPO / "params.yaml").model_dump(exclude={"tune": {"space"}}))
    defaults = flatten(Params().model_dump(exclude={"tune": {"space"}}))
    # Per-expert feature settings are validated (and defaulted) by each expert: not compared here.
    assert {k: v for k, v in from_file.items() if k in defaults and defaults[k] != v} == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.pooling=avg", "train.pooling: unknown pooling 'avg'; valid: mean, max, lstm, netvlad, netrvlad"),
        ("train.poolings=[mean,meen]", "train.poolings.1: unknown pooling 'meen'"),
        ("train.poolings=[]", "train.poolings: List should have at least 1 item"),
        ("train.experts=[fa,fa]", "duplicate expert names"),
        ("train.precision=fp8", "train.precision: unknown precision 'fp8'; valid: fp32, bf16, fp16"),
    ],
)
def test_names_are_validated_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_params(REPO / "params.yaml", [override])


def test_thread_count_follows_the_param_and_never_exceeds_the_available_cores(monkeypatch) -> None:
    import torch

    from atric import device

    before = torch.get_num_threads()
    try:
        assert device.configure_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for cores, expected in ((1, 1), (2, 1), (8, 7)):  # one core left to the data pipeline
            monkeypatch.setattr(device, "available_cpus", lambda cores=cores: cores)
            assert device.configure_threads(None) == expected == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.setattr(device, "available_cpus", lambda: 2)
        torch.set_num_threads(3)
        assert device.configure_threads(None) == 2 == torch.get_num_threads()  # a pin capped by the cores
        monkeypatch.setattr(device, "available_cpus", lambda: 8)
        torch.set_num_threads(2)
        assert device.configure_threads(None) == 2  # auto never raises an OMP_NUM_THREADS pin
        assert device.configure_threads(3) == 3 == torch.get_num_threads()  # the param decides
    finally:
        torch.set_num_threads(before)


def test_cgroup_quota_caps_the_available_cores(tmp_path, monkeypatch) -> None:
    from atric import device

    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(device, "CGROUP_V2_CPU_MAX", cpu_max)
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two threads
    assert device._cgroup_cpu_limit() == 2
    cpu_max.write_text("max 100000\n")
    assert device._cgroup_cpu_limit() is None
    cpu_max.write_text("50000 100000\n")
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert device.available_cpus() == 1


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = "import atric, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = src
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "ACTIVE"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: 0.01\n  lr: 0.02\n", r"duplicate key 'lr' \(DVC refuses it.*line 3"),
        ("train: {epochs: 2}\ntrain: {epochs: 3}\n", r"duplicate key 'train'"),
        # "A billion laughs": nine levels of nine aliases would expand to 10^9 strings.
        ("a: &a [x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)),
         r"aliases \(\*name\) are not accepted in params"),
    ],
)
def test_params_yaml_with_duplicate_keys_or_aliases_is_refused_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    import resource

    path = tmp_path / "params.yaml"
    path.write_text(text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=message):
        load_params(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing expanded


def test_an_oversized_params_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"bytes; a params file is at most 1048576 bytes"):
        load_params(path)
