"""lifelong.adapters: LoRA through peft on the model's linear layers, and the `lora` strategy that
trains the whole model in its first experience and only the adapters after it."""

import pytest
import torch

from lifelong.adapters import add_lora, is_adapter, lora_targets
from lifelong.build import build_model
from lifelong.config import ConfigError, from_dict
from lifelong.scopes import ScopeManager, trainable_of
from lifelong.strategy_config import LoRAConfig
from lifelong.training import build_optimizer

pytest.importorskip("peft")

from test_strategies import make_run, params_of, tiny_cfg  # noqa: E402


def lora_cfg(**lora):
    return tiny_cfg("lora", strategy={"lora": {"rank": 4, **lora}})


def test_adapters_start_at_zero_so_the_model_computes_what_it_did():
    cfg = lora_cfg()
    torch.manual_seed(0)
    plain = build_model(tiny_cfg("naive"), 256)
    torch.manual_seed(0)
    model = build_model(cfg, 256)
    x = torch.randint(0, 256, (2, 32))
    assert torch.equal(plain(x), model(x))
    adapters = [name for name, _ in model.named_parameters() if is_adapter(name)]
    assert adapters and all(".attn." in n or ".ffn." in n for n in adapters)
    assert all(p.requires_grad for p in model.parameters())  # scopes decide what learns, not peft


def test_targets_are_groups_or_layer_patterns():
    model = build_model(tiny_cfg("naive"), 256)
    assert lora_targets(model, ["attention"]) == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                 "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert lora_targets(model, ["dense"]) == ["blocks.0.ffn.fc", "blocks.0.ffn.proj"]  # block 1 is PEER
    assert lora_targets(model, ["queries", "blocks.0.attn.*"]) == ["blocks.1.ffn.query", "blocks.0.attn.qkv",
                                                                   "blocks.0.attn.proj"]
    with pytest.raises(ConfigError, match=r"strategy.lora.targets: 'blocks.9.\*' matches no linear layer"):
        lora_targets(model, ["blocks.9.*"])
    all_peer = build_model(tiny_cfg("naive", model={"ffn_layers": "all"}), 256)
    assert lora_targets(all_peer, ["attention", "dense"]) == lora_targets(all_peer, ["attention"])  # no dense
    with pytest.raises(ConfigError, match=r"strategy.lora.targets: \['dense'\] select no linear layer"):
        lora_targets(all_peer, ["dense"])
    with pytest.raises(ConfigError, match="strategy.lora.rank must be > 0"):
        from_dict({"strategy": {"name": "lora", "lora": {"rank": 0}}})
    with pytest.raises(ConfigError, match="strategy.lora.targets must name"):
        LoRAConfig(targets=[])


def test_the_first_experience_trains_the_model_and_the_next_ones_only_the_adapters():
    cfg = lora_cfg()
    assert trainable_of(cfg) == ["all", "adapters"]
    model = build_model(cfg, 256)
    optimizer = build_optimizer(model, cfg)
    scopes = ScopeManager(model, optimizer, trainable_of(cfg))
    x = torch.randint(0, 256, (4, 32))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()

    for experience, learns_adapters in ((0, False), (1, True), (2, True)):
        scopes.apply(experience)
        before = params_of(model)
        step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        adapters = {n for n in before if is_adapter(n)}
        if learns_adapters:
            # lora_A moves only once lora_B is non-zero, so after the first adapter step every adapter moves
            assert changed and changed <= adapters
            assert any(".lora_B." in n for n in changed)
        else:
            assert not changed & adapters and "tok_emb.weight" in changed


def test_a_lora_run_keeps_the_base_model_after_its_first_experience():
    """Through the real strategy: after the first experience, only adapter weights move."""
    from scenarios import STREAMS, build_benchmark

    bench = build_benchmark([d.to_dict() for d in STREAMS["smoke"][:2]], block_len=32, train_tokens=1024,
                            test_tokens=256, cache_dir=None, progress=False)
    cfg = lora_cfg()
    model, optimizer, probe, rows, strategy = make_run(cfg, bench=bench)
    from lifelong.plugins.scopes import TrainableScopePlugin

    strategy.plugins.insert(0, TrainableScopePlugin(ScopeManager(model, optimizer, trainable_of(cfg))))
    strategy.train(bench.train_stream[0])
    after_first = params_of(model)
    strategy.train(bench.train_stream[1])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), after_first[n])}
    assert changed and all(is_adapter(n) for n in changed)


def test_add_lora_without_peft_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match="strategy.name 'lora' needs the peft package"):
        add_lora(build_model(tiny_cfg("naive"), 256), LoRAConfig())


def test_lora_is_refused_under_fsdp_with_the_reason():
    with pytest.raises(ConfigError, match="strategy.name 'lora' with train.parallel 'fsdp' is not supported"):
        from_dict({"strategy": {"name": "lora"}, "train": {"parallel": "fsdp"}})


def test_the_adapters_flops_are_counted():
    plain, model = build_model(tiny_cfg("naive"), 256), build_model(lora_cfg(), 256)
    adapters = sum(p.numel() for name, p in model.named_parameters() if is_adapter(name))
    flops, base = model.flops_per_token(), plain.flops_per_token()
    assert flops.pop("adapters (LoRA)") == 2 * adapters and flops == base
