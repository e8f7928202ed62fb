"""lifelong.plots on the small hand-made runs of tests/test_analysis.py: what gets drawn."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from toy_runs import LN2, L, expert_run, results, summary

from lifelong import plots
from lifelong.runs import RunRecord


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def bar_heights(ax, label: str) -> list[float]:
    container = next(c for c in ax.containers if c.get_label() == label)
    return [patch.get_height() for patch in container]


def test_matrix_heatmap_annotates_every_cell_and_outlines_the_diagonal():
    ax = plots.matrix_heatmap(results(), "loss_matrix")
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert set(texts) == {"5.00", "2.00", "4.00", "3.00", "1.00"}
    assert texts["5.00"] == "white" and texts["1.00"] == "black"  # dark cells (high loss) get white text
    outlined = sorted(p.get_xy() for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill())
    assert outlined == [(-0.5, 0.5), (0.5, 1.5)]  # a right after stage 1, b right after stage 2
    assert "nats/token" in ax.get_title()


def test_matrix_heatmap_of_joint_training_outlines_nothing():
    joint = results(stages=["init", "after:joint"], loss_matrix=L[::2], bpb_matrix=L[::2])
    ax = plots.matrix_heatmap(joint)
    assert not [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]


def test_save_matrix_heatmap_writes_a_png(tmp_path):
    path = plots.save_matrix_heatmap(results(), tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_bars_show_both_forms_in_the_chosen_unit():
    ax = plots.forgetting_bars(results(), unit="nats")
    assert bar_heights(ax, "final - best since learned") == [1.0]
    assert bar_heights(ax, "final - just after learned (Avalanche)") == [1.0]
    ax = plots.forgetting_bars(results(), unit="bpb")
    assert bar_heights(ax, "final - best since learned") == [pytest.approx(1 / LN2)]


def test_forgetting_and_transfer_bars_explain_joint_training_instead_of_failing():
    joint = results(stages=["init", "after:joint"], loss_matrix=L[::2], bpb_matrix=L[::2], forgetting={},
                    bwt=None, fwt_gem=None, bpb_summary={"forgetting": {}, "bwt": None, "fwt_gem": None})
    assert "joint" in plots.forgetting_bars(joint).texts[0].get_text()
    assert "not defined" in plots.transfer_bars(joint).texts[0].get_text()


def test_transfer_bars_draw_each_domains_terms():
    ax = plots.transfer_bars(results(), unit="nats")
    assert bar_heights(ax, "BWT term")[0] == -1.0 and np.isnan(bar_heights(ax, "BWT term")[1])
    assert np.isnan(bar_heights(ax, "FWT term")[0]) and bar_heights(ax, "FWT term")[1] == 1.0


def test_summary_bars_compare_runs():
    better = results(bpb_summary={**summary(1 / LN2), "bwt": 0.5, "forgetting": {"a": -0.2}, "max_forgetting": -0.2})
    ax = plots.summary_bars({"base": results(), "better": better})
    assert bar_heights(ax, "BWT") == [pytest.approx(-1 / LN2), 0.5]
    assert bar_heights(ax, "max forgetting") == [pytest.approx(1 / LN2), -0.2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "better"]


def test_compare_matrices_share_one_colour_scale():
    other = results(bpb_matrix=[[2 * v for v in row] for row in results()["bpb_matrix"]])
    fig = plots.compare_matrices([("x", results()), ("y", other)])
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == ["x", "y"]
    assert [ax.images[0].get_clim() for ax in heatmaps] == [pytest.approx((1 / LN2, 10 / LN2))] * 2
    assert len(fig.axes) == 3  # two matrices, one colour bar


def test_learning_curves_mark_boundaries_growth_and_stage_evaluations():
    run = expert_run()
    ax = plots.learning_curves(run)
    curve = next(line for line in ax.lines if line.get_label() == "a")
    assert list(curve.get_xdata()) == [4, 8, 12]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert [list(d.get_xdata()) for d in dots] == [[0, 8, 16]] * 2  # stage evals at 0 and after 32/4, 30/4 steps
    vertical = [(line.get_xdata()[0], line.get_linestyle()) for line in ax.lines
                if line.get_xdata()[0] == line.get_xdata()[-1] and len(line.get_xdata()) == 2]
    assert sorted(vertical) == [(8, "--"), (8, ":")]  # the boundary after a, and the growth there
    assert "a" in [t.get_text() for t in ax.texts] and " +2" in [t.get_text() for t in ax.texts]


def test_learning_curves_without_curves_or_step_counts_use_stage_indices():
    run = RunRecord.from_data(results())
    ax = plots.learning_curves(run)
    assert [list(line.get_xdata()) for line in ax.lines] == [[0, 1, 2]] * 2
    assert "stage evaluations only" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["init", "after:a", "after:b"]


def test_learning_curves_with_curves_but_unknown_steps_leave_stages_out():
    run = expert_run(domain_info=[])  # no train_blocks: boundaries unknown
    ax = plots.learning_curves(run)
    assert [line.get_label() for line in ax.lines if line.get_linestyle() == "-"] == ["a", "b"]
    assert not [line for line in ax.lines if line.get_marker() == "o"]
    assert "no stage evaluations" in ax.get_title() and ax.get_xlabel() == "optimizer step"


def test_frontier_places_each_run_with_its_intervals():
    iv = {"plasticity": [1.0, 1.2], "max_forgetting": [0.5, 0.9]}  # the first misses its point: bar from 0
    one = RunRecord.from_data(results(bpb_summary={**summary(), "intervals": iv}), name="one")
    seeds = RunRecord.from_data(results(bpb_summary=summary(2.0), seeds=[0, 1, 2]), name="three")
    joint = RunRecord.from_data(results(bpb_summary={"plasticity": 1.0}), name="joint")
    ax = plots.frontier([one, seeds, joint])
    lines = [c for c in ax.containers]  # one errorbar container per drawable run; joint has no forgetting
    assert len(lines) == 2
    (x,), (y,) = lines[0].lines[0].get_data()
    assert (x, y) == (1.5, 1.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["one (1 seed)", "three (3 seeds)"]
    plt.close(ax.figure)
    empty = plots.frontier([joint])
    assert "no run with both" in empty.texts[0].get_text()
    plt.close(empty.figure)
