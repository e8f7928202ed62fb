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
    assert set(s) == {"forgetting", "forgetting_first_last", "max_forgetting", "bwt", "fwt_gem", "fwt_zero_shot",
                      "final_average", "plasticity"}
    assert s["max_forgetting"] == pytest.approx(1.7) and s["fwt_zero_shot"] is None


def test_matrix_shape_is_checked():
    with pytest.raises(ValueError, match="stage-by-domain"):
        transfer.forgetting([[1.0, 2.0], [1.0, 2.0]])


def test_bits_per_byte():
    assert transfer.bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert transfer.bits_per_byte(math.log(2) * 4, 4.0) == pytest.approx(1.0)


def test_joint_matrix_has_only_a_final_average():
    s = transfer.summarize([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]], ["a", "b", "c"])
    assert s["final_average"] == pytest.approx(2.0)
    assert s["bwt"] is None and s["fwt_gem"] is None and s["forgetting"] == {} and s["plasticity"] is None


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


# ---- zero-shot and curve forward transfer, bootstrap intervals, paired differences -------------

def test_zero_shot_transfer_is_the_share_of_a_scratch_models_gain():
    # j=1: (5 - 4.2) / (5 - 3.4) = 0.5 ; j=2: (5 - 4) / (5 - 3) = 0.5
    s = transfer.summarize(L, ["a", "b", "c"], reference=[2.0, 3.4, 3.0])
    assert s["fwt_zero_shot"] == pytest.approx(0.5) and s["fwt_gem"] == pytest.approx(0.9)


def test_curve_transfer_averages_reference_minus_stream_after_the_first_domain():
    assert transfer.curve_transfer([2.0, 3.0, 2.5], [2.0, 3.5, 3.5]) == pytest.approx((0.5 + 1.0) / 2)
    assert transfer.curve_transfer([2.0, None, 2.5], [2.0, 3.5, 3.0]) == pytest.approx(0.5)
    assert transfer.curve_transfer([2.0, None], [2.0, 3.0]) is None


def blocks_of(matrix, n=30, spread=0.2, seed=0):
    """Per-block losses whose means are exactly `matrix` (noise with zero mean per cell)."""
    g = np.random.default_rng(seed)
    out = []
    for row in matrix:
        cells = []
        for v in row:
            noise = g.normal(0, spread, size=n)
            cells.append(v + noise - noise.mean())
        out.append(cells)
    return out


def test_bootstrap_intervals_contain_each_figure_and_narrow_with_more_blocks():
    iv = transfer.bootstrap_intervals(blocks_of(L), ["a", "b", "c"], [1.0, 2.0, 1.0], samples=400)
    s = transfer.summarize(L, ["a", "b", "c"])
    for key in ("final_average", "plasticity", "bwt", "fwt_gem", "max_forgetting"):
        lo, hi = iv["nats"][key]
        assert lo < s[key] < hi, key
    lo, hi = iv["loss_interval"][3][1]
    assert lo < 2.0 < hi
    assert iv["bpb_interval"][3][1] == pytest.approx([lo / (math.log(2) * 2), hi / (math.log(2) * 2)])
    assert set(iv["nats"]["forgetting"]) == {"a", "b"} and iv["nats"]["fwt_zero_shot"] is None
    wide = transfer.bootstrap_intervals(blocks_of(L, n=10), ["a", "b", "c"], [1.0] * 3, samples=400)
    narrow = transfer.bootstrap_intervals(blocks_of(L, n=1000), ["a", "b", "c"], [1.0] * 3, samples=400)
    width = lambda i: i["nats"]["final_average"][1] - i["nats"]["final_average"][0]  # noqa: E731
    assert width(narrow) < width(wide) / 4


def test_bootstrap_is_seeded_and_resamples_the_same_blocks_at_every_stage():
    a = transfer.bootstrap_intervals(blocks_of(L), ["a", "b", "c"], [1.0] * 3, samples=100, seed=3)
    assert a == transfer.bootstrap_intervals(blocks_of(L), ["a", "b", "c"], [1.0] * 3, samples=100, seed=3)
    # a constant offset between stages survives every resampling: BWT's interval collapses
    blocks = blocks_of([[5.0, 5.0], [2.0, 4.0], [3.0, 1.0]])
    blocks[2][0] = blocks[1][0] + 1.0
    iv = transfer.bootstrap_intervals(blocks, ["a", "b"], [1.0, 1.0], samples=200)
    assert iv["nats"]["bwt"] == pytest.approx([-1.0, -1.0])


def test_paired_differences_of_equal_runs_are_exactly_zero_and_a_shift_is_found():
    blocks = blocks_of(L)
    same = transfer.paired_differences([blocks], [blocks], [1.0] * 3, samples=100)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    shifted = [row if s < 3 else [b + 0.1 for b in row] for s, row in enumerate(blocks)]
    diff = transfer.paired_differences([blocks], [shifted], [1.0] * 3, samples=100)
    assert diff["final_average"] == pytest.approx((0.1 / math.log(2),) * 3)  # paired: no spread at all
    assert diff["plasticity"][0] == pytest.approx(0.1 / math.log(2) / 3)  # only the last domain's own stage


def test_isolation_shares_split_each_domains_weight_by_when_its_experts_were_added():
    # experts 0-1 original, 2-3 added in experience 1 (generation 1), 4-5 in experience 2 (generation 2)
    generation = np.array([0, 0, 1, 1, 2, 2])
    counts = np.array([[6.0, 2.0, 1.0, 0.0, 1.0, 0.0],   # domain 0: 2 of 10 on experts added later
                       [1.0, 1.0, 3.0, 3.0, 2.0, 0.0],   # domain 1: 6 of 10 on its own, 2 on domain 2's
                       [0.0, 0.0, 0.0, 1.0, 3.0, 0.0]])  # domain 2: not learned yet at this stage
    intrusion, own = transfer.isolation_shares(counts, generation, {1: 1, 2: 2}, learned=2)
    assert intrusion[:2] == pytest.approx([0.2, 0.2]) and intrusion[2] is None
    assert own[0] is None and own[1] == pytest.approx(0.6) and own[2] is None
    assert transfer.isolation_shares(counts, np.zeros(6), {}, learned=3) == ([None] * 3, [None] * 3)
