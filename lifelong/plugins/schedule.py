"""The learning-rate schedule and gradient clipping, counted in optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from avalanche.core import SupervisedPlugin


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosinePlugin(SupervisedPlugin):
    """Linear warmup then cosine decay, counted in optimizer steps (not micro-batches).

    `total_steps=None` re-warms in every experience (continual pre-training): the schedule spans
    that experience's optimizer steps. Otherwise one schedule spans the whole stream:
    `total_steps` is the stream's optimizer-step count, or a callable `strategy -> int` resolved
    at the first experience (see `lifelong.strategies.stream_steps`). Each parameter group is
    scaled from its own `base_lr` (set by `build_optimizer`; taken from its current `lr` when
    absent) times the strategy's `lr_mult` (the pretraining phase's), so groups keep their ratios
    (the expert group's `expert_lr_mult`). Warmup is capped
    at half the schedule so a short experience still decays.
    """

    def __init__(self, warmup_steps: int, min_lr_ratio: float,
                 total_steps: int | Callable[[object], int] | None = None):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.rewarm = total_steps is None
        self._total_source = total_steps
        self.step = 0
        self.total: int | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        for group in strategy.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        if self.rewarm:
            grad_accum = getattr(strategy, "grad_accum", 1)
            self.step = 0
            self.total = max(1, math.ceil(len(strategy.dataloader) / grad_accum) * strategy.train_epochs)
        elif self.total is None:
            source = self._total_source
            self.total = max(1, int(source(strategy) if callable(source) else source))

    def lr_scale(self) -> float:
        total = self.total or 1
        return warmup_cosine(self.step, total, min(self.warmup_steps, total // 2), self.min_lr_ratio)

    def before_update(self, strategy, **kwargs) -> None:
        scale = self.lr_scale() * getattr(strategy, "lr_mult", 1.0)
        for group in strategy.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def after_update(self, strategy, **kwargs) -> None:
        self.step += 1

    def state_dict(self, strategy) -> dict:
        return {"step": self.step, "total": self.total}

    def load_state_dict(self, strategy, state: dict) -> None:
        self.step, self.total = int(state["step"]), state["total"]


class GradClipPlugin(SupervisedPlugin):
    """Clip the global gradient norm once before every optimizer step.

    `before_update` fires only when the LM template is about to step, so with gradient
    accumulation the norm is that of the whole accumulated gradient.
    """

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = max_norm

    def before_update(self, strategy, **kwargs) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in strategy.model.parameters() if p.requires_grad], self.max_norm)
