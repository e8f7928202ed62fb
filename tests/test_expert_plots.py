"""lifelong.expert_plots on toy runs (tests/toy_runs.py): each figure draws what analysis computes."""

from __future__ import annotations

import numpy as np
import pytest
from toy_runs import expert_run, results

from lifelong import expert_plots
from lifelong.runs import RunRecord


def test_drift_plot_shows_only_domains_already_learned():
    ax = expert_plots.drift_plot(expert_run(), "L")
    assert sorted(line.get_label() for line in ax.lines) == ["a: changed", "a: to new experts"]
    assert list(ax.lines[0].get_xdata()) == [2]  # a is old only from stage 1 to stage 2


def test_subkey_pca_colours_by_generation():
    ax = expert_plots.subkey_pca(expert_run(), "L", stage=2)
    labels = [c.get_label() for c in ax.collections]
    assert labels == ["original", "g1: added for b"]
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 1]


def test_expert_figures_draw_from_results_and_snapshots():
    run = expert_run()
    fig = expert_plots.usage_by_stage(run, "L")
    assert [line.get_ydata().tolist() for line in fig.axes[0].lines][:2] == [[1.0, 0.5, 0.5], [1.0, 0.75, 0.5]]
    ax = expert_plots.domain_expert_heatmap(run, "L", stage=2, bins=3)
    assert [t.get_text() for t in ax.texts] == ["g1"]
    ax = expert_plots.overlap_heatmap(run, "L", stage=-1)
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.25", "0.25", "1.00"]
    fig = expert_plots.generation_traffic(run, "L")
    assert [p.get_height() for p in fig.axes[0].containers[1]] == [0.5, 0.75]  # the g1 layer of the stack


def test_generation_traffic_refuses_joint_training():
    run = expert_run(stages=["init", "after:joint"])
    with pytest.raises(ValueError, match="joint"):
        expert_plots.generation_traffic(run, "L")


def test_entry_curve_plots_the_new_experts_share_with_growths_and_warmins():
    run = expert_run()
    run.results["config"]["growth"] = {"warmup_steps": 6}
    run._metrics["Growth/train_phase/L/new_share"] = (np.array([10.0, 12.0, 14.0]), np.array([0.0, 0.2, 0.4]))
    ax = expert_plots.entry_curve(run, "L")
    assert list(ax.lines[0].get_ydata()) == [0.0, 0.2, 0.4]
    assert len(ax.patches) == 1  # the growth's warm-in, shaded
    ax = expert_plots.entry_curve(results_only := RunRecord.from_data(results()), "L")
    assert "no entry curve" in ax.texts[0].get_text() and results_only.name == "run"


def test_isolation_plot_draws_intrusion_and_own_per_domain():
    run = expert_run()
    run.results["experts"]["L"]["intrusion"] = [[None, None], [None, None], [0.25, None]]
    run.results["experts"]["L"]["own"] = [[None, None], [None, None], [None, 0.5]]
    fig = expert_plots.isolation_plot(run, "L")
    left, right = fig.axes[:2]
    assert list(left.lines[0].get_ydata())[-1] == 0.25 and list(right.lines[0].get_ydata())[-1] == 0.5
    bare = expert_run()
    assert "no intrusion figures" in expert_plots.isolation_plot(bare, "L").axes[0].texts[0].get_text()
