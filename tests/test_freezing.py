"""experts.freezing: freezing experts (zero gradient plus the optimizer guard that keeps their rows and
moments bit-identical), freeze policies, and the attach / detach hooks (docs/growth.md, 'Freezing')."""

import copy
import io

import pytest
import torch

import experts
from experts import PEER, MoE, UsageCounter
from experts.freezing import growable_layers, surgery_targets
from helpers import teacher, tiny_moe, tiny_peer, train


# ---- freezing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
])
def test_frozen_experts_stay_bit_identical(make_opt):
    layer = tiny_peer(query_norm="layernorm")
    opt = make_opt(layer.parameters())
    x = torch.randn(64, layer.dim)
    target = teacher(layer.dim)(x)
    train(layer, opt, 3, x, target)  # moments exist before freezing
    ids = experts.freeze(layer, [0, 5, 6, 15], optimizer=opt)
    snapshot = {name: p.detach().clone() for name, p in layer.named_parameters()}
    moments = {k: v.clone() for p in (layer.expert_u, layer.expert_v) for k, v in opt.state[p].items()}
    train(layer, opt, 20, x, target)
    for name in ("expert_u", "expert_v"):
        p = getattr(layer, name)
        assert torch.equal(p[ids], snapshot[name][ids])
        others = torch.ones(16, dtype=torch.bool)
        others[ids] = False
        assert (p[others] != snapshot[name][others]).any(-1).all()  # every unfrozen expert moved
        assert p.grad[ids].abs().sum() == 0
    for key in moments:
        if key != "step":
            assert torch.equal(opt.state[layer.expert_v][key][ids], moments[key][ids])
    experts.unfreeze(layer)
    assert experts.frozen_ids(layer).numel() == 0
    train(layer, opt, 1, x, target)
    assert not torch.equal(layer.expert_u[ids], snapshot["expert_u"][ids])


def test_freezing_without_the_guard_only_zeroes_gradients():
    """Why the guard exists: AdamW moves rows with zero gradient (momentum, weight decay)."""
    layer = tiny_peer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, layer.dim)
    train(layer, opt, 3, x, x)
    with pytest.warns(UserWarning, match="experts.attach"):
        experts.freeze(layer, [0, 1, 2])
    before = layer.expert_u[:3].detach().clone()
    train(layer, opt, 2, x, x)
    assert layer.expert_u.grad[:3].abs().sum() == 0 and not torch.equal(layer.expert_u[:3], before)


def test_state_created_by_the_first_step_stays_zero_for_frozen_rows():
    layer = tiny_peer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    experts.freeze(layer, [3], optimizer=opt)
    before = layer.expert_v[3].detach().clone()
    train(layer, opt, 2, torch.randn(16, layer.dim), torch.randn(16, layer.dim))
    assert torch.equal(layer.expert_v[3], before)
    state = opt.state[layer.expert_v]
    assert state["exp_avg"][3].abs().sum() == 0 and state["exp_avg_sq"][3].abs().sum() == 0


@pytest.mark.filterwarnings("ignore:frozen experts get zero gradient")
def test_freeze_policies():
    layer = tiny_peer(grid=(3, 4))
    layer.grow(4)
    assert torch.equal(experts.freeze_existing(layer), torch.arange(12))
    assert torch.equal(experts.frozen_ids(layer), torch.arange(12))
    experts.unfreeze(layer, [0, 1])
    assert experts.frozen_ids(layer).tolist() == list(range(2, 12))
    experts.unfreeze(layer)
    counts = torch.zeros(2, 16)
    counts[0, 3], counts[1, 9], counts[0, 14] = 5.0, 2.0, 1.0
    assert experts.freeze_top_used(layer, counts, 2).tolist() == [3, 9]
    experts.unfreeze(layer)
    assert sorted(experts.freeze_top_used(layer, counts, 0.5).tolist()) == [3, 9, 14]  # zero usage never frozen
    counter = UsageCounter(12, heads=2)  # smaller than the pool: padded
    counter.counts[1, 7] = 1.0
    experts.unfreeze(layer)
    assert experts.freeze_top_used(layer, counter, 1).tolist() == [7]


def test_moe_frozen_experts_stay_bit_identical():
    layer = tiny_moe()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(64, 6)
    target = teacher(6)(x)
    train(layer, opt, 2, x, target)
    layer.grow(2, optimizer=opt, warmup_steps=2)
    frozen = experts.freeze_existing(layer)
    assert frozen.tolist() == [0, 1, 2, 3]
    tables = {name: getattr(layer, name).detach().clone() for name in ("w1", "w2", "b1", "b2")}
    router = layer.router.weight.detach().clone()
    train(layer, opt, 10, x, target)
    for name, before in tables.items():
        assert torch.equal(getattr(layer, name)[:4], before[:4]), name
        assert not torch.equal(getattr(layer, name)[4:], before[4:]), name
    assert not torch.equal(layer.router.weight, router)  # routing keeps learning


def test_frozen_flag_follows_direct_edits_copies_and_pickling():
    layer = tiny_peer()
    x = torch.randn(16, layer.dim)
    layer(x).sum().backward()
    assert not layer.has_frozen()
    with torch.no_grad():
        layer.frozen[:] = True  # edited in place, not through experts.freeze: still seen
    layer.expert_u.grad = None
    layer(x).sum().backward()
    assert layer.has_frozen() and layer.expert_u.grad.abs().sum() == 0
    twin = copy.deepcopy(layer)
    experts.unfreeze(twin)
    assert layer.has_frozen() and not twin.has_frozen()
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # a whole-module pickle holds no cache object
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).has_frozen()

# ---- optimizer hooks ----------------------------------------------------------------------------------------
def test_hooks_are_attached_once_and_used_for_later_growth():
    layer = tiny_peer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(10, layer.dim)
    layer.grow(4, optimizer=opt, warmup_steps=3)
    layer.grow(4, optimizer=opt, warmup_steps=3)
    assert experts.attach(layer, opt) == [layer]
    assert len(opt._optimizer_step_post_hooks) == 1 and len(opt._optimizer_step_pre_hooks) == 1
    assert experts.attached_optimizers(layer) == [opt] and experts.attached_layers(opt) == [layer]
    train(layer, opt, 1, x, x)
    ids = layer.grow(4, warmup_steps=3)  # no optimizer passed: the attached one still gets its surgery
    assert opt.state[layer.expert_u]["exp_avg"].shape == layer.expert_u.shape
    train(layer, opt, 1, x, x)
    assert layer.codebooks.warmup_left.tolist()[4:] == [1, 1, 2] and ids.numel() == 4
    experts.detach(layer, opt)
    assert len(opt._optimizer_step_post_hooks) == 0 and experts.attached_optimizers(layer) == []
    assert experts.attached_layers(opt) == []
    train(layer, opt, 1, x, x)
    assert layer.codebooks.warmup_left.tolist()[4:] == [1, 1, 2]  # no hook, no warm-in
    layer.advance_warmup()
    assert layer.codebooks.warmup_left.tolist()[4:] == [0, 0, 1]


def test_attach_covers_every_layer_of_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(PEER(8, (4, 4), heads=1, top_k=2, key_dim=4), torch.nn.Linear(8, 8),
                                MoE(8, num_experts=3, hidden=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model[0].grow(4, warmup_steps=2)
    model[2].grow(2, warmup_steps=2)
    assert experts.attach(model, opt) == [model[0], model[2]]
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    assert model[0].codebooks.warmup_left[4] == 1 and model[2].warmup_left.tolist() == [0, 0, 0, 1, 1]

# ---- argument checking --------------------------------------------------------------------------------------
def test_bad_freeze_and_attach_arguments_refused():
    layer = tiny_peer()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\)"):
        experts.freeze(layer, [3, 16])
    with pytest.raises(ValueError, match=r"ids must lie"):
        experts.freeze(layer, -1)
    with pytest.raises(ValueError, match="integers"):
        experts.freeze(layer, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="PEER or MoE"):
        experts.freeze(torch.nn.Linear(2, 2), [0])
    with pytest.raises(ValueError, match="has grown"):
        experts.freeze_existing(layer)
    with pytest.raises(ValueError, match="fraction_or_n"):
        experts.freeze_top_used(layer, torch.ones(16), 1.5)
    with pytest.raises(ValueError, match="no PEER or MoE"):
        experts.attach(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    assert not layer.frozen.any()


def test_growable_layers_and_surgery_targets():
    torch.manual_seed(0)
    peer, moe = PEER(8, (4, 4), heads=1, top_k=2, key_dim=4), MoE(8, num_experts=3, hidden=8)
    model = torch.nn.Sequential(peer, experts.DenseFFN(8, 16), moe)
    assert growable_layers(model) == [peer, moe] and growable_layers(peer) == [peer]
    attached, other = torch.optim.SGD(peer.parameters(), lr=0.1), torch.optim.SGD(peer.parameters(), lr=0.1)
    assert surgery_targets(peer, None) == []
    experts.attach(peer, attached)
    assert surgery_targets(peer, attached) == [attached]  # not twice
    assert surgery_targets(peer, other) == [attached, other]
    with pytest.raises(ValueError, match="optimizer must be"):
        surgery_targets(peer, "sgd")
