"""The command line end to end: a smoke run, `flops`, and every bad input ending with exit status 2."""

import json
import math
import subprocess
import sys

import pytest

from lifelong import cli, transfer


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    code = cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_smoke_run_writes_the_run_directory(smoke_run):
    for name in ("results.json", "metrics.csv", "config.yaml", "bpb_matrix.png"):
        assert (smoke_run / name).is_file(), name
    assert any((smoke_run / "tb").glob("events.out.tfevents.*"))


def test_results_are_self_consistent(smoke_run):
    res = json.loads((smoke_run / "results.json").read_text())
    domains, L = res["domains"], res["loss_matrix"]
    assert domains == ["python", "cpp", "prose", "legal"]
    assert res["stages"] == ["init"] + [f"after:{d}" for d in domains]
    assert len(L) == len(domains) + 1 and all(len(row) == len(domains) for row in L)
    assert res["forgetting"] == pytest.approx(dict(zip(domains, transfer.forgetting(L))))
    assert res["bwt"] == pytest.approx(transfer.backward_transfer(L))
    assert res["fwt_gem"] == pytest.approx(transfer.forward_transfer(L))
    bpt = [info["bytes_per_token"] for info in res["domain_info"]]
    for row, row_bpb in zip(L, res["bpb_matrix"]):
        assert row_bpb == pytest.approx([v / (math.log(2) * b) for v, b in zip(row, bpt)])
    assert res["num_experts"] == [256] * 5
    assert all(len(info["content_hash"]) == 64 for info in res["domain_info"])
    assert res["config"]["model"]["dim"] == 64


def test_each_domain_loss_falls_after_training_on_it(smoke_run):
    L = json.loads((smoke_run / "results.json").read_text())["loss_matrix"]
    for j in range(len(L[0])):
        assert L[j + 1][j] < L[j][j], f"domain {j}: {L[j][j]:.3f} -> {L[j + 1][j]:.3f}"
        assert L[j + 1][j] < L[0][j] - 1.0, f"domain {j}: init {L[0][j]:.3f} -> {L[j + 1][j]:.3f}"


def test_metrics_csv_has_eval_and_train_rows(smoke_run):
    lines = (smoke_run / "metrics.csv").read_text().splitlines()
    assert lines[0] == "name,x,value"
    names = {line.split(",")[0] for line in lines[1:]}
    assert "Loss_Exp/eval_phase/test_stream/Exp000" in names
    assert "BPB_Stream/eval_phase/test_stream" in names
    assert "Loss_MB/train_phase/train_stream" in names


def test_existing_run_is_refused_and_untouched(smoke_run, capsys):
    before = (smoke_run / "results.json").read_bytes()
    assert cli.main(["run", "--preset", "smoke", "--out", str(smoke_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (smoke_run / "results.json").read_bytes() == before


def test_flops_prints_per_layer_and_total(capsys):
    assert cli.main(["flops", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.ffn (peer)" in out and "total" in out and "active per token" in out


def test_flops_runs_without_importing_avalanche():
    code = ("import sys\nfrom lifelong import cli\ncode = cli.main(['flops', '--preset', 'iso-peer'])\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'avalanche', 'torchvision'})\n"
            "print(code, loaded)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def run_cli(argv) -> int:
    """cli.main's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv, message", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--set", "train.lrr=1"], "unknown config key train.lrr"),
    (["run", "--set", "train.batch_size=big"], "expected int"),
    (["run", "--set", "train.grad_clip=.nan"], "train.grad_clip: expected a finite number"),
    (["run", "--set", "seed=-1"], "seed: expected an integer in 0..4294967295"),
    (["run", "--set", "seed=4294967296"], "seed: expected an integer in 0..4294967295"),
    (["run", "--set", "train.lr=.inf"], "train.lr: expected a finite number"),
    (["run", "--config", "/nonexistent/c.yaml"], "does not exist"),
    (["flops", "--set", "model.peer.num_experts=1000"], "model.peer"),
    (["bogus"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    out = tmp_path / "r"
    code = run_cli(argv + (["--out", str(out)] if argv[0] == "run" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_console_entry_point_has_no_traceback_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "lifelong.cli", "run", "--set", "model.ffn=sparse"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lifelong: error: model.ffn: 'sparse' is not one of peer, moe, dense"


@pytest.mark.parametrize("seeds", ["a,b", "1,1", ",", "-1,0", "0,4294967296"])
def test_bad_seeds(seeds, capsys, tmp_path):
    assert run_cli(["run", "--preset", "smoke", "--seeds", seeds, "--out", str(tmp_path / "r")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress",
                     "--set", "train.lr=1e30", "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0",
                     "--set", "stream.train_tokens=4096"])
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert "training diverged" in err and "experience" in err and "optimizer step" in err
    assert "the last good checkpoint is" in err and len(err.splitlines()) == 1
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and not (out / "results.json").exists()


def _one_line_exit_2(argv, capsys, *messages):
    code = run_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


def test_missing_data_path(tmp_path, capsys):
    _one_line_exit_2(["run", "--preset", "smoke", "--out", str(tmp_path / "r"),
                      "--set", "stream.domains=[{name: wiki, path: /nonexistent/wiki}]"],
                     capsys, "wiki", "/nonexistent/wiki")


def test_empty_domain(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    _one_line_exit_2(["run", "--preset", "smoke", "--out", str(tmp_path / "r"),
                      "--set", f"stream.domains=[{{name: blank, path: {tmp_path / 'empty'}}}]"],
                     capsys, "blank")


def test_growth_on_a_model_without_expert_layers(tmp_path, capsys):
    _one_line_exit_2(["run", "--preset", "smoke", "--out", str(tmp_path / "r"),
                      "--set", "model.ffn=dense", "--set", "growth.schedule=boundary"],
                     capsys, "growth needs PEER or MoE layers")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    _one_line_exit_2(["run", "--resume", str(tmp_path)], capsys, "is not a run directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    _one_line_exit_2(["run", "--resume", str(tmp_path), "--set", "train.lr=1"], capsys, "drop --set")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_resume_from_a_damaged_checkpoint(smoke_run, tmp_path, capsys, damage):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    (run_dir / "results.json").unlink()
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    state = ckpt / "state.pt"
    state.write_bytes(b"not a checkpoint" if damage == "garbage" else state.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    _one_line_exit_2(["run", "--resume", str(run_dir)], capsys, "cannot be loaded safely", str(ckpt))
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing in the run directory was touched


STRATEGIES = ["naive", "replay", "ewc", "si", "mas", "agem", "cumulative", "joint", "distill", "sparse", "lora"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_completes_the_smoke_preset(strategy, tmp_path):
    out = tmp_path / strategy
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress",
                     "--set", f"strategy.name={strategy}", "--set", "stream.train_tokens=4096",
                     "--set", "stream.test_tokens=2048"]) == 0
    res = json.loads((out / "results.json").read_text())
    L = res["loss_matrix"]
    if strategy == "joint":
        assert res["stages"] == ["init", "after:joint"] and res["bwt"] is None
        assert res["final_average"] == pytest.approx(sum(L[1]) / len(L[1]))
    else:
        assert res["forgetting"] == pytest.approx(dict(zip(res["domains"], transfer.forgetting(L))))
        assert res["bwt"] == pytest.approx(transfer.backward_transfer(L))
        assert res["fwt_gem"] == pytest.approx(transfer.forward_transfer(L))
    assert res["config"]["strategy"]["name"] == strategy


def test_moe_runs_log_balance_z_loss_and_dropped_fraction(tmp_path):
    out = tmp_path / "moe"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress", "--set", "model.ffn=moe",
                     "--set", "model.moe.capacity_factor=1.0", "--set", "stream.train_tokens=8192"]) == 0
    names = {line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]}
    for key in ("balance_loss", "z_loss", "dropped_fraction"):
        assert f"Aux_MB/train_phase/blocks.1.ffn/{key}" in names
    res = json.loads((out / "results.json").read_text())
    assert res["experts"]["blocks.1.ffn"]["num_experts"][-1] == 8


def test_unparsable_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1,\n")
    assert run_cli(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and str(bad) in err and len(err.splitlines()) == 1


def test_report_compares_runs(smoke_run, tmp_path, capsys):
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    assert cli.main(["report", str(smoke_run), str(smoke_run), "--markdown", "--csv", str(csv_path),
                     "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("| ") > 4 and "BWT" in out
    assert csv_path.read_text().count("\n") == 3 and png.stat().st_size > 0


def test_report_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    _one_line_exit_2(["report", str(tmp_path)], capsys, "not a run directory")


def test_results_record_optimizer_steps_per_experience(smoke_run):
    res = json.loads((smoke_run / "results.json").read_text())
    steps = res["experience_steps"]  # optimizer steps of each experience: 256 blocks / 16 per step
    assert steps == [16, 16, 16, 16]


def test_wandb_logging_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # installed with avalanche-lib
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress", "--set", "log.wandb=true",
                     "--set", "stream.train_tokens=2048", "--set", "stream.test_tokens=1024"]) == 0
    (offline,) = (out / "wandb").glob("offline-run-*")
    assert any(offline.glob("*.wandb"))  # the run's logged history, to `wandb sync` later


def test_wandb_without_the_package_is_refused(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    _one_line_exit_2(["run", "--preset", "smoke", "--out", str(tmp_path / "r"), "--set", "log.wandb=true"],
                     capsys, "'wandb' package is not installed")


def test_flops_states_both_conventions_and_peer_stages(capsys):
    from lifelong.build import meta_model
    from lifelong.presets import resolve

    assert cli.main(["flops", "--preset", "iso-peer"]) == 0
    out = capsys.readouterr().out
    assert "matmul only" in out and "query projection" in out and "top-k of each half" in out
    model = meta_model(resolve("iso-peer"), 256)
    peer = model.blocks[2].ffn
    assert sum(peer.flops_breakdown().values()) == peer.flops_per_token()
    assert peer.matmul_flops_per_token() < peer.flops_per_token()
    total = sum(model.flops_per_token().values())
    matmul = sum(model.flops_per_token("matmul").values())
    assert f"{total:,}" in out and f"{matmul:,}" in out and matmul < total
