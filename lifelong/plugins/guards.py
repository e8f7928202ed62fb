"""Guards of a training run: stop before a NaN or infinite loss or gradient reaches the weights,
and checkpoint every N optimizer steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from avalanche.core import SupervisedPlugin

from lifelong import distributed
from lifelong.errors import TrainingDiverged


class FiniteLossPlugin(SupervisedPlugin):
    """Stop training the moment the loss or a gradient is NaN or infinite, before it reaches the weights.

    The loss is checked before the backward pass and the gradients before the optimizer step,
    so a poisoned update is never applied and every checkpoint holds finite weights. Under
    torchrun every rank stops together.
    """

    def before_backward(self, strategy, **kwargs) -> None:
        finite = bool(torch.isfinite(strategy.loss.detach()).all())
        if distributed.agree_any(not finite, strategy.device):  # every rank stops together
            raise _diverged(strategy, f"the loss is {float(strategy.loss.detach())}")

    def before_update(self, strategy, **kwargs) -> None:
        """A finite loss can still give an infinite gradient; stop before it reaches the weights
        (and so a checkpoint): a rollback could never recover from NaN weights."""
        if distributed.agree_any(not _gradients_finite(strategy.model), strategy.device):
            raise _diverged(strategy, "a gradient is NaN or infinite")


def _diverged(strategy, what: str) -> TrainingDiverged:
    """The error naming the optimizer step that would have applied `what`, and its experience."""
    step = getattr(strategy, "optimizer_steps", 0) + 1
    experience = strategy.experience
    return TrainingDiverged(
        f"training diverged: {what} at optimizer step {step} of experience {experience.current_experience} "
        f"({getattr(experience, 'domain', '?')}); lower train.lr or raise train.warmup_steps "
        "(or set train.rollback)", step=step, experience=experience.current_experience)


def _gradients_finite(model: nn.Module) -> bool:
    """One device sync for all gradients (not one per parameter: this runs every step)."""
    checks = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(checks).all()) if checks else True


class PeriodicCheckpointPlugin(SupervisedPlugin):
    """Calls `save()` after every `every`-th optimizer step, at the end of that iteration.

    Append it to `strategy.plugins` last, so every other plugin (metrics, SI's path integral,
    growth) has finished the iteration before the state is captured.
    """

    def __init__(self, every: int, save: Callable[[], None]):
        super().__init__()
        self.every, self.save = every, save

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if getattr(strategy, "is_update_step", True) and strategy.optimizer_steps % self.every == 0:
            self.save()
