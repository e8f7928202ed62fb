"""LoRA adapters (Hu et al. 2021) on the language model's linear layers, through the `peft` library.

`add_lora` wraps the targeted `nn.Linear` layers with peft's LoRA layers: W x + (alpha / r) B A x,
with B at zero, so the model computes exactly what it did (the same discipline as growth). The
adapters are added when the model is built, which keeps one parameter set for the whole run
(checkpoints, resume and the optimizer need no surgery); which of base weights and adapters learn
in each experience is a trainable scope (`lifelong/scopes.py`, group `adapters`): the `lora`
strategy trains everything but the adapters in its first experience and only the adapters after.
"""

from __future__ import annotations

import fnmatch
import warnings

import torch.nn as nn

from experts import PEER, DenseFFN
from lifelong.errors import ConfigError
from lifelong.strategy_config import LORA_TARGET_GROUPS, LoRAConfig

# The adapters' parameters carry peft's names: `<layer>.lora_A.<adapter>.weight`, `<layer>.lora_B...`.
ADAPTER_MARK = ".lora_"


def is_adapter(name: str) -> bool:
    """Whether parameter `name` belongs to a LoRA adapter."""
    return ADAPTER_MARK in name


def _is_pretrained(model: nn.Module) -> bool:
    from lifelong.pretrained import PretrainedLM  # here: lifelong.model imports this module

    return isinstance(model, PretrainedLM)


def _group_of_linear(model: nn.Module, name: str) -> str | None:
    if _is_pretrained(model):
        kind, part = model.parameter_owner(name + ".weight")
        return kind if kind in ("attention", "dense") else "queries" if (kind, part) == ("peer", "query") else None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn":
        return "attention"
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "ffn":
        ffn = model.get_submodule(".".join(parts[:3]))
        if isinstance(ffn, DenseFFN):
            return "dense"
        if isinstance(ffn, PEER) and parts[3] == "query":
            return "queries"
    return None


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the `nn.Linear` modules that `targets` (groups of LORA_TARGET_GROUPS or module-name
    patterns) select. A group the model lacks selects nothing (the default [attention, dense] fits a
    model without dense blocks); a pattern that matches no layer, or a selection of nothing at all,
    is a ConfigError."""
    head = model.hf.get_output_embeddings() if _is_pretrained(model) else model.head
    # GPT-2's Conv1D is a linear layer with its weight transposed (peft adapts it too)
    linears = [name for name, module in model.named_modules()
               if (type(module) is nn.Linear or type(module).__name__ == "Conv1D") and module is not head]
    hint = f"(groups: {', '.join(LORA_TARGET_GROUPS)}; layers: {', '.join(linears[:4])} ...)"
    chosen: list[str] = []
    for item in targets:
        if item in LORA_TARGET_GROUPS:
            found = [name for name in linears if _group_of_linear(model, name) == item]
        else:
            found = [name for name in linears if fnmatch.fnmatchcase(name, item)]
            if not found:
                raise ConfigError(f"strategy.lora.targets: {item!r} matches no linear layer of this model {hint}")
        chosen += [name for name in found if name not in chosen]
    if not chosen:
        raise ConfigError(f"strategy.lora.targets: {targets!r} select no linear layer of this model {hint}")
    return chosen


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted linear layers of `model` with zero-initialised LoRA adapters (in place);
    every parameter stays trainable (scopes decide what learns). Returns the wrapped layers' names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ConfigError(f"strategy.name 'lora' needs the peft package ({err}); pip install peft") from None
    names = lora_targets(model, cfg.targets)
    with warnings.catch_warnings():  # peft sets fan_in_fan_out per layer itself (Conv1D's transposed weight)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                           target_modules=names, bias="none"), model)
    for param in model.parameters():  # peft freezes the base model; our scopes say what learns instead
        param.requires_grad_(True)
    return names
