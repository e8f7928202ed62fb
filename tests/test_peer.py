import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import experts.product_keys as pk
from experts import PEER, DenseFFN
from experts.peer import QUERY_NORMS, SCORES, parse_grid
from helpers import randomize_peer_

ACTS = ("gelu", "relu")


def tiny_peer(grid=(4, 5), heads=2, top_k=3, key_dim=4, dim=6, seed=0, **kw):
    """A float64 PEER whose every parameter and buffer (norm affine, BN running stats, score
    offsets) is randomised, so no component can hide behind an identity init."""
    torch.manual_seed(seed)
    layer = PEER(dim=dim, num_experts=grid, heads=heads, top_k=top_k, key_dim=key_dim, **kw).double()
    return randomize_peer_(layer)


def reference_output(layer, x):
    """y from the definition: top-k of all_scores per head, score function, explicit loop."""
    act = F.gelu if layer.activation == "gelu" else F.relu
    x_TD = x.reshape(-1, layer.dim)
    scores_THN = layer.all_scores(x_TD)
    top_THK, ids_THK = scores_THN.topk(layer.top_k, dim=-1)
    weights_THK = top_THK.softmax(-1) if layer.score == "softmax" else torch.sigmoid(top_THK)
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for h in range(layer.heads):
            for k in range(layer.top_k):
                i = ids_THK[t, h, k]
                u, v = layer.expert_u[i], layer.expert_v[i]
                y[t] += weights_THK[t, h, k] * act(torch.dot(u, x_TD[t])) * v
    return y.reshape(x.shape)


@pytest.mark.parametrize("activation,query_norm,score,grid,train",
                         list(itertools.product(ACTS, QUERY_NORMS, SCORES, [(4, 4), (3, 5)], [False, True])))
def test_output_matches_definition(activation, query_norm, score, grid, train):
    layer = tiny_peer(grid=grid, activation=activation, query_norm=query_norm, score=score)
    layer.train(train)
    x = torch.randn(2, 3, layer.dim, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, reference_output(layer, x), rtol=0, atol=1e-8)


@pytest.mark.parametrize("query_norm,score", list(itertools.product(QUERY_NORMS, SCORES)))
def test_route_is_topk_of_all_scores(query_norm, score):
    layer = tiny_peer(grid=(5, 4), heads=3, top_k=4, query_norm=query_norm, score=score).eval()
    x = torch.randn(4, 2, layer.dim, dtype=torch.float64)
    weights, ids = layer.route(x)
    assert weights.shape == ids.shape == (4, 2, 3, 4) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < layer.num_experts
    scores = layer.all_scores(x)
    assert scores.shape == (4, 2, 3, 20)
    top, top_ids = scores.topk(4, dim=-1)
    assert torch.equal(ids.sort(-1).values, top_ids.sort(-1).values)
    mine = scores.gather(-1, ids)
    expected = mine.softmax(-1) if score == "softmax" else torch.sigmoid(mine)
    assert torch.allclose(weights, expected, rtol=0, atol=1e-12)
    assert torch.allclose(mine, top, rtol=0, atol=1e-12)  # ids come in descending score order


def test_all_scores_are_sums_of_half_scores():
    layer = tiny_peer(grid=(3, 4), query_norm="layernorm").eval()
    x = torch.randn(5, layer.dim, dtype=torch.float64)
    s1, s2 = layer.codebooks.half_scores(layer.norm(layer.query(x)))
    scores = layer.all_scores(x)
    for i, j in itertools.product(range(3), range(4)):
        assert torch.allclose(scores[..., i * 4 + j], s1[..., i] + s2[..., j], rtol=0, atol=1e-14)
    assert layer.codebooks.offset1.abs().sum() > 0  # and the offsets were part of it


def test_experts_gather_any_shape():
    layer = tiny_peer()
    ids = torch.tensor([[0, 19], [7, 7]])
    u, v = layer.experts(ids)
    assert u.shape == v.shape == (2, 2, layer.dim)
    assert torch.equal(u[0, 1], layer.expert_u[19]) and torch.equal(v[1, 0], layer.expert_v[7])


def test_shape_properties_and_parameter_layout():
    layer = PEER(dim=8, num_experts=(3, 5), heads=2, top_k=2, key_dim=6)
    assert layer.grid == (3, 5) and layer.num_experts == 15 and isinstance(layer.num_experts, int)
    assert PEER(dim=8, num_experts=16, heads=1, top_k=2, key_dim=2).grid == (4, 4)
    assert layer.codebooks.keys1.shape == (2, 3, 3) and layer.codebooks.keys2.shape == (2, 5, 3)
    assert layer.expert_u.shape == layer.expert_v.shape == (15, 8)
    assert layer.query.weight.shape == (12, 8) and layer.query.bias is None
    assert float(layer.aux_loss()) == 0.0 and layer.aux_loss().dim() == 0
    assert layer.aux_metrics() == {}


@pytest.mark.parametrize("num_experts", [15, 1000, (4,), (4, 0), (4.0, 4), True, "64", 0, -16, 4.0])
def test_bad_num_experts_refused(num_experts):
    with pytest.raises(ValueError, match="num_experts"):
        PEER(dim=8, num_experts=num_experts, heads=1, top_k=1, key_dim=2)


def test_non_square_message_suggests_squares():
    with pytest.raises(ValueError, match=r"961 = 31\^2 or 1024 = 32\^2"):
        parse_grid(1000)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 5}, "top_k=5 exceeds the codebook side"),                 # grid 4 x 8
    ({"top_k": 0}, "top_k"),
    ({"heads": 0}, "heads"),
    ({"key_dim": 5}, "key_dim must be even"),
    ({"dim": 0}, "dim"),
    ({"activation": "silu"}, r"activation='silu' is not valid; choose one of 'gelu', 'relu'"),
    ({"query_norm": "groupnorm"}, r"query_norm='groupnorm'.*'batchnorm', 'layernorm', 'rmsnorm', 'none'"),
    ({"score": "relu"}, r"score='relu'.*'softmax', 'sigmoid'"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_arguments_refused(kwargs, match):
    args = dict(dim=8, num_experts=(4, 8), heads=2, top_k=2, key_dim=4) | kwargs
    with pytest.raises(ValueError, match=match):
        PEER(**args)


def test_wrong_input_dim_refused():
    with pytest.raises(ValueError, match="dim=6"):
        tiny_peer()(torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("query_norm", QUERY_NORMS)
def test_eval_mode_is_per_token(query_norm):
    layer = tiny_peer(query_norm=query_norm).eval()
    x = torch.randn(7, layer.dim, dtype=torch.float64)
    y = layer(x)
    for t in (0, 4):
        assert torch.allclose(layer(x[t:t + 1]), y[t:t + 1], rtol=0, atol=1e-12)
        assert torch.equal(layer.route(x[t:t + 1])[1], layer.route(x)[1][t:t + 1])


@pytest.mark.parametrize("query_norm", ["layernorm", "rmsnorm", "none"])
def test_train_mode_is_per_token_without_batchnorm(query_norm):
    layer = tiny_peer(query_norm=query_norm).train()
    x = torch.randn(7, layer.dim, dtype=torch.float64)
    other = torch.cat([x[:3], 10 * torch.randn(4, layer.dim, dtype=torch.float64)])
    assert torch.allclose(layer(x)[:3], layer(other)[:3], rtol=0, atol=1e-12)


def test_batchnorm_train_mode_mixes_tokens():
    """Documented caveat: train-mode BatchNorm statistics pool every token of the batch."""
    layer = tiny_peer(query_norm="batchnorm").train()
    x = torch.randn(7, layer.dim, dtype=torch.float64)
    other = torch.cat([x[:3], 10 * torch.randn(4, layer.dim, dtype=torch.float64)])
    assert not torch.allclose(layer(x)[:3], layer(other)[:3], rtol=0, atol=1e-6)


def test_leading_dims_are_flattened_consistently():
    layer = tiny_peer(query_norm="rmsnorm")
    x = torch.randn(2, 3, layer.dim, dtype=torch.float64)
    assert torch.equal(layer(x).reshape(6, -1), layer(x.reshape(6, -1)))


@pytest.mark.parametrize("query_norm,score", [("layernorm", "softmax"), ("batchnorm", "sigmoid"),
                                               ("rmsnorm", "softmax"), ("none", "sigmoid")])
def test_gradcheck_all_parameters(query_norm, score):
    layer = tiny_peer(query_norm=query_norm, score=score, activation="gelu").eval()
    x = torch.randn(4, layer.dim, dtype=torch.float64)
    # top-k is piecewise constant: make sure no selection can flip under gradcheck's eps.
    scores = layer.all_scores(x).detach().sort(dim=-1, descending=True).values
    assert (scores[..., layer.top_k - 1] - scores[..., layer.top_k]).min() > 1e-4
    names = [n for n, _ in layer.named_parameters()]
    assert {"query.weight", "codebooks.keys1", "codebooks.keys2", "expert_u", "expert_v"} <= set(names)
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True),) + params, eps=1e-6, atol=1e-7)


def test_gradients_reach_every_parameter_in_training():
    layer = tiny_peer(query_norm="batchnorm").train()
    layer(torch.randn(9, layer.dim, dtype=torch.float64)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("score,query_norm", list(itertools.product(SCORES, QUERY_NORMS)))
def test_init_output_scale_matches_dense_ffn(score, query_norm):
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(256, 32)
        peer = PEER(dim=32, num_experts=16 * 16, heads=4, top_k=4, key_dim=16, query_norm=query_norm, score=score)
        dense = DenseFFN(32, 4 * 4, bias=False)  # same active width: heads * top_k neurons
        with torch.no_grad():
            ratios.append(float(peer(x).std() / dense(x).std()))
    assert 0.7 < sum(ratios) / len(ratios) < 1.4, ratios


def test_dropout_on_output():
    layer = tiny_peer(dropout=0.5, query_norm="layernorm")
    x = torch.randn(50, layer.dim, dtype=torch.float64)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    zeroed = y_train == 0
    assert zeroed.any() and torch.allclose(y_train[~zeroed], 2 * y_eval[~zeroed], rtol=0, atol=1e-12)


def test_forward_never_materialises_all_scores(monkeypatch):
    def boom(*args):
        raise AssertionError("PEER.forward built every score")

    monkeypatch.setattr(pk, "product_scores", boom)
    layer = PEER(dim=8, num_experts=256 * 256, heads=2, top_k=4, key_dim=8)
    y = layer(torch.randn(3, 5, 8))
    assert y.shape == (3, 5, 8) and torch.isfinite(y).all()


def test_bfloat16_autocast_runs():
    layer = PEER(dim=16, num_experts=8 * 8, heads=2, top_k=4, key_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(10, 16))
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.expert_v.grad is not None


def test_flops_and_params_hand_counted():
    layer = PEER(dim=4, num_experts=(2, 3), heads=1, top_k=2, key_dim=2, query_norm="none")
    # query 2*4*2 = 16; scoring 1*(2+3)*2 = 10 + 2 offset adds; half top-k 5 comparisons;
    # candidates 2*2 sums + 4 comparisons; softmax 3*2; experts 2*(2*4 + 1 + 1 + 2*4) = 36
    assert layer.flops_per_token() == 16 + 12 + 5 + 8 + 6 + 36
    # query 8 + sub-keys 2*1 + 3*1 + u, v 6*4 each
    assert layer.num_params() == 8 + 5 + 48
    # query 8 + all sub-keys 5 + 1*2 experts * 2 vectors * 4
    assert layer.active_params_per_token() == 8 + 5 + 16

    ln = PEER(dim=4, num_experts=(2, 3), heads=1, top_k=2, key_dim=2, query_norm="layernorm")
    assert ln.flops_per_token() == layer.flops_per_token() + 5 * 2
    assert ln.num_params() == layer.num_params() + 4            # weight + bias [1, 2]
    assert ln.active_params_per_token() == layer.active_params_per_token() + 4
    bn = PEER(dim=4, num_experts=(2, 3), heads=1, top_k=2, key_dim=2, query_norm="batchnorm")
    assert bn.num_params() == layer.num_params() + 4            # BN affine, running stats are buffers
    rms = PEER(dim=4, num_experts=(2, 3), heads=1, top_k=2, key_dim=2, query_norm="rmsnorm")
    assert rms.num_params() == layer.num_params() + 2



def test_forward_of_no_tokens_is_empty():
    layer = PEER(dim=8, num_experts=16, heads=2, top_k=2, key_dim=4).eval()
    assert layer(torch.zeros(0, 5, 8)).shape == (0, 5, 8)
