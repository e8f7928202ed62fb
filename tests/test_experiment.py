"""A whole run: determinism, and resuming after the process is killed at a checkpoint boundary."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from lifelong import checkpoint, experiment
from lifelong.config import ConfigError, dump_yaml
from lifelong.presets import resolve


def _cli(*args, env=None):
    return [sys.executable, "-m", "lifelong.cli", *args]


def _env():
    # Same thread count for every process, so float reductions are ordered the same way.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_same_seed_gives_bit_identical_results(tmp_path):
    cfg = resolve("smoke", overrides=["stream.train_tokens=4096", "stream.test_tokens=2048"])
    experiment.run(cfg, tmp_path / "a", progress=False, echo=lambda *_: None)
    experiment.run(cfg, tmp_path / "b", progress=False, echo=lambda *_: None)
    a = (tmp_path / "a" / "results.json").read_bytes()
    assert a == (tmp_path / "b" / "results.json").read_bytes()
    other = resolve("smoke", overrides=["stream.train_tokens=4096", "stream.test_tokens=2048", "seed=1"])
    experiment.run(other, tmp_path / "c", progress=False, echo=lambda *_: None)
    assert json.loads(a)["loss_matrix"] != json.loads((tmp_path / "c" / "results.json").read_text())["loss_matrix"]


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli("run", "--preset", "smoke", "--out", str(full), "--no-progress"),
                   env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_cli("run", "--preset", "smoke", "--out", str(killed), "--no-progress"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "ckpt-000001").is_dir():  # after the first experience
        assert proc.poll() is None, "the run ended before its first experience checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()

    done = subprocess.run(_cli("run", "--resume", str(killed), "--no-progress"),
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from ckpt-" in done.stdout
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["stages"] == b["stages"]
    for row_a, row_b in zip(a["loss_matrix"], b["loss_matrix"]):
        assert max(abs(x - y) for x, y in zip(row_a, row_b)) <= 1e-6
    # The metric log holds each stage once: rows logged after the checkpoint were dropped.
    rows = (killed / "metrics.csv").read_text().splitlines()
    stream_rows = [r for r in rows if r.startswith("Loss_Stream/")]
    assert len(stream_rows) == len(a["stages"])


def test_resume_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        experiment.resume(tmp_path)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = resolve("smoke", overrides=["stream.train_tokens=2048", "stream.test_tokens=1024"])
    experiment.run(cfg, tmp_path, progress=False, echo=lambda *_: None)
    changed = resolve("smoke", overrides=["stream.train_tokens=2048", "stream.test_tokens=1024", "train.lr=0.5"])
    (tmp_path / "config.yaml").write_text(dump_yaml(changed))
    with pytest.raises(checkpoint.CheckpointError, match="different configuration"):
        experiment.resume(tmp_path, progress=False, echo=lambda *_: None)


# ---- checkpoints inside an experience (checkpoint.every_steps) --------------------------------

_TINY = ["stream.train_tokens=2048", "stream.test_tokens=1024", "train.batch_size=4", "checkpoint.every_steps=3",
         "eval.curve_every=4"]


class _Crash(Exception):
    pass


def _run_cut_at(cfg, out, step, monkeypatch):
    """Run `cfg` in-process and stop it dead right after optimizer step `step` (like a kill)."""
    from avalanche.core import SupervisedPlugin

    class CrashAt(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            if strategy.is_update_step and strategy.optimizer_steps == step:
                raise _Crash()

    build = experiment.RunSession.__init__

    def build_and_arm(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.strategy.plugins.append(CrashAt())

    with monkeypatch.context() as patch:
        patch.setattr(experiment.RunSession, "__init__", build_and_arm)
        with pytest.raises(_Crash):
            experiment.run(cfg, out, progress=False, echo=lambda *_: None)


@pytest.mark.parametrize("overrides", [
    ["train.grad_accum=2", "train.epochs=2", "model.dropout=0.1"],
    ["strategy.name=replay"],
    ["strategy.name=si"],
    ["strategy.name=distill", "growth.schedule=boundary", "growth.experts=32", "growth.warmup_steps=3",
     "growth.isolate=1", "growth.isolate_queries=true"],
    ["strategy.name=cumulative", "growth.schedule=steps", "growth.every_steps=4", "growth.experts=16",
     "growth.freeze=top_used"],
    ["strategy.name=joint"],
    ["train.optimizer=rowwise_adamw", "growth.schedule=boundary", "growth.experts=16", "growth.freeze=existing"],
    ["train.optimizer_impl=fused", "growth.schedule=steps", "growth.every_steps=5", "growth.experts=16"],
    ["model.ffn=moe", "growth.schedule=trigger", "growth.trigger=plateau", "growth.plateau_window=4",
     "growth.check_every=3", "growth.experts=2"],
    ["growth.schedule=boundary", "growth.experts=32", "growth.warmup_steps=3", "growth.init=contrast",
     "train.trainable=[all, 'new_experts,new_keys']", "growth.isolate=1"],
    ["growth.schedule=steps", "growth.every_steps=5", "growth.experts=16", "train.trainable=[all, new_experts, experts]",
     "growth.warmin=bound"],
    ["strategy.name=sparse", "strategy.sparse.top_t=8", "growth.schedule=boundary", "growth.experts=16"],
    ["strategy.name=sparse", "strategy.sparse.ranking=kl", "strategy.sparse.background=python"],
    ["strategy.name=lora", "stream.pretrain.share=0.3", "train.pretrain_epochs=2", "train.pretrain_lr=0.004"],
    ["strategy.name=sparse", "stream.pretrain.share=0.3", "strategy.sparse.background=general", "train.rewarm=false"],
], ids=["accum-epochs-dropout", "replay", "si", "distill-boundary-growth-query-isolation", "cumulative-step-growth", "joint",
        "rowwise-adamw-growth-freeze", "fused-adamw-step-growth", "moe-trigger-growth",
        "contrast-isolate-growth-new-experts-scope", "step-growth-changing-scopes", "sparse-tfidf-growth",
        "sparse-kl-named-background", "lora-after-pretraining", "sparse-pretraining-background-one-schedule"])
def test_resume_inside_an_experience_gives_identical_results(tmp_path, monkeypatch, overrides):
    cfg = resolve("smoke", overrides=_TINY + overrides)
    quiet = lambda *_: None  # noqa: E731
    experiment.run(cfg, tmp_path / "full", progress=False, echo=quiet)
    steps = json.loads((tmp_path / "full" / "results.json").read_text())["experience_steps"]
    # Past the middle of the second experience (or of the joint one), one step after a checkpoint.
    cut = steps[0] + 3 * steps[1] // 4 + 2 if len(steps) > 1 else steps[0] // 2 + 1
    _run_cut_at(cfg, tmp_path / "cut", cut, monkeypatch)
    newest = checkpoint.latest(tmp_path / "cut")
    assert checkpoint.load_state(newest)["position"] is not None  # the newest one is inside an experience
    said = []
    experiment.resume(tmp_path / "cut", progress=False, echo=said.append)
    assert "inside the next experience" in said[0]
    assert (tmp_path / "full" / "results.json").read_bytes() == (tmp_path / "cut" / "results.json").read_bytes()
    log = (tmp_path / "cut" / "metrics.csv").read_text()
    assert log == (tmp_path / "full" / "metrics.csv").read_text()


def test_sigkill_inside_an_experience_then_resume_matches_uninterrupted(tmp_path):
    sets = [arg for o in _TINY for arg in ("--set", o)]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli("run", "--preset", "smoke", "--out", str(full), "--no-progress", *sets),
                   env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(_cli("run", "--preset", "smoke", "--out", str(killed), "--no-progress", *sets),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "ckpt-000001").is_dir():  # step 3 of the first experience
        assert proc.poll() is None, "the run ended before its first checkpoint inside an experience"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    done = subprocess.run(_cli("run", "--resume", str(killed), "--no-progress"), env=_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "inside the next experience" in done.stdout
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for row_a, row_b in zip(a["loss_matrix"], b["loss_matrix"], strict=True):
        assert max(abs(x - y) for x, y in zip(row_a, row_b)) <= 1e-6


def test_agem_refuses_checkpoints_inside_experiences():
    with pytest.raises(ConfigError, match="agem"):
        resolve("smoke", overrides=["strategy.name=agem", "checkpoint.every_steps=5"])


# ---- rollback after a diverged loss (train.rollback) ----------------------------------------

_DIVERGING = ["stream.train_tokens=2048", "stream.test_tokens=1024", "train.batch_size=4", "train.lr=1e30",
              "train.grad_clip=0", "train.warmup_steps=0"]


def test_rollback_restarts_from_the_last_checkpoint_with_a_lower_learning_rate(tmp_path):
    cfg = resolve("smoke", overrides=_DIVERGING + ["train.rollback=1", "train.rollback_lr_factor=2e-33"])
    said = []
    res = experiment.run(cfg, tmp_path / "r", progress=False, echo=said.append)
    assert len(res["rollbacks"]) == 1
    event = res["rollbacks"][0]
    assert event["experience"] == 0 and event["resumed_step"] == 0 and event["lr_scale"] == pytest.approx(2e-33)
    assert any("rolling back to ckpt-000000" in line for line in said)
    assert all(math.isfinite(x) for row in res["loss_matrix"] for x in row)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["rollbacks"] == res["rollbacks"]


def test_rollback_gives_up_after_its_retries(tmp_path):
    from lifelong.errors import TrainingDiverged

    cfg = resolve("smoke", overrides=_DIVERGING + ["train.rollback=2"])
    said = []
    with pytest.raises(TrainingDiverged):
        experiment.run(cfg, tmp_path / "r", progress=False, echo=said.append)
    assert sum("rolling back" in line for line in said) == 2
    assert not (tmp_path / "r" / "results.json").exists()
    assert checkpoint.latest(tmp_path / "r") is not None
