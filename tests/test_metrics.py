"""The Avalanche metric plugins on a real strategy: token-weighted domain losses, the training loss
every N optimizer steps, and expert usage per domain."""

import math

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import EvaluationPlugin

from lifelong.config import from_dict
from lifelong.metrics import DomainLossMetric, ExpertUsageMetric, TrainLossMetric
from lifelong.model import LanguageModel
from lifelong.strategies import build_strategy
from lifelong.training import build_optimizer
from lifelong.transfer import bits_per_byte
from scenarios import STREAMS, build_benchmark

BLOCK = 16


@pytest.fixture(scope="module")
def bench():
    """Two domains of 20 train and 5 test blocks: the last eval batch (of 4) is partial."""
    return build_benchmark([d.to_dict() for d in STREAMS["smoke"][:2]], block_len=BLOCK, train_tokens=20 * BLOCK,
                           test_tokens=5 * BLOCK, cache_dir=None, progress=False)


def strategy_with(metrics, bench):
    cfg = from_dict({"stream": {"block_len": BLOCK},
                     "model": {"dim": 16, "n_layers": 2, "n_heads": 2,
                               "peer": {"num_experts": 16, "heads": 2, "top_k": 2, "key_dim": 8}},
                     "train": {"batch_size": 4, "eval_batch_size": 4, "device": "cpu", "warmup_steps": 1}})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, vocab_size=256, context=BLOCK)
    evaluator = EvaluationPlugin(*metrics, loggers=[])
    return model, build_strategy(cfg, model, build_optimizer(model, cfg), evaluator, torch.device("cpu"))


def test_domain_loss_is_token_weighted_and_rows_reach_the_stage_callback(bench):
    rows = []
    metric = DomainLossMetric(bench.domains, [2.0, 1.5], on_stage=lambda nats, bpb, blocks: rows.append((nats, bpb, blocks)))
    model, strategy = strategy_with([metric], bench)
    strategy.eval(bench.test_stream)
    model.eval()
    with torch.no_grad():
        expected = []
        for exp in bench.test_stream:
            x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
            y = torch.stack([exp.dataset[i][1] for i in range(len(exp.dataset))])
            expected.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    (nats, bpb, blocks), = rows
    assert nats == pytest.approx(expected, rel=1e-5)
    assert [len(b) for b in blocks] == [5, 5]  # every test block, in order
    assert [float(b.mean()) for b in blocks] == pytest.approx(nats, rel=1e-6)
    assert bpb == pytest.approx([bits_per_byte(n, b) for n, b in zip(expected, [2.0, 1.5])])
    assert metric.stage == 1 and metric.result() == dict(zip(bench.domains, nats))


def test_train_loss_is_reported_every_n_optimizer_steps_with_the_learning_rate(bench):
    metric = TrainLossMetric(every=2, aux_metrics=lambda: {"blocks.1.ffn/x": 1.0})
    _, strategy = strategy_with([metric], bench)
    emitted = []
    original = metric.after_training_iteration
    metric.after_training_iteration = lambda s: emitted.append(original(s))
    strategy.train(bench.train_stream[0])
    values = [v for batch in emitted if batch for v in batch]
    steps = math.ceil(20 / 4)
    assert metric.step == steps and len(values) == 3 * (steps // 2)
    names = {v.name for v in values}
    assert names == {"Loss_MB/train_phase/train_stream", "LR/train_phase", "Aux_MB/train_phase/blocks.1.ffn/x"}
    assert all(v.x_plot in (2, 4) for v in values)


def test_expert_usage_per_domain_and_overlap(bench):
    seen = []
    model_box = {}
    metric = ExpertUsageMetric(lambda: model_box["m"].expert_layers(), bench.domains,
                               on_stage=lambda stats, counts: seen.append((stats, counts)))
    model, strategy = strategy_with([metric], bench)
    model_box["m"] = model
    strategy.eval(bench.test_stream)
    (stats, counts), = seen
    layer = stats["blocks.1.ffn"]
    assert layer["num_experts"] == 16 and len(layer["usage"]) == 2
    assert all(0 < u <= 1 for u in layer["usage"]) and layer["overlap"][0][0] == 1.0
    assert counts["blocks.1.ffn"][bench.domains[0]].shape == (2, 16)
    assert all(layer.usage_counter is None for layer in model.expert_layers().values())


def test_logged_moe_metrics_come_from_training_forwards_even_beside_learning_curves(bench):
    """The learning-curve evaluation runs right before the training metric reads the FFNs'
    auxiliary metrics on shared steps: the logged values must still be the training forward's."""
    from lifelong.plugins import CurvePlugin
    from lifelong.snapshots import probe_blocks

    cfg = from_dict({"stream": {"block_len": BLOCK},
                     "model": {"dim": 16, "n_layers": 2, "n_heads": 2, "ffn": "moe",
                               "moe": {"num_experts": 4, "capacity_factor": 1.0}},
                     "train": {"batch_size": 2, "eval_batch_size": 4, "device": "cpu", "warmup_steps": 1}})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model, vocab_size=256, context=BLOCK)
    moe = model.expert_layers()["blocks.1.ffn"]
    trained = []  # the metrics of every training forward, in order
    moe.register_forward_hook(lambda m, args, out: trained.append(m.aux_metrics()) if m.training else None)
    logged = []

    class Keep:
        def log_metrics(self, values):
            pass

    metric = TrainLossMetric(every=2, aux_metrics=lambda: {k: v for k, v in moe.aux_metrics().items()})
    original = metric.after_training_iteration
    metric.after_training_iteration = lambda s: logged.append((metric.step + 1, original(s)))
    curve = CurvePlugin(model, probe_blocks(bench.test_stream), every=2, loggers=[Keep()])
    strategy = build_strategy(cfg, model, build_optimizer(model, cfg), EvaluationPlugin(metric, loggers=[]),
                              torch.device("cpu"), plugins=[curve])
    strategy.train(bench.train_stream[0])
    checked = 0
    for step, values in logged:
        for v in values or []:
            if v.name.startswith("Aux_MB/"):
                assert v.value == trained[step - 1][v.name.rsplit("/", 1)[-1]], (step, v.name)
                checked += 1
    assert checked >= 6
