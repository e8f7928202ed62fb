"""Dense feed-forward block (the baseline every FFN is matched against), plus the small
activation / argument-checking helpers that PEER and MoE share with it.

DenseFFN is the nanoGPT MLP: Linear(dim, hidden) -> act -> Linear(hidden, dim) -> dropout,
with biases by default (``bias=False`` drops them). Parameters use torch's default nn.Linear
initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); PEER's initialisation is chosen relative to
this one (see experts/peer.py).

FLOP convention shared by every FFN in this package: a multiply-add is 2 FLOPs, an addition,
multiplication or comparison is 1, an activation function is 1 per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "relu")


def check_choice(name: str, value, valid) -> None:
    """Raise ValueError naming the argument and its valid values unless ``value in valid``."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) that is >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_dropout(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")


def activation_fn(name: str):
    """'gelu' = torch's exact (erf) GELU, 'relu' = plain ReLU (PEER paper, section 2)."""
    check_choice("activation", name, ACTIVATIONS)
    return F.gelu if name == "gelu" else F.relu


class DenseFFN(nn.Module):
    """x [..., dim] -> Linear(dim, hidden) -> act -> Linear(hidden, dim) -> dropout -> [..., dim]."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        check_int("dim", dim)
        check_int("hidden", hidden)
        check_dropout(dropout)
        self.dim, self.hidden, self.bias = dim, hidden, bool(bias)
        self.activation = activation
        self.act = activation_fn(activation)
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"input's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        return self.dropout(self.proj(self.act(self.fc(x))))

    def aux_loss(self) -> torch.Tensor:
        """Dense blocks have no auxiliary loss: a zero scalar on the parameters' device."""
        return torch.zeros((), device=self.fc.weight.device)

    def aux_metrics(self) -> dict[str, float]:
        return {}

    def flops_per_token(self) -> int:
        """2*dim*hidden (fc) + hidden (act) + 2*hidden*dim (proj) + biases (hidden + dim adds)."""
        flops = 2 * self.dim * self.hidden + self.hidden + 2 * self.hidden * self.dim
        if self.bias:
            flops += self.hidden + self.dim
        return flops

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Every parameter of a dense block touches every token."""
        return self.num_params()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, bias={self.bias}"
