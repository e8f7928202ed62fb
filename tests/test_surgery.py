"""experts.surgery: appending and resizing rows of parameters, buffers and optimizer state
(docs/growth.md, 'Optimizer surgery')."""

import pytest
import torch
from torch import nn

from experts.surgery import _pad, append_rows_, check_resizable_state, resize_rows_, set_data_
from helpers import tiny_peer


@pytest.mark.parametrize("make_opt,keys", [
    (lambda groups: torch.optim.AdamW(groups, lr=1e-2, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    (lambda groups: torch.optim.Adam(groups, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    (lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9), ("momentum_buffer",)),
])
def test_surgery_with_parameter_groups(make_opt, keys):
    layer = tiny_peer()
    groups = [{"params": [layer.codebooks.keys1, layer.codebooks.keys2, layer.query.weight], "weight_decay": 0.1},
              {"params": [layer.expert_u, layer.expert_v], "weight_decay": 0.0}]
    opt = make_opt(groups)
    x = torch.randn(20, layer.dim)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        layer(x).pow(2).mean().backward()
        opt.step()
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for g in groups for p in g["params"]}
    layer.grow(6, optimizer=opt, warmup_steps=2)  # 2 rows, a pending .grad included
    assert layer.expert_u.grad.shape == layer.expert_u.shape and layer.expert_u.grad[16:].abs().sum() == 0
    for p, dim, old in ((layer.codebooks.keys1, 1, 4), (layer.expert_u, 0, 16), (layer.expert_v, 0, 16)):
        state = opt.state[p]
        for key in keys:
            assert state[key].shape == p.shape
            assert torch.equal(state[key].narrow(dim, 0, old), before[id(p)][key])
            new_part = state[key].narrow(dim, old, p.shape[dim] - old)
            assert new_part.numel() > 0 and torch.equal(new_part, torch.zeros_like(new_part))
        if "step" in state:
            assert torch.equal(state["step"], before[id(p)]["step"])
    for p in (layer.codebooks.keys2, layer.query.weight):
        assert all(torch.equal(opt.state[p][k], before[id(p)][k]) for k in keys)
    assert opt.param_groups[1]["params"][0] is layer.expert_u
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    opt.step()  # shapes agree: the step runs
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_surgery_refuses_state_of_another_shape_before_changing_anything():
    layer = tiny_peer()
    opt = torch.optim.AdamW(layer.parameters())
    opt.state[layer.expert_v]["factored"] = torch.zeros(16)
    with pytest.raises(ValueError, match="cannot grow"):
        layer.grow(4, optimizer=opt)
    assert layer.num_experts == 16 and layer.codebooks.keys1.shape[1] == 4 and layer.expert_u.shape[0] == 16


def test_append_rows_extends_state_along_any_dim_and_keeps_identity():
    param = nn.Parameter(torch.arange(6.0).view(2, 3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(2, 3)
    opt.step()
    before = {key: value.clone() for key, value in opt.state[param].items()}
    same = param
    append_rows_(param, torch.full((2, 2), 7.0), dim=1, optimizers=[opt, None])
    assert param is same and param.shape == (2, 5)
    assert torch.equal(param[:, 3:], torch.full((2, 2), 7.0))
    assert torch.equal(param.grad, torch.cat([torch.ones(2, 3), torch.zeros(2, 2)], dim=1))
    assert torch.equal(opt.state[param]["step"], before["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[param][key][:, :3], before[key]) and not opt.state[param][key][:, 3:].any()
    with pytest.raises(ValueError, match="do not fit"):
        append_rows_(param, torch.zeros(3, 1), dim=1)
    opt.state[param]["factored"] = torch.zeros(2)
    with pytest.raises(ValueError, match="cannot grow the Adam state 'factored'"):
        check_resizable_state([param], [opt])


def test_resize_rows_pads_parameters_and_buffers_with_fill():
    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(2, 3))
    module.register_buffer("mask", torch.zeros(2, dtype=torch.bool))
    module.weight.grad = torch.ones(2, 3)
    weight = module.weight
    resize_rows_(module, "weight", 4, fill=-1.0)
    resize_rows_(module, "mask", 3)
    resize_rows_(module, "mask", 2)  # never shrinks
    assert module.weight is weight and module.weight.grad is None
    assert torch.equal(module.weight, torch.tensor([[1.0] * 3] * 2 + [[-1.0] * 3] * 2))
    assert module.mask.tolist() == [False, False, False] and "mask" in dict(module.named_buffers())
    assert torch.equal(_pad(torch.ones(1, 2), 1, 1, fill=5.0), torch.tensor([[1.0, 1.0, 5.0]]))


def test_set_data_drops_a_stale_gradient_accumulator():
    param = nn.Parameter(torch.ones(2))
    stale = param * 2  # a graph built before the resize keeps the old accumulator alive
    set_data_(param, torch.ones(3))
    (param * 3).sum().backward()
    assert param.grad.shape == (3,) and stale.grad_fn is not None
