import math

import pytest

from lifelong import results

L = [[5.0, 5.0], [2.0, 4.0], [3.0, 1.0]]


def test_assemble_recomputes_every_figure_from_its_matrices():
    bpb = [[v / math.log(2) for v in row] for row in L]
    res = results.assemble(["a", "b"], ["init", "after:a", "after:b"], L, bpb, [16, 16, 16], extra=1)
    assert res["forgetting"] == pytest.approx({"a": 1.0})
    assert res["bwt"] == pytest.approx(-1.0)
    assert res["fwt_gem"] == pytest.approx(1.0)
    assert res["bpb_summary"]["bwt"] == pytest.approx(-1.0 / math.log(2))
    assert res["extra"] == 1 and res["num_experts"] == [16, 16, 16]


def test_format_table_shows_matrix_and_summary():
    bpb = [[v / math.log(2) for v in row] for row in L]
    res = results.assemble(["alpha", "beta"], ["init", "after:alpha", "after:beta"], L, bpb, [0, 0, 0])
    table = results.format_table(res)
    assert "after:beta" in table and "alpha" in table and "BWT" in table and "FWT" in table
    assert f"{bpb[2][1]:.3f}" in table


def _blocks(matrix, n=20):
    """Per-block losses with exactly these means (symmetric offsets around each cell)."""
    offsets = [(-1) ** i * 0.1 * (1 + i // 2) for i in range(n)]
    return [[[v + o for o in offsets] for v in row] for row in matrix]


def test_assemble_adds_intervals_that_contain_every_cell_and_figure():
    bpb = [[v / math.log(2) for v in row] for row in L]
    res = results.assemble(["a", "b"], ["init", "after:a", "after:b"], L, bpb, [0, 0, 0], block_losses=_blocks(L),
                           bytes_per_token=[1.0, 1.0], bootstrap_samples=300)
    for matrix, key in ((L, "loss_interval"), (bpb, "bpb_interval")):
        assert all(lo <= v <= hi for row, ivs in zip(matrix, res[key]) for v, (lo, hi) in zip(row, ivs))
    for summary, intervals in ((res, res["intervals"]), (res["bpb_summary"], res["bpb_summary"]["intervals"])):
        for key in ("final_average", "plasticity", "bwt", "fwt_gem", "max_forgetting"):
            assert intervals[key][0] <= summary[key] <= intervals[key][1], key
    assert res["interval_method"]["level"] == 0.95
    table = results.format_table(res)
    assert "95% interval (test blocks)" in table and "FWT zero-shot" not in table


def test_a_degenerate_interval_is_widened_to_its_estimate():
    """One test block: every resampling gives the same number, which float rounding can leave a
    hair away from the token-weighted cell; the interval still contains the cell."""
    cell = [[5.0 + 1e-9]]
    res = results.assemble(["a"], ["init", "after:a"], cell + [[2.0]], cell + [[2.0]], [0, 0],
                           block_losses=[[[5.0]], [[2.0]]], bytes_per_token=[1.0], bootstrap_samples=10)
    lo, hi = res["loss_interval"][0][0]
    assert lo == 5.0 and hi == 5.0 + 1e-9


def test_assemble_with_references_adds_zero_shot_and_curve_transfer():
    bpb = [[v / (math.log(2) * c) for v, c in zip(row, (1.0, 2.0))] for row in L]
    res = results.assemble(["a", "b"], ["init", "after:a", "after:b"], L, bpb, [0, 0, 0], bytes_per_token=[1.0, 2.0],
                           reference=[2.0, 3.0], stream_curves=[2.5, 3.5], reference_curves=[2.5, 4.5])
    assert res["fwt_zero_shot"] == pytest.approx((5 - 4) / (5 - 3)) == res["bpb_summary"]["fwt_zero_shot"]
    assert res["fwt_auc"] == pytest.approx(1.0)
    assert res["bpb_summary"]["fwt_auc"] == pytest.approx(1.0 / (math.log(2) * 2.0))
    assert res["reference"]["bpb"] == pytest.approx([2.0 / math.log(2), 3.0 / (2 * math.log(2))])
    assert "FWT zero-shot" in results.format_table(res) and "FWT curve area" in results.format_table(res)
