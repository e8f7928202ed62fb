"""Growing expert pools: the warm-in schedule and margin, where new keys go, usage counts.

PEER grows by rows of its n1 x n2 grid (a new first-codebook sub-key per head and n2 new expert
rows; ids stay stable and new ids are appended), MoE by router rows and experts. New rows enter
dormant: a score offset of -inf until the first optimizer step, then -margin * (1 - t / W), 0
after W = warmup_steps steps (docs/growth.md, 'Warm-in'). Resizing tensors and optimizer state
is experts/surgery.py; freezing and the optimizer hooks are experts/freezing.py.

Shape suffixes: T tokens (points), H heads, R first-codebook rows (the new ones, or all n1 in
usage per row), d = key_dim / 2, N experts, B problems, K clusters, D point dim; x = 1 or H.
"""

from __future__ import annotations

import math
import weakref

import torch

from .checks import check_int, check_optimizer
from .surgery import _pad

INITS = ("random", "copy", "kmeans")


# ---- cached buffer summaries ------------------------------------------------------------------
_STATS = {
    "any": lambda t: bool(t.any()),
    "any_positive": lambda t: bool((t > 0).any()),
    "num_neginf": lambda t: int(torch.isneginf(t).sum()),
}
_STAT_CACHE: dict = {}  # (id(tensor), stat) -> (weakref to tensor, version, value)


def cached_stat(tensor: torch.Tensor, stat: str):
    """A Python-side summary of a buffer ("any", "any_positive", "num_neginf"), recomputed only when
    the buffer is modified in place (its version counter moves) or is another tensor. Lets a
    forward pass ask "is anything frozen / warming in / dormant?" without a device sync per call."""
    key = (id(tensor), stat)
    hit = _STAT_CACHE.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    value = _STATS[stat](tensor)
    _STAT_CACHE[key] = (weakref.ref(tensor, lambda _, key=key: _STAT_CACHE.pop(key, None)), tensor._version, value)
    return value


# ---- warm-in schedule -------------------------------------------------------------------------
def warmup_offsets(left: torch.Tensor, total: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Dormant score offsets (docs/growth.md, 'Warm-in'): -inf while no step was taken
    (left == total > 0), then -margin * left / total, 0 once left == 0. left/total broadcast
    against margin."""
    frac = left.to(margin.dtype) / total.clamp(min=1).to(margin.dtype)
    offset = torch.where(left > 0, -margin * frac, torch.zeros_like(margin))
    return torch.where((left == total) & (total > 0), torch.full_like(offset, -math.inf), offset)


def advance_warmup_(offset: torch.Tensor, left: torch.Tensor, total: torch.Tensor, margin: torch.Tensor,
                    steps: int) -> None:
    """Take ``steps`` warm-in steps: decrement ``left`` (>= 0) and rewrite the offsets of the rows
    that were warming up. Rows that were not (left == 0) keep whatever offset they have."""
    check_int("steps", steps)
    active = left > 0
    left.sub_(steps).clamp_(min=0)
    offset.copy_(torch.where(active, warmup_offsets(left, total, margin), offset))


def score_margin(q_norm: torch.Tensor, old_keys: torch.Tensor, new_keys: torch.Tensor) -> torch.Tensor:
    """Cauchy-Schwarz margin q_norm * (max |new key| + max |old key|) over the last two dims
    (keys [..., rows, dim], q_norm [...]): no new key out-scores any old one by more than this
    for a query of norm <= q_norm."""
    return q_norm * (new_keys.norm(dim=-1).amax(-1) + old_keys.norm(dim=-1).amax(-1))


# ---- k-means ----------------------------------------------------------------------------------
@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, iters: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means centres [..., k, D] of points [..., T, D] (a batch of independent problems, e.g.
    one per head): k-means++ seeding, then Lloyd iterations until the assignment is stable.

    Runs on the CPU in at least float32 (samples of recent inputs are small); an empty cluster
    keeps its previous centre. ``generator`` (a CPU torch.Generator) makes it reproducible.
    """
    check_int("k", k)
    check_int("iters", iters)
    if points.dim() < 2:
        raise ValueError(f"points must be [..., T, D], got shape {tuple(points.shape)}")
    lead, (T, D) = points.shape[:-2], points.shape[-2:]
    if T < k:
        raise ValueError(f"k-means needs at least k={k} points, got {T}")
    x_BTD = points.detach().reshape(-1, T, D).to("cpu", torch.promote_types(points.dtype, torch.float32))
    B = x_BTD.shape[0]
    batch_B = torch.arange(B)
    centres_BKD = x_BTD.new_empty(B, k, D)
    pick_B = torch.randint(T, (B,), generator=generator)
    centres_BKD[:, 0] = x_BTD[batch_B, pick_B]
    d2_BT = (x_BTD - centres_BKD[:, :1]).pow(2).sum(-1)
    for c in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        weights_BT = torch.where(d2_BT.sum(-1, keepdim=True) > 0, d2_BT, torch.ones_like(d2_BT))
        pick_B = torch.multinomial(weights_BT, 1, generator=generator).squeeze(-1)
        centres_BKD[:, c] = x_BTD[batch_B, pick_B]
        d2_BT = torch.minimum(d2_BT, (x_BTD - centres_BKD[:, c:c + 1]).pow(2).sum(-1))
    assign_BT = None
    for _ in range(iters):
        new_assign_BT = torch.cdist(x_BTD, centres_BKD).argmin(-1)
        if assign_BT is not None and torch.equal(new_assign_BT, assign_BT):
            break
        assign_BT = new_assign_BT
        sums_BKD = x_BTD.new_zeros(B, k, D).scatter_add_(1, assign_BT.unsqueeze(-1).expand(-1, -1, D), x_BTD)
        counts_BK = x_BTD.new_zeros(B, k).scatter_add_(1, assign_BT, torch.ones_like(x_BTD[..., 0]))
        centres_BKD = torch.where(counts_BK.unsqueeze(-1) > 0,
                                  sums_BKD / counts_BK.clamp(min=1).unsqueeze(-1), centres_BKD)
    return centres_BKD.reshape(*lead, k, D)


# ---- usage ------------------------------------------------------------------------------------
def usage_counts(usage, num_experts: int) -> torch.Tensor:
    """A UsageCounter or a counts tensor [N] / [heads, N] -> float64 counts [rows, num_experts] on
    the CPU; a counter smaller than the pool (it grows lazily) is zero-padded."""
    counts = getattr(usage, "counts", usage)
    if not torch.is_tensor(counts):
        raise ValueError(f"usage must be a UsageCounter or a counts tensor [N] or [heads, N], "
                         f"got {type(usage).__name__}")
    counts = counts.detach().to("cpu", torch.float64)
    if counts.dim() == 1:
        counts = counts.unsqueeze(0)
    if counts.dim() != 2 or counts.shape[1] > num_experts:
        raise ValueError(f"usage counts must be [N] or [heads, N] with N <= num_experts={num_experts}, "
                         f"got shape {tuple(counts.shape)}")
    return _pad(counts, num_experts - counts.shape[1], 1)


# ---- growth helpers shared by PEER and MoE ----------------------------------------------------
def check_grow_args(n, warmup_steps, optimizer) -> None:
    """Validate grow()'s shared arguments: n >= 1, warmup_steps >= 0, an optimizer or None."""
    check_int("n", n)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_optimizer(optimizer)


def uniform(shape, bound: float, generator) -> torch.Tensor:
    """U(-bound, bound) on the CPU from ``generator`` (None = the global RNG)."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def normal(shape, std: float, generator) -> torch.Tensor:
    """N(0, std^2) on the CPU from ``generator`` (None = the global RNG)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def new_subkeys(layer, rows: int, init: str, q1_THd: torch.Tensor | None, usage, generator) -> torch.Tensor:
    """Initial sub-keys [H, rows, key_dim/2] for new rows of a PEER's first codebook.

    random  N(0, 2/key_dim), as ProductKeys.reset_parameters.
    copy    the keys of each head's most-used rows (by ``usage``; cycled when rows exceed n1) plus
            1% relative noise: the copy ties with its original and splits its traffic (noise
            breaks the symmetry). Without usage, or with all-zero usage: random.
    kmeans  k-means centres of the first-half queries q1 of ``inputs`` per head, rescaled to the
            mean norm of the head's existing sub-keys, so the new rows point where the current
            domain's queries are and score on the old keys' scale.
    """
    keys1 = layer.codebooks.keys1.detach()
    H, n1, d = keys1.shape
    std = 1.0 / math.sqrt(d)
    if init == "copy" and usage is not None:
        counts_xN = usage_counts(usage, layer.num_experts)
        if counts_xN.shape[0] not in (1, H):
            counts_xN = counts_xN.sum(0, keepdim=True)
        rows_xR = counts_xN.view(-1, n1, layer.grid[1]).sum(-1)  # usage per first-codebook row
        if bool((rows_xR.sum(-1) > 0).all()):
            order_xR = rows_xR.argsort(dim=-1, descending=True, stable=True)
            pick_HR = order_xR[:, torch.arange(rows) % n1].expand(H, rows)
            base_HRd = keys1.to("cpu", torch.float64).gather(1, pick_HR.unsqueeze(-1).expand(H, rows, d))
            rms_HR1 = base_HRd.pow(2).mean(-1, keepdim=True).sqrt()
            return base_HRd + 0.01 * rms_HR1 * normal((H, rows, d), 1.0, generator)
    if init == "kmeans":
        centres_HRd = kmeans(q1_THd.transpose(0, 1), rows, generator=generator).to(torch.float64)
        scale_H11 = keys1.to("cpu", torch.float64).norm(dim=-1).mean(-1).view(H, 1, 1)
        return centres_HRd / centres_HRd.norm(dim=-1, keepdim=True).clamp(min=1e-12) * scale_H11
    return normal((H, rows, d), std, generator)
