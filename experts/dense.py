"""Dense feed-forward block: the nanoGPT MLP every FFN in this package is matched against.

Linear(dim, hidden) -> act -> Linear(hidden, dim) -> dropout, with biases by default
(``bias=False`` drops them) and torch's default nn.Linear initialisation U(-1/sqrt(fan_in),
1/sqrt(fan_in)); PEER's initialisation is chosen relative to this one (docs/peer.md,
'Initialisation'). FLOPs follow the package's convention (docs/peer.md, 'FLOP convention'): a
multiply-add is 2 FLOPs, an addition, multiplication or comparison 1, an activation 1 per element.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import activation_fn, check_dropout, check_int, check_last_dim


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
        check_last_dim(x, self.dim)
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

    def matmul_flops_per_token(self) -> int:
        """The two matrix products only (2 * dim * hidden each)."""
        return 4 * self.dim * self.hidden

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Every parameter of a dense block touches every token."""
        return self.num_params()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, bias={self.bias}"
