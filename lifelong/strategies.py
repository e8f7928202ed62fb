"""Avalanche strategies wired for language modelling.

Avalanche's templates assume classification in two places we must cover: the
criterion receives `[B, T, V]` logits against `[B, T]` targets (so it must
flatten them), and the default evaluator computes accuracy with `max(dim=1)`
(so we always pass our own `EvaluationPlugin`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from avalanche.training.supervised import Naive

from experts import PEER, ProductKeys
from lifelong.config import RunConfig
from lifelong.plugins import GradClipPlugin, WarmupCosinePlugin


class LMCriterion(nn.Module):
    """Next-token cross-entropy (mean nats/token) plus, in training, the FFNs' auxiliary losses.

    A module rather than a function because EWC, GEM and A-GEM call the
    criterion directly. The auxiliary losses (MoE balance and z-loss) join only
    in training mode so evaluation losses are pure NLL.
    """

    def __init__(self, aux_loss: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self._aux_loss = aux_loss

    def forward(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits_BTV.flatten(0, -2).float(), targets_BT.flatten())
        if self.training and self._aux_loss is not None:
            loss = loss + self._aux_loss()
        return loss


def _decays(module: nn.Module, param: nn.Parameter) -> bool:
    """Weight decay on matrices only; never on embeddings, PEER sub-keys or PEER expert tables."""
    if param.dim() < 2 or isinstance(module, (nn.Embedding, ProductKeys)):
        return False
    return not (isinstance(module, PEER) and param.shape[0] == module.num_experts)


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT's rule).

    Norm gains, biases, embeddings and PEER sub-keys are not decayed; nor are
    PEER expert tables: AdamW's decoupled decay would shrink every expert row
    each step, including the many rows a batch never retrieved.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # a tied weight (LM head = token embedding) is optimised once
            seen.add(id(param))
            (decay if _decays(module, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps updates bit-reproducible and cheap on small CPU models.
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), foreach=False)


def build_strategy(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                   evaluator, device: torch.device, plugins: list | None = None):
    """The configured Avalanche strategy, with the LM criterion and our schedule/clipping plugins."""
    plugins = list(plugins or [])
    plugins.append(WarmupCosinePlugin(cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    if cfg.train.grad_clip > 0:
        plugins.append(GradClipPlugin(cfg.train.grad_clip))
    criterion = LMCriterion(aux_loss=model.aux_loss)
    common = dict(model=model, optimizer=optimizer, criterion=criterion,
                  train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.epochs,
                  eval_mb_size=cfg.train.eval_batch_size, device=device,
                  plugins=plugins, evaluator=evaluator, eval_every=-1)
    if cfg.strategy.name == "naive":
        return Naive(**common)
    raise ValueError(f"unknown strategy {cfg.strategy.name!r}")
