import math

import pytest
import torch
import torch.nn.functional as F

from experts import MoE
from experts.moe import load_balancing_loss, router_z_loss


def tiny_moe(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(dim=6, num_experts=4, hidden=5, top_k=2) | kw
    layer = MoE(**args).double()
    with torch.no_grad():  # a router large enough that routing is clearly token-dependent
        layer.router.weight.normal_(0.0, 1.0)
    return layer


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    index = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.55, 0.45]  ->  2 * (1 * 0.55)
    assert load_balancing_loss(probs, index, 2).item() == pytest.approx(1.1)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    index = torch.tensor([[0, 1], [1, 2]])
    # f over the 4 slots = [.25, .5, .25], P = [.3, .45, .25]  ->  3 * (.075 + .225 + .0625)
    assert load_balancing_loss(probs, index, 3).item() == pytest.approx(3 * 0.3625)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_is_one_at_perfect_balance(k):
    E, T = 6, 12
    index = torch.stack([(torch.arange(T) + s) % E for s in range(k)], dim=1)  # every expert T*k/E times
    assert load_balancing_loss(torch.full((T, E), 1.0 / E), index, E).item() == pytest.approx(1.0)
    # with uniform dispatch the loss is 1 whatever the probabilities are
    probs = torch.randn(T, E).softmax(-1)
    assert load_balancing_loss(probs, index, E).item() == pytest.approx(1.0)


def test_balance_loss_validates_shape():
    with pytest.raises(ValueError, match="num_experts=3"):
        load_balancing_loss(torch.rand(4, 2), torch.zeros(4, 1, dtype=torch.long), 3)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2 and ln 4 = 2 ln 2  ->  mean(ln2^2, 4 ln2^2)
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2)


def reference_output(layer, x_TD):
    act = F.gelu if layer.activation == "gelu" else F.relu
    probs = (x_TD @ layer.router.weight.t()).softmax(-1)
    top, index = probs.topk(layer.top_k, dim=-1)
    gates = top / top.sum(-1, keepdim=True) if layer.normalize_gates else top
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(layer.top_k):
            e = index[t, k]
            h = act(x_TD[t] @ layer.w1[e] + layer.b1[e])
            y[t] += gates[t, k] * (h @ layer.w2[e] + layer.b2[e])
    return y


@pytest.mark.parametrize("normalize_gates,activation,top_k", [(True, "gelu", 2), (False, "relu", 2), (True, "gelu", 1)])
def test_dropless_output_matches_definition(normalize_gates, activation, top_k):
    layer = tiny_moe(normalize_gates=normalize_gates, activation=activation, top_k=top_k)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(15, 6), reference_output(layer, x.reshape(15, 6)), rtol=0, atol=1e-12)
    gates, index = layer.route(x)
    assert gates.shape == index.shape == (3, 5, top_k)
    if normalize_gates:
        assert torch.allclose(gates.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert layer.aux_metrics()["dropped_fraction"] == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_dropless_output_independent_of_batch(train):
    layer = tiny_moe().train(train)
    x = torch.randn(20, 6, dtype=torch.float64)
    y = layer(x)
    assert torch.allclose(layer(x[5:8]), y[5:8], rtol=0, atol=1e-12)
    shuffled = torch.randperm(20)
    assert torch.allclose(layer(x[shuffled]), y[shuffled], rtol=0, atol=1e-12)


def test_capacity_drops_overflow_and_reports_fraction():
    layer = MoE(dim=4, num_experts=4, hidden=3, top_k=1, capacity_factor=1.0, eval_capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # every positive token picks expert 0
    x = torch.rand(8, 4) + 0.1
    layer.train()
    assert layer.capacity(8) == 2  # ceil(1.0 * 8 tokens * 1 / 4 experts)
    y = layer(x)
    assert layer.aux_metrics()["dropped_fraction"] == pytest.approx(6 / 8)
    assert (y[:2].abs().sum(-1) > 0).all()          # first come, first served
    assert torch.equal(y[2:], torch.zeros(6, 4))    # over capacity: contributes nothing
    layer.eval()                                     # eval_capacity_factor=None: dropless eval
    y_eval = layer(x)
    assert layer.aux_metrics()["dropped_fraction"] == pytest.approx(6 / 8)  # still the training forward's
    assert torch.allclose(y_eval[:2], y[:2]) and (y_eval[2:].abs().sum(-1) > 0).all()


def test_capacity_prefers_first_choices():
    layer = MoE(dim=2, num_experts=2, hidden=3, top_k=2, capacity_factor=0.5, normalize_gates=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # token 0 prefers expert 0, token 1 expert 1
    layer.train()
    assert layer.capacity(2) == 1  # ceil(0.5 * 2 * 2 / 2)
    y = layer(x)
    assert layer.aux_metrics()["dropped_fraction"] == pytest.approx(0.5)
    gates, index = layer.route(x)
    for t in range(2):  # each token keeps exactly its first choice; its second choice was dropped
        e = int(index[t, 0])
        h = F.gelu(x[t] @ layer.w1[e] + layer.b1[e])
        assert torch.allclose(y[t], gates[t, 0] * (h @ layer.w2[e] + layer.b2[e]), atol=1e-6)


def test_capacity_formula_and_modes():
    layer = MoE(dim=4, num_experts=4, top_k=2, capacity_factor=1.25)
    assert layer.capacity(10) == math.ceil(1.25 * 10 * 2 / 4) == 7
    layer.eval()
    assert layer.capacity(10) == 10  # eval_capacity_factor defaults to 2.0
    assert MoE(dim=4, num_experts=4).capacity(10) is None
    assert MoE(dim=4, num_experts=4).hidden == 16


def test_aux_loss_value_and_gradient():
    layer = tiny_moe(balance_coef=0.01, z_coef=0.001).train()
    x = torch.randn(16, 6, dtype=torch.float64)
    layer(x)
    logits = x @ layer.router.weight.t()
    _, index = logits.softmax(-1).topk(2, dim=-1)
    balance = load_balancing_loss(logits.softmax(-1), index, 4)
    z = router_z_loss(logits)
    aux = layer.aux_loss()
    assert aux.item() == pytest.approx(0.01 * balance.item() + 0.001 * z.item())
    assert layer.aux_metrics()["balance_loss"] == pytest.approx(balance.item())
    assert layer.aux_metrics()["z_loss"] == pytest.approx(z.item())
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0   # aux losses train the router
    assert layer.w1.grad is None                       # and nothing else


def test_gradient_reaches_router_through_gates():
    layer = tiny_moe(balance_coef=0.0, z_coef=0.0).train()
    layer(torch.randn(16, 6, dtype=torch.float64)).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        assert p.grad.abs().sum() > 0


def test_aux_loss_zero_in_eval_and_before_forward():
    layer = tiny_moe()
    assert float(layer.aux_loss()) == 0.0
    layer.train()
    layer(torch.randn(8, 6, dtype=torch.float64))
    assert layer.aux_loss().item() > 0
    layer.eval()
    layer(torch.randn(8, 6, dtype=torch.float64))
    assert float(layer.aux_loss()) == 0.0
    assert set(layer.aux_metrics()) == {"balance_loss", "z_loss", "dropped_fraction"}
    assert layer.aux_metrics()["z_loss"] > 0  # metrics are still reported in eval


def test_router_runs_in_float32_under_autocast():
    layer = MoE(dim=8, num_experts=4, hidden=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, _ = layer.route(torch.randn(5, 8))
        y = layer(torch.randn(5, 8))
    assert gates.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 5}, "top_k=5 must be <= num_experts=4"),
    ({"activation": "tanh"}, r"activation='tanh'.*'gelu', 'relu'"),
    ({"balance_coef": -1.0}, "balance_coef"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"eval_capacity_factor": -2.0}, "eval_capacity_factor"),
    ({"hidden": 0}, "hidden"),
])
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(**(dict(dim=4, num_experts=4) | kwargs))


def test_flops_and_params_hand_counted():
    layer = MoE(dim=4, num_experts=2, hidden=3, top_k=1)
    # router 2*4*2 + softmax 3*2 + top-k 2 + gate renorm 2*1 = 26
    # expert 4*4*3 + act 3 + biases 3 + 4 + combine 2*4 = 66
    assert layer.flops_per_token() == 26 + 66
    assert layer.num_params() == 8 + 2 * (4 * 3 + 3 + 3 * 4 + 4)
    assert layer.active_params_per_token() == 8 + (4 * 3 + 3 + 3 * 4 + 4)
    nobias = MoE(dim=4, num_experts=2, hidden=3, top_k=1, bias=False, normalize_gates=False)
    assert nobias.flops_per_token() == 26 - 2 + 66 - 7
    assert nobias.num_params() == 8 + 2 * 24


def test_an_evaluation_forward_keeps_the_training_metrics():
    """aux_metrics() describe the last training forward: an evaluation forward in between (a learning
    curve, a growth check) must not replace what the training loss metric logs next."""
    layer = tiny_moe(capacity_factor=1.0)
    layer.train()
    layer(torch.randn(32, 6, dtype=torch.float64))
    trained = layer.aux_metrics()
    layer.eval()
    layer(torch.randn(5, 6, dtype=torch.float64) * 10)
    assert layer.aux_metrics() == trained


def test_a_trained_layer_can_be_deep_copied():
    """A distillation teacher is a deep copy of the model right after training: the last forward's
    auxiliary loss (part of its autograd graph) must not stop the copy."""
    import copy

    layer = tiny_moe()
    layer.train()
    layer(torch.randn(16, 6, dtype=torch.float64)).sum()
    assert layer.aux_loss().requires_grad
    teacher = copy.deepcopy(layer)
    assert float(teacher.aux_loss()) == 0.0 and layer.aux_loss().requires_grad
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(teacher.eval()(x), layer.eval()(x))
