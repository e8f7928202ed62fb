"""The plain torch PEER implementation every kernel is checked and timed against.

einsum sub-key scores, torch.topk on each half and then on the candidate sums
(product_keys.product_topk), two F.embedding gathers of the retrieved experts' u and v, and einsum
mixing: PEER's equations as written (docs/kernels.md, 'The reference path'). It materialises the
gathered [T, M, D] tensors and, in backward, dense [N, D] gradients.

Shape suffixes: T tokens, H heads, K top_k, M = H*K slots, N experts, D dim, d = key_dim / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..product_keys import product_topk


def sub_key_scores(q_THD: torch.Tensor, keys1_Hnd: torch.Tensor, keys2_Hnd: torch.Tensor,
                   offset1_Hn: torch.Tensor):
    """Queries [T, H, 2d] -> (s1 [T, H, n1] incl. the first codebook's offset1, s2 [T, H, n2]).

    Scored in at least float32 whatever the autocast or storage dtype, as the Triton path does:
    in bf16 the near-ties that decide top-k slots round differently, so routes would depend on
    the path."""
    d = q_THD.shape[-1] // 2
    dtype = torch.promote_types(q_THD.dtype, torch.float32)
    with torch.autocast(q_THD.device.type, enabled=False):
        q_THD, keys1_Hnd, keys2_Hnd = q_THD.to(dtype), keys1_Hnd.to(dtype), keys2_Hnd.to(dtype)
        s1_THn = torch.einsum("thd,hnd->thn", q_THD[..., :d], keys1_Hnd)
        s2_THn = torch.einsum("thd,hnd->thn", q_THD[..., d:], keys2_Hnd)
        return s1_THn + offset1_Hn.to(s1_THn.dtype), s2_THn


def retrieve(q_THD: torch.Tensor, keys1_Hnd: torch.Tensor, keys2_Hnd: torch.Tensor, offset1_Hn: torch.Tensor,
             k: int):
    """(scores [T, H, K] descending, flat expert ids [T, H, K]) of each head's exact top-k product keys,
    scored and selected in at least float32, the scores returned in the queries' dtype (as Triton)."""
    scores_THK, ids_THK = product_topk(*sub_key_scores(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn), k)
    return scores_THK.to(q_THD.dtype), ids_THK


def mix(x_TD: torch.Tensor, w_TM: torch.Tensor, ids_TM: torch.Tensor, u_ND: torch.Tensor, v_ND: torch.Tensor,
        activation: str, frozen_N: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, D] = sum_m w[t, m] act(u_{ids[t,m]} . x_t) v_{ids[t,m]}, with two F.embedding gathers.

    frozen_N: bool [N] or None; frozen experts compute as usual but their rows get no gradient
    (the gathered rows are detached, so F.embedding's backward adds zeros there).
    """
    u_TMD, v_TMD = F.embedding(ids_TM, u_ND), F.embedding(ids_TM, v_ND)
    if frozen_N is not None:
        frozen_TM1 = frozen_N[ids_TM].unsqueeze(-1)
        u_TMD = torch.where(frozen_TM1, u_TMD.detach(), u_TMD)
        v_TMD = torch.where(frozen_TM1, v_TMD.detach(), v_TMD)
    h_TM = torch.einsum("tmd,td->tm", u_TMD, x_TD.to(u_TMD.dtype))
    act = F.gelu if activation == "gelu" else F.relu
    a_TM = act(h_TM) * w_TM
    return torch.einsum("tm,tmd->td", a_TM.to(v_TMD.dtype), v_TMD)
