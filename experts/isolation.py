"""A routing loss that keeps a grown PEER's new experts for the domain they were added for.

Placement alone does not isolate: once training starts, the language-model gradient moves new
sub-keys wherever they lower the loss, and earlier domains' queries follow them in. This loss keeps
the separation during training. PEER grows by first-codebook rows, and a token's top-k product keys
(He 2024, eq. 3) combine its first-half scores s1 over rows with its second-half scores s2 over
columns, so both conditions are about rows:

- attraction, on queries of the domain being learned (``new_inputs``): the best newest row should
  beat the best older row by ``margin`` (then the top-k starts with the newest row's experts);
- repulsion, on queries of earlier domains (``old_inputs``): no row added after the domain was
  learned may enter its top-k, i.e. best later s1 + best s2 stays ``margin`` below the k-th best
  product score among the rows it knew. ``old_generations`` gives, per old token, the newest
  generation its domain was learned with (rows of later generations are "later" for it).

    loss = mean softplus(margin - gap_new) + mean softplus(best_later_old + margin - kth_known_old)

Of the keys, only first-codebook sub-keys receive gradient, and only on the side that should move:
the newest rows (attraction) and the later rows (repulsion); second-codebook keys and the rows an old
domain knew are held. Queries are held too unless ``learn_queries``: keys alone cannot separate
domains whose queries overlap, and a query network that learns from the loss can pull them apart
(at the price of moving old domains' routing, which other protections such as distillation must
then keep in check).

Shape suffixes: T tokens, H heads, n first-codebook rows, b second-codebook rows, k top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_inputs
from .product_keys import product_topk


def _queries(layer, inputs: torch.Tensor, learn: bool) -> torch.Tensor:
    """Queries [T, H, key_dim] with the query norm in eval mode (no running-statistics update);
    with gradient to the query network when ``learn``."""
    if not learn:
        return layer._probe_queries(inputs).detach()
    was_training = layer.norm.training
    layer.norm.eval()
    try:
        return layer._queries(layer._flatten(inputs.to(layer.query.weight.dtype)))
    finally:
        layer.norm.train(was_training)


def _half_scores(layer, q_THD: torch.Tensor, keys1_Hnd: torch.Tensor):
    """(s1 [T, H, n] of the queries' first halves against ``keys1_Hnd``, s2 [T, H, b] against the
    second-codebook keys, detached); warm-in offsets are left out: the loss aims at the routing
    after the warm-in."""
    half = keys1_Hnd.shape[-1]
    q1_THd, q2_THd = q_THD[..., :half].to(keys1_Hnd.dtype), q_THD[..., half:].to(keys1_Hnd.dtype)
    s1_THn = torch.einsum("thd,hnd->thn", q1_THd, keys1_Hnd)
    s2_THb = torch.einsum("thd,hbd->thb", q2_THd, layer.codebooks.keys2.detach().to(keys1_Hnd.dtype))
    return s1_THn, s2_THb


def row_contrast_loss(layer, new_inputs: torch.Tensor, old_inputs: torch.Tensor | None = None,
                      old_generations: torch.Tensor | None = None, margin: float = 1.0,
                      learn_queries: bool = False) -> torch.Tensor:
    """The routing contrast loss of a grown PEER (module docstring); 0 before its first growth.

    new_inputs: layer inputs [..., dim] of the domain being learned; old_inputs: [..., dim] of
    earlier domains, or None (attraction only); old_generations: [tokens] (or one int for all) the
    newest generation each old token's domain was learned with, default: every row but the newest
    is known to it. learn_queries: the query network (and query norm affine) gets gradient too, so
    that it can pull the domains' queries apart where keys alone cannot separate them."""
    check_inputs(new_inputs)
    cb = layer.codebooks
    generation_n = cb.generation
    keys1 = cb.live_keys1()  # frozen rows detached
    newest = int(generation_n.max())
    if newest == 0:
        return keys1.sum() * 0.0
    low = torch.finfo(keys1.dtype).min

    newest_n = generation_n == newest
    q_THD = _queries(layer, new_inputs, learn_queries)
    s1_THn, _ = _half_scores(layer, q_THD, torch.where(newest_n[None, :, None], keys1, keys1.detach()))
    gap_TH = s1_THn.masked_fill(~newest_n, low).amax(-1) - s1_THn.masked_fill(newest_n, low).amax(-1)
    loss = F.softplus(margin - gap_TH).mean()
    if old_inputs is None or not old_inputs.numel():
        return loss

    check_inputs(old_inputs)
    q_THD = _queries(layer, old_inputs, learn_queries)
    s1_THn, s2_THb = _half_scores(layer, q_THD, keys1)  # the later rows move
    held_s1_THn, _ = _half_scores(layer, q_THD, keys1.detach())  # the known rows do not
    known = torch.as_tensor(newest - 1 if old_generations is None else old_generations, device=generation_n.device)
    later_Tn = generation_n.view(1, -1) > known.reshape(-1, 1)  # [T or 1, n]
    later_T1n = later_Tn.unsqueeze(1)
    best_later_TH = s1_THn.masked_fill(~later_T1n, low).amax(-1) + s2_THb.amax(-1)
    kth_TH = product_topk(held_s1_THn.masked_fill(later_T1n, float("-inf")), s2_THb, layer.top_k)[0][..., -1]
    has_later_T1 = later_Tn.any(-1, keepdim=True)  # tokens whose domain already knew every row: no term
    repel_TH = F.softplus(best_later_TH + margin - kth_TH) * has_later_T1
    return loss + repel_TH.sum() / has_later_T1.expand_as(repel_TH).sum().clamp(min=1)
