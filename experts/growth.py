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

INITS = ("random", "copy", "kmeans", "contrast")
WARMINS = ("calibrated", "bound")
KNOTS = 9  # points of a warm-in schedule: the offset at progress p = t / W = 0, 1/8, ..., 1


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


def advance_warmup_(offset: torch.Tensor, left: torch.Tensor, total: torch.Tensor, schedule: torch.Tensor,
                    steps: int, offsets=warmup_offsets) -> None:
    """Take ``steps`` warm-in steps: decrement ``left`` (>= 0) and rewrite the offsets of the rows
    that were warming up as ``offsets(left, total, schedule)`` (a margin for `warmup_offsets`, knots
    for `schedule_offsets`). Rows that were not (left == 0) keep whatever offset they have."""
    check_int("steps", steps)
    active = left > 0
    left.sub_(steps).clamp_(min=0)
    offset.copy_(torch.where(active, offsets(left, total, schedule), offset))


def schedule_offsets(left: torch.Tensor, total: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Dormant score offsets [H, R] of rows following warm-in schedules ``knots`` [H, R, KNOTS] (the
    offset at p = t / W = 0, 1/8, ..., 1, interpolated linearly): -inf while no step was taken
    (left == total > 0), then the schedule at p = 1 - left / total, 0 once left == 0."""
    K = knots.shape[-1]
    p = 1.0 - left.to(knots.dtype) / total.clamp(min=1).to(knots.dtype)
    pos = (p.clamp(0.0, 1.0) * (K - 1)).expand(knots.shape[:-1])
    lo = pos.floor().clamp(max=K - 2).long()
    frac = pos - lo.to(pos.dtype)
    at = lambda i: knots.gather(-1, i.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    offset = at(lo) + (at(lo + 1) - at(lo)) * frac
    offset = torch.where(left > 0, offset, torch.zeros_like(offset))
    return torch.where((left == total) & (total > 0), torch.full_like(offset, -math.inf), offset)


def linear_knots(margin: torch.Tensor) -> torch.Tensor:
    """The schedule [..., KNOTS] from -margin after the first step to 0, linear in the steps."""
    return -margin.unsqueeze(-1) * (1.0 - torch.linspace(0.0, 1.0, KNOTS, dtype=margin.dtype))


def calibrated_knots(gaps_TH: torch.Tensor) -> torch.Tensor:
    """Warm-in schedules [H, KNOTS] from score gaps [T, H]: gap = the k-th best old product-key score
    of a recent query minus the best score of the new rows (before any offset), so a new expert
    enters that query's top-k once the offset exceeds its gap. The offset at p is the p * E0 quantile
    of the gaps (E0 = share of gaps < 0, what new experts would reach at offset 0), capped at 0: the
    share of recent queries new experts reach then grows linearly over the warm-in (docs/growth.md)."""
    gaps_HT = gaps_TH.to(torch.float64).T
    reach_H1 = (gaps_HT < 0).to(torch.float64).mean(-1, keepdim=True)
    levels_HK = reach_H1 * torch.linspace(0.0, 1.0, KNOTS, dtype=torch.float64)
    knots_HK = torch.stack([torch.quantile(g, lv) for g, lv in zip(gaps_HT, levels_HK)]).clamp(max=0.0)
    knots_HK[:, -1] = 0.0
    return knots_HK


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


def new_subkeys(layer, rows: int, init: str, q1_THd: torch.Tensor | None, usage, generator,
                old_q1_UHd: torch.Tensor | None = None) -> torch.Tensor:
    """Initial sub-keys [H, rows, key_dim/2] for new rows of a PEER's first codebook.

    random  N(0, 2/key_dim), as ProductKeys.reset_parameters.
    copy    the keys of each head's most-used rows (by ``usage``; cycled when rows exceed n1) plus
            1% relative noise: the copy ties with its original and splits its traffic (noise
            breaks the symmetry). Without usage, or with all-zero usage: random.
    kmeans  k-means centres of the first-half queries q1 of ``inputs`` per head, rescaled to the
            mean norm of the head's existing sub-keys, so the new rows point where the current
            domain's queries are and score on the old keys' scale.
    contrast  kmeans, then each key moved (`contrast_keys`) so that its cluster's queries reach it
            and the earlier domains' queries (``old_q1_UHd``) do not; kmeans without them.
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
    if init in ("kmeans", "contrast"):
        centres_HRd = kmeans(q1_THd.transpose(0, 1), rows, generator=generator).to(torch.float64)
        scale_H11 = keys1.to("cpu", torch.float64).norm(dim=-1).mean(-1).view(H, 1, 1)
        keys_HRd = centres_HRd / centres_HRd.norm(dim=-1, keepdim=True).clamp(min=1e-12) * scale_H11
        if init == "contrast" and old_q1_UHd is not None and len(old_q1_UHd):
            old_keys_Hnd = keys1.to("cpu", torch.float64)
            offset_Hn = layer.codebooks.offset1.detach().to("cpu", torch.float64)
            keys_HRd = contrast_keys(keys_HRd, q1_THd, old_q1_UHd, old_keys_Hnd, offset_Hn, layer.top_k)
        return keys_HRd
    return normal((H, rows, d), std, generator)


def contrast_keys(keys_HRd: torch.Tensor, new_q_THd: torch.Tensor, old_q_UHd: torch.Tensor, old_keys_Hnd: torch.Tensor,
                  offset_Hn: torch.Tensor, k: int, steps: int = 200, lr: float = 0.05,
                  old_weight: float = 4.0) -> torch.Tensor:
    """New first-codebook sub-keys [H, R, d] moved (norms kept) so that the new domain's queries reach
    them and the earlier domains' do not. A row is reachable for a query whose first-half score on it
    beats that query's k-th best old first-half score; each key maximises (sigmoid-smoothed) the share
    of its k-means cluster's new queries that reach it minus ``old_weight`` x the share of old-domain
    queries that do, by projected gradient ascent (Adam) from its k-means centre."""
    new_q, old_q = new_q_THd.to(torch.float64).transpose(0, 1), old_q_UHd.to(torch.float64).transpose(0, 1)
    kth = lambda q: (torch.einsum("htd,hnd->htn", q, old_keys_Hnd) + offset_Hn[:, None]).topk(  # noqa: E731
        min(k, old_keys_Hnd.shape[1]), dim=-1).values[..., -1]
    bar_new_HT, bar_old_HU = kth(new_q), kth(old_q)
    cluster_HT = torch.einsum("htd,hrd->htr", new_q, keys_HRd).argmax(-1)  # each new query's nearest new key
    member_HRT = (cluster_HT.unsqueeze(1) == torch.arange(keys_HRd.shape[1]).view(1, -1, 1)).to(torch.float64)
    norm_HR1 = keys_HRd.norm(dim=-1, keepdim=True)
    temp = float(bar_new_HT.std().clamp(min=1e-3)) * 0.25  # smoothing on the scale of the score spread
    with torch.enable_grad():  # growth runs under no_grad
        return _ascend(keys_HRd, new_q, old_q, bar_new_HT, bar_old_HU, member_HRT, norm_HR1, temp, steps, lr,
                       old_weight)


def _ascend(keys_HRd, new_q, old_q, bar_new_HT, bar_old_HU, member_HRT, norm_HR1, temp, steps, lr, old_weight):
    keys = keys_HRd.clone().requires_grad_(True)
    opt = torch.optim.Adam([keys], lr=lr * float(norm_HR1.mean()))
    for _ in range(steps):
        reach_new_HRT = torch.sigmoid((torch.einsum("htd,hrd->hrt", new_q, keys) - bar_new_HT.unsqueeze(1)) / temp)
        reach_old_HRU = torch.sigmoid((torch.einsum("hud,hrd->hru", old_q, keys) - bar_old_HU.unsqueeze(1)) / temp)
        gain = (reach_new_HRT * member_HRT).sum(-1) / member_HRT.sum(-1).clamp(min=1) - old_weight * reach_old_HRU.mean(-1)
        opt.zero_grad()
        (-gain.sum()).backward()
        opt.step()
        with torch.no_grad():
            keys.mul_(norm_HR1 / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12))
    return keys.detach()
