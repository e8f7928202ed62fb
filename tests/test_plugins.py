import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from lifelong.config import from_dict
from lifelong.model import LanguageModel
from lifelong.plugins import CumulativePlugin, GradClipPlugin, LMDistillPlugin, WarmupCosinePlugin, distill_kl, warmup_cosine
from lifelong.strategies import build_strategy, stream_steps
from lifelong.training import build_optimizer
from lifelong.transfer import steps_per_experience
from scenarios import STREAMS, build_benchmark

BLOCK = 32


def test_warmup_is_linear_then_cosine_to_floor():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_no_warmup():
    assert warmup_cosine(0, 10, 0, 0.0) == pytest.approx(1.0)
    values = [warmup_cosine(s, 10, 0, 0.0) for s in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---- plugins on a real strategy -------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    """Two real-text domains of 32 train blocks each."""
    return build_benchmark([d.to_dict() for d in STREAMS["smoke"][:2]], block_len=BLOCK, train_tokens=1024,
                           test_tokens=256, cache_dir=None, progress=False)


def tiny_cfg(name="naive", model=None, **train):
    return from_dict({
        "stream": {"block_len": BLOCK},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2,
                  "peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16}, **(model or {})},
        "train": {"batch_size": 8, "eval_batch_size": 16, "device": "cpu", **train},
        "strategy": {"name": name},
    })


def make_strategy(cfg, plugins=()):
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, vocab_size=256, context=BLOCK)
    optimizer = build_optimizer(model, cfg)
    strategy = build_strategy(cfg, model, optimizer, EvaluationPlugin(loggers=[]), torch.device("cpu"),
                              plugins=list(plugins))
    return model, optimizer, strategy


def plugin_of(strategy, cls):
    return next(p for p in strategy.plugins if isinstance(p, cls))


class StepRecorder:
    """Learning rate of every group and the global gradient norm at each real optimizer step."""

    def __init__(self, optimizer, model):
        self.lrs, self.norms = [], []
        self.model = model
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        grads = [p.grad.flatten() for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


@pytest.mark.parametrize("batch_size, grad_accum, epochs", [(8, 1, 1), (6, 2, 1), (6, 2, 2), (12, 4, 1)])
def test_steps_per_experience_counts_the_optimizer_steps_taken(bench, batch_size, grad_accum, epochs):
    cfg = tiny_cfg(model={"ffn": "dense"}, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs)
    model, optimizer, strategy = make_strategy(cfg)
    recorder = StepRecorder(optimizer, model)
    strategy.train(bench.train_stream[0])
    n = len(bench.train_stream[0].dataset)
    micro = batch_size // grad_accum
    assert len(recorder.lrs) == steps_per_experience(n, batch_size, grad_accum, epochs) == math.ceil(math.ceil(n / micro) / grad_accum) * epochs


def test_schedule_counts_optimizer_steps_and_rewarms_per_experience(bench):
    cfg = tiny_cfg(model={"ffn": "dense"}, batch_size=6, grad_accum=2, lr=1e-2, expert_lr_mult=2.0,
                   warmup_steps=2, min_lr_ratio=0.1, rewarm=True)
    model, optimizer, strategy = make_strategy(cfg)
    recorder = StepRecorder(optimizer, model)
    for exp in bench.train_stream:
        strategy.train(exp)
    total = steps_per_experience(32, 6, 2)  # 6 optimizer steps over 11 micro-batches
    expected = [warmup_cosine(i, total, 2, 0.1) for i in range(total)] * 2
    assert len(recorder.lrs) == len(expected) == 12
    for (decay, no_decay, experts), scale in zip(recorder.lrs, expected):
        assert decay == no_decay == pytest.approx(1e-2 * scale) and experts == pytest.approx(2e-2 * scale)
    assert recorder.lrs[6][0] == pytest.approx(1e-2 * 0.5)  # warmup again at the second experience


def test_schedule_without_rewarm_spans_the_stream(bench):
    cfg = tiny_cfg(model={"ffn": "dense"}, batch_size=8, lr=1e-2, warmup_steps=2, min_lr_ratio=0.0, rewarm=False)
    model, optimizer, strategy = make_strategy(cfg)
    recorder = StepRecorder(optimizer, model)
    for exp in bench.train_stream:
        strategy.train(exp)
    total = stream_steps(cfg, [len(e.dataset) for e in bench.train_stream])
    assert total == 8 and plugin_of(strategy, WarmupCosinePlugin).total == total
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([1e-2 * warmup_cosine(i, 8, 2, 0.0) for i in range(8)])


def test_stream_steps_follows_the_strategy():
    lengths = [32, 32, 16]
    assert stream_steps(tiny_cfg("naive"), lengths) == 4 + 4 + 2
    assert stream_steps(tiny_cfg("replay"), lengths) == 4 + 4 + 2
    assert stream_steps(tiny_cfg("cumulative"), lengths) == 4 + 8 + 10
    assert stream_steps(tiny_cfg("joint"), lengths) == 10


def test_gradient_is_clipped_once_on_the_accumulated_gradient(bench):
    cfg = tiny_cfg(model={"ffn": "dense"}, batch_size=8, grad_accum=2, grad_clip=1e-3)
    model, optimizer, strategy = make_strategy(cfg)
    recorder = StepRecorder(optimizer, model)
    strategy.train(bench.train_stream[0])
    # clipping each micro-batch and summing would give norms up to twice the limit
    assert recorder.norms == pytest.approx([1e-3] * 4, rel=1e-4)


def test_distill_kl_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    assert distill_kl(logits, logits.clone(), 2.0) == 0.0
    other = torch.randn(2, 5, 11)
    kl = distill_kl(logits, other, 2.0)
    p_t = torch.softmax(other / 2.0, -1)
    manual = (p_t * (torch.log_softmax(other / 2.0, -1) - torch.log_softmax(logits / 2.0, -1))).sum(-1).mean() * 4.0
    assert kl > 0 and kl == pytest.approx(float(manual), rel=1e-5)


class KLRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.kls = []

    def after_backward(self, strategy, **kwargs):
        self.kls.append(plugin_of(strategy, LMDistillPlugin).last_kl)


def test_distill_plugin_starts_from_the_previous_experiences_model(bench):
    # LayerNorm query norm and no dropout: the eval-mode teacher computes exactly like the student.
    cfg = tiny_cfg("distill", model={"peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 16,
                                              "query_norm": "layernorm"}})
    recorder = KLRecorder()
    model, _, strategy = make_strategy(cfg, plugins=[recorder])
    strategy.train(bench.train_stream[0])
    plugin = plugin_of(strategy, LMDistillPlugin)
    assert recorder.kls == [None] * 4 and plugin.teacher is not None
    assert not any(p.requires_grad for p in plugin.teacher.parameters()) and not plugin.teacher.training
    assert plugin.state_dict(strategy) == {"teacher": "model"}

    strategy.train(bench.train_stream[1])
    first, *rest = recorder.kls[4:]
    assert first == pytest.approx(0.0, abs=1e-6) and min(rest) > 0
    # a teacher that differs from the model (e.g. the model was changed after the boundary) is saved as weights
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    saved = plugin.state_dict(strategy)["teacher"]
    assert isinstance(saved, dict)
    assert all(torch.equal(saved[k], v) for k, v in plugin.teacher.state_dict().items())
    fresh = LMDistillPlugin(weight=1.0, temperature=2.0)
    fresh.load_state_dict(strategy, {"teacher": saved})
    assert torch.equal(fresh.teacher.tok_emb.weight, plugin.teacher.tok_emb.weight)
    assert not torch.equal(fresh.teacher.tok_emb.weight, model.tok_emb.weight)


def test_cumulative_plugin_trains_on_earlier_experiences_first(bench):
    class Seen(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            self.first = strategy.adapted_dataset[0][0]
            self.size = len(strategy.adapted_dataset)

    seen = Seen()
    _, _, strategy = make_strategy(tiny_cfg("cumulative"), plugins=[seen])
    strategy.train(bench.train_stream[0])
    strategy.train(bench.train_stream[1])
    assert seen.size == 64 and torch.equal(seen.first, bench.train_stream[0].dataset[0][0])
    assert plugin_of(strategy, CumulativePlugin).state_dict(strategy) == {"seen": [0, 1]}


def test_finite_loss_plugin_stops_before_a_step_with_a_non_finite_gradient():

    from lifelong.errors import TrainingDiverged
    from lifelong.plugins import FiniteLossPlugin

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    strategy = SimpleNamespace(model=model, device=torch.device("cpu"), optimizer_steps=4,
                               experience=SimpleNamespace(current_experience=1, domain="cpp"))
    FiniteLossPlugin().before_update(strategy)  # finite: nothing happens
    model.bias.grad[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="gradient is NaN or infinite at optimizer step 5 of experience 1") as err:
        FiniteLossPlugin().before_update(strategy)
    assert err.value.step == 5 and err.value.experience == 1


def test_clipping_counts_only_parameters_that_learn():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].requires_grad_(False)  # frozen, with a gradient left from before
    GradClipPlugin(max_norm=1.0).before_update(SimpleNamespace(model=model))
    learning = torch.cat([p.grad.flatten() for p in model[1].parameters()])
    assert float(learning.norm()) == pytest.approx(1.0, rel=1e-5)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model[0].parameters())
