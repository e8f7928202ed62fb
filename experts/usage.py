"""Expert usage statistics, as in the PEER paper's Table 2 (He 2024, expert usage and unevenness).

Accumulate the router weights each expert receives over an evaluation set and normalise the totals
to a distribution z over the N experts: usage = fraction of experts with z_i > 0, unevenness =
KL(z || uniform) = log N + sum_i z_i log z_i (0 log 0 = 0); plus the Jaccard overlap of the
expert sets two domains use. ``track_usage(layer)`` attaches a fresh counter to a PEER or MoE
layer's ``usage_counter`` (None by default): every forward *in eval mode* then adds its routing
weights (PEER: per head; MoE: the top-k gates); training forwards are never recorded. Detach with
``layer.usage_counter = None``; counters are plain objects, never part of a state_dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .checks import check_int


def usage_fraction(counts_N: torch.Tensor) -> float:
    """Fraction of experts whose accumulated weight is > 0."""
    return float((counts_N > 0).double().mean())


def kl_to_uniform(counts_N: torch.Tensor) -> float:
    """KL(z || uniform) = log N + sum z log z with z = counts / counts.sum(); nan if nothing counted."""
    counts_N = counts_N.double()
    total = counts_N.sum()
    if total <= 0:
        return float("nan")
    z_N = counts_N / total
    return float(math.log(counts_N.numel()) + torch.xlogy(z_N, z_N).sum())  # xlogy(0, 0) = 0


class UsageCounter:
    """Per-head accumulated router weight (``counts``) and selection counts (``hits``), [heads, N].

    update(weights, ids) takes route() outputs of any leading shape: [..., heads, top_k] for PEER;
    with heads=1 any shape is pooled into the single row, so MoE's [..., top_k] gates and expert
    indices work too. The last dim is always read as top_k: ``tokens`` counts the routed tokens
    (numel / (heads * top_k)). Statistics are pooled over heads unless ``head`` is given.
    """

    def __init__(self, num_experts: int, heads: int = 1):
        check_int("num_experts", num_experts)
        check_int("heads", heads)
        self.heads = heads
        self.counts = torch.zeros(heads, num_experts, dtype=torch.float64)
        self.hits = torch.zeros(heads, num_experts, dtype=torch.int64)
        self.tokens = 0

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @torch.no_grad()
    def update(self, weights: torch.Tensor, ids: torch.Tensor) -> None:
        if weights.shape != ids.shape:
            raise ValueError(f"weights and ids must have the same shape, got {tuple(weights.shape)} "
                             f"and {tuple(ids.shape)}")
        if ids.numel() == 0:
            return
        ids = ids.detach().to("cpu", torch.int64)
        weights = weights.detach().to("cpu", torch.float64)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_experts:
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got [{lo}, {hi}]; "
                             f"call grow_to(n) after the pool grows")
        if self.heads == 1:
            flat = ids.reshape(-1)
            self.tokens += ids.numel() // ids.shape[-1]
        else:
            if ids.dim() < 2 or ids.shape[-2] != self.heads:
                raise ValueError(f"ids must be [..., heads={self.heads}, top_k], got {tuple(ids.shape)}")
            head_H1 = torch.arange(self.heads).unsqueeze(-1)  # broadcasts over [..., H, K]
            flat = (head_H1 * self.num_experts + ids).reshape(-1)
            self.tokens += ids.numel() // (self.heads * ids.shape[-1])
        self.counts.view(-1).index_add_(0, flat, weights.reshape(-1))
        self.hits.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _row(self, head: int | None) -> torch.Tensor:
        if head is None:
            return self.counts.sum(0)
        if not 0 <= head < self.heads:
            raise ValueError(f"head must be None (pooled) or in [0, {self.heads}), got {head!r}")
        return self.counts[head]

    def distribution(self, head: int | None = None) -> torch.Tensor:
        """z: the accumulated weights normalised to sum to 1 (all zeros if nothing was counted)."""
        row = self._row(head)
        total = row.sum()
        return row / total if total > 0 else row.clone()

    def usage(self, head: int | None = None) -> float:
        """Fraction of experts with z_i > 0."""
        return usage_fraction(self._row(head))

    def unevenness(self, head: int | None = None) -> float:
        """KL(z || uniform) in nats; 0 = perfectly even, log N = one expert takes everything."""
        return kl_to_uniform(self._row(head))

    def top_experts(self, n: int, head: int | None = None):
        """(ids, shares z_i) of the n most-weighted experts, in descending order."""
        check_int("n", n)
        shares, ids = self.distribution(head).topk(min(n, self.num_experts))
        return ids, shares

    def reset(self) -> None:
        self.counts.zero_()
        self.hits.zero_()
        self.tokens = 0

    def grow_to(self, num_experts: int) -> None:
        """Extend to num_experts experts (new ids have zero counts); ids are append-only."""
        check_int("num_experts", num_experts)
        if num_experts < self.num_experts:
            raise ValueError(f"num_experts={num_experts} is smaller than the current {self.num_experts}: "
                             f"the pool only grows")
        pad = num_experts - self.num_experts
        self.counts = torch.cat([self.counts, self.counts.new_zeros(self.heads, pad)], dim=1)
        self.hits = torch.cat([self.hits, self.hits.new_zeros(self.heads, pad)], dim=1)

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "hits": self.hits.clone(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        counts, hits = state["counts"], state["hits"]
        if counts.dim() != 2 or counts.shape != hits.shape or counts.shape[0] != self.heads:
            raise ValueError(f"state has counts {tuple(counts.shape)} / hits {tuple(hits.shape)}; "
                             f"expected [heads={self.heads}, num_experts]")
        self.counts = counts.to(torch.float64).clone()
        self.hits = hits.to(torch.int64).clone()
        self.tokens = int(state.get("tokens", 0))

    def __repr__(self) -> str:
        return f"UsageCounter(num_experts={self.num_experts}, heads={self.heads}, tokens={self.tokens})"


def expert_set(x) -> set[int]:
    """The set of experts named by ``x``: a UsageCounter or a counts tensor ([N] or [heads, N]:
    experts with a positive count, pooled over heads), or an iterable of expert ids."""
    if isinstance(x, UsageCounter):
        x = x.counts
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            x = x.sum(0)
        if x.dim() != 1:
            raise ValueError(f"counts must be [N] or [heads, N], got shape {tuple(x.shape)}")
        return set(torch.nonzero(x > 0).flatten().tolist())
    if isinstance(x, Iterable):
        return {int(i) for i in x}
    raise ValueError(f"expected a set of expert ids, a counts tensor or a UsageCounter, got {type(x).__name__}")


def jaccard_overlap(a, b) -> float:
    """|A & B| / |A | B| of the expert sets two domains use (1.0 if both are empty).

    Counts of different lengths are fine (the pool grew between domains): ids are compared.
    """
    set_a, set_b = expert_set(a), expert_set(b)
    union = set_a | set_b
    return 1.0 if not union else len(set_a & set_b) / len(union)


def track_usage(layer) -> UsageCounter:
    """Attach a fresh UsageCounter to a PEER or MoE layer and return it (see module docstring)."""
    if not hasattr(layer, "usage_counter") or not hasattr(layer, "num_experts"):
        raise ValueError(f"track_usage needs a PEER or MoE layer, got {type(layer).__name__}")
    counter = UsageCounter(layer.num_experts, getattr(layer, "heads", 1))
    layer.usage_counter = counter
    return counter
