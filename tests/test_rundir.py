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


def _started(path: Path, *, checkpoint: bool = False, results: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / rundir.CONFIG_FILE).write_text("seed: 0\n")
    (path / rundir.METRICS_FILE).write_text("name,x,value\n")
    if checkpoint:
        ckpt = path / rundir.CHECKPOINT_DIR / "ckpt-000000"
        ckpt.mkdir(parents=True)
        for name in (rundir.MODEL_FILE, rundir.STATE_FILE):
            (ckpt / name).write_bytes(b"x")
    if results:
        (path / rundir.RESULTS_FILE).write_text("{}")
    return path


def test_checkpoint_folders_tell_complete_from_incomplete(tmp_path):
    run = _started(tmp_path / "r", checkpoint=True)
    (run / "checkpoints" / "ckpt-000003").mkdir()  # a folder missing both files
    (run / "checkpoints" / "ckpt-000004").write_text("stray")
    (run / "checkpoints" / ".tmp-abc").mkdir()  # a checkpoint being written: not a ckpt-* entry
    complete, incomplete = rundir.checkpoint_folders(run)
    assert [n for n, _ in complete] == [0]
    assert [p.name for p in incomplete] == ["ckpt-000003", "ckpt-000004"]


def test_only_a_started_run_is_refused_without_overwrite(tmp_path):
    assert rundir.check_out_dir(tmp_path / "new", overwrite=False) == []
    leftovers = _started(tmp_path / "killed-early")
    assert rundir.check_out_dir(leftovers, overwrite=False) == ["config.yaml", "metrics.csv"]
    for kind in ({"checkpoint": True}, {"results": True}):
        run = _started(tmp_path / str(kind), **kind)
        with pytest.raises(ConfigError, match="already holds a run"):
            rundir.check_out_dir(run, overwrite=False)
        assert "config.yaml" in rundir.check_out_dir(run, overwrite=True)
    multi = tmp_path / "multi"
    _started(multi / "seed-1", checkpoint=True)
    assert rundir.holds_started_run(multi) and rundir.run_entries(multi) == ["seed-1"]


def test_check_writable_names_the_blocking_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file is not a directory"):
        rundir.check_writable(tmp_path / "file" / "a" / "b")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        rundir.check_writable(tmp_path / "file")
    rundir.check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()


def test_replace_entries_removes_only_what_it_is_given(tmp_path):
    run = _started(tmp_path / "r", checkpoint=True)
    (run / "notes.txt").write_text("mine")
    (run / ".replaced-old").mkdir()  # left by a process killed while deleting
    rundir.replace_entries(run, rundir.run_entries(run))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_write_text_atomic_clears_the_leftover_of_a_killed_write(tmp_path):
    (tmp_path / ".results.json.x1.tmp").write_text("half")
    rundir.write_text_atomic(tmp_path / "results.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_config_values_of_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_bytes(b"seed: \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        rundir.read_config_values(tmp_path)
