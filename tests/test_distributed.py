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
from lifelong.presets import resolve

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


@pytest.mark.parametrize("strategy", ["naive", "replay", "sparse", "lora"])
def test_torchrun_matches_a_single_process_run(tmp_path, strategy):
    # replay: saving its buffer must not move rank 0's RNG (the ranks' data order would drift apart)
    # sparse: the retrieval counts are summed over ranks, so every rank updates the experts one process would
    # lora: the DDP wrapper is rebuilt when the adapters alone start to learn
    overrides = _SMALL + [f"strategy.name={strategy}"]
    sets = [a for o in overrides for a in ("--set", o)]
    done = _torchrun("-m", "lifelong.cli", "run", "--preset", "smoke", "--out", str(tmp_path / "ddp"),
                     "--no-progress", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # only rank 0 speaks
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = experiment.run(resolve("smoke", overrides=overrides), tmp_path / "single", progress=False,
                            echo=lambda *_: None)
    assert _max_diff(ddp, single) <= 1e-5
    assert ddp["experience_steps"] == single["experience_steps"]
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_trains_a_pretrained_model_as_one_process_does(tmp_path, tiny_hf, parallel):
    overrides = _SMALL + [f"model.hf={tiny_hf('llama')}", f"train.parallel={parallel}"]
    if parallel == "fsdp":  # the references are keyed by the weights' hash, taken before FSDP shards them
        overrides.append("eval.reference=scratch")
    sets = [a for o in overrides for a in ("--set", o)]
    done = _torchrun("-m", "lifelong.cli", "run", "--preset", "smoke", "--out", str(tmp_path / "ddp"),
                     "--no-progress", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = experiment.run(resolve("smoke", overrides=overrides), tmp_path / "single", progress=False,
                            echo=lambda *_: None)
    assert _max_diff(ddp, single) <= 1e-5
    if parallel == "fsdp":
        assert ddp["fwt_zero_shot"] == pytest.approx(single["fwt_zero_shot"], abs=1e-4)


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


def test_fsdp_sharded_run_killed_and_resumed_matches_a_single_process(tmp_path):
    import signal
    import time

    sets = [a for o in _SMALL + ["train.parallel=fsdp", "train.batch_size=4", "checkpoint.every_steps=3"]
            for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "lifelong.cli", "run", "--preset", "smoke", "--out", str(run_dir),
           "--no-progress", *sets]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "ckpt-000003").is_dir():  # inside the second experience
        assert proc.poll() is None, "the run ended before the checkpoint the test waits for"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not (run_dir / "results.json").exists()
    done = _torchrun("-m", "lifelong.cli", "run", "--resume", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    single = experiment.run(resolve("smoke", overrides=_SMALL + ["train.batch_size=4"]), tmp_path / "single",
                            progress=False, echo=lambda *_: None)
    assert _max_diff(resumed, single) <= 1e-5


def test_fsdp_refuses_growth_and_strategies_that_copy_the_model():
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="re-shard"):
        resolve("smoke", overrides=["train.parallel=fsdp", "growth.schedule=boundary"])
    with pytest.raises(ConfigError, match="'distill' with train.parallel 'fsdp'"):
        resolve("smoke", overrides=["train.parallel=fsdp", "strategy.name=distill"])


def test_a_sharded_checkpoint_is_refused_without_sharding(tmp_path):
    from lifelong import checkpoint

    run_dir = tmp_path / "fsdp"
    done = _torchrun("-m", "lifelong.cli", "run", "--preset", "smoke", "--out", str(run_dir), "--no-progress",
                     *[a for o in _SMALL + ["train.parallel=fsdp"] for a in ("--set", o)])
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir / "results.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="FSDP"):
        experiment.resume(run_dir, progress=False, echo=lambda *_: None)
