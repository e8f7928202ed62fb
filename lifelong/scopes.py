"""Trainable scopes (`train.trainable`): which parameters learn in each experience.

A scope is a comma-separated list of groups and parameter-name patterns (fnmatch):

    all          every parameter but adapters
    embeddings   token and position embeddings (the tied head; a pretrained model's LM head)
    attention    every attention block
    norms        the transformer's LayerNorms (RMSNorms)
    dense        dense FFN blocks (a pretrained model's MLPs)
    queries      PEER query networks and query norms
    keys         PEER sub-keys, MoE routers
    experts      PEER expert tables, MoE expert weights
    new_experts  the experts of each layer's newest growth only (their u, v rows)
    new_keys     the first-codebook sub-keys of each PEER layer's newest growth only
    adapters     LoRA adapters (strategy `lora`, lifelong/adapters.py)

Everything outside the scope is frozen: requires_grad off, out of the optimizer's groups (its state
dropped: no optimizer memory), a BatchNorm whose parameters are all frozen keeps its running
statistics. `new_experts` / `new_keys` freeze the older experts / sub-key rows row by row
(experts.freeze, the codebook's frozen rows) for the rest of the run, so they stay bit-identical.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

import experts
from experts import PEER, DenseFFN, MoE
from lifelong.adapters import is_adapter
from lifelong.config import SCOPE_GROUPS, RunConfig
from lifelong.errors import ConfigError
from lifelong.pretrained import PretrainedLM


def trainable_of(cfg: RunConfig) -> list[str]:
    """The run's scopes: `train.trainable`, or for the `lora` strategy the whole model but its adapters
    in the first experience and the adapters alone after it."""
    if not cfg.train.trainable and cfg.strategy.name == "lora":
        return ["all", "adapters"]
    return list(cfg.train.trainable)


def scope_of(trainable: list[str], experience: int) -> str | None:
    """The scope of experience `experience` (the last entry repeats); None = everything."""
    if not trainable:
        return None
    return trainable[min(experience, len(trainable) - 1)]


# The groups of a PEER layer's parts (the first name part inside the layer); the rest are "experts".
PEER_PART_GROUPS = {"query": "queries", "norm": "queries", "codebooks": "keys"}


def _group_of(model: nn.Module, name: str) -> str:
    """The named group a parameter of the LanguageModel (or a PretrainedLM) belongs to."""
    if is_adapter(name):
        return "adapters"
    if isinstance(model, PretrainedLM):
        kind, part = model.parameter_owner(name)
        return PEER_PART_GROUPS.get(part, "experts") if kind == "peer" else kind
    parts = name.split(".")
    if parts[0] in ("tok_emb", "pos_emb"):
        return "embeddings"
    if parts[0] == "ln_f" or (len(parts) > 2 and parts[2] in ("ln_attn", "ln_ffn")):
        return "norms"
    if len(parts) > 2 and parts[2] == "attn":
        return "attention"
    ffn = model.get_submodule(".".join(parts[:3])) if len(parts) > 3 and parts[2] == "ffn" else None
    if isinstance(ffn, DenseFFN):
        return "dense"
    if isinstance(ffn, PEER):
        return PEER_PART_GROUPS.get(parts[3], "experts")
    if isinstance(ffn, MoE):
        return "keys" if parts[3] == "router" else "experts"
    return "other"


def trainable_names(model: nn.Module, scope: str | None) -> tuple[set[str], set[str]]:
    """(names of the parameters the scope trains, which of "new_experts" / "new_keys" it restricts to
    each layer's newest growth)."""
    names = [name for name, _ in model.named_parameters()]
    if scope is None:
        return set(names), set()
    items = [item.strip() for item in scope.split(",") if item.strip()]
    groups = {item for item in items if item in SCOPE_GROUPS}
    patterns = [item for item in items if item not in SCOPE_GROUPS]
    newest = groups & {"new_experts", "new_keys"}
    chosen = {name for name in names
              if ("all" in groups and not is_adapter(name)) or _group_of(model, name) in groups
              or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    if "new_experts" in newest and "experts" not in groups and "all" not in groups:
        chosen |= {name for name in names if _group_of(model, name) == "experts"}
    else:
        newest.discard("new_experts")
    if "new_keys" in newest and not ({"keys", "all"} & groups):
        chosen |= {name for name in names if name.endswith("codebooks.keys1")}
    else:
        newest.discard("new_keys")
    return chosen, newest


def check_scopes(model: nn.Module, trainable: list[str]) -> None:
    """ConfigError for a train.trainable pattern that names no parameter of `model`, or a scope that
    would train nothing (a run would stop at its first backward pass)."""
    names = [name for name, _ in model.named_parameters()]
    for scope in trainable:
        for item in (item.strip() for item in scope.split(",") if item.strip()):
            if item not in SCOPE_GROUPS and not any(fnmatch.fnmatchcase(name, item) for name in names):
                raise ConfigError(f"train.trainable: {item!r} is neither a group ({', '.join(SCOPE_GROUPS)}) nor "
                                  f"a pattern matching a parameter name (e.g. {names[0]}, {names[-1]})")
        if not trainable_names(model, scope)[0]:
            raise ConfigError(f"train.trainable: the scope {scope!r} trains no parameter of this model")


def check_base_frozen(model: nn.Module, trainable: list[str]) -> None:
    """ConfigError unless every scope leaves a pretrained model's weights frozen (what checkpoints that
    reference them instead of copying them need: checkpoint.base_weights 'reference')."""
    base = set(model.base_names())
    for scope in trainable or [None]:
        trained = sorted(trainable_names(model, scope)[0] & base)
        if trained:
            raise ConfigError(f"checkpoint.base_weights 'reference' leaves the pretrained weights out of checkpoints, "
                              f"but the scope {scope or 'all'!r} trains {len(trained):,} of them ({trained[0]}, ...)")


class ScopeManager:
    """Applies scopes to a model and its optimizer, whose full parameter groups it remembers."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: list[str]):
        check_scopes(model, trainable)
        self.model, self.optimizer, self.trainable = model, optimizer, list(trainable)
        self.groups = [list(group["params"]) for group in optimizer.param_groups]
        self._momentum: dict[int, float | None] = {}

    def apply(self, experience: int) -> None:
        """Freeze and unfreeze for experience `experience` (call before it trains, or before loading
        an optimizer state saved while it trained)."""
        if not self.trainable:
            return
        chosen, newest = trainable_names(self.model, scope_of(self.trainable, experience))
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in chosen)
            if not param.requires_grad:
                param.grad = None  # a stale gradient would cost memory and count in gradient clipping
        for group, params in zip(self.optimizer.param_groups, self.groups):
            group["params"] = [p for p in params if p.requires_grad]
            for p in params:
                if not p.requires_grad:
                    self.optimizer.state.pop(p, None)
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._hold_statistics(module, not any(p.requires_grad for p in module.parameters()))
        for layer in self.model.expert_layers().values():  # older experts / key rows stay frozen for good
            if "new_experts" in newest:
                generation = layer.expert_generation()
                experts.freeze(layer, torch.nonzero(generation < generation.max()).flatten(), self.optimizer)
            if "new_keys" in newest and isinstance(layer, PEER):
                rows = layer.codebooks.generation
                layer.codebooks.set_frozen_rows(layer.codebooks.frozen_rows | (rows < rows.max()))

    def apply_saved(self, next_experience: int, inside: bool) -> None:
        """The scope in force when a checkpoint was written (before its optimizer state is loaded):
        that of the experience it was inside, else of the last one finished (none before any)."""
        active = next_experience if inside else next_experience - 1
        if active >= 0:
            self.apply(active)

    def _hold_statistics(self, module: nn.Module, hold: bool) -> None:
        key = id(module)
        if hold and key not in self._momentum:
            self._momentum[key] = module.momentum
            module.momentum = 0.0  # running statistics stay as they are
        elif not hold and key in self._momentum:
            module.momentum = self._momentum.pop(key)

