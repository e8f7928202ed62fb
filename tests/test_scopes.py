"""train.trainable: what learns in each experience; the rest frozen, out of the optimizer, bit-identical."""

import pytest
import torch

import experts
from lifelong.build import build_model
from lifelong.config import ConfigError
from lifelong.presets import resolve
from lifelong.scopes import ScopeManager, scope_of, trainable_names
from lifelong.training import build_optimizer


def tiny(*overrides):
    cfg = resolve("smoke", overrides=["model.n_layers=3", "model.ffn_layers=1", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=256)
    optimizer = build_optimizer(model, cfg)
    experts.attach(model, optimizer)
    return cfg, model, optimizer


def step(model, optimizer, steps=3):
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 16))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        optimizer.step()


def test_scope_of_an_experience_repeats_the_last_entry():
    assert scope_of([], 3) is None
    assert [scope_of(["all", "experts"], i) for i in range(4)] == ["all", "experts", "experts", "experts"]


def test_named_groups_cover_the_model():
    _, model, _ = tiny()
    names = {name for name, _ in model.named_parameters()}
    assert trainable_names(model, "all")[0] == names
    assert trainable_names(model, "embeddings")[0] == {"tok_emb.weight", "pos_emb.weight"}
    assert trainable_names(model, "experts")[0] == {"blocks.1.ffn.expert_u", "blocks.1.ffn.expert_v"}
    assert trainable_names(model, "keys")[0] == {"blocks.1.ffn.codebooks.keys1", "blocks.1.ffn.codebooks.keys2"}
    assert trainable_names(model, "queries")[0] == {"blocks.1.ffn.query.weight", "blocks.1.ffn.norm.bn.weight",
                                                    "blocks.1.ffn.norm.bn.bias"}  # the query norm's affine too
    assert "blocks.0.ffn.fc.weight" in trainable_names(model, "dense")[0]
    attention = trainable_names(model, "attention")[0]
    assert attention and all(".attn." in n for n in attention)
    assert trainable_names(model, "blocks.2.*")[0] == {n for n in names if n.startswith("blocks.2.")}
    chosen, newest = trainable_names(model, "new_experts, new_keys, norms")
    assert newest == {"new_experts", "new_keys"} and "ln_f.weight" in chosen
    assert "blocks.1.ffn.codebooks.keys1" in chosen and "blocks.1.ffn.expert_u" in chosen
    chosen, newest = trainable_names(model, "new_experts")
    assert newest == {"new_experts"} and "blocks.1.ffn.codebooks.keys1" not in chosen
    assert trainable_names(model, "experts, new_experts")[1] == set()  # every expert learns anyway


def test_a_bad_scope_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"train.trainable\[1\]: 'expert' is neither a group"):
        resolve("smoke", overrides=["train.trainable=[all, expert]"])
    with pytest.raises(ConfigError, match="fsdp"):
        resolve("smoke", overrides=["train.trainable=[all]", "train.parallel=fsdp"])


def test_frozen_parameters_leave_the_optimizer_and_stay_bit_identical():
    cfg, model, optimizer = tiny("train.trainable=[experts, all]")
    manager = ScopeManager(model, optimizer, cfg.train.trainable)
    step(model, optimizer, 1)  # every parameter has optimizer state now
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn = model.blocks[1].ffn.norm.bn
    stats = bn.running_mean.clone()
    manager.apply(0)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(model.blocks[1].ffn.expert_u), id(model.blocks[1].ffn.expert_v)}
    assert len(optimizer.state) == 2  # the frozen parameters' moments are gone
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # and their gradients
    model.train()
    step(model, optimizer, 3)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.endswith(("expert_u", "expert_v")), name
    assert torch.equal(bn.running_mean, stats)  # a fully frozen batchnorm keeps its statistics
    manager.apply(1)  # everything learns again: fresh optimizer state, the batchnorm's momentum back
    assert bn.momentum == pytest.approx(0.1) and all(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_new_experts_scope_trains_only_the_newest_rows():
    cfg, model, optimizer = tiny("train.trainable=[all, 'new_experts,new_keys']")
    manager = ScopeManager(model, optimizer, cfg.train.trainable)
    layer = model.blocks[1].ffn
    layer.grow(16, optimizer=optimizer, warmup_steps=0)  # one new row of 16 experts, live at once
    manager.apply(1)
    old_u, old_keys = layer.expert_u[:256].detach().clone(), layer.codebooks.keys1[:, :16].detach().clone()
    new_u = layer.expert_u[256:].detach().clone()
    model.train()
    step(model, optimizer, 5)
    assert torch.equal(layer.expert_u[:256], old_u) and torch.equal(layer.codebooks.keys1[:, :16], old_keys)
    assert not torch.equal(layer.expert_u[256:], new_u)  # the new experts learned
    assert layer.frozen[:256].all() and not layer.frozen[256:].any()
    assert not model.tok_emb.weight.requires_grad


def test_the_scope_in_force_is_reapplied_before_an_optimizer_state_loads():
    cfg, model, optimizer = tiny("train.trainable=[all, experts]")
    ScopeManager(model, optimizer, cfg.train.trainable).apply(1)
    step(model, optimizer, 1)
    saved = optimizer.state_dict()
    _, model2, optimizer2 = tiny("train.trainable=[all, experts]")
    manager = ScopeManager(model2, optimizer2, cfg.train.trainable)
    with pytest.raises(ValueError):
        optimizer2.load_state_dict(saved)  # the full groups do not match the saved ones
    manager.apply_saved(2, inside=False)  # saved after experience 1 finished
    optimizer2.load_state_dict(saved)
