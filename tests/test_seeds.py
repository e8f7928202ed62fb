"""Several seeds of one configuration: the aggregate and resuming a multi-seed run."""

import json
import shutil

import pytest

from lifelong import experiment, results, seeds, transfer
from lifelong.presets import resolve


def _fake(matrix, seed):
    bpb = [[v * 2 for v in row] for row in matrix]
    return results.assemble(["a", "b"], ["init", "after:a", "after:b"], matrix, bpb, [4, 4, 4],
                            domain_info=[], flops_per_token=1, params={}, config={"seed": seed})


def test_aggregate_seeds_averages_matrices_and_reports_spread():
    r0 = _fake([[5.0, 5.0], [2.0, 4.0], [3.0, 1.0]], 0)   # bwt -1, fwt 1
    r1 = _fake([[5.0, 5.0], [2.0, 4.0], [4.0, 1.0]], 1)   # bwt -2, fwt 1
    agg = seeds.aggregate_seeds([r0, r1], [0, 1])
    assert agg["loss_matrix"] == [[5.0, 5.0], [2.0, 4.0], [3.5, 1.0]]
    assert agg["bwt"] == pytest.approx(-1.5)
    assert agg["over_seeds"]["bwt"]["values"] == [-1.0, -2.0] and agg["over_seeds"]["bwt"]["mean"] == -1.5
    assert agg["over_seeds"]["bwt"]["std"] == pytest.approx(0.5 ** 0.5)
    half = 12.706204736174698 * 0.5 ** 0.5 / 2 ** 0.5  # t_{0.975, 1} * s / sqrt(n)
    assert agg["over_seeds"]["bwt"]["interval"] == pytest.approx([-1.5 - half, -1.5 + half])
    assert agg["intervals"]["bwt"] == agg["over_seeds"]["bwt"]["interval"]
    assert agg["over_seeds"]["fwt_gem"]["std"] == 0.0
    assert agg["over_seeds"]["bpb_bwt"]["values"] == [-2.0, -4.0]
    assert agg["over_seeds"]["forgetting/a"]["values"] == [1.0, 2.0]
    assert agg["seeds"] == [0, 1] and agg["runs"] == ["seed-0", "seed-1"]
    assert agg["loss_interval"][2][0] == pytest.approx([3.5 - half, 3.5 + half])  # a t interval per cell
    assert agg["loss_interval"][0][0] == [5.0, 5.0]
    assert agg["interval_method"]["kind"] == "Student t over seeds"


def test_figures_with_a_min_or_max_inside_are_averaged_per_seed():
    """Two seeds that each forget 1 nat of domain a, at different stages: their averaged matrix
    forgets only 0.5, the per-seed mean says what happened (1.0)."""
    stages = ["init", "after:a", "after:b", "after:c"]
    runs = []
    for seed, column in enumerate(([5.0, 2.0, 1.0, 2.0], [5.0, 1.0, 2.0, 2.0])):
        L = [[a, 4.0, 4.0] for a in column]
        runs.append(results.assemble(["a", "b", "c"], stages, L, L, [4] * 4, domain_info=[], flops_per_token=1,
                                     params={}, config={"seed": seed}))
    assert [r["forgetting"]["a"] for r in runs] == [1.0, 1.0]
    agg = seeds.aggregate_seeds(runs, [0, 1])
    assert agg["forgetting"]["a"] == 1.0 and agg["max_forgetting"] == 1.0
    assert transfer.forgetting(agg["loss_matrix"])[0] == 0.5  # what the averaged matrix would say


def test_seeds_run_and_resume(tmp_path):
    from lifelong import cli
    out = tmp_path / "multi"
    args = ["run", "--preset", "smoke", "--out", str(out), "--no-progress", "--seeds", "3,4",
            "--set", "stream.train_tokens=2048", "--set", "stream.test_tokens=1024"]
    assert cli.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["seeds"] == [3, 4] and (out / "seed-3" / "results.json").is_file()
    seed4 = json.loads((out / "seed-4" / "results.json").read_text())
    assert seed4["config"]["seed"] == 4
    # Interrupt seed 4 after its init stage: resume finishes it and re-aggregates identically.
    for ckpt in sorted((out / "seed-4" / "checkpoints").iterdir()):
        shutil.rmtree(ckpt)
    experiment.run(resolve("smoke", overrides=["stream.train_tokens=2048", "stream.test_tokens=1024", "seed=4",
                                               "checkpoint.keep=9"]), tmp_path / "ref", progress=False,
                   echo=lambda *_: None)
    shutil.rmtree(out / "seed-4")
    shutil.copytree(tmp_path / "ref", out / "seed-4")
    for name in ("results.json", "run_info.json"):
        (out / "seed-4" / name).unlink()
    for ckpt in sorted((out / "seed-4" / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ckpt)
    assert cli.main(["run", "--resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["loss_matrix"] == first["loss_matrix"]


def test_read_seeds_tells_a_multi_seed_run_from_a_single_one(tmp_path):
    from lifelong import rundir
    assert seeds.read_seeds(tmp_path) is None
    rundir.write_json_atomic(tmp_path / rundir.SEEDS_FILE, {"seeds": [3, 4]})
    assert seeds.read_seeds(tmp_path) == [3, 4]
