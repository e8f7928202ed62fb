"""Growth during a run (lifelong/plugins/growth.py) and on a saved checkpoint (`lifelong grow`), both
through lifelong/growth.py."""

import json
import shutil
import subprocess
import sys
from collections import deque

import pytest
import torch
from safetensors.torch import load_file

from lifelong import checkpoint, cli, experiment
from lifelong.config import GrowthConfig
from lifelong.presets import resolve
from lifelong.plugins.growth import GrowthPlugin, InputRecorder

SMALL = ["stream.train_tokens=4096", "stream.test_tokens=2048"]


def quiet(*_):
    pass


def run(tmp_path, *overrides):
    cfg = resolve("smoke", overrides=[*SMALL, *overrides])
    return experiment.run(cfg, tmp_path, progress=False, echo=quiet)


def test_boundary_growth_preserves_output_and_is_recorded(tmp_path):
    res = run(tmp_path, "growth.schedule=boundary", "growth.experts=40", "growth.warmup_steps=5")
    events = res["growth_events"]
    assert [e["experience"] for e in events] == [1, 2, 3]
    assert all(e["added"] == 48 and e["reason"] == "boundary" for e in events)  # 40 -> 3 rows of 16
    assert all(e["output_change"] <= 1e-6 for e in events)
    assert res["num_experts"] == [256, 256, 304, 352, 400]


def test_steps_schedule_grows_every_n_optimizer_steps(tmp_path):
    res = run(tmp_path, "growth.schedule=steps", "growth.every_steps=5", "growth.experts=16",
              "growth.max_growths=3", "growth.init=random")
    assert [e["step"] for e in res["growth_events"]] == [5, 10, 15]


def test_usage_trigger_fires_on_a_saturated_pool(tmp_path):
    res = run(tmp_path, "growth.schedule=trigger", "growth.trigger=usage", "growth.usage_threshold=0.05",
              "growth.check_every=5", "growth.max_growths=2", "growth.experts=16")
    assert [e["reason"] for e in res["growth_events"]] == ["trigger:usage"] * 2


def test_plateau_trigger():
    plugin = GrowthPlugin.__new__(GrowthPlugin)
    plugin.cfg = GrowthConfig(schedule="trigger", trigger="plateau", plateau_window=4, plateau_tolerance=0.05)
    plugin.losses = deque([2.0, 2.0, 1.99, 1.99], maxlen=4)
    assert plugin._fired()
    plugin.losses = deque([2.0, 2.0, 1.5, 1.5], maxlen=4)
    assert not plugin._fired()
    plugin.losses = deque([2.0, 2.0], maxlen=4)
    assert not plugin._fired()


def test_frozen_experts_stay_bit_identical_while_training(tmp_path):
    run(tmp_path, "growth.schedule=boundary", "growth.experts=16", "growth.freeze=existing", "checkpoint.keep=5")
    # Freezing of the original 256 experts starts at the first growth, before experience 1.
    weights = [load_file(str(tmp_path / "checkpoints" / f"ckpt-{i:06d}" / checkpoint.MODEL_FILE))
               for i in range(5)]
    for table in ("blocks.1.ffn.expert_u", "blocks.1.ffn.expert_v"):
        # trained during experience 0, before anything was frozen ...
        assert not torch.equal(weights[0][table][:256], weights[1][table][:256])
        # ... then bit-identical through three experiences of AdamW with weight decay
        assert torch.equal(weights[1][table][:256], weights[4][table][:256])
        assert weights[4][table].shape[0] == 304
    res = json.loads((tmp_path / "results.json").read_text())
    assert [e["frozen"] for e in res["freeze_events"]] == [256, 272, 288]


def test_grow_a_checkpoint_then_resume(tmp_path, capsys):
    full = run(tmp_path / "full", "checkpoint.keep=5")
    # Pretend the run was interrupted after its first experience, then grow what it left.
    run_dir = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", run_dir)
    for name in ("ckpt-000002", "ckpt-000003", "ckpt-000004"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    (run_dir / "results.json").unlink()
    # `lifelong grow` reads the stream's blocks and builds the model without importing Avalanche
    code = ("import sys; sys.modules['avalanche'] = None\nfrom lifelong import cli\n"
            f"sys.exit(cli.main(['grow', {str(run_dir)!r}, '--experts', '32', '--warmup-steps', '5']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "continue with: lifelong run --resume" in proc.stdout
    assert cli.main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_experts"] == [256, 256, 288, 288, 288]
    (event,) = res["growth_events"]
    assert event["reason"] == "checkpoint" and event["added"] == 32 and event["output_change"] <= 1e-6
    assert res["loss_matrix"][:2] == full["loss_matrix"][:2]  # what was done before the cut is kept


@pytest.mark.parametrize("args, message", [
    (["--experts", "8"], "neither a run directory nor a checkpoint folder"),
    (["--experts", "0"], "--experts must be >= 1"),
])
def test_grow_bad_input(tmp_path, capsys, args, message):
    assert cli.main(["grow", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_grow_refuses_a_model_without_expert_layers(tmp_path, capsys):
    run(tmp_path, "model.ffn=dense")
    assert cli.main(["grow", str(tmp_path), "--experts", "8"]) == 2
    assert "growth needs PEER or MoE layers" in capsys.readouterr().err


def test_input_recorder_keeps_a_bounded_window_of_training_inputs():
    layer = torch.nn.Linear(4, 4)
    recorder = InputRecorder({"l": layer}, max_tokens=10)
    for i in range(5):
        layer(torch.full((2, 3, 4), float(i)))  # 6 tokens each
    kept = recorder.get("l")
    assert kept.shape == (10, 4) and kept[-1, 0] == 4 and kept[0, 0] == 3
    layer.eval()
    layer(torch.zeros(1, 4))
    assert torch.equal(recorder.get("l"), kept)  # eval forwards are not recorded
    recorder.clear()
    assert recorder.get("l") is None


def test_a_run_resumed_after_growth_continues_identically(tmp_path):
    settings = ["growth.schedule=boundary", "growth.experts=16", "growth.warmup_steps=3", "checkpoint.keep=5"]
    full = run(tmp_path / "full", *settings)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for name in ("ckpt-000003", "ckpt-000004"):  # keep the checkpoint after experience 1 (one growth done)
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "results.json").unlink()
    resumed = experiment.resume(cut, progress=False, echo=quiet)
    assert resumed["loss_matrix"] == full["loss_matrix"]
    assert resumed["growth_events"] == full["growth_events"] and len(full["growth_events"]) == 3
    assert resumed["num_experts"] == full["num_experts"] == [256, 256, 272, 288, 304]


def test_new_experts_are_trained_once_their_warmin_is_over(tmp_path, monkeypatch):
    """Experiences of 16 steps and a 4-step warm-in: every growth's experts get traffic and gradient."""
    from lifelong.plugins import growth as growth_plugin

    added = {}
    real = growth_plugin.grow_recorded

    def spy(name, layer, *args, **kwargs):
        event = real(name, layer, *args, **kwargs)
        start = layer.num_experts - event["added"]
        added[event["experience"]] = (start, layer.expert_u.detach()[start:].clone())
        return event

    monkeypatch.setattr(growth_plugin, "grow_recorded", spy)
    cfg = resolve("smoke", overrides=["growth.schedule=boundary", "growth.experts=32", "growth.warmup_steps=4",
                                      "eval.curve_every=0"])
    res = experiment.run(cfg, tmp_path, progress=False, echo=quiet)
    assert res["experience_steps"] == [16] * 4 and sorted(added) == [1, 2, 3]
    u = load_file(str(checkpoint.latest(tmp_path) / checkpoint.MODEL_FILE))["blocks.1.ffn.expert_u"]
    for start, rows in added.values():
        assert not torch.equal(u[start:start + len(rows)], rows)  # they learned
    own = res["experts"]["blocks.1.ffn"]["own"][-1]
    assert own[0] is None and all(share > 0 for share in own[1:])  # and each domain routes to its own
    shares = [float(line.split(",")[2]) for line in (tmp_path / "metrics.csv").read_text().splitlines()
              if line.startswith("Growth/train_phase/blocks.1.ffn/new_share")]
    assert len(shares) >= 3 and max(shares) > 0


def test_the_routing_contrast_loss_is_added_and_logged(tmp_path):
    cfg = resolve("smoke", overrides=["growth.schedule=boundary", "growth.experts=32", "growth.warmup_steps=4",
                                      "growth.isolate=1", "eval.curve_every=0"])
    res = experiment.run(cfg, tmp_path, progress=False, echo=quiet)
    losses = [float(line.split(",")[2]) for line in (tmp_path / "metrics.csv").read_text().splitlines()
              if line.startswith("Growth/train_phase/isolation_loss")]
    assert len(losses) >= 3 and all(0 < x < float("inf") for x in losses)
    assert res["max_intrusion"] is not None and res["min_own"] is not None
