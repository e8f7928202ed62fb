"""lifelong.analysis on small hand-made runs (tests/toy_runs.py): the numbers behind each figure,
worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toy_runs import expert_run, results, summary

from lifelong import analysis
from lifelong.runs import RunRecord


def test_learned_stage_and_stage_labels():
    assert analysis.learned_stage(results()) == {0: 1, 1: 2}  # a right after stage 1, b after stage 2
    assert analysis.learned_stage(results(stages=["init", "after:joint"])) == {}
    assert analysis.stage_labels(expert_run()) == ["init", "a", "b"]


def test_growth_stages_generations_and_their_labels():
    run = expert_run()
    assert analysis.growth_stages(run, "L") == [2]  # 4, 4, 6 experts
    assert analysis.generation_starts(np.array([0, 0, 0, 0, 1, 1, 2])) == {1: 4, 2: 6}
    assert analysis.generation_labels(run, "L") == {0: "original", 1: "g1: added for b"}


def test_max_forgetting_of_a_summary():
    assert analysis.max_forgetting(summary()) == 1.0
    assert analysis.max_forgetting({"forgetting": {"a": -0.5, "b": 0.25}}) == 0.25
    assert analysis.max_forgetting({"forgetting": {}}) is None and analysis.max_forgetting({}) is None


def test_expert_bin_usage_normalises_rows_and_respects_breaks():
    usage = {"a": np.array([[1, 1, 0, 0, 2, 0]]), "b": np.array([[0, 0, 0, 1, 0, 3]]), "c": np.zeros((1, 6))}
    share, edges = analysis.expert_bin_usage(usage, bins=2, breaks=[4])
    assert edges.tolist() == [0, 3, 4, 6]
    assert share.tolist() == [[0.5, 0.0, 0.5], [0.0, 0.25, 0.75], [0.0, 0.0, 0.0]]


def test_traffic_by_generation_and_later_share():
    run = expert_run()
    gens, share = analysis.traffic_by_generation(run, "L", stage=2)
    assert gens == [0, 1] and share.tolist() == [[0.5, 0.5], [0.25, 0.75]]
    later = analysis.later_traffic_share(run, "L")
    # only a has a later domain (b), whose experts exist from stage 2 on
    assert np.isnan(later[:2]).all() and later[2, 0] == 0.5 and np.isnan(later[2, 1])


def test_routing_drift_counts_changed_and_new_ids():
    drift = analysis.routing_drift(expert_run(), "L")
    assert drift["changed"][:, 0].tolist() == [0.25, 0.5]
    assert drift["to_new"][:, 0].tolist() == [0.0, 0.5]
    assert drift["changed"][:, 1].tolist() == [0.0, 0.0]  # b's routes never moved


def test_subkey_points_of_peer_rows_and_moe_routers():
    run = expert_run()
    points, generation, what = analysis.subkey_points(run, "L", stage=2)
    assert points.shape == (3, 2) and generation.tolist() == [0, 0, 1] and "sub-key" in what
    moe = RunRecord.from_data(results(), snapshots=[{"generation/M": np.array([0, 0, 1]),
                                                     "router/M": np.eye(3, 4, dtype=np.float32)}])
    points, generation, what = analysis.subkey_points(moe, "M", stage=0)
    assert points.shape == (3, 4) and generation.tolist() == [0, 0, 1] and "router" in what


def test_pca_2d_keeps_the_direction_of_largest_variance():
    points = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 1.0], [2.0, 4.0, 1.0], [3.0, 6.0, 1.01]])
    xy, ratio = analysis.pca_2d(points)
    assert xy.shape == (4, 2) and ratio[0] == pytest.approx(1.0, abs=1e-4)
    assert np.ptp(xy[:, 0]) == pytest.approx(3 * math.sqrt(5), rel=1e-4)  # the points span 3 * |(1, 2, 0)|


def test_frontier_points_read_plasticity_forgetting_and_their_intervals():
    from lifelong.runs import RunRecord

    run = RunRecord.from_data(results(bpb_summary={**summary(), "intervals": {"plasticity": [1.0, 2.0]}}), name="r")
    (point,) = analysis.frontier_points([run])
    assert point == {"name": "r", "plasticity": 1.5, "plasticity_interval": [1.0, 2.0], "max_forgetting": 1.0,
                     "max_forgetting_interval": None, "seeds": 1}
