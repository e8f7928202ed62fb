"""experts.growth and the layers' grow(): function preservation, warm-in, placement of new keys
(docs/growth.md), checkpoints of grown layers. Surgery and freezing: test_surgery.py, test_freezing.py.
The helpers tiny_peer, teacher, train and tiny_moe are shared with those modules."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

import experts
from experts import PEER, MoE, UsageCounter
from experts import growth
from experts.growth import kmeans
from experts.peer import QUERY_NORMS, SCORES
from helpers import teacher, tiny_moe, tiny_peer, train

TOL = 1e-6  # outputs before and after growth, float32 (docs/growth.md, 'Function preservation')


def new_ids_routed(layer, x, old_n):
    layer.eval()
    with torch.no_grad():
        _, ids = layer.route(x)
    return int((ids >= old_n).sum())


# ---- function preservation --------------------------------------------------------------------
@pytest.mark.parametrize("query_norm", QUERY_NORMS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_growth_preserves_routes_and_output(query_norm, score, train_mode):
    layer = tiny_peer(query_norm=query_norm, score=score).train(train_mode)
    x = torch.randn(3, 7, layer.dim)
    with torch.no_grad():
        y0, (w0, ids0) = layer(x), layer.route(x)
        layer.grow(5, warmup_steps=10)
        y1, (w1, ids1) = layer(x), layer.route(x)
    assert layer.num_experts == 24
    assert torch.equal(ids1, ids0)
    assert (w1 - w0).abs().max() <= TOL and (y1 - y0).abs().max() <= TOL


@pytest.mark.parametrize("init", ["random", "copy", "kmeans"])
def test_every_init_preserves_output(init):
    layer = tiny_peer()
    x = torch.randn(40, layer.dim)
    usage = UsageCounter(layer.num_experts, layer.heads)
    usage.update(*layer.eval().route(x))
    y0 = layer(x)
    layer.grow(8, warmup_steps=5, init=init, inputs=x, usage=usage, generator=torch.Generator().manual_seed(0))
    assert (layer(x) - y0).abs().max() <= TOL


def test_new_ids_append_and_old_parameters_keep_their_identity():
    layer = tiny_peer(grid=(3, 5))
    params = dict(layer.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    ids = layer.grow(7)  # ceil(7 / 5) = 2 new rows of 5 experts
    assert torch.equal(ids, torch.arange(15, 25)) and ids.dtype == torch.int64
    assert layer.grid == (5, 5) and layer.num_experts == 25
    assert dict(layer.named_parameters()) == params  # the very same Parameter objects
    cb = layer.codebooks
    assert torch.equal(cb.keys1[:, :3], before["codebooks.keys1"]) and torch.equal(cb.keys2, before["codebooks.keys2"])
    assert torch.equal(layer.expert_u[:15], before["expert_u"]) and torch.equal(layer.expert_v[:15], before["expert_v"])
    assert cb.offset1.shape == (2, 5) == cb.warmup_knots.shape[:2] and layer.frozen.shape == (25,)
    assert cb.warmup_left.tolist() == cb.warmup_total.tolist() == [0, 0, 0, 100, 100]
    assert torch.equal(layer.expert_generation(), torch.tensor([0] * 15 + [1] * 10))
    assert torch.equal(layer.grow(1), torch.arange(25, 30))
    assert cb.generation.tolist() == [0, 0, 0, 1, 1, 2]


def test_dormant_rows_keep_forward_and_backward_finite():
    layer = tiny_peer(query_norm="layernorm").train()
    layer.grow(8, warmup_steps=3)
    x = torch.randn(30, layer.dim)
    scores = layer.all_scores(x)
    assert torch.isneginf(scores[..., 16:]).all() and torch.isfinite(scores[..., :16]).all()
    assert torch.isfinite(scores.softmax(-1)).all()
    layer(x).pow(2).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["codebooks.keys1"][:, 4:].abs().sum() == 0  # dormant rows are never selected
    assert grads["expert_u"][16:].abs().sum() == 0 and grads["expert_u"][:16].abs().sum() > 0


# ---- warm-in schedule ---------------------------------------------------------------------------
def test_warmup_schedule_from_minus_inf_to_zero():
    layer = tiny_peer()
    x = torch.randn(50, layer.dim)
    cb = layer.codebooks
    old_offsets = cb.offset1.clone()  # the old rows' own (random) offsets are never touched
    layer.grow(8, warmup_steps=4, inputs=x, warmin="bound")
    margin_H = -cb.warmup_knots[:, 4, 0]
    assert torch.isneginf(cb.offset1[:, 4:]).all() and (margin_H > 0).all()
    for t in range(1, 6):
        layer.advance_warmup()
        expected = -margin_H * max(0.0, 1 - t / 4)
        assert torch.allclose(cb.offset1[:, 4], expected) and torch.allclose(cb.offset1[:, 5], expected)
    assert torch.equal(cb.offset1[:, 4:], torch.zeros(2, 2)) and cb.warmup_left.sum() == 0
    assert torch.equal(cb.offset1[:, :4], old_offsets)


def test_margin_bounds_every_new_score_by_the_old_ones():
    """At offset -margin (the first step's handicap is just below it) no new sub-key out-scores
    any old one for the inputs the margin was measured on: new keys enter gradually."""
    layer = tiny_peer(query_norm="none").eval()
    x = 3.0 * torch.randn(200, layer.dim)
    layer.grow(12, warmup_steps=10, inputs=x, warmin="bound")
    cb = layer.codebooks
    q1 = layer._probe_queries(x)[..., : layer.key_dim // 2]
    raw = torch.einsum("thd,hnd->thn", q1, cb.keys1.detach())
    new_best = (raw[..., 4:] + cb.warmup_knots[:, 4:, 0]).amax(-1)
    assert (new_best <= raw[..., :4].amin(-1)).all()


def test_second_growth_does_not_restart_the_first_warmup():
    layer = tiny_peer()
    layer.grow(4, warmup_steps=4)
    layer.advance_warmup(2)
    layer.grow(4, warmup_steps=8)
    cb = layer.codebooks
    assert cb.warmup_left.tolist() == [0, 0, 0, 0, 2, 8]
    assert torch.isfinite(cb.offset1[:, 4]).all() and torch.isneginf(cb.offset1[:, 5]).all()
    layer.advance_warmup(3)
    assert cb.warmup_left.tolist() == [0, 0, 0, 0, 0, 5] and torch.equal(cb.offset1[:, 4], torch.zeros(2))


@pytest.mark.parametrize("warmup_steps", [0, 5])
def test_warmup_zero_is_live_at_once(warmup_steps):
    layer = tiny_peer().eval()
    x = torch.randn(20, layer.dim)
    layer.grow(4, warmup_steps=warmup_steps)
    with torch.no_grad():  # a strong new key: it wins top-k slots on the next forward unless dormant
        layer.codebooks.keys1[:, 4] *= 100
    if warmup_steps == 0:
        assert torch.equal(layer.codebooks.offset1[:, 4], torch.zeros(2)) and layer.codebooks.warmup_left[4] == 0
        assert new_ids_routed(layer, x, 16) > 0
    else:
        assert new_ids_routed(layer, x, 16) == 0


# ---- acceptance: grow a trained layer, then the new experts take tokens -----------------------------
def test_acceptance_grow_64_with_adamw_then_new_experts_take_tokens():
    torch.manual_seed(0)
    layer = PEER(dim=16, num_experts=(8, 8), heads=2, top_k=4, key_dim=8)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3, weight_decay=0.1)
    f = teacher(16)
    x = torch.randn(64, 16)
    target = f(x)
    train(layer, opt, 100, x, target)  # a trained PEER

    moments = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in layer.named_parameters()}
    shapes = {name: p.shape for name, p in layer.named_parameters()}
    outputs = {}
    for mode in (True, False):  # eval last: a train-mode forward updates the BN running stats
        with torch.no_grad():
            outputs[mode] = layer.train(mode)(x)

    new_ids = layer.grow(64, optimizer=opt, warmup_steps=50)

    assert torch.equal(new_ids, torch.arange(64, 128))
    for mode in (False, True):
        with torch.no_grad():
            assert (layer.train(mode)(x) - outputs[mode]).abs().max() <= TOL
    grown = {"expert_u": (0, 64), "expert_v": (0, 64), "codebooks.keys1": (1, 8)}  # name: (dim, old size)
    for name, p in layer.named_parameters():
        state = opt.state[p]
        assert torch.equal(state["step"], moments[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            if name not in grown:
                assert p.shape == shapes[name] and torch.equal(state[key], moments[name][key])
                continue
            dim, old = grown[name]
            assert torch.equal(state[key].narrow(dim, 0, old), moments[name][key])  # bit-identical
            assert torch.equal(state[key].narrow(dim, old, old), torch.zeros_like(moments[name][key]))  # fresh

    u_new, v_new = layer.expert_u[64:].detach().clone(), layer.expert_v[64:].detach().clone()
    train(layer, opt, 300, x, target)
    assert layer.codebooks.warmup_left.sum() == 0 and torch.equal(layer.codebooks.offset1[:, 8:], torch.zeros(2, 8))
    assert new_ids_routed(layer, x, 64) > 0.05 * x.shape[0] * 2 * 4  # tokens route to new experts
    assert not torch.equal(layer.expert_u[64:], u_new) and not torch.equal(layer.expert_v[64:], v_new)


def test_new_experts_learn_with_sgd_momentum_and_kmeans_keys():
    torch.manual_seed(1)
    layer = PEER(dim=12, num_experts=(6, 6), heads=2, top_k=3, key_dim=8, query_norm="layernorm")
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    x_old, x_new = torch.randn(96, 12), torch.randn(96, 12) + 2.0  # a new "domain"
    train(layer, opt, 30, x_old, teacher(12, 2)(x_old))
    old_n = layer.num_experts
    layer.grow(12, optimizer=opt, warmup_steps=10, init="kmeans", inputs=x_new,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(opt.state[layer.expert_v]["momentum_buffer"][old_n:], torch.zeros(12, 12))
    rows_before = layer.expert_u[old_n:].detach().clone()
    assert new_ids_routed(layer, x_new, old_n) == 0  # dormant
    train(layer, opt, 40, x_new, teacher(12, 3)(x_new))
    assert new_ids_routed(layer, x_new, old_n) > 0
    changed = (layer.expert_u[old_n:] != rows_before).any(-1)
    assert changed.sum() >= 6  # new experts received gradients


# ---- new sub-key initialisations --------------------------------------------------------------------
def test_copy_init_clones_the_most_used_rows():
    layer = tiny_peer(grid=(4, 3))
    keys = layer.codebooks.keys1.detach().clone()
    counts_N = torch.zeros(12)
    counts_N[7] = 5.0   # row 2
    counts_N[10] = 3.0  # row 3
    layer.grow(6, init="copy", usage=counts_N)  # two rows: copies of rows 2 and 3
    new = layer.codebooks.keys1[:, 4:].detach()
    assert torch.allclose(new[:, 0], keys[:, 2], atol=0.1) and torch.allclose(new[:, 1], keys[:, 3], atol=0.1)
    assert not torch.equal(new[:, 0], keys[:, 2])  # with noise, so copies can specialise

    per_head = UsageCounter(12, heads=2)
    per_head.counts[0, 0], per_head.counts[1, 4] = 1.0, 1.0  # head 0 uses row 0, head 1 row 1
    layer.grow(3, init="copy", usage=per_head)
    new = layer.codebooks.keys1[:, 6].detach()
    assert torch.allclose(new[0], keys[0, 0], atol=0.1) and torch.allclose(new[1], keys[1, 1], atol=0.1)


def test_copy_without_usage_falls_back_to_random():
    a, b = tiny_peer(), tiny_peer()
    a.grow(4, init="copy", generator=torch.Generator().manual_seed(3))
    b.grow(4, init="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.codebooks.keys1, b.codebooks.keys1)
    c = tiny_peer()
    c.grow(4, init="copy", usage=torch.zeros(16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(c.codebooks.keys1, b.codebooks.keys1)


def test_kmeans_init_points_new_keys_at_the_query_clusters():
    layer = tiny_peer(query_norm="none", heads=1, key_dim=6).eval()
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(2, layer.dim, generator=g)
    x = torch.cat([c + 0.05 * torch.randn(30, layer.dim, generator=g) for c in centres])
    old_norm = layer.codebooks.keys1.detach().norm(dim=-1).mean()
    layer.grow(8, init="kmeans", inputs=x, generator=g)  # 2 rows of 4
    new_HRd = layer.codebooks.keys1[:, 4:].detach()
    q1_cluster_means = layer._probe_queries(x)[:, 0, :3].view(2, 30, 3).mean(1)
    cos = F.cosine_similarity(new_HRd[0].unsqueeze(1), q1_cluster_means.unsqueeze(0), dim=-1)
    assert cos.amax(1).min() > 0.99 and cos.amax(0).min() > 0.99  # one new key per cluster
    assert torch.allclose(new_HRd.norm(dim=-1), old_norm.expand(1, 2), rtol=1e-5)


def test_kmeans_recovers_separated_clusters_per_batch():
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[5.0, 5.0], [-5.0, 5.0], [0.0, -8.0]]])
    points = (truth.unsqueeze(2) + 0.1 * torch.randn(2, 3, 40, 2, generator=g)).flatten(1, 2)  # [2, 120, 2]
    found = kmeans(points, 3, generator=g)
    for b in range(2):
        dist = torch.cdist(found[b], truth[b])
        assert dist.amin(1).max() < 0.1 and dist.amin(0).max() < 0.1
    assert kmeans(points[0], 3, generator=torch.Generator().manual_seed(0)).shape == (3, 2)


# ---- argument checking ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"), (dict(n=2.5), "n must be"), (dict(n=True), "n must be"),
    (dict(n=4, warmup_steps=-1), "warmup_steps"), (dict(n=4, init="pca"), "init='pca'"),
    (dict(n=4, init="kmeans"), "needs inputs"),
    (dict(n=8, init="kmeans", inputs=torch.randn(1, 8)), "at least 2 input tokens"),
    (dict(n=4, inputs=torch.randn(3, 5)), "last dimension"),
    (dict(n=4, inputs=[1.0]), "inputs must be a tensor"),
    (dict(n=4, optimizer="adamw"), "optimizer must be"),
    (dict(n=4, init="copy", usage=torch.ones(17)), "usage counts"),
    (dict(n=4, init="copy", usage=[1, 2]), "usage must be"),
])
def test_bad_grow_arguments_refused(kwargs, match):
    layer = tiny_peer()
    with pytest.raises(ValueError, match=match):
        layer.grow(**kwargs) if "n" not in kwargs else layer.grow(kwargs.pop("n"), **kwargs)
    assert layer.num_experts == 16


def test_bad_warmup_and_kmeans_arguments_refused():
    layer = tiny_peer()
    with pytest.raises(ValueError, match="steps"):
        layer.advance_warmup(0)
    with pytest.raises(ValueError, match="k=5"):
        kmeans(torch.randn(4, 2), 5)


# ---- checkpoints --------------------------------------------------------------------------------------
def test_checkpoint_of_a_grown_layer_loads_into_a_fresh_process():
    torch.manual_seed(0)
    make = lambda: PEER(dim=8, num_experts=(4, 4), heads=2, top_k=2, key_dim=4)
    layer = make()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 8)
    train(layer, opt, 5, x, x)
    layer.grow(8, optimizer=opt, warmup_steps=6)
    train(layer, opt, 2, x, x)
    layer.grow(4, optimizer=opt, warmup_steps=6)
    experts.freeze(layer, [1, 5])
    train(layer, opt, 2, x, x)
    buffer = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)
    fresh = make()  # the original size
    fresh.load_state_dict(saved["model"])  # strict: resized to the grown sizes first
    assert fresh.grid == layer.grid == (7, 4) and fresh.num_experts == 28
    for mode in (False, True):
        with torch.no_grad():
            assert torch.equal(fresh.train(mode)(x), layer.train(mode)(x))
    assert torch.equal(experts.frozen_ids(fresh), torch.tensor([1, 5]))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(saved["opt"])
    experts.attach(fresh, fresh_opt)  # hooks are not in checkpoints
    train(layer, opt, 3, x, x)
    train(fresh, fresh_opt, 3, x, x)
    for (name, a), b in zip(layer.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.codebooks.warmup_left.tolist()[4:] == [0, 0, 1]


# ---- many growths -------------------------------------------------------------------------------------
def test_ten_growths_in_a_row_are_stable():
    torch.manual_seed(0)
    layer = PEER(dim=8, num_experts=(4, 4), heads=2, top_k=3, key_dim=4)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(48, 8)
    target = teacher(8)(x)
    inits = ["random", "copy", "kmeans"]
    n_before = layer.num_experts
    for g in range(10):
        train(layer, opt, 3, x, target)
        layer.eval()
        usage = UsageCounter(layer.num_experts, layer.heads)
        with torch.no_grad():
            y0 = layer(x)
            usage.update(*layer.route(x))
        ids = layer.grow(3 + g, optimizer=opt, warmup_steps=4, init=inits[g % 3], inputs=x, usage=usage)
        assert torch.equal(ids, torch.arange(n_before, layer.num_experts)) and ids.numel() >= 3 + g
        n_before = layer.num_experts
        with torch.no_grad():
            assert (layer(x) - y0).abs().max() <= TOL
    loss = train(layer, opt, 20, x, target)
    assert math.isfinite(loss) and all(torch.isfinite(p).all() for p in layer.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    assert layer.codebooks.generation.max() == 10 and layer.num_experts == 4 * layer.grid[0]
    assert new_ids_routed(layer, x, 16) > 0


# ---- usage counters ---------------------------------------------------------------------------------------
def test_usage_counter_grows_along():
    layer = tiny_peer()
    counter = experts.track_usage(layer)
    layer.grow(4)
    assert counter.num_experts == 20
    moe = MoE(dim=8, num_experts=3, hidden=8)
    moe_counter = experts.track_usage(moe)
    moe.grow(2)
    assert moe_counter.num_experts == 5
    moe.usage_counter = UsageCounter(3)
    moe.eval()(torch.randn(4, 8))
    assert moe.usage_counter.num_experts == 5


# ---- coarse MoE ------------------------------------------------------------------------------------------



@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_growth_preserves_output_and_losses(train_mode, capacity_factor):
    layer = tiny_moe(capacity_factor=capacity_factor, eval_capacity_factor=1.0).train(train_mode)
    x = torch.randn(40, 6)
    with torch.no_grad():
        y0, aux0, metrics0, route0 = layer(x), layer.aux_loss(), layer.aux_metrics(), layer.route(x)
        ids = layer.grow(3, warmup_steps=5)
        y1, aux1, metrics1, route1 = layer(x), layer.aux_loss(), layer.aux_metrics(), layer.route(x)
    assert torch.equal(ids, torch.arange(4, 7)) and layer.num_experts == 7 and layer.num_live_experts() == 4
    assert torch.equal(route1[1], route0[1]) and (route1[0] - route0[0]).abs().max() <= TOL
    assert (y1 - y0).abs().max() <= TOL
    assert aux1.item() == pytest.approx(aux0.item(), rel=1e-6)  # N counts the live experts only
    assert metrics1 == pytest.approx(metrics0, rel=1e-6)


def test_moe_warmup_surgery_and_new_experts_take_tokens():
    layer = tiny_moe(top_k=1, normalize_gates=False)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(64, 6)
    target = teacher(6)(x)
    train(layer, opt, 10, x, target)
    moments = {name: opt.state[p]["exp_avg_sq"].clone() for name, p in layer.named_parameters()}
    x_norm = x.norm(dim=-1).max()
    layer.grow(4, optimizer=opt, warmup_steps=5, inputs=x)
    for name, p in layer.named_parameters():
        state = opt.state[p]["exp_avg_sq"]
        assert torch.equal(state[:4], moments[name]) and torch.equal(state[4:], torch.zeros_like(state[4:]))
    w = layer.router.weight.detach()
    assert torch.allclose(layer.warmup_margin[4:], x_norm * (w[4:].norm(dim=-1).max() + w[:4].norm(dim=-1).max()))
    for t in range(1, 6):
        train(layer, opt, 1, x, target)
        expected = layer.warmup_margin[4:] * -(1 - t / 5) if t < 5 else torch.zeros(4)
        assert torch.allclose(layer.logit_offset[4:], expected)
    assert layer.num_live_experts() == 8
    with torch.no_grad():  # make the new experts attractive: traffic moves to them
        layer.router.weight[4:] = 3 * layer.router.weight[:4]
    _, index = layer.eval().route(x)
    assert (index >= 4).any()


@pytest.mark.filterwarnings("ignore:frozen experts get zero gradient")
def test_moe_checkpoint_of_a_grown_layer_loads_into_a_fresh_one():
    layer = tiny_moe()
    layer.grow(3, warmup_steps=4)
    layer.advance_warmup()
    experts.freeze(layer, [2])
    fresh = tiny_moe(seed=5)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_experts == 7 and fresh.w1.shape[0] == 7 and experts.frozen_ids(fresh).tolist() == [2]
    x = torch.randn(10, 6)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))




# ---- calibrated warm-in and contrastive placement ------------------------------------------------
def test_calibrated_knots_are_quantiles_of_the_gaps_up_to_the_share_reached_at_zero():
    gaps = torch.linspace(-3.0, 5.0, 801).view(-1, 1).repeat(1, 2)  # 3/8 of the queries reachable at 0
    knots = growth.calibrated_knots(gaps)
    assert knots.shape == (2, growth.KNOTS) and (knots[:, -1] == 0).all()
    assert (knots.diff(dim=-1) >= 0).all() and knots[0, 0] == -3.0
    share = (gaps[:, 0].unsqueeze(-1) < knots[0]).double().mean(0)  # reached at each knot
    assert torch.allclose(share[:-1], torch.linspace(0, 3 / 8, growth.KNOTS, dtype=torch.float64)[:-1], atol=3e-3)


def test_new_experts_enter_gradually_across_a_calibrated_warmin():
    """The share of queries with a new expert among their top-k rises step by step, not at the end."""
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="layernorm", dim=16, key_dim=8).eval()
    x = torch.randn(400, 16)
    layer.grow(16, warmup_steps=16, init="kmeans", inputs=x)
    old_n = 64
    shares = []
    for _ in range(16):
        layer.advance_warmup()
        _, ids = layer.route(x)
        shares.append(float((ids >= old_n).any(-1).double().mean()))
    assert shares[0] < 0.1 < shares[-1]
    rises = [b - a for a, b in zip(shares, shares[1:])]
    assert max(rises) < 0.5 * shares[-1]  # no single step lets most of them in
    assert shares[7] > 0.25 * shares[-1]  # half way through, a good part entered


def test_contrastive_keys_reach_the_new_domain_more_and_the_old_one_less_than_kmeans():
    g = torch.Generator().manual_seed(0)
    layer = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
    shared = torch.randn(1, 16, generator=g)
    new_x = shared + 0.8 * torch.randn(300, 16, generator=g) + torch.randn(1, 16, generator=g)
    old_x = shared + 0.8 * torch.randn(300, 16, generator=g)

    def reach(init):
        grown = tiny_peer(grid=(8, 8), top_k=4, query_norm="none", dim=16, key_dim=8)
        grown.load_state_dict(layer.state_dict())
        grown.grow(16, warmup_steps=0, init=init, inputs=new_x, old_inputs=old_x, generator=torch.Generator())
        return [float((grown.route(x)[1] >= 64).any(-1).double().mean()) for x in (new_x, old_x)]

    (_, old_k), (new_c, old_c) = reach("kmeans"), reach("contrast")
    assert old_c < old_k and old_c < 0.5 * new_c
