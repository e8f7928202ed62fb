import math

import pytest

from lifelong import results

L = [[5.0, 5.0], [2.0, 4.0], [3.0, 1.0]]


def test_assemble_recomputes_every_figure_from_its_matrices():
    bpb = [[v / math.log(2) for v in row] for row in L]
    res = results.assemble(["a", "b"], ["init", "after:a", "after:b"], L, bpb, [16, 16, 16], extra=1)
    assert res["forgetting"] == pytest.approx({"a": 1.0})
    assert res["bwt"] == pytest.approx(-1.0)
    assert res["fwt"] == pytest.approx(1.0)
    assert res["bpb_summary"]["bwt"] == pytest.approx(-1.0 / math.log(2))
    assert res["extra"] == 1 and res["num_experts"] == [16, 16, 16]


def test_format_table_shows_matrix_and_summary():
    bpb = [[v / math.log(2) for v in row] for row in L]
    res = results.assemble(["alpha", "beta"], ["init", "after:alpha", "after:beta"], L, bpb, [0, 0, 0])
    table = results.format_table(res)
    assert "after:beta" in table and "alpha" in table and "BWT" in table and "FWT" in table
    assert f"{bpb[2][1]:.3f}" in table
