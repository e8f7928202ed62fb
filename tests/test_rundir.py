"""lifelong.rundir: the names inside a run directory, atomic JSON writes and reading a saved config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifelong import rundir
from lifelong.errors import ConfigError


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "results.json"
    rundir.write_json_atomic(path, {"a": 1})
    rundir.write_json_atomic(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    rundir.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        rundir.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_read_json_reads_what_write_json_atomic_wrote(tmp_path):
    rundir.write_json_atomic(tmp_path / "x.json", {"nan": float("nan"), "list": [1.5]})
    data = rundir.read_json(tmp_path / "x.json")
    assert data["list"] == [1.5] and data["nan"] != data["nan"]  # NaN survives the round trip


def test_seed_dirs_are_named_by_seed_and_need_a_config(tmp_path):
    assert rundir.seed_dir(tmp_path, 3) == tmp_path / "seed-3"
    assert rundir.is_seed_dir(Path("runs/multi/seed-3")) and not rundir.is_seed_dir(Path("runs/seed"))
    for seed in (1, 0):
        rundir.seed_dir(tmp_path, seed).mkdir()
        (rundir.seed_dir(tmp_path, seed) / rundir.CONFIG_FILE).write_text("seed: 0\n")
    (tmp_path / "seed-2").mkdir()  # not started: no config yet
    assert rundir.seed_dirs(tmp_path) == [tmp_path / "seed-0", tmp_path / "seed-1"]


def test_snapshot_path_numbers_stages_with_two_digits(tmp_path):
    assert rundir.snapshot_path(tmp_path, 0) == tmp_path / "snapshots" / "stage-00.safetensors"
    assert rundir.snapshot_path(str(tmp_path), 12).name == "stage-12.safetensors"


def test_read_config_values_of_a_run(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("seed: 7\ntrain:\n  batch_size: 16\n")
    assert rundir.read_config_values(tmp_path) == {"seed": 7, "train": {"batch_size": 16}}


def test_read_config_values_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory \\(no config.yaml\\)"):
        rundir.read_config_values(tmp_path)
    config = tmp_path / rundir.CONFIG_FILE
    config.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        rundir.read_config_values(tmp_path)
    config.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="does not hold a run configuration"):
        rundir.read_config_values(tmp_path)
