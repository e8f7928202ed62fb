import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import AGEMPlugin, EvaluationPlugin, ReplayPlugin

from lifelong.config import ConfigError, from_dict
from lifelong.strategy_config import STRATEGIES
from lifelong.metrics import DomainLossMetric
from lifelong.build import build_model
from lifelong.strategies import (
    STRATEGY_PLUGINS,
    build_strategy,
    is_joint,
    load_strategy_state,
    replay_sizes,
    strategy_state_dict,
)
from lifelong.training import LMCriterion, build_optimizer
from scenarios import STREAMS, build_benchmark

BLOCK = 32


@pytest.fixture(scope="module")
def bench():
    """Two real-text domains, 32 train blocks (4 optimizer steps of 8) and 8 test blocks each."""
    return build_benchmark([d.to_dict() for d in STREAMS["smoke"][:2]], block_len=BLOCK, train_tokens=1024,
                           test_tokens=256, cache_dir=None, progress=False)


def tiny_cfg(name="naive", model=None, strategy=None, **train):
    return from_dict({
        "stream": {"block_len": BLOCK},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2,
                  "peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16}, **(model or {})},
        "train": {"batch_size": 8, "eval_batch_size": 16, "warmup_steps": 1, "device": "cpu", **train},
        "strategy": {"name": name, "replay": {"buffer_tokens": 16 * BLOCK},
                     "agem": {"patterns": 8, "sample_size": 4}, **(strategy or {})},
    })


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Probe(SupervisedPlugin):
    """Records, per training iteration: experience, micro-batch size, loss minus the plain NLL
    (the plugins' penalties) and the logits' dtype."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def after_training_iteration(self, strategy, **kwargs):
        nll = F.cross_entropy(strategy.mb_output.float().flatten(0, -2), strategy.mb_y.flatten())
        self.rows.append({"exp": strategy.experience.current_experience, "size": len(strategy.mb_x),
                          "penalty": float(strategy.loss.detach().sum() - nll.detach()),
                          "dtype": strategy.mb_output.dtype})

    def of(self, exp, key):
        return [row[key] for row in self.rows if row["exp"] == exp]


def make_run(cfg, seed=0, bench=None):
    """Model, optimizer, probe, stage rows and strategy, built as lifelong.experiment does."""
    seed_all(seed)
    model = build_model(cfg, 256)  # LoRA adapters included under strategy lora
    optimizer = build_optimizer(model, cfg)
    rows = []
    domains = bench.domains if bench is not None else ["a", "b"]
    evaluator = EvaluationPlugin(DomainLossMetric(domains, [1.0] * len(domains),
                                                  on_stage=lambda nats, bpb, blocks: rows.append(nats)), loggers=[])
    probe = Probe()
    strategy = build_strategy(cfg, model, optimizer, evaluator, torch.device("cpu"), plugins=[probe])
    return model, optimizer, probe, rows, strategy


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


_RUNS = {}


def run_stream(bench, name):
    """Each strategy over the two-domain stream, evaluated at every stage (memoised per strategy)."""
    if name not in _RUNS:
        cfg = tiny_cfg(name)
        model, optimizer, probe, rows, strategy = make_run(cfg, bench=bench)
        before = params_of(model)
        strategy.eval(bench.test_stream)
        if is_joint(cfg):
            strategy.train(bench.train_stream)
            strategy.eval(bench.test_stream)
        else:
            for exp in bench.train_stream:
                strategy.train(exp)
                strategy.eval(bench.test_stream)
        _RUNS[name] = dict(model=model, optimizer=optimizer, probe=probe, rows=rows, strategy=strategy,
                           before=before)
    return _RUNS[name]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_and_evaluates(bench, name):
    run = run_stream(bench, name)
    model, strategy, rows = run["model"], run["strategy"], run["rows"]
    stages = 2 if name == "joint" else 3
    assert len(rows) == stages and all(len(r) == 2 and all(math.isfinite(v) for v in r) for r in rows)
    assert rows[-1][0] < rows[0][0]  # learned something about the first domain
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), run["before"][n])]
    assert "tok_emb.weight" in changed and any(".ffn." in n for n in changed)
    # Avalanche never reset the optimizer: Adam's step count is every optimizer step of the stream.
    # (sparse finetuning trains the embeddings in the first experience only, the experts throughout)
    step = run["optimizer"].state[model.tok_emb.weight]["step"]
    expert_step = run["optimizer"].state[model.blocks[1].ffn.expert_u]["step"]
    assert int(step) == (4 if name == "sparse" else strategy.optimizer_steps)
    assert int(expert_step) == strategy.optimizer_steps == (8 if name != "cumulative" else 4 + 8)


@pytest.mark.parametrize("name", ["ewc", "si", "mas", "distill"])
def test_regularizers_add_a_penalty_from_the_second_experience(bench, name):
    probe = run_stream(bench, name)["probe"]
    assert all(p == pytest.approx(0.0, abs=1e-6) for p in probe.of(0, "penalty"))
    assert max(probe.of(1, "penalty")) > 1e-6


@pytest.mark.parametrize("name", ["naive", "replay", "agem", "cumulative"])
def test_other_strategies_train_on_the_plain_loss(bench, name):
    probe = run_stream(bench, name)["probe"]
    assert all(p == pytest.approx(0.0, abs=1e-5) for p in probe.of(0, "penalty") + probe.of(1, "penalty"))


def test_replay_mixes_memory_into_every_minibatch_after_the_first_experience(bench):
    run = run_stream(bench, "replay")
    cfg = tiny_cfg("replay")
    mem_size, mem_batch = replay_sizes(cfg)
    assert (mem_size, mem_batch) == (16, 4)
    assert run["probe"].of(0, "size") == [8] * 4
    assert run["probe"].of(1, "size") == [8 + mem_batch] * 4
    plugin = next(p for p in run["strategy"].plugins if isinstance(p, ReplayPlugin))
    # experience-balanced: half of the memory per domain, filled from blocks with no class targets
    assert [len(g.buffer) for g in plugin.storage_policy.buffer_groups.values()] == [8, 8]


def test_cumulative_trains_on_the_union_and_joint_on_everything_at_once(bench):
    assert len(run_stream(bench, "cumulative")["probe"].of(1, "size")) == 8  # 64 blocks of both domains
    joint = run_stream(bench, "joint")["probe"]
    assert joint.of(1, "size") == [] and len(joint.of(0, "size")) == 8


def test_agem_keeps_a_memory_per_experience_and_projects(bench):
    plugin = next(p for p in run_stream(bench, "agem")["strategy"].plugins if isinstance(p, AGEMPlugin))
    assert [len(b) for b in plugin.buffers] == [8, 8]
    model = run_stream(bench, "agem")["model"]
    assert plugin.reference_gradients.numel() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, train", [(name, {}) for name in STRATEGIES]
                         + [("replay", {"grad_accum": 2, "rewarm": False}), ("ewc", {"rewarm": False})])
def test_state_round_trip_resumes_exactly(bench, name, train):
    cfg = tiny_cfg(name, strategy={"ewc": {"mode": "online"}} if name == "ewc" and train else None, **train)
    model, optimizer, _, _, strategy = make_run(cfg, seed=0)
    strategy.train(bench.train_stream[0])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "strategy": strategy_state_dict(strategy)}, buffer)
    seed_all(1)
    strategy.train(bench.train_stream[1])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, optimizer2, _, _, strategy2 = make_run(cfg, seed=123)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    load_strategy_state(strategy2, saved["strategy"])
    seed_all(1)
    strategy2.train(bench.train_stream[1])

    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # and the restart really depended on the loaded state: a run without it differs
    if train or name not in ("naive", "joint"):
        model3, optimizer3, _, _, strategy3 = make_run(cfg, seed=123)
        model3.load_state_dict(saved["model"])
        optimizer3.load_state_dict(saved["optimizer"])
        seed_all(1)
        strategy3.train(bench.train_stream[1])
        assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))


def test_load_strategy_state_refuses_another_strategys_state(bench):
    _, _, _, _, ewc = make_run(tiny_cfg("ewc"))
    _, _, _, _, naive = make_run(tiny_cfg("naive"))
    with pytest.raises(ValueError, match="EWCPlugin"):
        load_strategy_state(naive, strategy_state_dict(ewc))


def test_grad_accum_gives_the_full_batch_update(bench):
    """Micro-batches of 3 accumulated in pairs step like batches of 6 (dense FFN: no batch
    statistics): same gradients at every step, the last partial group (2 blocks) included."""
    results = []
    for accum in (1, 2):
        cfg = tiny_cfg(model={"ffn": "dense"}, batch_size=6, grad_accum=accum, weight_decay=0.0, grad_clip=0.0)
        model, optimizer, probe, _, strategy = make_run(cfg, seed=0)
        grads = []
        optimizer.register_step_pre_hook(lambda opt, args, kwargs, grads=grads, model=model: grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters()])))
        strategy.train(bench.train_stream[0])
        assert strategy.optimizer_steps == len(grads) == 6
        assert probe.of(0, "size") == ([6] * 5 + [2] if accum == 1 else [3] * 10 + [2])
        results.append((grads, params_of(model)))
    (grads1, params1), (grads2, params2) = results
    for g1, g2 in zip(grads1, grads2):
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
    for name, p in params1.items():
        assert torch.allclose(p, params2[name], rtol=1e-5, atol=1e-5), name


def test_last_partial_accumulation_group_is_stepped(bench):
    cfg = tiny_cfg(batch_size=6, grad_accum=2)  # 32 blocks: micro-batches 3 x 10 + 2, groups 5 full + 1 of one
    _, _, probe, _, strategy = make_run(cfg)
    strategy.train(bench.train_stream[0])
    assert probe.of(0, "size") == [3] * 10 + [2]
    assert strategy.optimizer_steps == 6


def test_bf16_autocast_forward_with_float32_loss(bench):
    _, _, probe, _, strategy = make_run(tiny_cfg(precision="bf16"))
    strategy.train(bench.train_stream[0])
    assert set(probe.of(0, "dtype")) == {torch.bfloat16}
    assert strategy.loss.dtype == torch.float32
    _, _, probe, _, strategy = make_run(tiny_cfg(precision="auto"))  # auto = fp32 on the CPU
    strategy.train(bench.train_stream[0])
    assert set(probe.of(0, "dtype")) == {torch.float32}


def test_criterion_flattens_tokens_and_aux_loss_joins_in_training_only():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert torch.allclose(LMCriterion()(logits, targets), F.cross_entropy(logits.reshape(10, 7), targets.reshape(10)))
    cfg = tiny_cfg(model={"ffn": "moe", "moe": {"num_experts": 4, "top_k": 2}})
    model, _, _, _, strategy = make_run(cfg)
    x = torch.randint(0, 256, (2, BLOCK))
    strategy.mbatch = [x, x]
    strategy.mb_output = model(x)
    strategy.is_training = True
    assert float(strategy.criterion() - LMCriterion()(strategy.mb_output, x)) == pytest.approx(
        float(model.aux_loss()), rel=1e-5)
    assert float(model.aux_loss()) > 0
    strategy.is_training = False
    assert torch.equal(strategy.criterion(), LMCriterion()(strategy.mb_output, x))


def test_refused_combinations():
    # refused by the config itself, before anything is built
    with pytest.raises(ConfigError, match="grad_accum"):
        tiny_cfg("agem", batch_size=8, grad_accum=2)
    with pytest.raises(ConfigError, match="buffer_tokens"):
        tiny_cfg("replay", strategy={"replay": {"buffer_tokens": BLOCK - 1}})


def test_every_configurable_strategy_has_its_plugins():
    assert set(STRATEGY_PLUGINS) == set(STRATEGIES)
    for name in STRATEGIES:
        plugins = STRATEGY_PLUGINS[name](tiny_cfg(name), None)
        assert all(isinstance(p, SupervisedPlugin) for p in plugins)
        assert (plugins == []) == (name in ("naive", "joint", "lora"))  # lora: its scopes say what learns


def test_distillation_of_a_moe_model_copies_its_teacher_after_training(bench):
    """The teacher is a deep copy taken right after an experience; a MoE layer's last auxiliary loss
    (still part of that forward's graph) used to make the copy fail."""
    cfg = tiny_cfg("distill", model={"ffn": "moe", "moe": {"num_experts": 4}})
    model, _, probe, rows, strategy = make_run(cfg, bench=bench)
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    assert len(rows) == 2 and all(p > 0 for p in probe.of(1, "penalty"))  # the KL term joins from exp 1
