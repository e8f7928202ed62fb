"""AdamW's arithmetic on the rows a RowAdamW step touched (docs/optim.md, 'Execution paths').

Each function updates one row-wise table in place from its AdamW state (``exp_avg``,
``exp_avg_sq``, the per-row ``rows['step']`` and ``rows['log_decay']`` marks, the table's decay
sum ``log_decay``): ``sparse_update`` gathers, updates and scatters the touched rows,
``masked_dense_update`` runs the same math over whole tables with per-row coefficients, and
``lockstep_update`` hands rows in lockstep to torch's own AdamW kernel. The arithmetic mirrors
torch's single-tensor AdamW operation by operation.

Shape suffixes: K touched rows, N rows of the table, D row width; ``1`` a broadcast column.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as _adamw_functional


def lockstep_update(param, group, state, rows) -> None:
    """Every row touched and all rows in lockstep: the per-row quantities are scalars, so
    this is exactly AdamW, run by torch's kernel (the group's foreach / fused choice)."""
    beta1, beta2 = group["betas"]
    owed = math.exp(state["log_decay"] - float(rows["log_decay"][0]))
    if owed != 1.0:
        param.mul_(owed)
    grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
    step = torch.tensor(float(rows["step"][0]), dtype=torch.float32,
                        device=param.device if group["fused"] else "cpu")  # the functional adds 1
    _adamw_functional([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                      foreach=group["foreach"], fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2,
                      lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
    rows["step"].add_(1)
    rows["log_decay"].fill_(state["log_decay"])


def bias_corrections(steps: torch.Tensor, lr: float, beta1: float, beta2: float, dtype: torch.dtype):
    """Per-row (-step size) = -lr / (1 - b1^t) and sqrt(1 - b2^t), computed in float64 like
    torch's Python-float scalars, then rounded to the parameter's dtype, as columns [rows, 1].
    Rows with t = 0 (untouched, masked path) get t = 1 here; the caller zeroes their step."""
    t = steps.to(torch.float64).clamp(min=1)
    neg_step_size = -lr / (1 - torch.pow(beta1, t))
    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    return neg_step_size.to(dtype).unsqueeze(1), bias_correction2_sqrt.to(dtype).unsqueeze(1)


def sparse_update(param, group, state, rows, ids_K, grad_KD) -> None:
    """Gather the K touched rows, apply owed decay + AdamW to them, scatter them back.

    The AdamW arithmetic is torch's single-tensor implementation operation for operation
    (lerp, mul + addcmul, sqrt / bc2 + eps, addcdiv of (-step_size * m) / denom), with the
    per-row scalars as [K, 1] columns; buffers are reused to keep allocations at five."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if grad_KD is None:
        grad_KD = param.grad.index_select(0, ids_K)
    else:
        grad_KD = grad_KD.to(param.dtype, copy=True)  # a buffer of our own: it becomes denom
    w_KD = param.index_select(0, ids_K)
    m_KD = exp_avg.index_select(0, ids_K)
    v_KD = exp_avg_sq.index_select(0, ids_K)
    steps_K = rows["step"].index_select(0, ids_K) + 1
    rows["step"].index_copy_(0, ids_K, steps_K)
    log_decay = state["log_decay"]
    if log_decay != 0.0:  # decay owed since each row's last update, this step's included
        owed_K = torch.exp(log_decay - rows["log_decay"].index_select(0, ids_K))
        w_KD.mul_(owed_K.to(w_KD.dtype).unsqueeze(1))
        rows["log_decay"].index_fill_(0, ids_K, log_decay)
    m_KD.lerp_(grad_KD, 1 - beta1)
    v_KD.mul_(beta2).addcmul_(grad_KD, grad_KD, value=1 - beta2)
    neg_step_size_K1, bc2_sqrt_K1 = bias_corrections(steps_K, group["lr"], beta1, beta2, w_KD.dtype)
    denom_KD = torch.sqrt(v_KD, out=grad_KD).div_(bc2_sqrt_K1).add_(group["eps"])
    # torch's addcdiv_(exp_avg, denom, value=-step_size) rounds (value * exp_avg) / denom: same here
    w_KD.addcdiv_(m_KD * neg_step_size_K1, denom_KD)
    param.index_copy_(0, ids_K, w_KD)
    exp_avg.index_copy_(0, ids_K, m_KD)
    exp_avg_sq.index_copy_(0, ids_K, v_KD)


def masked_dense_update(param, group, state, rows, ids_K, grad_KD, touched_N, frozen_N) -> None:
    """The same update as sparse_update over whole tables: untouched rows get moment
    coefficients of exactly 1 and 0, zero gradient, decay factor 1 and step size 0, so they
    do not change by a single bit."""
    beta1, beta2 = group["betas"]
    n = param.shape[0]
    if touched_N is None:  # a sparse gradient: scatter it into a dense one
        touched_N = torch.zeros(n, dtype=torch.bool, device=param.device).index_fill_(0, ids_K, True)
        grad = param.new_zeros(param.shape).index_copy_(0, ids_K, grad_KD.to(param.dtype))
    else:
        grad = param.grad
        if frozen_N is not None:  # frozen rows are untouched even if something gave them gradient
            grad = grad.masked_fill(frozen_N.unsqueeze(1), 0)
    touched_N1 = touched_N.unsqueeze(1)
    rows["step"].add_(touched_N.to(rows["step"].dtype))
    log_decay = state["log_decay"]
    if log_decay != 0.0:
        owed_N = torch.exp(log_decay - rows["log_decay"]).where(touched_N, 1.0)
        param.mul_(owed_N.to(param.dtype).unsqueeze(1))
        rows["log_decay"].masked_fill_(touched_N, log_decay)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, torch.where(touched_N1, 1 - beta1, 0.0).to(exp_avg.dtype))
    exp_avg_sq.mul_(torch.where(touched_N1, beta2, 1.0).to(exp_avg_sq.dtype)).addcmul_(grad, grad, value=1 - beta2)
    neg_step_size_N1, bc2_sqrt_N1 = bias_corrections(rows["step"], group["lr"], beta1, beta2, param.dtype)
    neg_step_size_N1 = neg_step_size_N1.where(touched_N1, 0.0)
    denom = exp_avg_sq.sqrt().div_(bc2_sqrt_N1).add_(group["eps"])
    param.addcdiv_(exp_avg * neg_step_size_N1, denom)
