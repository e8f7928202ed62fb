"""eval.reference=scratch: each domain's model trained alone, cached, and the forward transfer
measured against it; the run itself is unchanged by it."""

import json

import numpy as np
import pytest

from lifelong import experiment, reference
from lifelong.presets import resolve

SMALL = ["stream.train_tokens=2048", "stream.test_tokens=1024", "train.batch_size=4", "eval.curve_every=2"]


def run(tmp_path, name, *overrides, said=None):
    cfg = resolve("smoke", overrides=[*SMALL, *overrides])
    return experiment.run(cfg, tmp_path / name, progress=False, echo=(said.append if said is not None else print))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("ref")
    # a cache of its own (a module fixture runs before the suite's per-test cache is set)
    monkeypatch_module.setenv("LIFELONG_CACHE", str(tmp_path_factory.mktemp("ref-cache")))
    said = []
    plain = run(root, "plain")
    with_ref = run(root, "ref", "eval.reference=scratch", said=said)
    again = []
    replay = run(root, "replay", "eval.reference=scratch", "strategy.name=replay", said=again)
    return plain, with_ref, replay, said, again


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_references_leave_the_run_itself_unchanged(runs):
    plain, with_ref, *_ = runs
    assert with_ref["loss_matrix"] == plain["loss_matrix"] and with_ref["bwt"] == plain["bwt"]
    assert plain["fwt_zero_shot"] is None and plain["fwt_auc"] is None and "reference" not in plain


def test_forward_transfer_against_the_references(runs):
    _, res, *_ = runs
    R, L = res["reference"]["loss"], res["loss_matrix"]
    want = np.mean([(L[0][j] - L[j][j]) / (L[0][j] - R[j]) for j in range(1, 4)])
    assert res["fwt_zero_shot"] == pytest.approx(want) == res["bpb_summary"]["fwt_zero_shot"]
    stream, ref = res["reference"]["stream_curve_mean"], res["reference"]["curve_mean"]
    assert None not in stream + ref
    assert res["fwt_auc"] == pytest.approx(np.mean([r - s for s, r in zip(stream[1:], ref[1:])]))
    lo, hi = res["intervals"]["fwt_zero_shot"]
    assert lo <= res["fwt_zero_shot"] <= hi
    # the first domain's reference is trained like the stream's first experience: the same loss there
    assert R[0] == pytest.approx(L[1][0], abs=0.05)


def test_references_are_trained_once_and_shared_across_strategies(runs):
    *_, said, again = runs
    assert sum("training the model on" in line for line in said) == 4
    assert not any("training the model on" in line for line in again)  # all four from the cache


def test_reference_key_follows_what_a_reference_depends_on():
    cfg = resolve("smoke")
    info = {"name": "python", "content_hash": "c", "test_hash": "t", "train_blocks": 4, "test_blocks": 2}
    key = reference.reference_key(cfg, info)
    assert reference.reference_key(resolve("smoke", overrides=["strategy.name=replay", "growth.schedule=boundary",
                                                               "train.trainable=[all, experts]"]), info) == key
    assert reference.reference_key(resolve("smoke", overrides=["train.lr=0.01"]), info) != key
    assert reference.reference_key(resolve("smoke", overrides=["seed=1"]), info) != key
    assert reference.reference_key(cfg, {**info, "test_hash": "u"}) != key


def test_curve_mean_takes_the_points_of_one_experience():
    points = [[2, 5.0], [4, 4.0], [6, 3.0], [8, 2.0]]
    assert reference.curve_mean(points, 2, 6) == 3.5 and reference.curve_mean(points, 8, 9) is None


def test_every_cell_has_an_interval_containing_it_and_snapshots_keep_the_blocks(runs, tmp_path):
    _, res, *_ = runs
    for matrix, intervals in (("loss_matrix", "loss_interval"), ("bpb_matrix", "bpb_interval")):
        for row, ivs in zip(res[matrix], res[intervals]):
            assert all(lo <= v <= hi for v, (lo, hi) in zip(row, ivs))
    assert res["interval_method"]["samples"] == 1000
    for key in ("final_average", "bwt", "fwt_gem", "max_forgetting", "plasticity"):
        lo, hi = res["bpb_summary"]["intervals"][key]
        assert lo <= res["bpb_summary"][key] <= hi


def test_no_intervals_when_bootstrap_is_off(tmp_path):
    res = run(tmp_path, "off", "eval.bootstrap_samples=0", "eval.curve_every=0")
    assert "loss_interval" not in res and "intervals" not in res["bpb_summary"]
    saved = json.loads((tmp_path / "off" / "results.json").read_text())
    assert saved["loss_matrix"] == res["loss_matrix"]
