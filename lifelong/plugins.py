"""Avalanche plugins of the LM harness: learning-rate schedule, gradient clipping, cumulative
training, token-level distillation (LwF for language models) and Avalanche's Synaptic
Intelligence with a fix that makes it work on the CPU.

Plugins that carry state across experiences implement `state_dict(strategy) -> dict` and
`load_state_dict(strategy, state)`; `lifelong.strategies.strategy_state_dict` collects them for
checkpoints. Their state holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import SynapticIntelligencePlugin

from lifelong import distributed


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_experience(len_dataset: int, cfg) -> int:
    """Optimizer steps one experience of `len_dataset` blocks takes under `cfg.train`.

    Avalanche's train loader keeps the last partial micro-batch (`drop_last=False`, in both the
    plain and the replay loader, whose length is set by the current data alone), and the LM
    template steps the last partial accumulation group of every epoch too:
    ceil(ceil(len / micro_batch) / grad_accum) per epoch.
    """
    t = cfg.train
    micro_batches = math.ceil(len_dataset / (t.batch_size // t.grad_accum))
    return math.ceil(micro_batches / t.grad_accum) * t.epochs


class WarmupCosinePlugin(SupervisedPlugin):
    """Linear warmup then cosine decay, counted in optimizer steps (not micro-batches).

    `total_steps=None` re-warms in every experience (continual pre-training): the schedule spans
    that experience's optimizer steps. Otherwise one schedule spans the whole stream:
    `total_steps` is the stream's optimizer-step count, or a callable `strategy -> int` resolved
    at the first experience (see `lifelong.strategies.stream_steps`). Each parameter group is
    scaled from its own `base_lr` (set by `build_optimizer`; taken from its current `lr` when
    absent), so groups keep their ratios (the expert group's `expert_lr_mult`). Warmup is capped
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
        scale = self.lr_scale()
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
        torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), self.max_norm)


class CumulativePlugin(SupervisedPlugin):
    """Train every experience on the union of all train experiences seen so far.

    Avalanche's `Cumulative` as a plugin, so it runs on the one LM template. The seen experiences
    are kept as indices into the experience's `origin_stream` (the train stream), which makes the
    state a list of ints that a fresh process resolves against its rebuilt benchmark. The union is
    ordered like Avalanche's: earlier experiences first, the current one last.
    """

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        exp = strategy.experience
        past = [exp.origin_stream[i].dataset for i in self.seen if i != exp.current_experience]
        if past:
            strategy.adapted_dataset = concat_datasets(past + [strategy.adapted_dataset]).train()

    def after_training_exp(self, strategy, **kwargs) -> None:
        index = strategy.experience.current_experience
        if index not in self.seen:
            self.seen.append(index)

    def state_dict(self, strategy) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, strategy, state: dict) -> None:
        self.seen = [int(i) for i in state["seen"]]


class LMSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """Avalanche's SynapticIntelligencePlugin, with its weight snapshots made real copies.

    Avalanche 0.6.0 snapshots parameters with `param.detach().cpu().flatten()`, which on the CPU
    is a view of the parameter, not a copy: the optimizer's in-place update then moves the
    "old" weights along with the new ones, so the path integral and the anchor of the penalty
    stay exactly zero and SI silently does nothing (on CUDA `.cpu()` copies, so it works there).
    Cloning the two snapshots that must outlive an update (the anchor taken at the start of an
    experience and the pre-step weights of each iteration) fixes it on every device without
    changing the algorithm.
    """

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _detach_snapshots(self.ewc_data[0])

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _detach_snapshots(self.syn_data["old_theta"])


def _detach_snapshots(params: dict) -> None:
    for data in params.values():
        data.data = data.data.clone()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), summed over the vocabulary and averaged over tokens.

    Both distributions are softmaxes of logits / T in float32. The T^2 factor (Hinton et al.)
    keeps the gradient scale of the term independent of the temperature.
    """
    log_s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / log_s.shape[0]
    return kl * temperature ** 2


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class LMDistillPlugin(SupervisedPlugin):
    """Token-level distillation from the model frozen at the end of the previous experience.

    Avalanche's LwF and LFL are classification-only; this is LwF for language models: from the
    second experience on, `loss += weight * T^2 * KL(teacher_T || student_T)` per token on the
    current minibatch (`distill_kl`). The teacher is a deep copy taken in `after_training_exp`,
    in eval mode (no dropout, BatchNorm running statistics) and without gradients; its forward
    runs under the template's autocast, if any.
    """

    def __init__(self, weight: float, temperature: float):
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.teacher: nn.Module | None = None
        self.last_kl: float | None = None
        """The last minibatch's (unweighted) distillation term, for logging and tests."""
        self.make_model: Callable[[], nn.Module] | None = None
        """Builds a fresh model of the configured size: a saved teacher smaller than the model
        (taken before the model grew) is loaded into one, since loading only grows expert tables."""

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.teacher = _frozen_copy(strategy.model)

    def before_backward(self, strategy, **kwargs) -> None:
        if self.teacher is None:
            return
        autocast = getattr(strategy, "autocast", contextlib.nullcontext)
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(strategy.mb_x)
        kl = distill_kl(strategy.mb_output, teacher_logits, self.temperature)
        self.last_kl = float(kl.detach())
        strategy.loss = strategy.loss + self.weight * kl

    def state_dict(self, strategy) -> dict:
        """The teacher's weights, or "model" when they equal the model's (the usual case at an
        experience boundary, which keeps checkpoints from holding the model twice)."""
        if self.teacher is None:
            return {"teacher": None}
        teacher = self.teacher.state_dict()
        model = strategy.model.state_dict()
        if teacher.keys() == model.keys() and all(
                teacher[k].shape == model[k].shape and torch.equal(teacher[k], model[k]) for k in teacher):
            return {"teacher": "model"}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in teacher.items()}}

    def load_state_dict(self, strategy, state: dict) -> None:
        """Needs the model's weights loaded first (the teacher is built from it)."""
        saved = state["teacher"]
        if saved is None:
            self.teacher = None
            return
        if saved == "model":
            self.teacher = _frozen_copy(strategy.model)
            return
        teacher = self.make_model() if self.make_model is not None else copy.deepcopy(strategy.model)
        teacher.load_state_dict(saved)
        self.teacher = _frozen_copy(teacher)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stops at its last good checkpoint.

    `step` is the optimizer step that would have applied it, `experience` the experience index.
    """

    def __init__(self, message: str, step: int = 0, experience: int = 0):
        super().__init__(message)
        self.step, self.experience = step, experience


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
