"""Every params preset applies through `dvc exp run` exactly as the README says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric.config import load_params, preset_overrides

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "params").glob("*.yaml"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=fakes.dvc_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = fakes.copy_repo_with_params(tmp_path_factory.mktemp("presets"), {})
    (work / "data" / "raw").mkdir(parents=True)
    (work / "data" / "raw" / "placeholder.txt").write_text("a dry run reads no audio\n")
    steps = (["git", "init", "-q"], ["dvc", "commit", "-f", "-q", "data.dvc"], ["git", "add", "-A"],
             ["git", "commit", "-q", "-m", "tiny"])
    for args in steps:
        assert _run(args, work).returncode == 0
    return work


def test_presets_exist() -> None:
    assert {p.name for p in PRESETS} >= {"paper-clotho.yaml", "paper-audiocaps.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_flags_apply_through_dvcs_own_override_code(tiny_repo: Path, preset: Path) -> None:
    """`dvc exp run -S` hands the flags to dvc.utils.hydra.apply_overrides (what refused
    `train.max_frames.logmel` before); then the pipeline must resolve with them."""
    from dvc.utils.hydra import apply_overrides

    params_file = tiny_repo / "params.yaml"
    original = params_file.read_text()
    try:
        apply_overrides(params_file, preset_overrides(preset, REPO / "params.yaml"))
        applied = load_params(params_file)
        for section, values in yaml.safe_load(preset.read_text()).items():
            for key, value in values.items():
                assert getattr(getattr(applied, section), key) == value, f"{section}.{key}"
        result = _run(["dvc", "repro", "--dry", "--force"], tiny_repo)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        for expert in applied.features.experts:
            assert f"src/extract.py --expert {expert}" in result.stdout
    finally:
        params_file.write_text(original)


def test_a_preset_key_params_yaml_lacks_is_appended_with_plus(tmp_path: Path) -> None:
    preset = tmp_path / "frames.yaml"
    preset.write_text("train:\n  max_frames: {logmel: 90}\n  lr: 0.02\n")
    assert preset_overrides(preset, REPO / "params.yaml") == ["+train.max_frames.logmel=90", "train.lr=0.02"]


def test_paper_presets_set_what_the_paper_set() -> None:
    for name, seconds in (("paper-clotho.yaml", 30), ("paper-audiocaps.yaml", 10)):
        train = yaml.safe_load((REPO / "params" / name).read_text())["train"]
        assert train["sampling"] == "clip" and train["max_seconds"] == seconds and train["epochs"] == 20


@pytest.mark.parametrize(
    ("source", "make", "expected"),
    [
        ("synth", "clotho", r"this looks like a Clotho release .* but data\.source is 'synth': set data\.source=clotho"),
        ("clotho", "audiocaps", r"looks like an AudioCaps release .* set data\.source=audiocaps"),
        ("audiocaps", "seed", r"looks like a seed layout .* set data\.source=seed"),
    ],
)
def test_a_source_that_does_not_match_the_raw_folder_names_the_fix(
    tmp_path: Path, source: str, make: str, expected: str
) -> None:
    from test_importers import make_audiocaps_tree, make_clotho_tree

    from atric.config import Params
    from atric.corpus.prepare import prepare_dataset
    from atric.errors import ConfigError

    raw = tmp_path / "raw"
    if make == "clotho":
        make_clotho_tree(raw)
    elif make == "audiocaps":
        make_audiocaps_tree(raw)
    else:
        fakes.write_fake_layout(tmp_path / "stage", dataset="CLOTHO")
        (tmp_path / "stage" / "CLOTHO").rename(raw)
    dataset = {"synth": "SynthCaps", "clotho": "CLOTHO", "audiocaps": "AudioCaps"}[source]
    params = Params.model_validate({"data": {"source": source, "dataset": dataset, "raw_dir": str(raw), "root": str(tmp_path / "data")}})
    with pytest.raises(ConfigError, match=expected):
        prepare_dataset(params)
    assert not (tmp_path / "data").exists()  # nothing written


def test_dvcs_own_rewrite_of_params_yaml_keeps_every_value_on_its_key_line(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml; it once wrapped a long flow mapping mid-value
    (`seed:` on one line, `0` on the next): readable YAML, but not what the user wrote."""
    from dvc.utils.hydra import apply_overrides

    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    apply_overrides(params_file, ["train.lr=0.003"])
    lines = params_file.read_text().splitlines()
    for line, following in zip(lines, lines[1:]):
        if line.rstrip().endswith(":") and following.strip() and not following.lstrip().startswith("#"):
            assert re.match(r"\s*(- |[\w.\-]+:)", following), f"value wrapped off its key: {line!r} / {following!r}"
    assert yaml.safe_load(params_file.read_text())["train"]["lr"] == 0.003
