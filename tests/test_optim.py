"""experts.optim.RowAdamW: AdamW when every row is touched, lazy row-wise semantics otherwise,
exact deferred weight decay, growth surgery, frozen rows, checkpoints, argument checks."""

import io
import math

import pytest
import torch
from torch import nn

import experts
from experts.optim import (RowAdamW, build_expert_optimizer, flush_pending_decay, row_sparse_tables, rowwise_groups,
                           touched_rows)

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8


def schedule(step: int) -> float:
    """A LambdaLR factor that changes every step, so deferred decay must track each step's lr."""
    return 0.5 + 0.5 * math.cos(step / 3.0) ** 2


def make_params(seed=0, rows=40, dim=6):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(rows, dim, generator=g)), nn.Parameter(torch.randn(rows, dim, generator=g)),
            nn.Parameter(torch.randn(dim, generator=g))]  # two tables and a bias


def make_grads(params, steps, seed=1, touch=None):
    """Random gradients; ``touch`` = fraction of rows of the 2-D tables with gradient per step
    (None = every row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = []
        for p in params:
            grad = torch.randn(p.shape, generator=g)
            if touch is not None and p.dim() == 2:
                grad[torch.rand(p.shape[0], generator=g) >= touch] = 0
            grads.append(grad)
        out.append(grads)
    return out


def run(opt, params, grads, scheduler=None):
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def groups_of(params, rowwise=True):
    return [{"params": params[:2], "rowwise": rowwise}, {"params": params[2:], "weight_decay": 0.0}]


# ---- AdamW equivalence -----------------------------------------------------------------------------
@pytest.mark.parametrize("lockstep", [True, False])
@pytest.mark.parametrize("dense_fallback", [0.0, 1.0])
def test_equals_adamw_when_every_row_is_touched(dense_fallback, lockstep, monkeypatch):
    if not lockstep:  # exercise the masked / gather paths, not torch's kernel on rows in lockstep
        monkeypatch.setattr(RowAdamW, "_lockstep", staticmethod(lambda rows: False))
    ref_params, params = make_params(), make_params()
    ref = torch.optim.AdamW(groups_of(ref_params, rowwise=False), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                            foreach=False)
    ref_groups = [{k: v for k, v in g.items() if k != "rowwise"} for g in ref.param_groups]
    assert len(ref_groups) == 2
    opt = RowAdamW(groups_of(params), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, dense_fallback=dense_fallback)
    grads = make_grads(params, 12)
    run(ref, ref_params, grads, torch.optim.lr_scheduler.LambdaLR(ref, schedule))
    run(opt, params, grads, torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=0, atol=1e-6)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 12
    for p in params[:2]:
        assert torch.equal(opt.state[p]["rows"]["step"], torch.full((40,), 12, dtype=torch.int32))


# ---- lazy semantics ------------------------------------------------------------------------------
def reference_lazy(w0, grads, lrs):
    """Row-wise Adam written out row by row in float64: every row decays every step (what the
    deferred decay must add up to), only rows with gradient get an Adam step, with their own
    step count; untouched rows keep their moments."""
    w = w0.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    t = [0] * w.shape[0]
    b1, b2 = BETAS
    for grad, lr in zip(grads, lrs):
        grad = grad.double()
        w *= 1 - lr * WD
        for r in range(w.shape[0]):
            if not bool((grad[r] != 0).any()):
                continue
            t[r] += 1
            m[r] = b1 * m[r] + (1 - b1) * grad[r]
            v[r] = b2 * v[r] + (1 - b2) * grad[r] ** 2
            w[r] -= lr / (1 - b1 ** t[r]) * m[r] / ((v[r] / (1 - b2 ** t[r])).sqrt() + EPS)
    return w, m, v, torch.tensor(t, dtype=torch.int32)


@pytest.mark.parametrize("dense_fallback", [0.0, 1.0])
def test_lazy_rows_match_a_hand_written_reference(dense_fallback):
    (p,) = make_params(rows=30)[:1]
    w0 = p.detach().clone()
    opt = RowAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rowwise=True, dense_fallback=dense_fallback)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    grads = [g[0] for g in make_grads([p], 15, touch=0.3)]
    lrs = [LR * schedule(i) for i in range(15)]
    moments_before = None
    for i, grad in enumerate(grads):
        if i == len(grads) - 1:
            moments_before = (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), p.detach().clone())
        p.grad = grad.clone()
        opt.step()
        sched.step()
    w, m, v, t = reference_lazy(w0, grads, lrs)
    # untouched rows of the last step: moments, weights bit-identical (their decay is pending)
    untouched = ~touched_rows(grads[-1])
    assert untouched.any()
    assert torch.equal(opt.state[p]["exp_avg"][untouched], moments_before[0][untouched])
    assert torch.equal(opt.state[p]["exp_avg_sq"][untouched], moments_before[1][untouched])
    assert torch.equal(p.detach()[untouched], moments_before[2][untouched])
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v, rtol=0, atol=1e-6)
    assert torch.equal(opt.state[p]["rows"]["step"], t)
    # touched rows of the last step are up to date already; the rest after flush
    touched = ~untouched
    torch.testing.assert_close(p.detach()[touched].double(), w[touched], rtol=0, atol=1e-5)
    assert not torch.allclose(p.detach()[untouched].double(), w[untouched], rtol=0, atol=1e-5)
    opt.flush()
    torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-5)


def test_untouched_rows_only_decay_exactly_once_flushed():
    (p,) = make_params(rows=20)[:1]
    w0 = p.detach().clone()
    opt = RowAdamW([p], lr=LR, betas=BETAS, weight_decay=WD, rowwise=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    factor = 1.0
    for i in range(10):
        grad = torch.zeros_like(p)
        grad[:5] = torch.randn(5, p.shape[1])  # rows 5.. are never touched
        p.grad = grad
        opt.step()
        factor *= 1 - LR * schedule(i) * WD
        sched.step()
    assert torch.equal(p.detach()[5:], w0[5:])  # nothing applied yet: the decay is pending
    assert torch.equal(opt.state[p]["exp_avg"][5:], torch.zeros(15, p.shape[1]))
    flush_pending_decay(opt)
    torch.testing.assert_close(p.detach()[5:], w0[5:] * factor, rtol=1e-6, atol=0)
    after = p.detach().clone()
    opt.flush()  # idempotent
    assert torch.equal(p.detach(), after)
    flush_pending_decay(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))  # other optimizers: no-op


def test_dense_fallback_only_changes_the_execution():
    results = []
    for dense_fallback in (0.0, 0.3, 1.0):
        params = make_params()
        opt = RowAdamW(groups_of(params), lr=LR, betas=BETAS, weight_decay=WD, dense_fallback=dense_fallback)
        run(opt, params, make_grads(params, 10, touch=0.35), torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        opt.flush()
        results.append([p.detach().clone() for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sparse_gradients_equal_dense_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (6, 7))
    outs = []
    for sparse in (False, True):
        torch.manual_seed(1)
        emb = nn.Embedding(50, 4, sparse=sparse)
        opt = RowAdamW(emb.parameters(), lr=LR, weight_decay=WD, rowwise=True)
        for step in range(4):
            emb(ids[:, step:step + 3]).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        outs.append(emb.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_parameters_without_gradient_are_not_stepped():
    params = make_params()
    opt = RowAdamW(groups_of(params), lr=LR, weight_decay=WD)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    opt.flush()
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    assert params[1] not in opt.state


# ---- PEER: growth and freezing -------------------------------------------------------------------
def peer_layer():
    torch.manual_seed(0)
    return experts.PEER(dim=16, num_experts=64, heads=2, top_k=2, key_dim=8, query_norm="layernorm")


def train(layer, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(24, 16, generator=g)
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()


def test_growth_surgery_keeps_old_rows_and_steps_continue():
    layer = peer_layer()
    opt = build_expert_optimizer(layer, lr=LR, weight_decay=WD)
    assert [g.get("rowwise", False) for g in opt.param_groups] == [False, True]
    assert experts.attached_optimizers(layer) == [opt]
    train(layer, opt, 4)
    u = layer.expert_u
    old = {key: opt.state[u][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    old_rows = {key: value.clone() for key, value in opt.state[u]["rows"].items()}
    assert (old_rows["step"] > 0).any() and (old_rows["step"] < 4).any()  # some rows touched, not all each step
    log_decay_at_growth = opt.state[u]["log_decay"]
    new_ids = layer.grow(8, optimizer=opt, warmup_steps=3)
    assert layer.num_experts == 72 and new_ids.tolist() == list(range(64, 72))
    for key, value in old.items():  # growth's surgery pads the parameter-shaped moments
        assert opt.state[u][key].shape == (72, 16)
        assert torch.equal(opt.state[u][key][:64], value)
        assert not opt.state[u][key][64:].any()
    new_u = u.detach()[64:].clone()
    train(layer, opt, 1, seed=1)  # dormant new rows are not retrieved on the first step after growth
    rows = opt.state[u]["rows"]
    assert rows["step"].shape == (72,) and rows["log_decay"].shape == (72,)
    assert not rows["step"][64:].any()
    assert torch.equal(u.detach()[64:], new_u)
    opt.flush()
    factor = math.exp(opt.state[u]["log_decay"] - log_decay_at_growth)  # decay since growth only
    torch.testing.assert_close(u.detach()[64:], new_u * factor, rtol=1e-6, atol=0)
    train(layer, opt, 5, seed=2)  # steps continue; the new rows warm in and get used
    assert torch.isfinite(u).all() and (rows["step"] >= 0).all()


@pytest.mark.parametrize("dense_fallback", [0.0, 1.0])
def test_frozen_rows_stay_bit_identical(dense_fallback):
    layer = peer_layer()
    opt = RowAdamW(rowwise_groups(layer), lr=LR, betas=BETAS, weight_decay=WD, dense_fallback=dense_fallback)
    experts.attach(layer, opt)
    train(layer, opt, 3)
    ids = torch.arange(0, 64, 3)
    experts.freeze(layer, ids, opt)  # no flush first: some frozen rows still owe decay
    tables = layer.expert_tables()
    snap = [(t.detach()[ids].clone(), opt.state[t]["exp_avg"][ids].clone(), opt.state[t]["exp_avg_sq"][ids].clone(),
             opt.state[t]["rows"]["step"][ids].clone(),
             torch.exp(opt.state[t]["log_decay"] - opt.state[t]["rows"]["log_decay"][ids])) for t in tables]
    assert any(bool((owed < 1).any()) for *_, owed in snap)
    before_all = [t.detach().clone() for t in tables]
    train(layer, opt, 6, seed=3)
    opt.flush()
    for t, (w, m, v, s, _), before in zip(tables, snap, before_all):
        assert torch.equal(t.detach()[ids], w)
        assert torch.equal(opt.state[t]["exp_avg"][ids], m) and torch.equal(opt.state[t]["exp_avg_sq"][ids], v)
        assert torch.equal(opt.state[t]["rows"]["step"][ids], s)
        assert not torch.equal(t.detach(), before)  # the others trained
    # unfrozen: they owe exactly what they owed when frozen, nothing for the frozen steps
    experts.unfreeze(layer, ids)
    opt.flush()
    for t, (w, *_, owed) in zip(tables, snap):
        torch.testing.assert_close(t.detach()[ids], w * owed.float().unsqueeze(1), rtol=1e-6, atol=0)
    train(layer, opt, 2, seed=4)
    assert any(not torch.equal(t.detach()[ids], w) for t, (w, *_) in zip(tables, snap))


# ---- checkpoints ---------------------------------------------------------------------------------
def test_state_dict_round_trip_with_weights_only_load(tmp_path):
    def build():
        layer = peer_layer()
        return layer, build_expert_optimizer(layer, lr=LR, betas=BETAS, weight_decay=WD)

    layer, opt = build()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for i in range(3):
        train(layer, opt, 1, seed=i)
        sched.step()
    layer.grow(8, optimizer=opt, warmup_steps=2)  # per-row state is now shorter than the tables
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    layer2, opt2 = build()
    layer2.load_state_dict(saved["model"])  # resizes the layer to the grown shape
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, schedule)  # before loading: it resets the lrs
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for t in layer2.expert_tables():
        rows = opt2.state[t]["rows"]
        assert rows["step"].dtype == torch.int32 and rows["log_decay"].dtype == torch.float64
        assert isinstance(opt2.state[t]["log_decay"], float)
    for i in range(3, 7):
        for lay, o, s in ((layer, opt, sched), (layer2, opt2, sched2)):
            train(lay, o, 1, seed=i)
            s.step()
    opt.flush()
    opt2.flush()
    for a, b in zip(layer.state_dict().values(), layer2.state_dict().values()):
        assert torch.equal(a, b)


def test_continues_from_a_torch_adamw_state_dict():
    """Switching a run from AdamW to RowAdamW: AdamW's state loads, rows start in lockstep."""
    ref_params, params = make_params(), make_params()
    ref = torch.optim.AdamW([{"params": ref_params[:2]}, {"params": ref_params[2:], "weight_decay": 0.0}], lr=LR,
                            betas=BETAS, weight_decay=WD, foreach=False)
    grads = make_grads(params, 6)
    run(ref, ref_params, grads[:3])
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            p.copy_(q)
    opt = RowAdamW(groups_of(params), lr=LR, betas=BETAS, weight_decay=WD)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert [g["rowwise"] for g in opt.param_groups] == [True, False]
    run(ref, ref_params, grads[3:])
    run(opt, params, grads[3:])
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert torch.equal(opt.state[params[0]]["rows"]["step"], torch.full((40,), 6, dtype=torch.int32))


# ---- building and arguments ----------------------------------------------------------------------
def test_rowwise_groups_moves_only_the_expert_tables():
    model = nn.Sequential(nn.Linear(16, 16), peer_layer(), nn.LayerNorm(16))
    peer = model[1]
    named = [{"name": "decay", "params": [model[0].weight, peer.query.weight], "weight_decay": 0.1},
             {"name": "no_decay", "params": [model[0].bias, *model[2].parameters(), *peer.norm.parameters()],
              "weight_decay": 0.0},
             {"name": "experts", "params": [*peer.codebooks.parameters(), *peer.expert_tables()], "lr": 5e-3,
              "weight_decay": 0.0}]
    groups = rowwise_groups(model, named)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "experts", "experts_rows"]
    assert groups[3]["rowwise"] and groups[3]["lr"] == 5e-3 and groups[3]["weight_decay"] == 0.0
    assert groups[3]["params"] == peer.expert_tables()
    assert all(p is not peer.expert_u and p is not peer.expert_v for p in groups[2]["params"])
    opt = RowAdamW(groups, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    default = rowwise_groups(model)
    assert [g.get("name") for g in default] == [None, "expert_tables"]


def test_row_sparse_tables_come_from_the_layers_interface():
    """PEER's tables are found through its row_sparse_tables(), any module's too (duck typing);
    MoE has no such method, so its tables stay in dense AdamW groups."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = nn.Parameter(torch.randn(5, 3))

        def row_sparse_tables(self):
            return [self.rows]

    peer, moe, table = peer_layer(), experts.MoE(16, num_experts=4, hidden=8), Table()
    model = nn.Sequential(peer, moe, table)
    assert not hasattr(moe, "row_sparse_tables")
    found = row_sparse_tables(model)
    assert len(found) == 3 and all(a is b for a, b in zip(found, [peer.expert_u, peer.expert_v, table.rows]))
    opt = build_expert_optimizer(model, lr=LR, weight_decay=WD)
    dense, rowwise = opt.param_groups
    assert not dense["rowwise"] and rowwise["rowwise"] and len(rowwise["params"]) == 3
    assert all(any(p is q for q in dense["params"]) for p in moe.parameters())
    model[0](torch.randn(6, 16)).pow(2).mean().backward()
    model[1](torch.randn(6, 16)).pow(2).mean().backward()
    opt.step()
    assert "rows" in opt.state[peer.expert_u] and "rows" not in opt.state[moe.w1]


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr must be"),
    ({"lr": float("nan")}, "lr must be"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\] must be"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must be"),
    ({"betas": 0.9}, "betas must be a pair"),
    ({"eps": -1e-8}, "eps must be"),
    ({"weight_decay": -0.1}, "weight_decay must be"),
    ({"dense_fallback": 1.5}, "dense_fallback must be"),
    ({"rowwise": "yes"}, "rowwise must be True or False"),
    ({"foreach": "no"}, "foreach must be"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RowAdamW([nn.Parameter(torch.ones(3, 2))], **kwargs)


def test_bad_parameters_and_groups_raise_value_errors():
    with pytest.raises(ValueError, match="2-D tables"):
        RowAdamW([nn.Parameter(torch.ones(3))], rowwise=True)
    with pytest.raises(ValueError, match="real floating-point"):
        RowAdamW([nn.Parameter(torch.ones(3, 2, dtype=torch.complex64))])
    opt = RowAdamW([nn.Parameter(torch.ones(3, 2))])
    with pytest.raises(ValueError, match="2-D tables"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2, 2))], "rowwise": True})
    assert len(opt.param_groups) == 1  # a refused group is not kept
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1"):
        p = nn.Parameter(torch.ones(3, 2))
        p.grad = torch.ones(3, 2)
        RowAdamW([p], lr=2.0, weight_decay=0.5, rowwise=True).step()
    with pytest.raises(ValueError, match="dicts with a 'params' entry"):
        rowwise_groups(nn.Linear(2, 2), [[nn.Parameter(torch.ones(2))]])
