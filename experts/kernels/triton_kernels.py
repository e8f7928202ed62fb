"""Triton kernels for PEER: fused sub-key scoring + top-k, candidate top-k, a fused gather-dot /
weighted gather-sum expert forward, and a backward that sums each expert row's gradient from the
slots that used it (no atomics, no [T, M, D] tensor). Imported lazily (experts.kernels), so
`import experts` works without triton; on the CPU they run only under the Triton interpreter
(TRITON_INTERPRET=1 set before import). Design, tie order, numerics, interpreter caveat and
limits: docs/kernels.md, 'The Triton path'.

Shape suffixes: T tokens, H heads, K top_k, M = H*K slots, N experts, D dim, d = key_dim / 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

# globals read inside @triton.jit functions must be constexpr
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ---- top-k selection helpers ---------------------------------------------------------------------
# (score, index) pairs packed into int64s ordered by (score, then smaller index): docs/kernels.md
_EMPTY = tl.constexpr(-(2**63))  # below every packed key, -inf scores included: padding


@triton.jit
def _pack(score, index):
    score = score + 0.0  # -0.0 -> +0.0: both zeros tie, as in torch
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))


@triton.jit
def _unpack(packed):
    ordered = (packed >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (packed & 0xFFFFFFFF)


@triton.jit
def _subkey_topk_kernel(q_ptr, keys_ptr, off_ptr, val_ptr, idx_ptr,
                        T, n, d, stride_qt, stride_qh,
                        K: tl.constexpr, HAS_OFFSET: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                        UPCAST: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-K of s[t, i] = q[t, h] . keys[h, i] (+ offset[h, i]) per token, for one head and BLOCK_T
    tokens. Scores are computed BLOCK_N sub-keys at a time; each tile's top-BLOCK_K is merged into a
    running top-BLOCK_K kept in registers: the scores never go to global memory."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t_T = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d_D = tl.arange(0, BLOCK_D)
    k_K = tl.arange(0, BLOCK_K)
    q_TD = tl.load(q_ptr + t_T[:, None] * stride_qt + h * stride_qh + d_D[None, :],
                   mask=(t_T[:, None] < T) & (d_D[None, :] < d), other=0.0)
    if UPCAST:
        q_TD = q_TD.to(tl.float32)
    best_TK = tl.full((BLOCK_T, BLOCK_K), _EMPTY, tl.int64)
    for n0 in range(0, n, BLOCK_N):
        i_N = n0 + tl.arange(0, BLOCK_N)
        keys_ND = tl.load(keys_ptr + h * n * d + i_N[:, None] * d + d_D[None, :],
                          mask=(i_N[:, None] < n) & (d_D[None, :] < d), other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot multiplies bit patterns (triton#11584)
            keys_ND = keys_ND.to(tl.float32)
        if USE_DOT:
            if IEEE:
                s_TN = tl.dot(q_TD, tl.trans(keys_ND), input_precision="ieee")
            else:
                s_TN = tl.dot(q_TD, tl.trans(keys_ND))
        else:
            s_TN = tl.sum(q_TD.to(tl.float32)[:, None, :] * keys_ND.to(tl.float32)[None, :, :], axis=2)
        if HAS_OFFSET:
            s_TN += tl.load(off_ptr + h * n + i_N, mask=i_N < n, other=0.0).to(tl.float32)[None, :]
        packed_TN = tl.where(i_N[None, :] < n, _pack(s_TN, i_N[None, :]), _EMPTY)
        tile_TK = tl.topk(packed_TN, BLOCK_K)
        best_TK = tl.topk(tl.reshape(tl.join(best_TK, tile_TK), (BLOCK_T, 2 * BLOCK_K)), BLOCK_K)
    vals_TK, idx_TK = _unpack(best_TK)
    out = (t_T[:, None] * tl.num_programs(1) + h) * K + k_K[None, :]
    mask = (t_T[:, None] < T) & (k_K[None, :] < K)
    tl.store(val_ptr + out, vals_TK, mask=mask)
    tl.store(idx_ptr + out, idx_TK.to(tl.int32), mask=mask)


@triton.jit
def _candidate_topk_kernel(v1_ptr, i1_ptr, v2_ptr, i2_ptr, score_ptr, id_ptr, R, n2,
                           K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-K of the K*K sums v1[r, a] + v2[r, b] per row r (= token, head), ties broken by the flat
    expert id i1[r, a] * n2 + i2[r, b]; writes the scores and the flat ids."""
    r_R = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_C = tl.arange(0, BLOCK_C)
    a_C, b_C = c_C // K, c_C % K
    live = (r_R[:, None] < R) & (c_C[None, :] < K * K)
    v = (tl.load(v1_ptr + r_R[:, None] * K + a_C[None, :], mask=live, other=0.0)
         + tl.load(v2_ptr + r_R[:, None] * K + b_C[None, :], mask=live, other=0.0))
    flat = (tl.load(i1_ptr + r_R[:, None] * K + a_C[None, :], mask=live, other=0).to(tl.int64) * n2
            + tl.load(i2_ptr + r_R[:, None] * K + b_C[None, :], mask=live, other=0))
    best = tl.topk(tl.where(live, _pack(v, flat), _EMPTY), BLOCK_K)
    scores, ids = _unpack(best)
    k_K = tl.arange(0, BLOCK_K)
    out = r_R[:, None] * K + k_K[None, :]
    mask = (r_R[:, None] < R) & (k_K[None, :] < K)
    tl.store(score_ptr + out, scores, mask=mask)
    tl.store(id_ptr + out, ids, mask=mask)


# ---- expert mixing ----------------------------------------------------------------------------------
@triton.jit
def _act(h, GELU: tl.constexpr):
    if GELU:  # exact (erf) GELU, as torch's default
        return 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    return tl.maximum(h, 0.0)


@triton.jit
def _act_grad(h, GELU: tl.constexpr):
    if GELU:  # d/dh [h Phi(h)] = Phi(h) + h phi(h)
        return 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2)) + h * _INV_SQRT_2PI * tl.exp(-0.5 * h * h)
    return tl.where(h > 0, 1.0, 0.0)


@triton.jit
def _gather_dot(table_ptr, vec_ptr, e_M, mask_M, t, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M] fp32: row e_m of a [N, D] table dotted with row t of a [T, D] vector array."""
    out_M = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        vec_D = tl.load(vec_ptr + t * D + d_D, mask=mask_D, other=0.0).to(tl.float32)
        row_MD = tl.load(table_ptr + e_M[:, None] * D + d_D[None, :], mask=mask_M[:, None] & mask_D[None, :],
                         other=0.0)
        out_M += tl.sum(row_MD.to(tl.float32) * vec_D[None, :], axis=1)
    return out_M


@triton.jit
def _mix_fwd_kernel(x_ptr, w_ptr, ids_ptr, u_ptr, v_ptr, h_ptr, y_ptr, M, D,
                    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token t: h_m = u_{e_m} . x_t (gather-dot), a_m = w_m act(h_m), y_t = sum_m a_m v_{e_m}
    (weighted gather-sum); fp32 accumulation, h stored in fp32 for the backward."""
    t = tl.program_id(0).to(tl.int64)
    m_M = tl.arange(0, BLOCK_M)
    mask_M = m_M < M
    e_M = tl.load(ids_ptr + t * M + m_M, mask=mask_M, other=0).to(tl.int64)
    h_M = _gather_dot(u_ptr, x_ptr, e_M, mask_M, t, D, BLOCK_M, BLOCK_D)
    w_M = tl.load(w_ptr + t * M + m_M, mask=mask_M, other=0.0).to(tl.float32)
    a_M = w_M * _act(h_M, GELU)
    tl.store(h_ptr + t * M + m_M, h_M, mask=mask_M)
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        mask_D = d_D < D
        v_MD = tl.load(v_ptr + e_M[:, None] * D + d_D[None, :], mask=mask_M[:, None] & mask_D[None, :], other=0.0)
        y_D = tl.sum(a_M[:, None] * v_MD.to(tl.float32), axis=0)
        tl.store(y_ptr + t * D + d_D, y_D.to(y_ptr.dtype.element_ty), mask=mask_D)


@triton.jit
def _mix_bwd_token_kernel(dy_ptr, w_ptr, ids_ptr, u_ptr, v_ptr, h_ptr, dx_ptr, dw_ptr, dh_ptr, a_ptr, M, D,
                          GELU: tl.constexpr, NEED_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token t: g_m = v_{e_m} . dy_t, dw_m = g_m act(h_m), dh_m = g_m w_m act'(h_m),
    a_m = w_m act(h_m) (for dV), dx_t = sum_m dh_m u_{e_m}."""
    t = tl.program_id(0).to(tl.int64)
    m_M = tl.arange(0, BLOCK_M)
    mask_M = m_M < M
    e_M = tl.load(ids_ptr + t * M + m_M, mask=mask_M, other=0).to(tl.int64)
    g_M = _gather_dot(v_ptr, dy_ptr, e_M, mask_M, t, D, BLOCK_M, BLOCK_D)
    h_M = tl.load(h_ptr + t * M + m_M, mask=mask_M, other=0.0)
    w_M = tl.load(w_ptr + t * M + m_M, mask=mask_M, other=0.0).to(tl.float32)
    act_M = _act(h_M, GELU)
    dh_M = g_M * w_M * _act_grad(h_M, GELU)
    tl.store(dw_ptr + t * M + m_M, g_M * act_M, mask=mask_M)
    tl.store(dh_ptr + t * M + m_M, dh_M, mask=mask_M)
    tl.store(a_ptr + t * M + m_M, w_M * act_M, mask=mask_M)
    if NEED_X:
        for d0 in range(0, D, BLOCK_D):
            d_D = d0 + tl.arange(0, BLOCK_D)
            mask_D = d_D < D
            u_MD = tl.load(u_ptr + e_M[:, None] * D + d_D[None, :], mask=mask_M[:, None] & mask_D[None, :],
                           other=0.0)
            dx_D = tl.sum(dh_M[:, None] * u_MD.to(tl.float32), axis=0)
            tl.store(dx_ptr + t * D + d_D, dx_D.to(dx_ptr.dtype.element_ty), mask=mask_D)


@triton.jit
def _expert_grad_kernel(sorted_ptr, order_ptr, end_ptr, frozen_ptr, x_ptr, dy_ptr, dh_ptr, a_ptr, du_ptr, dv_ptr,
                        M, D, HAS_FROZEN: tl.constexpr, NEED_U: tl.constexpr, NEED_V: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p over the slots sorted by expert id: if p starts expert e's run of slots
    [p, end[p]), sum dU_e = sum dh_s x_{t(s)} and dV_e = sum a_s dy_{t(s)} over them for one block of
    columns and write the rows once. Other programs (and frozen experts) do nothing."""
    p = tl.program_id(0)  # int32 slot positions and loop bounds (T*M < 2^31); rows use int64
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_D = d_D < D
    e = tl.load(sorted_ptr + p)
    prev = tl.load(sorted_ptr + tl.maximum(p - 1, 0))
    head = (p == 0) | (prev != e)
    if HAS_FROZEN:
        head = head & (tl.load(frozen_ptr + e) == 0)
    end = tl.where(head, tl.load(end_ptr + p).to(tl.int32), p)  # an empty loop unless p heads a live run
    acc_u = tl.zeros((BLOCK_D,), tl.float32)
    acc_v = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(p, end, BLOCK_S):
        s_S = s0 + tl.arange(0, BLOCK_S)
        mask_S = s_S < end
        slot_S = tl.load(order_ptr + s_S, mask=mask_S, other=0)
        t_S = slot_S // M
        mask_SD = mask_S[:, None] & mask_D[None, :]
        if NEED_U:
            c_S = tl.load(dh_ptr + slot_S, mask=mask_S, other=0.0)
            x_SD = tl.load(x_ptr + t_S[:, None] * D + d_D[None, :], mask=mask_SD, other=0.0).to(tl.float32)
            acc_u += tl.sum(c_S[:, None] * x_SD, axis=0)
        if NEED_V:
            c_S = tl.load(a_ptr + slot_S, mask=mask_S, other=0.0)
            dy_SD = tl.load(dy_ptr + t_S[:, None] * D + d_D[None, :], mask=mask_SD, other=0.0).to(tl.float32)
            acc_v += tl.sum(c_S[:, None] * dy_SD, axis=0)
    row = e.to(tl.int64) * D + d_D
    if NEED_U:
        tl.store(du_ptr + row, acc_u.to(du_ptr.dtype.element_ty), mask=mask_D & head)
    if NEED_V:
        tl.store(dv_ptr + row, acc_v.to(dv_ptr.dtype.element_ty), mask=mask_D & head)


# ---- launchers --------------------------------------------------------------------------------------
def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


# launch parameters live in *_meta functions: the compile check in tests compiles what is launched
def subkey_meta(d: int, n: int, k: int, dtype: torch.dtype, has_offset: bool) -> dict:
    use_dot = d >= 16  # tl.dot needs every block dim >= 16; tiny test shapes use a broadcast sum
    upcast = use_dot and dtype == torch.bfloat16 and triton.knobs.runtime.interpret
    block_k = _pow2(k)
    ieee = dtype == torch.float32 or upcast
    # fp32 IEEE tiles take ~4x bf16's registers: half the sub-keys per tile avoid spills (ptxas -v, sm_90)
    block_n = 64 if ieee and use_dot else 128
    return dict(K=k, HAS_OFFSET=has_offset, USE_DOT=use_dot, IEEE=ieee, UPCAST=upcast,
                BLOCK_T=16 if use_dot else 4, BLOCK_N=max(block_k, min(block_n, _pow2(n)), 16 if use_dot else 1),
                BLOCK_D=_pow2(d, 16 if use_dot else 1), BLOCK_K=block_k, num_warps=8 if ieee and use_dot else 4)


def candidate_meta(k: int) -> dict:
    return dict(K=k, BLOCK_R=4, BLOCK_C=_pow2(k * k), BLOCK_K=_pow2(k), num_warps=4)


def mix_meta(M: int, D: int, activation: str) -> dict:
    # 128 x 32 tiles of 64-bit addressed rows over 8 warps: 128 registers, no spills (ptxas -v, sm_90)
    return dict(GELU=activation == "gelu", BLOCK_M=_pow2(M), BLOCK_D=min(32, _pow2(D)), num_warps=8)


def expert_grad_meta(D: int, has_frozen: bool, need_u: bool, need_v: bool) -> dict:
    # one program per (slot, column block): wide column blocks keep the mostly idle grid small
    return dict(HAS_FROZEN=has_frozen, NEED_U=need_u, NEED_V=need_v, BLOCK_S=16, BLOCK_D=min(128, _pow2(D)),
                num_warps=4)


def subkey_topk(q_THd: torch.Tensor, keys_Hnd: torch.Tensor, offset_Hn: torch.Tensor | None, k: int):
    """(values [T, H, k] fp32 descending, sub-key indices [T, H, k] int32) of q . keys (+ offset).
    q_THd may be a strided view (a half of the query); its last dim must be contiguous."""
    T, H, d = q_THd.shape
    n = keys_Hnd.shape[1]
    if q_THd.dtype in (torch.bfloat16, torch.float16):  # every path scores and selects in fp32
        q_THd = q_THd.float()
    keys_Hnd = keys_Hnd.to(q_THd.dtype).contiguous()
    if q_THd.stride(-1) != 1:
        q_THd = q_THd.contiguous()
    meta = subkey_meta(d, n, k, q_THd.dtype, offset_Hn is not None)
    vals = torch.empty(T, H, k, dtype=torch.float32, device=q_THd.device)
    idx = torch.empty(T, H, k, dtype=torch.int32, device=q_THd.device)
    offset = offset_Hn.contiguous() if offset_Hn is not None else vals
    _subkey_topk_kernel[(triton.cdiv(T, meta["BLOCK_T"]), H)](
        q_THd, keys_Hnd, offset, vals, idx, T, n, d, q_THd.stride(0), q_THd.stride(1), **meta)
    return vals, idx


def candidate_topk(v1_THK, i1_THK, v2_THK, i2_THK, n1: int, n2: int):
    """(scores [T, H, K] fp32 descending, flat ids [T, H, K] int64) of the K*K candidate sums."""
    T, H, K = v1_THK.shape
    R = T * H
    if n1 * n2 > 2**32:
        raise ValueError(f"the Triton top-k packs expert ids into 32 bits: at most 2^32 experts, got {n1 * n2}")
    scores = torch.empty(T, H, K, dtype=torch.float32, device=v1_THK.device)
    ids = torch.empty(T, H, K, dtype=torch.int64, device=v1_THK.device)
    meta = candidate_meta(K)
    _candidate_topk_kernel[(triton.cdiv(R, meta["BLOCK_R"]),)](
        v1_THK, i1_THK, v2_THK, i2_THK, scores, ids, R, n2, **meta)
    return scores, ids


class TritonRetrieve(torch.autograd.Function):
    """(scores [T, H, K], flat ids [T, H, K]) of each head's exact top-K product keys; see docs/kernels.md for
    the tie order and the backward."""

    @staticmethod
    def forward(ctx, q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k):
        d = q_THD.shape[-1] // 2
        with torch.autocast(q_THD.device.type, enabled=False):
            v1, i1 = subkey_topk(q_THD[..., :d], keys1_Hnd, offset1_Hn, k)
            v2, i2 = subkey_topk(q_THD[..., d:], keys2_Hnd, None, k)
            scores, ids = candidate_topk(v1, i1, v2, i2, keys1_Hnd.shape[1], keys2_Hnd.shape[1])
        ctx.save_for_backward(q_THD, keys1_Hnd, keys2_Hnd, ids)
        ctx.n2 = keys2_Hnd.shape[1]
        ctx.mark_non_differentiable(ids)
        return scores.to(q_THD.dtype), ids

    @staticmethod
    def backward(ctx, g_THK, _g_ids):
        q_THD, keys1, keys2, ids = ctx.saved_tensors
        d = q_THD.shape[-1] // 2
        with torch.autocast(q_THD.device.type, enabled=False):
            g_THK = g_THK.float()
            # score(i, j) = s1[i] + s2[j]: a sub-key's gradient sums its row's / column's chosen experts
            grads = []
            for sub_THK, keys_Hnd, q_THd in ((torch.div(ids, ctx.n2, rounding_mode="floor"), keys1, q_THD[..., :d]),
                                             (ids % ctx.n2, keys2, q_THD[..., d:])):
                gs_THn = g_THK.new_zeros(q_THD.shape[:2] + keys_Hnd.shape[1:2]).scatter_add_(-1, sub_THK, g_THK)
                grads.append((torch.einsum("thn,hnd->thd", gs_THn, keys_Hnd.float()),
                              torch.einsum("thn,thd->hnd", gs_THn, q_THd.float()).to(keys_Hnd.dtype)))
            dq_THD = torch.cat([grads[0][0], grads[1][0]], dim=-1).to(q_THD.dtype)
        return dq_THD, grads[0][1], grads[1][1], None, None


class TritonMix(torch.autograd.Function):
    """y = sum_m w act(u . x) v over the retrieved experts; see docs/kernels.md."""

    @staticmethod
    def forward(ctx, x_TD, w_TM, ids_TM, u_ND, v_ND, frozen_N, activation):
        T, D = x_TD.shape
        M = ids_TM.shape[1]
        x_TD, w_TM, ids_TM = x_TD.contiguous(), w_TM.contiguous(), ids_TM.contiguous()
        h_TM = torch.empty(T, M, dtype=torch.float32, device=x_TD.device)
        y_TD = torch.empty(T, D, dtype=torch.promote_types(x_TD.dtype, u_ND.dtype), device=x_TD.device)
        ctx.meta = mix_meta(M, D, activation)
        if T:
            _mix_fwd_kernel[(T,)](x_TD, w_TM, ids_TM, u_ND.contiguous(), v_ND.contiguous(), h_TM, y_TD, M, D,
                                  **ctx.meta)
        ctx.save_for_backward(x_TD, w_TM, ids_TM, u_ND, v_ND, h_TM, frozen_N)
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_TD):
        x_TD, w_TM, ids_TM, u_ND, v_ND, h_TM, frozen_N = ctx.saved_tensors
        need_x, need_w, _, need_u, need_v = ctx.needs_input_grad[:5]
        T, D = x_TD.shape
        M = ids_TM.shape[1]
        dev = x_TD.device
        dy_TD = dy_TD.contiguous()
        dx_TD = torch.empty_like(x_TD) if need_x else None
        dw_TM = torch.empty(T, M, dtype=torch.float32, device=dev)
        dh_TM = torch.empty_like(dw_TM)
        a_TM = torch.empty_like(dw_TM)
        u_ND, v_ND = u_ND.contiguous(), v_ND.contiguous()
        if T:
            _mix_bwd_token_kernel[(T,)](dy_TD, w_TM, ids_TM, u_ND, v_ND, h_TM, dx_TD if need_x else dy_TD,
                                        dw_TM, dh_TM, a_TM, M, D, NEED_X=need_x, **ctx.meta)
        du_ND = torch.zeros_like(u_ND) if need_u else None
        dv_ND = torch.zeros_like(v_ND) if need_v else None
        S = T * M
        if (need_u or need_v) and S:
            # bucket the slots by expert: sorted ids, the slot order, and where each run ends
            sorted_S, order_S = ids_TM.reshape(-1).sort(stable=True)
            end_S = torch.searchsorted(sorted_S, sorted_S, right=True)
            frozen = frozen_N if frozen_N is not None else sorted_S
            meta = expert_grad_meta(D, frozen_N is not None, need_u, need_v)
            _expert_grad_kernel[(S, triton.cdiv(D, meta["BLOCK_D"]))](
                sorted_S, order_S, end_S, frozen, x_TD, dy_TD, dh_TM, a_TM,
                du_ND if need_u else dh_TM, dv_ND if need_v else dh_TM, M, D, **meta)
        return (dx_TD, dw_TM.to(w_TM.dtype) if need_w else None, None, du_ND, dv_ND, None, None)


def retrieve(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k: int):
    """Same contract as reference.retrieve (tie order: docs/kernels.md)."""
    if q_THD.shape[0] == 0:  # no tokens: nothing to launch
        return reference.retrieve(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k)
    return TritonRetrieve.apply(q_THD, keys1_Hnd, keys2_Hnd, offset1_Hn, k)


def mix(x_TD, w_TM, ids_TM, u_ND, v_ND, activation: str, frozen_N=None):
    """Same contract as reference.mix; output dtype promote_types(x, table)."""
    with torch.autocast(x_TD.device.type, enabled=False):
        return TritonMix.apply(x_TD, w_TM, ids_TM, u_ND, v_ND,
                               frozen_N.to(torch.uint8) if frozen_N is not None else None, activation)
