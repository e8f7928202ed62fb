"""Section-7 metrics recomputed by hand on a small matrix, with their sign conventions."""

import math

import pytest

from lifelong import metrics

# Rows: init, after d0, after d1, after d2. Columns: d0, d1, d2. Nats per token.
L = [[5.0, 5.0, 5.0],
     [2.0, 4.2, 4.5],
     [1.8, 1.0, 4.0],
     [3.5, 2.0, 1.0]]


def test_forgetting_uses_best_stage_since_learning():
    # d0: 3.5 - min(2.0, 1.8) = 1.7 ; d1: 2.0 - min(1.0) = 1.0 ; the last domain is left out
    assert metrics.forgetting(L) == pytest.approx([1.7, 1.0])


def test_forgetting_first_last_is_avalanche_sign_corrected():
    # Avalanche: first - last on a higher-is-better metric; for losses last - first.
    assert metrics.forgetting_first_last(L) == pytest.approx([3.5 - 2.0, 2.0 - 1.0])


def test_backward_transfer_negative_means_forgetting():
    assert metrics.backward_transfer(L) == pytest.approx(((2.0 - 3.5) + (1.0 - 2.0)) / 2)
    assert metrics.backward_transfer(L) < 0


def test_forward_transfer_positive_means_help():
    # j=1: L[0][1] - L[1][1] = 5 - 4.2 ; j=2: L[0][2] - L[2][2] = 5 - 4
    assert metrics.forward_transfer(L) == pytest.approx((0.8 + 1.0) / 2)


def test_final_average_and_plasticity():
    assert metrics.final_average(L) == pytest.approx((3.5 + 2.0 + 1.0) / 3)
    assert metrics.plasticity(L) == pytest.approx((2.0 + 1.0 + 1.0) / 3)


def test_no_forgetting_when_nothing_changes():
    flat = [[3.0, 3.0]] * 3
    assert metrics.forgetting(flat) == [0.0]
    assert metrics.backward_transfer(flat) == 0.0
    assert metrics.forward_transfer(flat) == 0.0


def test_single_domain_has_no_transfer():
    assert metrics.backward_transfer([[5.0], [2.0]]) is None
    assert metrics.forward_transfer([[5.0], [2.0]]) is None
    assert metrics.forgetting([[5.0], [2.0]]) == []


def test_summarize_keys_forgetting_by_domain():
    s = metrics.summarize(L, ["a", "b", "c"])
    assert s["forgetting"] == pytest.approx({"a": 1.7, "b": 1.0})
    assert set(s) == {"forgetting", "forgetting_first_last", "bwt", "fwt", "final_average", "plasticity"}


def test_matrix_shape_is_checked():
    with pytest.raises(ValueError, match="stage-by-domain"):
        metrics.forgetting([[1.0, 2.0], [1.0, 2.0]])


def test_bits_per_byte():
    assert metrics.bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert metrics.bits_per_byte(math.log(2) * 4, 4.0) == pytest.approx(1.0)


def test_joint_matrix_has_only_a_final_average():
    s = metrics.summarize([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]], ["a", "b", "c"])
    assert s["final_average"] == pytest.approx(2.0)
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] == {} and s["plasticity"] is None
