"""Continual-learning plugins for language models: cumulative training, Avalanche's Synaptic
Intelligence with real weight snapshots, and token-level distillation (LwF for LMs)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import SynapticIntelligencePlugin


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

    def __init__(self, weight: float, temperature: float, make_model: Callable[[], nn.Module] | None = None):
        """`make_model` builds a fresh model of the configured size: a saved teacher smaller than the
        model (taken before the model grew) is loaded into one, since loading only grows expert tables."""
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.make_model = make_model
        self.teacher: nn.Module | None = None
        self.last_kl: float | None = None
        """The last minibatch's (unweighted) distillation term, for logging and tests."""

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
