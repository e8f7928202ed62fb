"""Product keys: sub-key codebooks and exact top-k retrieval over their Cartesian product.

Lample et al. 2019 ("Large Memory Layers with Product Keys"), as used by PEER (He 2024, arXiv
2407.04153, section 2): key (i, j) = [c_i, c'_j] scores q1 . c_i + q2 . c'_j, so the exact top-k
is the top-k of the k*k sums of each half's top-k (proof: docs/peer.md, 'Product-key
retrieval'). Expert ids are flat, id = i * n2 + j, and append-only under row growth; the first
codebook's additive ``offset1`` lets new rows enter dormant (docs/growth.md, 'Warm-in').

Shape suffixes (torchtitan style): T tokens (any leading dims), H heads, K top_k, N experts,
D key dimension, P candidate pairs.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .checks import check_int, check_key_dim
from .growth import KNOTS, advance_warmup_, cached_stat, linear_knots, schedule_offsets
from .surgery import append_rows_, resize_rows_


def check_top_k(top_k: int, n1: int, n2: int) -> None:
    """top_k must satisfy 1 <= top_k <= min(n1, n2): each half retrieves top_k of its codebook."""
    check_int("top_k", top_k)
    if top_k > min(n1, n2):
        raise ValueError(f"top_k={top_k} exceeds the codebook side: the grid is {n1} x {n2} and "
                         f"product-key retrieval takes top_k of each codebook, so top_k <= {min(n1, n2)}")


def topk_last(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1), values in descending order and differentiable as torch's.

    On the CPU, float32 is selected through an order-preserving int32 view of its bits (sign bit
    clear: as is; set: the other 31 bits flipped): torch's float comparator checks for NaN on every
    comparison and takes about twice as long. The values and their order are the same; -0.0 ranks
    just below +0.0 (a tie either way); NaN scores are not supported on any path.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.topk(k, dim=-1)
    bits = x.detach().contiguous().view(torch.int32)
    idx = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).topk(k, dim=-1).indices
    return x.gather(-1, idx), idx


@functools.cache
def _candidate_groups(k: int) -> tuple[tuple[int, int, int], ...]:
    """The rank pairs (a, b) that can reach a top-k, (a + 1) * (b + 1) <= k, as runs of first ranks
    a in [lo, hi) that share the second ranks b < m: ((lo, hi, m), ...), in (a, b) order.

    With both halves sorted descending, pair (a, b) scores at most each of the (a + 1) * (b + 1)
    pairs (a' <= a, b' <= b); when that is more than k, at least k other pairs score as much, so it
    is never needed. About k * ln k pairs remain (50 of 256 for k = 16); the top-k is the same.
    """
    groups: list[tuple[int, int, int]] = []
    for a in range(k):
        m = k // (a + 1)
        if groups and groups[-1][2] == m:
            groups[-1] = (groups[-1][0], a + 1, m)
        else:
            groups.append((a, a + 1, m))
    return tuple(groups)


@functools.cache
def _candidate_ranks(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [P], b [P]) on the CPU: the ranks of each candidate that _candidates forms, in its order."""
    pairs = [(a, b) for lo, hi, m in _candidate_groups(k) for a in range(lo, hi) for b in range(m)]
    return torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])


def _candidates(top1_THK: torch.Tensor, top2_THK: torch.Tensor) -> torch.Tensor:
    """[..., P]: top1[a] + top2[b] for the pairs of _candidate_groups, built from slices (a gather
    along the last dim costs more than the k * k sums it saves)."""
    k = top1_THK.shape[-1]
    parts = [(top1_THK[..., lo:hi, None] + top2_THK[..., None, :m]).flatten(-2) for lo, hi, m in _candidate_groups(k)]
    return torch.cat(parts, dim=-1)


def product_topk(scores1_THa: torch.Tensor, scores2_THb: torch.Tensor, k: int):
    """Exact top-k of scores1[..., i] + scores2[..., j] over all n1 * n2 pairs (i, j).

    scores1 [..., n1], scores2 [..., n2] (same leading shape) -> (scores [..., k] in descending
    order, flat ids [..., k] int64 with id = i * n2 + j). Gradients flow to both inputs through
    the returned scores; the ids are piecewise constant. Of the k * k candidate sums of the two
    halves' top-k only the pairs that can reach the top-k are formed (_candidate_groups).
    """
    if scores1_THa.shape[:-1] != scores2_THb.shape[:-1]:
        raise ValueError(f"scores1 and scores2 must share leading dims, got {tuple(scores1_THa.shape)} "
                         f"and {tuple(scores2_THb.shape)}")
    n1, n2 = scores1_THa.shape[-1], scores2_THb.shape[-1]
    check_top_k(k, n1, n2)
    top1_THK, idx1_THK = topk_last(scores1_THa, k)  # sorted descending
    top2_THK, idx2_THK = topk_last(scores2_THb, k)
    a_P, b_P = (r.to(top1_THK.device) for r in _candidate_ranks(k))
    scores_THK, c_THK = topk_last(_candidates(top1_THK, top2_THK), k)
    c_S = c_THK.reshape(-1)  # index_select: several times faster than advanced indexing on the CPU
    i_THK = idx1_THK.gather(-1, a_P.index_select(0, c_S).view_as(c_THK))
    j_THK = idx2_THK.gather(-1, b_P.index_select(0, c_S).view_as(c_THK))
    return scores_THK, i_THK * n2 + j_THK


def product_scores(scores1_THa: torch.Tensor, scores2_THb: torch.Tensor) -> torch.Tensor:
    """All n1 * n2 product-key scores [..., n1 * n2], entry i * n2 + j = scores1[i] + scores2[j].

    Reference path for small grids: it materialises every score, which PEER's forward never does.
    """
    return (scores1_THa.unsqueeze(-1) + scores2_THb.unsqueeze(-2)).flatten(-2)


def split_ids(ids: torch.Tensor, n2: int):
    """Flat ids -> (row i in the first codebook, column j in the second)."""
    return torch.div(ids, n2, rounding_mode="floor"), ids % n2


class ProductKeys(nn.Module):
    """Per-head sub-key codebooks: keys1 [H, n1, D/2], keys2 [H, n2, D/2], offset1 buffer [H, n1].

    Every head has its own two codebooks over the one shared expert pool (PEER section 2,
    multi-head retrieval); sub-keys start N(0, 1/(D/2)) (docs/peer.md, 'Initialisation').
    Growth state per first-codebook row, in buffers so checkpoints carry it: warmup_left /
    warmup_total [n1] (warm-in steps to go / in all; 0 = live), warmup_knots [H, n1, KNOTS] (the
    row's offset schedule after step 0), generation [n1] (0 = original, g = added by the g-th
    growth). append_rows() grows the codebook, advance_warmup() anneals offset1 (docs/growth.md).
    """

    def __init__(self, heads: int, n1: int, n2: int, key_dim: int):
        super().__init__()
        check_int("heads", heads)
        check_int("n1", n1)
        check_int("n2", n2)
        check_key_dim(key_dim)
        self.heads, self.key_dim = heads, key_dim
        half = key_dim // 2
        self.keys1 = nn.Parameter(torch.empty(heads, n1, half))
        self.keys2 = nn.Parameter(torch.empty(heads, n2, half))
        # additive score of each first-codebook sub-key; 0 = active. Persistent: it is model state.
        self.register_buffer("offset1", torch.zeros(heads, n1))
        self.register_buffer("warmup_left", torch.zeros(n1, dtype=torch.int64))
        self.register_buffer("warmup_total", torch.zeros(n1, dtype=torch.int64))
        self.register_buffer("warmup_knots", torch.zeros(heads, n1, KNOTS))
        self.register_buffer("generation", torch.zeros(n1, dtype=torch.int64))
        # first-codebook rows that do not learn (experts.freeze of whole grid rows; trainable scopes)
        self.register_buffer("frozen_rows", torch.zeros(n1, dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.key_dim // 2)
        nn.init.normal_(self.keys1, std=std)
        nn.init.normal_(self.keys2, std=std)

    @property
    def grid(self) -> tuple[int, int]:
        return self.keys1.shape[1], self.keys2.shape[1]

    def live_keys1(self) -> torch.Tensor:
        """keys1 as retrieval uses it: frozen rows detached, so they get no gradient on any path."""
        if not self.has_frozen_rows():
            return self.keys1
        return torch.where(self.frozen_rows[None, :, None], self.keys1.detach(), self.keys1)

    def has_frozen_rows(self) -> bool:
        """Whether any first-codebook row is frozen (cached: no device sync per forward)."""
        return cached_stat(self.frozen_rows, "any")

    def set_frozen_rows(self, mask: torch.Tensor | None) -> None:
        """Freeze the first-codebook rows where ``mask`` [n1] is true (None: none); the optimizer guard
        of experts.attach keeps them and their optimizer state bit-identical."""
        with torch.no_grad():
            self.frozen_rows.copy_(torch.zeros_like(self.frozen_rows) if mask is None else mask.to(self.frozen_rows))

    def half_scores(self, q_THD: torch.Tensor):
        """Queries [..., H, D] -> (s1 [..., H, n1] incl. offset1, s2 [..., H, n2])."""
        half = self.key_dim // 2
        q1_THd, q2_THd = q_THD[..., :half], q_THD[..., half:]
        s1_THa = torch.einsum("...hd,hnd->...hn", q1_THd, self.live_keys1())
        s2_THb = torch.einsum("...hd,hnd->...hn", q2_THd, self.keys2)
        return s1_THa + self.offset1.to(s1_THa.dtype), s2_THb

    def topk(self, q_THD: torch.Tensor, k: int):
        """(scores [..., H, k], flat ids [..., H, k]) of each head's exact top-k product keys."""
        return product_topk(*self.half_scores(q_THD), k)

    def all_scores(self, q_THD: torch.Tensor) -> torch.Tensor:
        """Every product key's score [..., H, n1 * n2] (reference path, small grids only)."""
        return product_scores(*self.half_scores(q_THD))

    # ---- growth -------------------------------------------------------------------------------
    def append_rows(self, keys_HRd: torch.Tensor, warmup_steps: int, knots_HK: torch.Tensor,
                    optimizers=()) -> None:
        """Append R sub-keys [H, R, D/2] to every head's first codebook as one new generation.

        The new rows' offset starts at -inf (0 if warmup_steps == 0), then follows each head's
        schedule ``knots_HK`` [H, KNOTS] (growth.schedule_offsets); the optimizers' keys1 state is
        extended (surgery.append_rows_).
        """
        check_int("warmup_steps", warmup_steps, minimum=0)
        H, R = keys_HRd.shape[:2]
        if H != self.heads or knots_HK.shape != (H, KNOTS):
            raise ValueError(f"expected keys [heads={self.heads}, R, {self.key_dim // 2}] and a schedule "
                             f"[{self.heads}, {KNOTS}], got {tuple(keys_HRd.shape)} and {tuple(knots_HK.shape)}")
        append_rows_(self.keys1, keys_HRd, dim=1, optimizers=optimizers)
        steps_R = self.warmup_left.new_full((R,), warmup_steps)
        knots_HRK = knots_HK.to(self.warmup_knots).unsqueeze(1).expand(H, R, KNOTS)
        self.warmup_left = torch.cat([self.warmup_left, steps_R])
        self.warmup_total = torch.cat([self.warmup_total, steps_R])
        self.warmup_knots = torch.cat([self.warmup_knots, knots_HRK], dim=1)
        self.offset1 = torch.cat([self.offset1, schedule_offsets(steps_R, steps_R, knots_HRK).to(self.offset1)], dim=1)
        newest = int(self.generation.max()) + 1
        self.generation = torch.cat([self.generation, self.generation.new_full((R,), newest)])
        self.frozen_rows = torch.cat([self.frozen_rows, self.frozen_rows.new_zeros(R)])

    def warming_up(self) -> bool:
        """Whether any row still has warm-in steps to go (cached: no device sync per call)."""
        return cached_stat(self.warmup_left, "any_positive")

    def advance_warmup(self, steps: int = 1) -> None:
        """Anneal the warming rows' offset1 by ``steps`` optimizer steps (growth.schedule_offsets)."""
        check_int("steps", steps)
        if self.warming_up():
            with torch.no_grad():
                advance_warmup_(self.offset1, self.warmup_left, self.warmup_total, self.warmup_knots, steps,
                                schedule_offsets)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of a grown codebook (more first-codebook rows) resizes this one to match
        before the values are copied in."""
        saved = state_dict.get(prefix + "keys1")
        if torch.is_tensor(saved) and saved.dim() == 3 and saved.shape[1] > self.keys1.shape[1]:
            n1 = saved.shape[1]
            resize_rows_(self, "keys1", n1, dim=1)
            for name, dim in (("offset1", 1), ("warmup_knots", 1), ("warmup_left", 0),
                              ("warmup_total", 0), ("generation", 0), ("frozen_rows", 0)):
                resize_rows_(self, name, n1, dim=dim)
        if prefix + "frozen_rows" not in state_dict:  # checkpoints of earlier versions: none frozen
            state_dict[prefix + "frozen_rows"] = torch.zeros(self.keys1.shape[1], dtype=torch.bool)
        margin = state_dict.pop(prefix + "warmup_margin", None)  # checkpoints of earlier versions
        if margin is not None and prefix + "warmup_knots" not in state_dict:
            state_dict[prefix + "warmup_knots"] = linear_knots(margin)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        n1, n2 = self.grid
        return f"heads={self.heads}, grid={n1}x{n2}, key_dim={self.key_dim}"
