"""What one training step needs, free of Avalanche: the next-token criterion, the autocast dtype,
the AdamW parameter groups and the optimizer. lifelong.strategies trains with these; so do
benchmarks/train_step.py and any loop of your own around lifelong.model.LanguageModel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import PEER, MoE, ProductKeys, QueryNorm
from experts.optim import RowAdamW, rowwise_groups
from lifelong.config import RunConfig
from lifelong.errors import ConfigError


class LMCriterion(nn.Module):
    """Next-token cross-entropy in mean nats per token, computed in float32.

    A module rather than a function because EWC, GEM and A-GEM call the criterion directly
    (`strategy._criterion(out, y)`). It is pure NLL: the FFNs' auxiliary losses are added by
    `LMTemplate.criterion` in training only, so evaluation losses, EWC's Fisher and A-GEM's
    reference gradient are all about next-token prediction.
    """

    def forward(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BTV.flatten(0, -2).float(), targets_BT.flatten())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """"auto": bf16 on CUDA, fp32 elsewhere; "bf16" forces bf16 autocast on any device; "fp32": none."""
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ConfigError(f"train.precision: {precision!r} is not one of auto, fp32, bf16")


_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, QueryNorm,
                     *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _group_name(module: nn.Module, name: str, param: nn.Parameter) -> str:
    """ "experts" for PEER sub-keys and expert tables, "no_decay" for embeddings, norms and
    biases (MoE's b1/b2 are 2-D biases), "decay" for every other matrix (MoE experts included)."""
    if isinstance(module, ProductKeys) or (isinstance(module, PEER) and any(param is t for t in module.expert_tables())):
        return "experts"
    is_bias = name == "bias" or name.endswith("_bias") or (isinstance(module, MoE) and name in ("b1", "b2"))
    if param.dim() < 2 or is_bias or isinstance(module, _NO_DECAY_MODULES):
        return "no_decay"
    return "decay"


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """AdamW parameter groups "decay", "no_decay" and "experts", in that order, every trainable
    parameter in exactly one (a tied weight, LM head = token embedding, counted once).

    Weight decay on matrices only (nanoGPT's rule). PEER sub-keys and expert tables get their
    own group with lr * expert_lr_mult and no decay: AdamW's decoupled decay would shrink every
    expert row each step, including the many rows a batch never retrieved. Each group records
    its `base_lr` for the schedule.
    """
    t = cfg.train
    groups = {"decay": [], "no_decay": [], "experts": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            groups[_group_name(module, name, param)].append(param)
    settings = {"decay": (t.lr, t.weight_decay), "no_decay": (t.lr, 0.0), "experts": (t.lr * t.expert_lr_mult, 0.0)}
    return [{"name": name, "params": params, "lr": settings[name][0], "base_lr": settings[name][0],
             "weight_decay": settings[name][1]} for name, params in groups.items()]


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (all three always present, so checkpoints share one layout).

    `train.optimizer: rowwise_adamw`: experts.optim.RowAdamW, the same AdamW for every group plus
    a fourth, "experts_rows", holding the PEER expert tables, updated only in the rows a step
    retrieved (lazy moments, exact deferred weight decay; identical to AdamW while every row is
    retrieved every step). `train.optimizer_impl` picks torch's implementation (`adamw_impl`) for
    the device the model will train on (`device`; default: where its parameters are now).
    """
    groups = param_groups(model, cfg)
    if device is None:
        device = next(model.parameters()).device
    impl = adamw_impl(cfg.train.optimizer_impl, device)
    if cfg.train.optimizer == "rowwise_adamw":
        return RowAdamW(rowwise_groups(model, groups), lr=cfg.train.lr, betas=(0.9, 0.95), **impl)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), **impl)


def adamw_impl(name: str, device: torch.device) -> dict:
    """torch.optim.AdamW's foreach / fused arguments for `train.optimizer_impl` on `device`.

    "auto" is "fused" on CUDA: at a million experts a dense step is memory-bound, and the fused
    kernel reads and writes each table, gradient and moment once, where the single-tensor loop runs
    about eight elementwise passes and allocates table-sized temporaries (sqrt(v), the denominator:
    a 5.7 GiB higher peak and a 13x slower step at 1024^2 x 512 on the CPU, README "A million
    experts"). On the CPU "auto" stays "single": it keeps the README's recorded results
    bit-reproducible and costs little at the presets' sizes.
    """
    if name == "auto":
        name = "fused" if torch.device(device).type == "cuda" else "single"
    return {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[name]
