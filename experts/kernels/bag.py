"""Expert mixing with fused embedding-bag operators: the fast CPU path (runs on any device).

y_t = sum_m w_tm act(u_{e_tm} . x_t) v_{e_tm} (He 2024, section 2, eq. (1) with singleton-MLP
experts) and its backward as four sparse-times-dense products, done by torch's embedding-bag
kernels (and, for the expert rows' gradients on the CPU, a CSR matrix product) without the gathered
[T, M, D] tensors; two are private aten operators.
bf16 / fp16 tables are computed in float32. Derivation and numerics: docs/kernels.md, 'The bag
path'.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_SUM = 0  # embedding-bag mode "sum"


class _Bags:
    """The embedding-bag bookkeeping of T bags of M slots each: flat ids [T*M], offsets [T],
    offset2bag [T*M] (the bag = token of each slot) and bag sizes [T]."""

    def __init__(self, ids_TM: torch.Tensor):
        T, M = ids_TM.shape
        dev = ids_TM.device
        self.T, self.M = T, M
        self.ids_S = ids_TM.reshape(-1)
        self.offsets_T = torch.arange(0, T * M, M, device=dev)
        self.bag_S = torch.arange(T, device=dev).repeat_interleave(M)
        self.size_T = torch.full((T,), M, dtype=torch.int64, device=dev)
        self._sorted = None  # _by_expert's sort, made on first use

    def gather_dot(self, table_ND: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, M]: table[ids[t, m]] . x[t]."""
        out_S = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            x_TD, table_ND, self.ids_S, self.offsets_T, self.bag_S, _SUM, -1)
        return out_S.view(self.T, self.M)

    def gather_sum(self, table_ND: torch.Tensor, c_TM: torch.Tensor) -> torch.Tensor:
        """[T, D]: sum_m c[t, m] table[ids[t, m]]."""
        return F.embedding_bag(self.ids_S, table_ND, self.offsets_T, mode="sum", per_sample_weights=c_TM.reshape(-1))

    def scatter_rows(self, rows_TD: torch.Tensor, c_TM: torch.Tensor, num_rows: int) -> torch.Tensor:
        """[N, D]: row e = sum over slots (t, m) with ids[t, m] == e of c[t, m] rows[t].

        On the CPU a sparse [N, T] CSR matrix of the coefficients times rows: the slots are sorted by
        expert once per _Bags and shared by every call (the u and v gradients), where the embedding-bag
        backward sorts them again each time and costs about twice as much."""
        if rows_TD.device.type != "cpu":
            return torch.ops.aten._embedding_bag_dense_backward(
                rows_TD, self.ids_S, self.bag_S, self.size_T, self.size_T, num_rows, False, _SUM,
                c_TM.reshape(-1), -1)
        order_S, crow_R, token_S = self._by_expert(num_rows)
        coef_S = c_TM.reshape(-1).index_select(0, order_S).to(rows_TD.dtype)
        with warnings.catch_warnings():  # torch's once-per-process "sparse CSR is in beta" notice
            warnings.simplefilter("ignore")
            coef_NT = torch.sparse_csr_tensor(crow_R, token_S, coef_S, size=(num_rows, self.T), check_invariants=False)
        return coef_NT @ rows_TD

    def _by_expert(self, num_rows: int):
        """(slot order sorted by expert [S], CSR row pointers [N + 1], token of each sorted slot [S])."""
        if self._sorted is None or self._sorted[1].shape[0] != num_rows + 1:
            order_S = torch.argsort(self.ids_S)
            crow_R = torch.zeros(num_rows + 1, dtype=torch.int64, device=self.ids_S.device)
            torch.cumsum(torch.bincount(self.ids_S, minlength=num_rows), 0, out=crow_R[1:])
            self._sorted = (order_S, crow_R, self.bag_S.index_select(0, order_S))
        return self._sorted


def _compute_dtype(table: torch.Tensor) -> torch.dtype:
    return torch.float32 if table.dtype in (torch.bfloat16, torch.float16) else table.dtype


def act_forward(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def act_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(h) with exactly the derivative torch's own GELU / ReLU backward uses."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.threshold_backward(grad, h, 0)


class BagMix(torch.autograd.Function):
    """y = sum_m w act(u . x) v over the retrieved experts; see docs/kernels.md, 'The bag path'."""

    @staticmethod
    def forward(ctx, x_TD, w_TM, ids_TM, u_ND, v_ND, frozen_N, activation):
        dtype = _compute_dtype(u_ND)
        ctx.x_dtype, ctx.w_dtype, ctx.activation = x_TD.dtype, w_TM.dtype, activation
        with torch.autocast(x_TD.device.type, enabled=False):
            bags = _Bags(ids_TM)
            x_TD = x_TD.to(dtype).contiguous()
            w_TM = w_TM.to(dtype)
            h_TM = bags.gather_dot(u_ND.to(dtype), x_TD)
            y_TD = bags.gather_sum(v_ND.to(dtype), act_forward(h_TM, activation) * w_TM)
        ctx.save_for_backward(x_TD, w_TM, ids_TM, u_ND, v_ND, h_TM, frozen_N)
        return y_TD.to(torch.promote_types(ctx.x_dtype, u_ND.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TD):
        x_TD, w_TM, ids_TM, u_ND, v_ND, h_TM, frozen_N = ctx.saved_tensors
        need_x, need_w, _, need_u, need_v = ctx.needs_input_grad[:5]
        dx_TD = dw_TM = du_ND = dv_ND = None
        dtype = x_TD.dtype
        with torch.autocast(dy_TD.device.type, enabled=False):
            bags = _Bags(ids_TM)
            dy_TD = dy_TD.to(dtype).contiguous()
            g_TM = bags.gather_dot(v_ND.to(dtype), dy_TD)             # dL/da = v . dy
            act_TM = act_forward(h_TM, ctx.activation)
            dh_TM = act_backward(g_TM * w_TM, h_TM, ctx.activation)   # dL/dh = g w act'(h)
            if need_w:
                dw_TM = g_TM * act_TM
            if need_x:
                dx_TD = bags.gather_sum(u_ND.to(dtype), dh_TM)
            if need_u or need_v:
                # frozen experts: zero coefficient on their slots, so their rows stay exactly 0
                frozen_TM = None if frozen_N is None else frozen_N[ids_TM]
                if need_u:
                    c_TM = dh_TM if frozen_TM is None else dh_TM.masked_fill(frozen_TM, 0)
                    du_ND = bags.scatter_rows(x_TD, c_TM, u_ND.shape[0]).to(u_ND.dtype)
                if need_v:
                    a_TM = act_TM * w_TM
                    c_TM = a_TM if frozen_TM is None else a_TM.masked_fill(frozen_TM, 0)
                    dv_ND = bags.scatter_rows(dy_TD, c_TM, v_ND.shape[0]).to(v_ND.dtype)
        return (dx_TD.to(ctx.x_dtype) if need_x else None, dw_TM.to(ctx.w_dtype) if need_w else None, None,
                du_ND, dv_ND, None, None)


def mix(x_TD: torch.Tensor, w_TM: torch.Tensor, ids_TM: torch.Tensor, u_ND: torch.Tensor, v_ND: torch.Tensor,
        activation: str, frozen_N: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as reference.mix, without the gathered [T, M, D] tensors."""
    return BagMix.apply(x_TD, w_TM, ids_TM, u_ND, v_ND, frozen_N, activation)

