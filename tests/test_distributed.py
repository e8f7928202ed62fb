"""Data parallel under torchrun with 2 CPU processes (gloo): the loss matrix of a single process,
identical ranks after growth, and resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lifelong import distributed, experiment
from lifelong.config import resolve

# layernorm queries: each token's route is its own, so sharding a batch changes no number (with
# batchnorm each rank would normalise with its own shard's statistics).
_SMALL = ["model.peer.query_norm=layernorm", "stream.train_tokens=4096", "stream.test_tokens=2048"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for ra, rb in zip(a["loss_matrix"], b["loss_matrix"], strict=True)
               for x, y in zip(ra, rb, strict=True))


def test_shard_bounds_cover_a_batch_once_on_one_process():
    assert not distributed.active() and distributed.shard_bounds(7) == (0, 7)
    assert distributed.shard([1]) == [1] and distributed.agree_any(True) and not distributed.agree_any(False)


def test_torchrun_matches_a_single_process_run(tmp_path):
    sets = [a for o in _SMALL for a in ("--set", o)]
    done = _torchrun("-m", "lifelong.cli", "run", "--preset", "smoke", "--out", str(tmp_path / "ddp"),
                     "--no-progress", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # only rank 0 speaks
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = experiment.run(resolve("smoke", overrides=_SMALL), tmp_path / "single", progress=False,
                            echo=lambda *_: None)
    assert _max_diff(ddp, single) <= 1e-5
    assert ddp["experience_steps"] == single["experience_steps"]
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2


@pytest.mark.parametrize("growth", [
    ["growth.schedule=steps", "growth.every_steps=3", "growth.experts=16", "growth.init=kmeans"],
    ["growth.schedule=boundary", "growth.experts=16", "growth.freeze=top_used"],
], ids=["steps-kmeans", "boundary-top-used"])
def test_growth_keeps_ranks_identical(tmp_path, growth):
    worker = Path(__file__).with_name("ddp_worker.py")
    done = _torchrun(str(worker), str(tmp_path / "grow"), *_SMALL, *growth)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads((tmp_path / "grow" / "ranks.json").read_text())
    assert ranks["growth_events"] >= 3 and ranks["num_experts"][-1] > ranks["num_experts"][0]
    assert len(ranks["digests"]) == 2 and ranks["digests"][0] == ranks["digests"][1]


def test_torchrun_resumes_a_run_inside_an_experience(tmp_path, monkeypatch):
    from test_experiment import _run_cut_at

    overrides = _SMALL + ["train.batch_size=4", "checkpoint.every_steps=3"]
    cfg = resolve("smoke", overrides=overrides)
    full = experiment.run(cfg, tmp_path / "full", progress=False, echo=lambda *_: None)
    _run_cut_at(cfg, tmp_path / "cut", full["experience_steps"][0] + 5, monkeypatch)
    done = _torchrun("-m", "lifelong.cli", "run", "--resume", str(tmp_path / "cut"), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inside the next experience" in done.stdout
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert _max_diff(resumed, full) <= 1e-5
