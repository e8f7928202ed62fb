"""The continual-learning strategies: one `LMTemplate` plus the plugins `strategy.name` selects
(`STRATEGY_PLUGINS`), the learning-rate schedule, gradient clipping and the divergence guard.
What each Avalanche plugin does with language-model logits: docs/strategies.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from avalanche.training.plugins import AGEMPlugin, EWCPlugin, MASPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer

from lifelong import transfer
from lifelong.config import RunConfig
from lifelong.strategy_config import STRATEGIES
from lifelong.plugins.cl import CumulativePlugin, LMDistillPlugin, LMSynapticIntelligencePlugin
from lifelong.plugins.guards import FiniteLossPlugin, PeriodicCheckpointPlugin
from lifelong.plugins.schedule import GradClipPlugin, WarmupCosinePlugin
from lifelong.plugins.sparse import SparseFinetunePlugin
from lifelong.strategies.state import load_strategy_state, strategy_state_dict
from lifelong.strategies.template import LMTemplate
from lifelong.training import LMCriterion

__all__ = ["LMTemplate", "STRATEGY_PLUGINS", "build_strategy", "is_joint", "load_strategy_state", "replay_sizes",
           "strategy_state_dict", "stream_steps"]


def is_joint(cfg: RunConfig) -> bool:
    """Joint training is trained once: call `strategy.train(bench.train_stream)` (not per experience)."""
    return cfg.strategy.name == "joint"


def replay_sizes(cfg: RunConfig) -> tuple[int, int]:
    """(memory size in blocks, replayed blocks per micro-batch).

    The memory holds buffer_tokens // block_len blocks. Each optimizer step replays
    round(batch_ratio * batch_size) blocks, spread over its grad_accum micro-batches (at least
    one per micro-batch), on top of the micro-batch's current-experience blocks.
    """
    r, t = cfg.strategy.replay, cfg.train
    return r.buffer_tokens // cfg.stream.block_len, max(1, round(r.batch_ratio * t.batch_size / t.grad_accum))


def stream_steps(cfg: RunConfig, experience_lengths: list[int]) -> int:
    """Optimizer steps over a whole stream whose train experiences hold these many blocks: the
    `total_steps` of a schedule with `train.rewarm=false` (`transfer.experience_steps`)."""
    t = cfg.train
    steps = transfer.experience_steps(cfg.strategy.name, experience_lengths, t.batch_size, t.grad_accum, t.epochs)
    if cfg.stream.pretrain.enabled:  # the phase is the first experience and has epochs of its own
        steps[0] = transfer.steps_per_experience(experience_lengths[0], t.batch_size, t.grad_accum, t.pretrain_epochs)
    return sum(steps)


# ---- name -> the plugins the strategy adds (`make_model` builds a fresh model of the configured size)

def _replay(cfg: RunConfig, make_model) -> list:
    mem_size, mem_batch = replay_sizes(cfg)
    return [ReplayPlugin(mem_size=mem_size, batch_size_mem=mem_batch,
                         storage_policy=ExperienceBalancedBuffer(max_size=mem_size, adaptive_size=True))]


def _ewc(cfg: RunConfig, make_model) -> list:
    e = cfg.strategy.ewc
    return [EWCPlugin(e.weight, mode=e.mode, decay_factor=e.decay if e.mode == "online" else None)]


STRATEGY_PLUGINS: dict[str, Callable[[RunConfig, Callable[[], nn.Module] | None], list]] = {
    "naive": lambda cfg, make_model: [],
    "replay": _replay,
    "ewc": _ewc,
    "si": lambda cfg, make_model: [LMSynapticIntelligencePlugin(si_lambda=cfg.strategy.si.weight)],
    "mas": lambda cfg, make_model: [MASPlugin(lambda_reg=cfg.strategy.mas.weight)],
    "agem": lambda cfg, make_model: [AGEMPlugin(patterns_per_experience=cfg.strategy.agem.patterns,
                                                sample_size=cfg.strategy.agem.sample_size)],
    "cumulative": lambda cfg, make_model: [CumulativePlugin()],
    "joint": lambda cfg, make_model: [],
    "distill": lambda cfg, make_model: [LMDistillPlugin(weight=cfg.strategy.distill.weight,
                                                        temperature=cfg.strategy.distill.temperature,
                                                        make_model=make_model)],
    "sparse": lambda cfg, make_model: [SparseFinetunePlugin(cfg.strategy.sparse, scoped=bool(cfg.train.trainable))],
    # the adapters are in the model from the start; the scopes of `scopes.trainable_of` say what learns
    "lora": lambda cfg, make_model: [],
}
assert set(STRATEGY_PLUGINS) == set(STRATEGIES), "every configurable strategy needs its plugins"


def build_strategy(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, evaluator,
                   device: torch.device, plugins: list | None = None, total_steps: int | None = None,
                   make_model: Callable[[], nn.Module] | None = None,
                   save_checkpoint: Callable[[], None] | None = None) -> LMTemplate:
    """The configured strategy: an `LMTemplate` with `plugins`, the strategy's own plugins, the LR
    schedule, gradient clipping, the LM criterion and our evaluator (`eval_every=-1`: the caller
    evaluates).

    The train loader's micro-batch is batch_size // grad_accum blocks. With `train.rewarm=false`
    the schedule spans the whole stream: pass `total_steps` (see `stream_steps`) or leave it None
    to have it computed from the first experience's `origin_stream`. `make_model` is what the
    distillation plugin loads an older, smaller teacher into; `save_checkpoint` is called every
    `checkpoint.every_steps` optimizer steps. For joint training call
    `strategy.train(bench.train_stream)` once (`is_joint`).
    """
    t = cfg.train
    schedule_total = None
    if not t.rewarm:
        schedule_total = total_steps if total_steps is not None else (
            lambda strategy: stream_steps(cfg, [len(exp.dataset) for exp in strategy.experience.origin_stream]))
    plugins = list(plugins or []) + STRATEGY_PLUGINS[cfg.strategy.name](cfg, make_model) + [FiniteLossPlugin()]
    plugins.append(WarmupCosinePlugin(t.warmup_steps, t.min_lr_ratio, total_steps=schedule_total))
    if t.grad_clip > 0:
        plugins.append(GradClipPlugin(t.grad_clip))
    strategy = LMTemplate(model=model, optimizer=optimizer, criterion=LMCriterion(),
                          train_mb_size=t.batch_size // t.grad_accum, train_epochs=t.epochs,
                          eval_mb_size=t.eval_batch_size, device=device, plugins=plugins, evaluator=evaluator,
                          eval_every=-1, grad_accum=t.grad_accum, precision=t.precision, joint=is_joint(cfg),
                          pretrain_domain=cfg.stream.pretrain.name if cfg.stream.pretrain.enabled else None,
                          pretrain_epochs=t.pretrain_epochs, pretrain_lr_mult=(t.pretrain_lr or t.lr) / t.lr)
    if cfg.checkpoint.every_steps and save_checkpoint is not None:
        # Last of all (after the evaluator too), so it saves once every other plugin finished the iteration.
        strategy.plugins.append(PeriodicCheckpointPlugin(cfg.checkpoint.every_steps, save_checkpoint))
    return strategy
