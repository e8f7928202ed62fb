"""Argument validators and the activation table shared by every layer of the package.

Every check raises ValueError with a message that names the argument and what it accepts; none
touches a tensor's values. Depends on torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "relu")


def is_int(value) -> bool:
    """Whether ``value`` is an int and not a bool (True and False are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether ``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value, valid) -> None:
    """Raise ValueError naming the argument and its valid values unless ``value in valid``."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) that is >= minimum."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_dropout(value) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1)."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")


def check_key_dim(key_dim) -> None:
    """A product-key dimension: an even int >= 2 (the query is split into two halves)."""
    check_int("key_dim", key_dim, minimum=2)
    if key_dim % 2:
        raise ValueError(f"key_dim must be even (the query is split into two halves), got {key_dim}")


def check_optimizer(optimizer) -> None:
    """Raise ValueError unless ``optimizer`` is a torch.optim.Optimizer or None."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def check_last_dim(x: torch.Tensor, dim: int) -> None:
    """Raise ValueError unless a layer's input ``x`` is [..., dim]."""
    if x.shape[-1] != dim:
        raise ValueError(f"input's last dimension must be dim={dim}, got shape {tuple(x.shape)}")


def check_inputs(inputs) -> None:
    """Raise ValueError unless ``inputs`` (recent inputs a growth learns from) is a tensor."""
    if not torch.is_tensor(inputs):
        raise ValueError(f"inputs must be a tensor [..., dim], got {type(inputs).__name__}")


def check_tokens(x_TD: torch.Tensor) -> None:
    """Raise ValueError unless the flattened ``inputs`` x [T, D] hold at least one token."""
    if x_TD.shape[0] == 0:
        raise ValueError("inputs must hold at least one token")


def activation_fn(name: str):
    """'gelu' = torch's exact (erf) GELU, 'relu' = plain ReLU (PEER paper, section 2)."""
    check_choice("activation", name, ACTIVATIONS)
    return F.gelu if name == "gelu" else F.relu
