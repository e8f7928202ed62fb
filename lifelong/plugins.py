"""Avalanche plugins the LM harness adds to every strategy: learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math

import torch
from avalanche.core import SupervisedPlugin


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosinePlugin(SupervisedPlugin):
    """Re-warm and decay the learning rate within every experience.

    The standard recipe for continual pre-training: each new domain starts with
    a short linear warmup, then cosine decay over that experience's steps. The
    base learning rate of each parameter group is remembered on first use, so
    groups with their own rates keep their ratios.
    """

    def __init__(self, warmup_steps: int, min_lr_ratio: float):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self._step = 0
        self._total = 1

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._step = 0
        self._total = max(1, len(strategy.dataloader) * strategy.train_epochs)
        for group in strategy.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def before_training_iteration(self, strategy, **kwargs) -> None:
        scale = warmup_cosine(self._step, self._total, min(self.warmup_steps, self._total // 2), self.min_lr_ratio)
        for group in strategy.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        self._step += 1


class GradClipPlugin(SupervisedPlugin):
    """Clip the global gradient norm before every optimizer step."""

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = max_norm

    def before_update(self, strategy, **kwargs) -> None:
        torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), self.max_norm)
