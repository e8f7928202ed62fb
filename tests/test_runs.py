"""lifelong.runs: finding run directories and reading what a run wrote."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from toy_runs import rewrite_results

from lifelong.runs import RunRecord, experience_steps, expert_layers, find_runs, load_run, load_runs

DOMAINS = ["a", "b"]


def make_run(path, *, experts: bool = True, snapshots: bool = True, **extra):
    """A minimal finished run directory: results.json, run_info.json, metrics.csv, snapshots/."""
    path.mkdir(parents=True)
    results = {"domains": DOMAINS, "stages": ["init", "after:a", "after:b"],
               "loss_matrix": [[5, 5], [2, 4], [3, 1]], "bpb_matrix": [[5, 5], [2, 4], [3, 1]],
               "experts": {"L": {"num_experts": [2, 2, 4]}} if experts else {}, "growth_events": [],
               "config": {"model": {"ffn": "peer" if experts else "dense"}, "strategy": {"name": "naive"},
                          "growth": {"schedule": "none"},
                          "train": {"batch_size": 8, "grad_accum": 1, "epochs": 1}},
               "domain_info": [{"train_blocks": 16}, {"train_blocks": 20}], **extra}
    (path / "results.json").write_text(json.dumps(results))
    (path / "run_info.json").write_text(json.dumps({"wall_time_s": 1.5}))
    (path / "metrics.csv").write_text(
        "name,x,value\n"
        "Curve/test_stream/b,4,2.0\nCurve/test_stream/a,4,3.0\nCurve/test_stream/a,2,4.0\n"
        "Loss_MB/train_phase/train_stream,10,1.5\nCurve/test_stream/a,6")  # torn last line
    if snapshots:
        (path / "snapshots").mkdir()
        for stage, gen in enumerate([[0, 0], [0, 0], [0, 0, 1, 1]]):
            tensors = {"generation/L": np.array(gen, np.int64)} if experts else {}
            if experts:
                tensors.update({f"usage/L/{d}": np.ones((1, len(gen)), np.float32) for d in DOMAINS})
                tensors.update({f"routes/L/{d}": np.zeros((3, 1, 2), np.int32) for d in DOMAINS})
            save_file(tensors, str(path / "snapshots" / f"stage-{stage:02d}.safetensors"))
    return path


def test_find_runs_reads_comma_separated_dirs_from_the_environment(tmp_path, monkeypatch):
    one, two = make_run(tmp_path / "one"), make_run(tmp_path / "two")
    monkeypatch.setenv("LIFELONG_RUN", f"{one}, {two},")
    assert find_runs() == [one, two]
    assert find_runs(str(two)) == [two] and find_runs([one]) == [one]  # an explicit spec wins


def test_find_runs_names_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a run directory"):
        find_runs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing: no such directory"):
        find_runs(f"{make_run(tmp_path / 'ok')},{tmp_path / 'missing'}")


def test_find_runs_defaults_to_the_newest_run_under_runs(tmp_path, monkeypatch):
    old, new = make_run(tmp_path / "runs" / "old"), make_run(tmp_path / "runs" / "group" / "new")
    os.utime(old / "results.json", (1000, 1000))
    os.utime(new / "results.json", (2000, 2000))
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # a notebook's working directory: runs/ is one up
    monkeypatch.setenv("LIFELONG_RUN", "")
    assert find_runs() == [tmp_path / "runs" / "group" / "new"]
    os.utime(old / "results.json", (3000, 3000))
    assert find_runs(root=tmp_path / "runs") == [old]


def test_find_runs_without_any_run_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFELONG_RUN", raising=False)
    with pytest.raises(ValueError, match="LIFELONG_RUN"):
        find_runs()


def test_load_run_reads_results_info_metrics_and_curves(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    assert run.name == "r" and run.domains == DOMAINS and run.run_info["wall_time_s"] == 1.5
    assert run.strategy == "naive" and run.ffn == "peer" and run.layers == ["L"] and not run.is_joint
    curves = run.curves()
    assert list(curves) == ["a", "b"]  # stream order, not file order
    assert curves["a"][0].tolist() == [2, 4] and curves["a"][1].tolist() == [4.0, 3.0]  # sorted by step
    assert run.metric("Loss_MB/train_phase/train_stream")[1].tolist() == [1.5]
    assert run.metric("absent")[0].size == 0


def test_snapshots_give_usage_routes_and_generations(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    assert run.has_snapshots
    assert run.usage("L", -1)["a"].shape == (1, 4) and run.routes("L", 0)["b"].shape == (3, 1, 2)
    assert run.generation("L", 1).tolist() == [0, 0]
    assert run.generation_stage("L") == {0: 0, 1: 2}
    assert run.has_growth("L")
    assert sorted(run.snapshot(0)) == ["generation/L", "routes/L/a", "routes/L/b", "usage/L/a", "usage/L/b"]
    with pytest.raises(KeyError, match="keys1/L"):
        run.snapshot(0)["keys1/L"]
    with pytest.raises(IndexError, match="stage 3 out of range"):
        run.snapshot(3)


def test_a_run_without_snapshots_says_so(tmp_path):
    run = load_run(make_run(tmp_path / "r", snapshots=False))
    assert not run.has_snapshots
    with pytest.raises(ValueError, match="no snapshot for stage 0"):
        run.snapshot(0)


def test_experience_steps_follow_the_strategy():
    base = {"config": {"train": {"batch_size": 8, "grad_accum": 2, "epochs": 2}, "strategy": {"name": "naive"}},
            "domain_info": [{"train_blocks": 16}, {"train_blocks": 21}]}
    # micro-batches of 4 blocks: ceil(16/4)=4 -> 2 steps, ceil(21/4)=6 -> 3 steps; x2 epochs
    assert experience_steps(base) == [4, 6]
    cumulative = {**base, "config": {**base["config"], "strategy": {"name": "cumulative"}}}
    assert experience_steps(cumulative) == [4, 10]  # 37 blocks -> 10 micro-batches -> 5 steps x2
    joint = {**base, "config": {**base["config"], "strategy": {"name": "joint"}}}
    assert experience_steps(joint) == [10]
    assert experience_steps({**base, "experience_steps": [7, 9]}) == [7, 9]  # recorded by the run
    assert experience_steps({"config": {}, "domain_info": []}) is None


def test_growth_steps_and_stage_steps():
    events = [{"step": 16, "layer": "y", "added": 4}, {"step": 8, "layer": "x", "added": 2},
              {"step": 16, "layer": "x", "added": 2}]
    run = RunRecord.from_data({"domains": DOMAINS, "stages": ["init", "after:a", "after:b"], "growth_events": events,
                               "experience_steps": [8, 9]})
    assert run.growth_steps() == {8: 2, 16: 6} and list(run.growth_steps()) == [8, 16]  # in step order
    assert run.boundaries() == [8, 17] and run.stage_steps() == [0, 8, 17]
    assert RunRecord.from_data({**run.results, "experience_steps": [8]}).stage_steps() is None  # does not fit
    assert RunRecord.from_data({**run.results, "experience_steps": None}).stage_steps() is None  # unknown


def test_readers_load_neither_torch_nor_avalanche():
    code = ("import sys\n"
            "import lifelong.runs, lifelong.analysis, lifelong.report\n"
            "heavy = ('torch', 'avalanche', 'matplotlib')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
            "import lifelong.plots\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy[:2]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]  # and the numbers behind the figures need no matplotlib


def test_expert_layers_skips_and_explains(tmp_path):
    dense = load_run(make_run(tmp_path / "dense", experts=False))
    bare = load_run(make_run(tmp_path / "bare", snapshots=False))
    grown = load_run(make_run(tmp_path / "grown"))
    seeds = load_run(make_run(tmp_path / "agg", experts=False, snapshots=False, seeds=[0, 1]))
    messages = []
    assert list(expert_layers([dense, bare, grown, seeds], echo=messages.append)) == [(grown, "L")]
    assert "dense has no PEER or MoE layer (model.ffn = 'dense')" in messages[0]
    assert "bare: no snapshots/" in messages[1]
    assert "agg aggregates seeds [0, 1]" in messages[2]
    # figures drawn from results.json alone (usage, overlap) do not need snapshots
    assert list(expert_layers([bare], need_snapshots=False, echo=messages.append)) == [(bare, "L")]


def test_expert_layers_needing_growth_skips_runs_without_it():
    snapshot = {"generation/L": np.zeros(2, np.int64)}
    run = RunRecord.from_data({"domains": DOMAINS, "stages": ["init"], "experts": {"L": {}},
                               "config": {"growth": {"schedule": "none"}}}, name="flat", snapshots=[snapshot])
    messages = []
    assert list(expert_layers([run], echo=messages.append)) == [(run, "L")]
    assert list(expert_layers([run], need_growth=True, echo=messages.append)) == []
    assert messages == ["flat L: no growth in this run (growth.schedule = 'none'): every expert is original"]


def test_load_runs_gives_unique_names(tmp_path):
    one = make_run(tmp_path / "x" / "run")
    two = make_run(tmp_path / "y" / "run")
    seed = make_run(tmp_path / "multi" / "seed-3")
    assert [r.name for r in load_runs([one, two, seed])] == ["run", "run (2)", "multi/seed-3"]


# ---- damaged and misshapen results.json -----------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"), (b'{"domains": ["a", "b"], "stages": [', "Expecting value"),
    (b"results", "Expecting value"), (b'{"domains": ["\xff\xfe"]}', "not UTF-8"),
])
def test_load_run_names_a_damaged_results_file(tmp_path, content, reason):
    path = make_run(tmp_path / "r")
    (path / "results.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'results.json'} is not valid JSON ({reason}")):
        load_run(path)


@pytest.mark.parametrize("change, what", [
    (lambda r: [], "expected a JSON object, got a list"),
    (lambda r: {}, "no domains"),
    (lambda r: {**r, "domains": 3}, "domains: expected a non-empty list of strings"),
    (lambda r: {k: v for k, v in r.items() if k != "stages"}, "no stages"),
    (lambda r: {k: v for k, v in r.items() if k != "bpb_matrix"}, "no bpb_matrix"),
    (lambda r: {**r, "bpb_matrix": r["bpb_matrix"][:2]}, "bpb_matrix: expected 3 rows of 2 numbers"),
    (lambda r: {**r, "loss_matrix": [[5, 5], [2, "4"], [3, 1]]}, "loss_matrix: expected 3 rows of 2 numbers"),
    (lambda r: {**r, "loss_matrix": [[5, 5, 5], [2, 4, 4], [3, 1, 1]]}, "loss_matrix: expected 3 rows of 2 numbers"),
    (lambda r: {**r, "config": "naive"}, "config: expected an object, got a string"),
    (lambda r: {**r, "config": {"strategy": "naive"}}, "config.strategy: expected an object, got a string"),
    (lambda r: {**r, "domain_info": [1, 2]}, "domain_info: expected one object per domain"),
    (lambda r: {**r, "growth_events": [{"step": "8"}]}, "growth_events: expected objects"),
    (lambda r: {**r, "seeds": [0, 1], "runs": [0, 1]}, "runs: expected the seed directories"),
])
def test_load_run_refuses_results_of_the_wrong_shape(tmp_path, change, what):
    path = rewrite_results(make_run(tmp_path / "r"), change)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'results.json'} is not a lifelong results file ({what}")):
        load_run(path)


def test_load_run_accepts_nan_cells_and_names_a_bad_run_info(tmp_path):
    path = rewrite_results(make_run(tmp_path / "r"), lambda r: {**r, "bpb_matrix": [[5, float("nan")], [2, 4], [3, 1]]})
    assert math.isnan(load_run(path).results["bpb_matrix"][0][1])  # write_json_atomic allows NaN
    (path / "run_info.json").write_text("[1.5]")
    with pytest.raises(ValueError, match="run_info.json is not a lifelong run info file .*got a list"):
        load_run(path)
    (path / "run_info.json").write_text('{"wall_time_s": 1.')
    with pytest.raises(ValueError, match="run_info.json is not valid JSON"):
        load_run(path)
