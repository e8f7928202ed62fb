"""experts.isolation: the routing contrast loss that keeps a grown PEER's newest experts for the
domain they were added for."""

import pytest
import torch

import experts
from helpers import tiny_peer


def two_domains(seed=0, n=300, dim=16):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, dim, generator=g)
    old_x = shared + 0.8 * torch.randn(n, dim, generator=g)
    new_x = shared + 0.8 * torch.randn(n, dim, generator=g) + 2 * torch.randn(1, dim, generator=g)
    return old_x, new_x


def newest_share(layer, x, old_n):
    """Share of routing weight on experts with ids >= old_n."""
    layer.eval()
    with torch.no_grad():
        weights, ids = layer.route(x)
    return float((weights * (ids >= old_n)).sum() / weights.sum())


def test_loss_is_zero_without_growth_and_reaches_only_the_newest_rows():
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
    old_x, new_x = two_domains()
    assert float(experts.row_contrast_loss(layer, new_x, old_x).detach()) == 0.0
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(1))
    layer.grow(8, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(2))
    loss = experts.row_contrast_loss(layer, new_x, old_x)
    assert float(loss) > 0
    layer.zero_grad()
    loss.backward()
    grad = layer.codebooks.keys1.grad
    newest = layer.codebooks.generation == 2
    assert grad[:, newest].abs().sum() > 0
    assert torch.equal(grad[:, ~newest], torch.zeros_like(grad[:, ~newest]))
    others = [p.grad for n, p in layer.named_parameters() if n != "codebooks.keys1"]
    assert all(g is None or not g.any() for g in others)


def test_minimising_the_loss_routes_the_new_domain_to_new_experts_and_the_old_one_away():
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
    old_x, new_x = two_domains()
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(1))
    before = newest_share(layer, new_x, 64), newest_share(layer, old_x, 64)
    opt = torch.optim.Adam([layer.codebooks.keys1], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        experts.row_contrast_loss(layer, new_x, old_x, margin=1.0).backward()
        opt.step()
    new_share, old_share = newest_share(layer, new_x, 64), newest_share(layer, old_x, 64)
    assert new_share > 0.8 and new_share > before[0] + 0.3, (before, new_share)
    assert old_share < 0.5 * before[1], (before, old_share)


def test_frozen_newest_rows_get_no_gradient_and_bad_inputs_are_refused():
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
    old_x, new_x = two_domains()
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(1))
    layer.codebooks.set_frozen_rows(torch.ones(layer.grid[0], dtype=torch.bool))
    layer.zero_grad()
    experts.row_contrast_loss(layer, new_x, old_x).backward()
    assert not layer.codebooks.keys1.grad.any()
    with pytest.raises(ValueError, match="inputs must be a tensor"):
        experts.row_contrast_loss(layer, [1.0], old_x)


def test_repulsion_moves_only_rows_added_after_the_old_domain_was_learned():
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
    old_x, new_x = two_domains()
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(1))  # generation 1
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(2))  # generation 2
    generation = layer.codebooks.generation

    def grad_of_generation_1(known):
        layer.zero_grad()
        experts.row_contrast_loss(layer, new_x, old_x, torch.full((len(old_x),), known), margin=3.0).backward()
        return layer.codebooks.keys1.grad[:, generation == 1].abs().sum()

    assert grad_of_generation_1(known=1) == 0  # the old domain was learned with generation 1: not pushed
    assert grad_of_generation_1(known=0) > 0  # learned before it: pushed out of its top-k


def test_the_query_network_learns_from_the_loss_only_when_asked():
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="batchnorm", dim=16, key_dim=8)
    old_x, new_x = two_domains()
    layer.grow(16, warmup_steps=0, init="random", generator=torch.Generator().manual_seed(1))
    stats = layer.norm.bn.running_mean.clone()
    for learn in (False, True):
        layer.zero_grad()
        experts.row_contrast_loss(layer, new_x, old_x, margin=1.0, learn_queries=learn).backward()
        grad = layer.query.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == learn
    assert torch.equal(layer.norm.bn.running_mean, stats)  # probing never updates the norm's statistics
