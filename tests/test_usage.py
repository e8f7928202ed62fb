import math

import pytest
import torch

from experts import MoE, PEER, DenseFFN, UsageCounter
from experts.usage import expert_set, jaccard_overlap, kl_to_uniform, track_usage, usage_fraction


def test_hand_computed_usage_and_kl():
    counter = UsageCounter(num_experts=4)
    counter.update(torch.tensor([[0.6, 0.4], [0.5, 0.5]]), torch.tensor([[0, 1], [0, 2]]))
    assert torch.allclose(counter.counts[0], torch.tensor([1.1, 0.4, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(counter.hits[0], torch.tensor([2, 1, 1, 0]))
    assert counter.tokens == 2
    z = [0.55, 0.2, 0.25]
    assert torch.allclose(counter.distribution(), torch.tensor(z + [0.0], dtype=torch.float64))
    assert counter.usage() == 0.75
    assert counter.unevenness() == pytest.approx(math.log(4) + sum(p * math.log(p) for p in z))


def test_kl_extremes():
    assert kl_to_uniform(torch.ones(8)) == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(torch.tensor([0.0, 3.0, 0.0, 0.0])) == pytest.approx(math.log(4))
    assert math.isnan(kl_to_uniform(torch.zeros(3)))
    assert usage_fraction(torch.tensor([0.0, 1.0, 2.0, 0.0])) == 0.5


def test_per_head_and_pooled():
    counter = UsageCounter(num_experts=3, heads=2)
    weights = torch.tensor([[[1.0], [1.0]], [[1.0], [1.0]]])  # [T=2, H=2, K=1]
    ids = torch.tensor([[[0], [1]], [[0], [2]]])
    counter.update(weights, ids)
    assert torch.equal(counter.counts, torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64))
    assert counter.usage(head=0) == pytest.approx(1 / 3) and counter.usage() == 1.0
    assert counter.unevenness(head=0) == pytest.approx(math.log(3))
    assert counter.unevenness(head=1) == pytest.approx(math.log(3) + math.log(0.5))
    assert counter.tokens == 2
    with pytest.raises(ValueError, match="head must be"):
        counter.usage(head=2)


def test_update_validation():
    counter = UsageCounter(num_experts=4, heads=2)
    with pytest.raises(ValueError, match="heads=2"):
        counter.update(torch.ones(5, 3, 2), torch.zeros(5, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        counter.update(torch.ones(5, 2, 2), torch.zeros(5, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\).*grow_to"):
        counter.update(torch.ones(1, 2, 1), torch.tensor([[[4], [0]]]))
    with pytest.raises(ValueError, match="num_experts"):
        UsageCounter(0)


def test_grow_reset_state_dict_top_experts():
    counter = UsageCounter(num_experts=3)
    counter.update(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0, 1, 2]))
    ids, shares = counter.top_experts(2)
    assert ids.tolist() == [1, 2] and torch.allclose(shares, torch.tensor([0.5, 0.3], dtype=torch.float64))
    counter.grow_to(5)
    assert counter.num_experts == 5 and counter.counts[0, :3].sum().item() == pytest.approx(1.0)
    counter.update(torch.tensor([1.0]), torch.tensor([4]))
    assert counter.usage() == 0.8
    with pytest.raises(ValueError, match="only grows"):
        counter.grow_to(4)
    state = counter.state_dict()
    other = UsageCounter(num_experts=1)
    other.load_state_dict(state)
    assert torch.equal(other.counts, counter.counts) and torch.equal(other.hits, counter.hits)
    assert other.tokens == counter.tokens == 2  # the last dim is top_k: two 1-D updates = 2 tokens
    counter.reset()
    assert counter.counts.sum() == 0 and counter.hits.sum() == 0 and counter.tokens == 0
    assert other.counts.sum() > 0  # the state dict was a copy
    with pytest.raises(ValueError, match="heads=2"):
        UsageCounter(3, heads=2).load_state_dict(state)


def test_jaccard_overlap():
    assert jaccard_overlap({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard_overlap([0, 1], [2]) == 0.0
    assert jaccard_overlap(set(), set()) == 1.0
    # counts of different lengths (the pool grew between domains), and [heads, N] counts
    a = torch.tensor([0.0, 2.0, 1.0])
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    assert expert_set(b) == {1, 4}
    assert jaccard_overlap(a, b) == pytest.approx(1 / 3)
    counter = UsageCounter(3)
    counter.update(torch.tensor([1.0]), torch.tensor([2]))
    assert jaccard_overlap(counter, a) == 0.5
    with pytest.raises(ValueError, match="counts must be"):
        expert_set(torch.zeros(2, 2, 2))


def test_track_usage_records_peer_in_eval_only():
    torch.manual_seed(0)
    layer = PEER(dim=8, num_experts=6 * 6, heads=2, top_k=3, key_dim=4)
    keys_before = set(layer.state_dict())
    counter = track_usage(layer)
    assert layer.usage_counter is counter and counter.heads == 2 and counter.num_experts == 36
    assert set(layer.state_dict()) == keys_before  # a counter is not part of the model's state
    x = torch.randn(4, 5, 8)
    layer.train()
    layer(x)
    assert counter.tokens == 0
    layer.eval()
    layer(x)
    weights, ids = layer.route(x)
    expected = UsageCounter(36, heads=2)
    expected.update(weights, ids)
    assert counter.tokens == 20
    assert torch.allclose(counter.counts, expected.counts)
    assert counter.counts.sum().item() == pytest.approx(20 * 2)  # softmax weights sum to 1 per head
    layer.usage_counter = None
    layer(x)
    assert counter.tokens == 20


def test_counter_follows_a_grown_pool():
    layer = PEER(dim=8, num_experts=4 * 4, heads=1, top_k=2, key_dim=4).eval()
    layer.usage_counter = UsageCounter(9)  # attached when the pool was smaller
    with torch.no_grad():
        layer.codebooks.offset1[:, :2] = -1e4  # route away from rows 0-1 so ids >= 9 appear
    layer(torch.randn(10, 8))
    assert layer.usage_counter.num_experts == 16 and layer.usage_counter.tokens == 10


def test_track_usage_records_moe():
    torch.manual_seed(0)
    layer = MoE(dim=8, num_experts=4, hidden=8, top_k=2).eval()
    counter = track_usage(layer)
    assert counter.heads == 1 and counter.num_experts == 4
    x = torch.randn(3, 7, 8)
    layer(x)
    gates, index = layer.route(x)
    assert counter.tokens == 21 and counter.hits.sum() == 42
    assert torch.allclose(counter.counts[0], torch.zeros(4, dtype=torch.float64).index_add_(
        0, index.reshape(-1), gates.reshape(-1).double()))


def test_track_usage_refuses_dense():
    with pytest.raises(ValueError, match="PEER or MoE"):
        track_usage(DenseFFN(4, 8))
