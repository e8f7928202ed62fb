"""lifelong.training: the next-token criterion, autocast dtype, parameter groups and optimizer,
and that none of it (nor the model) needs Avalanche."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experts import PEER, MoE
from lifelong.config import from_dict
from lifelong.model import LanguageModel
from lifelong.training import (
    LMCriterion,
    adamw_impl,
    autocast_dtype,
    build_optimizer,
    param_groups,
)

BLOCK = 16


def tiny_cfg(model=None, **train):
    return from_dict({"stream": {"block_len": BLOCK},
                      "model": {"dim": 32, "n_layers": 2, "n_heads": 2,
                                "peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16}, **(model or {})},
                      "train": {"device": "cpu", **train}})


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_autocast_dtype_and_criterion():
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    logits, targets = torch.randn(2, 5, 7, dtype=torch.bfloat16), torch.randint(0, 7, (2, 5))
    loss = LMCriterion()(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.float().reshape(10, 7), targets.reshape(10)))


def test_a_training_step_needs_no_avalanche():
    """benchmarks/train_step.py and loops of one's own build model, optimizer and loss without it."""
    code = ("import sys; sys.modules['avalanche'] = None\n"
            "import torch, scenarios, lifelong.training as t\n"
            "from lifelong.presets import resolve\n"
            "from lifelong.model import LanguageModel\n"
            "cfg = resolve('smoke')\n"
            "m = LanguageModel(cfg.model, vocab_size=scenarios.get_tokenizer('byte').vocab_size, context=8)\n"
            "opt = t.build_optimizer(m, cfg)\n"
            "x = torch.randint(256, (2, 8))\n"
            "t.LMCriterion()(m(x), x).backward(); opt.step()\n"
            "assert 'avalanche' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None}\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _group(optimizer, name):
    (group,) = [g for g in optimizer.param_groups if g["name"] == name]
    return group


@pytest.mark.parametrize("ffn, query_norm", [("peer", "layernorm"), ("peer", "batchnorm"), ("moe", "batchnorm")])
def test_param_groups_hold_every_trainable_parameter_once(ffn, query_norm):
    cfg = tiny_cfg(model={"ffn": ffn, "peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16,
                                                "query_norm": query_norm}},
                   lr=1e-3, expert_lr_mult=3.0, weight_decay=0.1)
    model = LanguageModel(cfg.model, vocab_size=256, context=BLOCK)
    optimizer = build_optimizer(model, cfg)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "experts"]
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # tied head counted once
    assert len(grouped) == len(set(grouped))
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}

    assert _group(optimizer, "decay")["weight_decay"] == 0.1 and _group(optimizer, "decay")["lr"] == 1e-3
    assert _group(optimizer, "no_decay")["weight_decay"] == 0.0
    experts = _group(optimizer, "experts")
    assert experts["lr"] == experts["base_lr"] == pytest.approx(3e-3) and experts["weight_decay"] == 0.0
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"} <= by_group["no_decay"]
    assert "blocks.0.attn.qkv.weight" in by_group["decay"]
    layer = next(iter(model.expert_layers().values()))
    if isinstance(layer, PEER):
        peer = "blocks.1.ffn."
        assert by_group["experts"] == {peer + n for n in ("codebooks.keys1", "codebooks.keys2", "expert_u", "expert_v")}
        assert peer + "query.weight" in by_group["decay"]
        norm = {n for n in by_group["no_decay"] if n.startswith(peer + "norm.")}
        assert norm and not any(n.startswith(peer + "norm.") for n in by_group["decay"])  # 2-D layernorm gain too
    else:
        assert isinstance(layer, MoE) and by_group["experts"] == set()
        assert {"blocks.1.ffn.w1", "blocks.1.ffn.w2", "blocks.1.ffn.router.weight"} <= by_group["decay"]
        assert {"blocks.1.ffn.b1", "blocks.1.ffn.b2"} <= by_group["no_decay"]
    # every group is scheduled from its own base rate
    assert all(g["base_lr"] == g["lr"] for g in param_groups(model, cfg))


@pytest.mark.parametrize("optimizer", ["adamw", "rowwise_adamw"])
def test_optimizer_impl_picks_torchs_adamw_implementation_and_all_agree(optimizer):
    """`train.optimizer_impl`: auto is single-tensor on the CPU (fused on CUDA); single, foreach
    and fused reach the same parameters after a few steps (float rounding only)."""
    assert adamw_impl("auto", torch.device("cuda")) == {"fused": True}
    assert adamw_impl("auto", torch.device("cpu")) == {"foreach": False}
    results = {}
    for impl in ("auto", "single", "foreach", "fused"):
        cfg = tiny_cfg(model={"peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16}},
                       optimizer=optimizer, optimizer_impl=impl)
        torch.manual_seed(0)
        model = LanguageModel(cfg.model, vocab_size=256, context=BLOCK)
        opt = build_optimizer(model, cfg)
        want = {"auto": (False, None), "single": (False, None), "foreach": (True, None), "fused": (None, True)}[impl]
        assert {(g["foreach"], g["fused"]) for g in opt.param_groups} == {want}
        x = torch.randint(256, (4, BLOCK), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
            opt.step()
            opt.zero_grad()
        results[impl] = params_of(model)
    for impl in ("single", "foreach", "fused"):
        for name, value in results[impl].items():
            torch.testing.assert_close(value, results["auto"][name], rtol=1e-5, atol=1e-6, msg=f"{impl}: {name}")
    assert all(torch.equal(v, results["auto"][n]) for n, v in results["single"].items())  # auto = single here
