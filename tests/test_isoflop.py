"""benchmarks/isoflop.py on tiny budgets: the same compute per arm, tuning on validation, the sweep's
table and figure. Nothing here is about which arm wins."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import isoflop  # noqa: E402

TINY = ["--set", "stream.name=smoke", "--set", "stream.block_len=32", "--set", "stream.test_tokens=1024",
        "--set", "model.n_layers=2"]


def test_arms_get_the_same_compute_and_peer_matches_dense_flops():
    s = dict(isoflop.DEFAULTS["peer"], heads=2, key_dim=32, num_experts=4096)
    model = isoflop.model_overrides("peer", s, 64)
    dense = sum(isoflop.flops_by_part(["model.dim=64", "model.n_heads=4", "model.ffn=dense"]).values())
    peer = sum(isoflop.flops_by_part(model).values())
    assert abs(peer - dense) <= 4 * 2 * 4 * 64 + 2 * 4  # within one top_k step (4 * dim * heads + 2 * heads)
    runs = {arm: isoflop.run_config(arm, isoflop.DEFAULTS[arm] if arm != "peer" else s, 4e11, 64, 0, "test", "joint",
                                    [])
            for arm in isoflop.ARMS}
    for arm, (cfg, flops, tokens) in runs.items():
        assert cfg.model.ffn == arm and cfg.stream.evaluate_on == "test" and cfg.strategy.name == "joint"
        assert abs(3 * flops * tokens * 4 - 4e11) <= 3 * flops * 4 * cfg.stream.block_len  # one block of slack


def test_a_query_net_dearer_than_the_dense_block_is_redrawn():
    s = dict(isoflop.DEFAULTS["peer"], heads=8, key_dim=128)
    with pytest.raises(isoflop.Unmatched):
        isoflop.model_overrides("peer", s, 48)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = isoflop.feasible_settings("peer", rng, 48, 1e-3)
        isoflop.model_overrides("peer", s, isoflop.width_of(48, s["width_mult"]))


def test_tune_then_sweep_write_tables_and_figure(tmp_path, capsys):
    out = tmp_path / "iso"
    common = ["--out", str(out), "--budgets", "3e9:64", *TINY]
    trials = len(isoflop.LR_GRID) + 1
    assert isoflop.main(["tune", "--trials", str(trials), "--arms", "dense", *common]) == 0
    tuned = json.loads((out / "tuned.json").read_text())
    rows = tuned["all"]
    assert [r["trial"] for r in rows] == [f"lr{lr:g}" for lr in isoflop.LR_GRID] + ["0"]
    best_lr = min(rows[:-1], key=lambda r: r["bpb"])["settings"]["lr"]
    assert rows[-1]["settings"]["lr"] == best_lr  # the random stage draws at the best rate
    assert tuned["best"]["dense"]["bpb"] == min(r["bpb"] for r in rows)
    info = json.loads((out / "tune" / "dense-0" / "results.json").read_text())["domain_info"]
    assert {d["evaluated_on"] for d in info} == {"validation"}  # tuned on validation: test is never read
    assert isoflop.main(["sweep", "--seeds", "0,1", *common]) == 0  # moe and peer: their starting settings
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["runs"]) == 3 * 2 and len(sweep["table"]) == 3
    peer = next(r for r in sweep["table"] if r["arm"] == "peer")
    assert peer["interval"][0] <= peer["bpb"] <= peer["interval"][1] and "vs_dense_interval" in peer
    assert (out / "sweep.png").stat().st_size > 0 and all(r["wall_s"] > 0 for r in sweep["runs"])
    assert "| training FLOPs | arm | width | train tokens |" in (out / "sweep.md").read_text()
    before = (out / "sweep.json").read_text()
    assert isoflop.main(["sweep", "--seeds", "0,1", *common]) == 0  # finished runs are read back
    assert json.loads((out / "sweep.json").read_text())["runs"] == json.loads(before)["runs"]


@pytest.mark.parametrize("argv, says", [
    (["sweep"], "run the tune stage first"),
    (["sweep", "--budgets", "1e12"], "budgets must look like"),
    (["tune", "--set", "model.dim=-3"], "model.dim"),
    (["tune", "--arms", "mlp"], "--arms: choose from"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    try:
        code = isoflop.main([*argv, "--out", str(tmp_path)])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err and err.startswith("isoflop: ")


def test_presets_repeat_the_sweep_cell_and_scale_to_the_gpu(tmp_path):
    out, write = tmp_path / "iso", tmp_path / "presets"
    out.mkdir()
    write.mkdir()
    best = {arm: {"settings": dict(isoflop.DEFAULTS[arm]), "bpb": 1.0, "trial": 0} for arm in isoflop.ARMS}
    best["peer"]["settings"].update(heads=4, key_dim=32)
    (out / "tuned.json").write_text(json.dumps({"budget": [1e12, 64], "best": best}))
    assert isoflop.main(["presets", "--out", str(out), "--write", str(write)]) == 0
    from lifelong.presets import resolve

    _, budget, width, _, _ = isoflop.PRESET_TARGETS[0]
    for arm in isoflop.ARMS:
        cpu = resolve(None, write / f"iso-{arm}.yaml")
        sweep_cfg, flops, tokens = isoflop.run_config(arm, best[arm]["settings"], budget, width, 0, "test", "joint",
                                                      ["model.n_layers=4"])
        assert cpu.model == sweep_cfg.model and cpu.stream.train_tokens == tokens
        assert cpu.strategy.name == "joint" and cpu.train.lr == pytest.approx(best[arm]["settings"]["lr"], rel=1e-2)
        gpu = resolve(None, write / f"iso-{arm}-gpu.yaml")
        assert gpu.model.dim == isoflop.PRESET_TARGETS[1][2] and gpu.model.n_layers == 8
    gpu_peer = resolve(None, write / "iso-peer-gpu.yaml").model.peer
    assert gpu_peer.key_dim == 4 * 32 and gpu_peer.num_experts == (4 * 64) ** 2  # 4x the width: 4x kd, grid side
