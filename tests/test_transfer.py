"""lifelong.transfer: the matrix maths recomputed by hand on small matrices, with their sign
conventions, and the optimizer steps of each experience."""

import math

import numpy as np
import pytest

from lifelong import transfer

# Rows: init, after d0, after d1, after d2. Columns: d0, d1, d2. Nats per token.
L = [[5.0, 5.0, 5.0],
     [2.0, 4.2, 4.5],
     [1.8, 1.0, 4.0],
     [3.5, 2.0, 1.0]]


def test_forgetting_uses_best_stage_since_learning():
    # d0: 3.5 - min(2.0, 1.8) = 1.7 ; d1: 2.0 - min(1.0) = 1.0 ; the last domain is left out
    assert transfer.forgetting(L) == pytest.approx([1.7, 1.0])


def test_forgetting_first_last_is_avalanche_sign_corrected():
    # Avalanche: first - last on a higher-is-better metric; for losses last - first.
    assert transfer.forgetting_first_last(L) == pytest.approx([3.5 - 2.0, 2.0 - 1.0])


def test_backward_transfer_negative_means_forgetting():
    assert transfer.backward_transfer(L) == pytest.approx(((2.0 - 3.5) + (1.0 - 2.0)) / 2)
    assert transfer.backward_transfer(L) < 0


def test_forward_transfer_positive_means_help():
    # j=1: L[0][1] - L[1][1] = 5 - 4.2 ; j=2: L[0][2] - L[2][2] = 5 - 4
    assert transfer.forward_transfer(L) == pytest.approx((0.8 + 1.0) / 2)


def test_final_average_and_plasticity():
    assert transfer.final_average(L) == pytest.approx((3.5 + 2.0 + 1.0) / 3)
    assert transfer.plasticity(L) == pytest.approx((2.0 + 1.0 + 1.0) / 3)


def test_no_forgetting_when_nothing_changes():
    flat = [[3.0, 3.0]] * 3
    assert transfer.forgetting(flat) == [0.0]
    assert transfer.backward_transfer(flat) == 0.0
    assert transfer.forward_transfer(flat) == 0.0


def test_single_domain_has_no_transfer():
    assert transfer.backward_transfer([[5.0], [2.0]]) is None
    assert transfer.forward_transfer([[5.0], [2.0]]) is None
    assert transfer.forgetting([[5.0], [2.0]]) == []


def test_summarize_keys_forgetting_by_domain():
    s = transfer.summarize(L, ["a", "b", "c"])
    assert s["forgetting"] == pytest.approx({"a": 1.7, "b": 1.0})
    assert set(s) == {"forgetting", "forgetting_first_last", "bwt", "fwt", "final_average", "plasticity"}


def test_matrix_shape_is_checked():
    with pytest.raises(ValueError, match="stage-by-domain"):
        transfer.forgetting([[1.0, 2.0], [1.0, 2.0]])


def test_bits_per_byte():
    assert transfer.bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert transfer.bits_per_byte(math.log(2) * 4, 4.0) == pytest.approx(1.0)


def test_joint_matrix_has_only_a_final_average():
    s = transfer.summarize([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]], ["a", "b", "c"])
    assert s["final_average"] == pytest.approx(2.0)
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] == {} and s["plasticity"] is None


def test_transfer_components_average_to_the_metric_definitions():
    matrix = np.random.default_rng(0).uniform(1, 5, size=(5, 4))
    bwt, fwt = transfer.transfer_components(matrix)
    assert bwt[-1] is None and fwt[0] is None
    assert np.mean(bwt[:-1]) == pytest.approx(transfer.backward_transfer(matrix))
    assert np.mean(fwt[1:]) == pytest.approx(transfer.forward_transfer(matrix))
    assert transfer.transfer_components(matrix[:2]) == ([None] * 4, [None] * 4)  # joint: undefined


def hand_steps(blocks: int, batch: int, accum: int, epochs: int) -> int:
    """The training loop's rule: Avalanche keeps the last partial micro-batch of batch // accum blocks,
    the LM template steps the last partial accumulation group of every epoch."""
    return math.ceil(math.ceil(blocks / (batch // accum)) / accum) * epochs


@pytest.mark.parametrize("blocks,batch,accum,epochs", [(256, 16, 1, 1), (37, 8, 2, 2), (5, 16, 4, 3), (64, 6, 3, 1)])
def test_steps_per_experience_matches_the_training_loop_rule(blocks, batch, accum, epochs):
    expected = hand_steps(blocks, batch, accum, epochs)
    assert transfer.steps_per_experience(blocks, batch, accum, epochs) == expected
    assert transfer.experience_steps("naive", [blocks], batch, accum, epochs) == [expected]


@pytest.mark.parametrize("strategy,expected", [("naive", [10, 4, 14]), ("cumulative", [10, 14, 26]), ("joint", [26])])
def test_experience_steps_follow_the_strategy(strategy, expected):
    # micro-batches of 8 // 2 = 4 blocks, 2 per optimizer step, 2 epochs: 37 blocks -> 10 micro-batches
    # -> 5 steps -> 10; 16 -> 4; 50 -> 14; cumulative 53 -> 14, 103 -> 26; joint: one experience of 103
    blocks = [37, 16, 50]
    steps = transfer.experience_steps(strategy, blocks, 8, grad_accum=2, epochs=2)
    assert steps == expected
    sets = {"naive": blocks, "cumulative": [37, 53, 103], "joint": [103]}[strategy]
    assert steps == [hand_steps(b, 8, 2, 2) for b in sets]
