"""Checkpoints are atomic, keep the newest complete ones, and refuse anything unsafe or foreign."""

import pickle
import random

import numpy as np
import pytest
import torch

from lifelong import checkpoint
from lifelong.checkpoint import CheckpointError


class Tiny(torch.nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.emb = torch.nn.Embedding(n, 3)
        self.head = torch.nn.Linear(3, n, bias=False)
        self.head.weight = self.emb.weight  # tied, like the LM
        self.register_buffer("running", torch.arange(3.0))


def test_save_and_load_round_trip(tmp_path):
    model = Tiny()
    path = checkpoint.save(tmp_path, model, {"progress": {"stages": ["init"]}, "t": torch.ones(2)})
    assert path.name == "ckpt-000000" and checkpoint.latest(tmp_path) == path
    fresh = Tiny()
    checkpoint.load_weights(path, fresh)
    assert torch.equal(fresh.emb.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight
    state = checkpoint.load_state(path)
    assert state["progress"] == {"stages": ["init"]} and torch.equal(state["t"], torch.ones(2))


def test_keeps_newest_and_ignores_half_written(tmp_path):
    model = Tiny()
    for _ in range(3):
        checkpoint.save(tmp_path, model, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-000001", "ckpt-000002"]
    # A process killed mid-write leaves a hidden temporary folder: never chosen, cleaned up on next save.
    (tmp_path / "checkpoints" / ".tmp-dead").mkdir()
    assert checkpoint.latest(tmp_path).name == "ckpt-000002"
    checkpoint.save(tmp_path, model, {}, keep=2)
    assert not (tmp_path / "checkpoints" / ".tmp-dead").exists()


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None


def test_truncated_state_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, Tiny(), {"x": 1})
    data = (path / checkpoint.STATE_FILE).read_bytes()
    (path / checkpoint.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load_state(path)


def test_garbage_weights_are_refused(tmp_path):
    path = checkpoint.save(tmp_path, Tiny(), {})
    (path / checkpoint.MODEL_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.load_weights(path, Tiny())


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
    path = checkpoint.save(tmp_path, Tiny(), {})
    torch.save({"format": checkpoint.FORMAT, "evil": Evil()}, path / checkpoint.STATE_FILE)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoint.load_state(path)
    assert "code ran" not in capsys.readouterr().out
    (path / checkpoint.STATE_FILE).write_bytes(pickle.dumps({"format": checkpoint.FORMAT}))
    with pytest.raises(CheckpointError):
        checkpoint.load_state(path)


def test_foreign_state_and_wrong_model_are_refused(tmp_path):
    path = checkpoint.save(tmp_path, Tiny(), {})
    torch.save({"something": "else"}, path / checkpoint.STATE_FILE)
    with pytest.raises(CheckpointError, match="not a lifelong-experts checkpoint"):
        checkpoint.load_state(path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        checkpoint.load_weights(path, Tiny(n=5))


def test_rng_state_round_trip_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = checkpoint.save(tmp_path, Tiny(), {"rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_run_state_round_trips_and_fills_what_older_checkpoints_lack(tmp_path):
    state = checkpoint.RunState(config={"seed": 0}, progress=checkpoint.Progress(stages=["init"]).as_state(),
                                optimizer={"state": {}, "param_groups": []}, strategy={"optimizer_steps": 2},
                                rng=checkpoint.rng_state(), metric_counters={"stage": 1}, metrics_csv_bytes=10)
    path = checkpoint.save(tmp_path, Tiny(), state.to_dict())
    loaded = checkpoint.RunState.from_dict(checkpoint.load_state(path))
    assert loaded.progress["stages"] == ["init"] and loaded.metrics_csv_bytes == 10
    assert loaded.position is None and loaded.optimizer_format == "plain" and loaded.manual_growth_events == []
    assert list(state.to_dict()) == list(checkpoint.RunState._ORDER)
    older = {k: v for k, v in state.to_dict().items() if k not in ("optimizer_format", "manual_growth_events")}
    assert checkpoint.RunState.from_dict(older).optimizer_format == "plain"


def test_checkpoint_folder_from_a_run_directory_or_itself(tmp_path):
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="neither a run directory nor a checkpoint folder"):
        checkpoint.checkpoint_folder(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.checkpoint_folder(tmp_path)
    path = checkpoint.save(tmp_path, Tiny(), {})
    assert checkpoint.checkpoint_folder(tmp_path) == path == checkpoint.checkpoint_folder(path)
