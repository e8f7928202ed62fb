"""Row-wise ("lazy") AdamW for large expert tables: update only the rows a step touched.

Why. A PEER layer with N = 1024^2 experts holds two tables ``expert_u``, ``expert_v`` of shape
[N, dim], but one batch retrieves at most tokens * heads * top_k of their rows. A dense AdamW step
still reads and writes every row of the parameter, the gradient and both moments, so at a million
experts the optimizer step, not the layer, dominates a training step (issue 9). ``RowAdamW``
applies Adam only to the rows that received gradient and defers the weight decay of the others,
so its cost follows the touched rows (plus two reductions over the gradient to find them).

AdamW (Kingma & Ba 2015; decoupled weight decay, Loshchilov & Hutter 2019), per step t with
learning rate lr_t, gradient g_t, betas (b1, b2), eps and weight decay wd::

    w <- w * (1 - lr_t * wd)                          decoupled decay, independent of g
    m <- b1 * m + (1 - b1) * g_t                      first moment
    v <- b2 * v + (1 - b2) * g_t^2                    second moment
    w <- w - lr_t * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Row-wise semantics (``rowwise=True`` groups). A row is *touched* by a step when its gradient row
has any nonzero entry (dense gradient; NaN counts as nonzero) or when it is listed in a sparse
COO gradient (``nn.Embedding(sparse=True)`` style; zero-valued listed rows count as touched).
Then, as torch.optim.SparseAdam and TensorFlow's LazyAdam do:

* a touched row gets exactly the AdamW update above, with its moments m, v;
* an untouched row's moments are *not* decayed and the row gets *no* momentum step. AdamW would
  keep moving a row after its last gradient (the decaying momentum "coasts" it about
  1 / (1 - b1) = 10 more steps) and would shrink its second moment; here both are frozen until
  the row is touched again. This is the main semantic difference from AdamW, and it is
  deliberate: a rarely retrieved expert is not pushed along by stale momentum;
* bias correction uses a *per-row* step count t_r = the number of steps that touched the row (the
  other difference; SparseAdam and LazyAdam use the global count), so a row first retrieved at
  global step 1000 takes an Adam first step of size ~lr, not the (1 - b1) / sqrt(1 - b2) ~ 3x
  larger one (b2 = 0.999) a global count would give;
* weight decay stays *exact*: decay does not depend on the gradient, so it is only postponed. Each
  parameter keeps L_t = sum_{s <= t} log(1 - lr_s * wd) (float64, so a long schedule of per-step
  factors neither underflows nor loses precision, learning-rate schedules included) and each row
  the value L at its last update. When a row is next touched, or on ``flush()``, it is first
  multiplied by exp(L_t - L_row) = prod over the missed steps of (1 - lr_s * wd), exactly what
  AdamW would have applied. Touched every step, a row therefore follows AdamW step for step.

So: with every row touched at every step, RowAdamW *is* AdamW (tested against torch.optim.AdamW
to 1e-6; the arithmetic mirrors torch's single-tensor implementation operation by operation, and
on the CPU the results were bit-identical to ``AdamW(foreach=False)`` on every path).

Pending decay and saved weights. Between touches a row's stored weights lack the decay of the
steps it missed; the optimizer state holds what is missing (``rows['log_decay']``), so a
checkpoint of model + optimizer state resumes exactly without any flush. Before using the weights
*outside* this optimizer (evaluation, export, analysis of a checkpoint) call ``flush()`` (or
``flush_pending_decay(optimizer)``, a no-op for other optimizers): it applies every row's missing
factor in one pass over the tables. ``state_dict()`` does not flush by itself: a model saved before
the optimizer state would then disagree with it. With ``weight_decay=0`` (the project's expert
group) nothing is ever pending and ``flush()`` is a cheap no-op.

Dense fallback. Finding the touched rows costs two reductions over the gradient and a host sync;
updating them gathers the touched rows of weights, gradient and moments, updates them and
scatters them back, several times the bytes per row of AdamW's in-place pass. When most rows are
touched, one masked pass over whole tables is cheaper: a step whose touched fraction exceeds
``dense_fallback`` runs the same math as full-table operations with per-row coefficients
(untouched rows multiply by exactly 1 and add exactly 0), at about the cost of AdamW's
single-tensor step. The default 0.5 sits between the measured CPU crossover (~0.3,
benchmarks/optimizer_step.py) and a GPU estimate from bytes moved (~0.6); tune it per machine. The threshold only picks the execution strategy, never the
semantics: both paths give the same result up to float rounding (tested). ``dense_fallback=0``
always takes the masked dense path, ``1`` never does. When a step touches every row and every row
has the same step count and decay mark (every step so far touched every row: a small pool under a
large batch, e.g. the iso-peer preset's 4096 experts), the per-row quantities are scalars and the
step runs torch's own AdamW kernel (the group's ``foreach`` / ``fused``), at AdamW's speed.

Growth and freezing (experts/growth.py). State shaped like the parameter (``exp_avg``,
``exp_avg_sq``) is padded by the growth surgery (``PEER.grow(n, optimizer=opt)``) like AdamW's; the
per-row bookkeeping lives in a nested dict ``state['rows']`` (``step`` int32 [N], ``log_decay``
float64 [N]) that growth's surgery deliberately does not see (it only resizes parameter-shaped
tensors) and that RowAdamW extends itself at the next step or flush: new rows start with no step
and no pending decay, old rows keep theirs. Rows of a layer's ``frozen`` buffer, for every layer
attached to this optimizer (``experts.attach`` / ``experts.freeze(layer, ids, optimizer)``), are
never touched and never written, not even by ``flush()``: they do not decay while frozen (as under
AdamW + the freeze guard), and decay a row still owed from before its freeze stays owed until it is
unfrozen (call ``flush()`` before freezing to settle it first, making the frozen values exactly the
AdamW ones). The attach guard still snapshots and restores them around every step.

Dense groups (``rowwise=False``, the default) are plain AdamW through torch's own functional
implementation (``foreach`` / ``fused`` as in torch.optim.AdamW), so one optimizer serves a whole
model: Avalanche strategies take exactly one. ``rowwise_groups(model, groups)`` moves the PEER
expert tables of existing parameter groups into row-wise groups with the same settings.

Not supported: amsgrad, maximize, complex parameters, capturable / CUDA graphs (row selection
syncs with the host), gradient scaling through ``grad_scale`` / ``found_inf``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as _adamw_functional

from . import growth
from .peer import PEER

__all__ = ["RowAdamW", "build_expert_optimizer", "flush_pending_decay", "rowwise_groups", "touched_rows"]


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    """Bool mask [N] of the rows of a dense 2-D gradient with any nonzero entry (NaN counts).

    max != 0 or min != 0 is two plain reductions, about 3x faster on the CPU than
    ``grad.ne(0).any(1)`` (which materialises a bool copy) and NaN-propagating, unlike
    ``abs().amax()`` compared with > 0; -0.0 counts as zero."""
    return (grad.amax(dim=1) != 0) | (grad.amin(dim=1) != 0)


def _check_number(name: str, value, low: float, high: float | None = None, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"RowAdamW: {name} must be a finite number >= {low}{upper}, got {value!r}")


def _check_group_options(group: dict) -> None:
    _check_number("lr", group["lr"], 0.0)
    _check_number("eps", group["eps"], 0.0)
    _check_number("weight_decay", group["weight_decay"], 0.0)
    _check_number("dense_fallback", group["dense_fallback"], 0.0, 1.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"RowAdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
    if not isinstance(group["rowwise"], bool):
        raise ValueError(f"RowAdamW: rowwise must be True or False, got {group['rowwise']!r}")
    for name in ("foreach", "fused"):
        if group[name] not in (None, True, False):
            raise ValueError(f"RowAdamW: {name} must be None, True or False, got {group[name]!r}")
    for param in group["params"]:
        if not (param.is_floating_point() and not param.is_complex()):
            raise ValueError(f"RowAdamW: parameters must be real floating-point tensors, got dtype {param.dtype}")
        if group["rowwise"] and param.dim() != 2:
            raise ValueError(f"RowAdamW: a rowwise=True group takes 2-D tables [rows, dim] only, got a parameter "
                             f"of shape {tuple(param.shape)} (put it in a group with rowwise=False)")


class RowAdamW(torch.optim.Optimizer):
    """AdamW whose ``rowwise=True`` parameter groups update only the rows each step touched
    (lazy moments, per-row bias correction, exact deferred weight decay; module docstring).

    Args:
        params: parameters or parameter groups, as for torch.optim.AdamW. Each group may set any
            of the options below; ``rowwise`` marks groups of 2-D tables [rows, dim].
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        rowwise: default of the groups' ``rowwise`` flag (False: plain AdamW).
        dense_fallback: fraction of touched rows above which a row-wise step runs as one masked
            pass over the whole table (same result; a speed choice). 0 = always, 1 = never.
        foreach, fused: implementation of the dense groups' AdamW, as in torch.optim.AdamW.

    ``flush()`` applies the weight decay the untouched rows still owe (call it before using the
    weights outside training); ``state_dict()`` / ``load_state_dict()`` round-trip through
    ``torch.save`` / ``torch.load(weights_only=True)`` (tensors, numbers and dicts only).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rowwise: bool = False, dense_fallback: float = 0.5,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas, "eps": eps,
                    "weight_decay": weight_decay, "rowwise": rowwise, "dense_fallback": dense_fallback,
                    "foreach": foreach, "fused": fused}
        _check_group_options({**defaults, "params": []})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults
        try:
            _check_group_options(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("rowwise", False), ("dense_fallback", 0.5), ("foreach", None), ("fused", None)):
                group.setdefault(key, value)

    # ---- state ----------------------------------------------------------------------------------
    def _init_state(self, param: torch.Tensor, group: dict, state: dict) -> None:
        # 'step' as torch.optim.AdamW keeps it (a float32 scalar; on the device when fused), so
        # growth surgery, LR tooling and the freeze guard see familiar state.
        on_device = bool(group["fused"]) and not group["rowwise"]
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["rowwise"]:
            n = param.shape[0]
            state["log_decay"] = 0.0  # L_t: sum over steps of log(1 - lr * wd), float64 as a Python float
            state["rows"] = {"step": torch.zeros(n, dtype=torch.int32, device=param.device),
                             "log_decay": torch.zeros(n, dtype=torch.float64, device=param.device)}

    @staticmethod
    def _fit_rows(param: torch.Tensor, state: dict) -> dict:
        """Extend the per-row state to the parameter's current rows (after growth): new rows have no
        step and no pending decay. Moments not padded by a growth surgery are zero-padded here.
        State loaded from torch.optim.AdamW gets per-row state with every row in lockstep."""
        n = param.shape[0]
        if "rows" not in state:  # AdamW state (e.g. a checkpoint of torch.optim.AdamW): every row
            # has taken every step and owes no decay, which is exactly rows in lockstep
            state["log_decay"] = 0.0
            state["rows"] = {"step": torch.full((state["exp_avg"].shape[0],), int(state["step"]), dtype=torch.int32,
                                                device=param.device),
                             "log_decay": torch.zeros(state["exp_avg"].shape[0], dtype=torch.float64,
                                                      device=param.device)}
        rows = state["rows"]
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[key]
            if value.shape[1:] != param.shape[1:] or value.shape[0] > n:
                raise ValueError(f"RowAdamW: state {key!r} of shape {tuple(value.shape)} does not fit a parameter of "
                                 f"shape {tuple(param.shape)} (tables may only grow by appending rows)")
            if value.shape[0] < n:
                state[key] = torch.cat([value, value.new_zeros((n - value.shape[0],) + value.shape[1:])])
        old = rows["step"].shape[0]
        if old > n or rows["log_decay"].shape[0] != old:
            raise ValueError(f"RowAdamW: per-row state for {old} rows does not fit a parameter of {n} rows")
        if old < n:
            rows["step"] = torch.cat([rows["step"], rows["step"].new_zeros(n - old)])
            fresh = rows["log_decay"].new_full((n - old,), state["log_decay"])  # nothing owed yet
            rows["log_decay"] = torch.cat([rows["log_decay"], fresh])
        return rows

    def _frozen_masks(self) -> dict[int, torch.Tensor]:
        """id(table) -> the ``frozen`` buffer [N] of each layer attached to this optimizer that has
        frozen experts."""
        masks = {}
        for layer in growth.attached_layers(self):
            if layer.has_frozen():
                for table in layer.expert_tables():
                    masks[id(table)] = layer.frozen
        return masks

    # ---- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the loss, as for any torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen = self._frozen_masks()
        for group in self.param_groups:
            if group["lr"] * group["weight_decay"] >= 1:
                raise ValueError(f"RowAdamW: lr * weight_decay must be < 1 (a decay factor 1 - lr * wd <= 0 would "
                                 f"zero or flip the weights), got lr={group['lr']}, "
                                 f"weight_decay={group['weight_decay']}")
            if group["rowwise"]:
                for param in group["params"]:
                    if param.grad is not None:
                        self._row_step(param, group, frozen.get(id(param)))
            else:
                self._dense_step(group)
        return loss

    def _dense_step(self, group: dict) -> None:
        """torch's AdamW over the group, through its functional implementation."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("RowAdamW: sparse gradients need a rowwise=True group (2-D tables)")
            state = self.state[param]
            if not state:
                self._init_state(param, group, state)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                          fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _row_step(self, param: torch.Tensor, group: dict, frozen_N: torch.Tensor | None) -> None:
        state = self.state[param]
        if not state:
            self._init_state(param, group, state)
        rows = self._fit_rows(param, state)
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        if lr * wd:
            step_log_decay = math.log1p(-lr * wd)
            state["log_decay"] += step_log_decay
            if frozen_N is not None:
                # frozen rows do not decay: their mark moves with L, so what they owed when frozen
                # stays owed, unchanged (the same float64 additions as L: 0 owed stays exactly 0)
                rows["log_decay"].add_(frozen_N.to(torch.float64) * step_log_decay)
        ids_K, grad_KD, touched_N = self._touched(param.grad, frozen_N)
        k = ids_K.numel()
        if k == 0:
            return
        if k == param.shape[0] and self._lockstep(rows):
            self._lockstep_update(param, group, state, rows)
        elif k > group["dense_fallback"] * param.shape[0]:
            self._masked_dense_update(param, group, state, rows, ids_K, grad_KD, touched_N, frozen_N)
        else:
            self._sparse_update(param, group, state, rows, ids_K, grad_KD)

    @staticmethod
    def _touched(grad: torch.Tensor, frozen_N: torch.Tensor | None):
        """(ids [K] int64 ascending, gradient rows [K, D] or None (gather them from the dense
        gradient), touched mask [N] or None). Frozen rows are never touched."""
        if grad.is_sparse:
            grad = grad.coalesce()
            ids_K, grad_KD = grad.indices()[0], grad.values()
            if grad_KD.dim() != 2:
                raise RuntimeError("RowAdamW: a sparse gradient must be sparse along dim 0 only (embedding-style)")
            if frozen_N is not None:
                keep_K = ~frozen_N[ids_K]
                ids_K, grad_KD = ids_K[keep_K], grad_KD[keep_K]
            return ids_K, grad_KD, None
        touched_N = touched_rows(grad)
        if frozen_N is not None:
            touched_N &= ~frozen_N
        return touched_N.nonzero().squeeze(1), None, touched_N

    @staticmethod
    def _lockstep(rows: dict) -> bool:
        """Whether every row has the same step count and the same decay mark (every row was
        touched by every step so far, the common case of a small pool and a large batch)."""
        step_N, mark_N = rows["step"], rows["log_decay"]
        return bool((step_N == step_N[0]).all() & (mark_N == mark_N[0]).all())

    def _lockstep_update(self, param, group, state, rows) -> None:
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

    @staticmethod
    def _bias_corrections(steps: torch.Tensor, lr: float, beta1: float, beta2: float, dtype: torch.dtype):
        """Per-row (-step size) = -lr / (1 - b1^t) and sqrt(1 - b2^t), computed in float64 like
        torch's Python-float scalars, then rounded to the parameter's dtype, as columns [rows, 1].
        Rows with t = 0 (untouched, masked path) get t = 1 here; the caller zeroes their step."""
        t = steps.to(torch.float64).clamp(min=1)
        neg_step_size = -lr / (1 - torch.pow(beta1, t))
        bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
        return neg_step_size.to(dtype).unsqueeze(1), bias_correction2_sqrt.to(dtype).unsqueeze(1)

    def _sparse_update(self, param, group, state, rows, ids_K, grad_KD) -> None:
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
        neg_step_size_K1, bc2_sqrt_K1 = self._bias_corrections(steps_K, group["lr"], beta1, beta2, w_KD.dtype)
        denom_KD = torch.sqrt(v_KD, out=grad_KD).div_(bc2_sqrt_K1).add_(group["eps"])
        # torch: param.addcdiv_(exp_avg, denom, value=-step_size), whose kernel rounds
        # (value * exp_avg) / denom; a per-row value is folded into exp_avg the same way
        w_KD.addcdiv_(m_KD * neg_step_size_K1, denom_KD)
        param.index_copy_(0, ids_K, w_KD)
        exp_avg.index_copy_(0, ids_K, m_KD)
        exp_avg_sq.index_copy_(0, ids_K, v_KD)

    def _masked_dense_update(self, param, group, state, rows, ids_K, grad_KD, touched_N, frozen_N) -> None:
        """The same update as _sparse_update over whole tables: untouched rows get moment
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
        exp_avg_sq.mul_(torch.where(touched_N1, beta2, 1.0).to(exp_avg_sq.dtype)).addcmul_(grad, grad,
                                                                                           value=1 - beta2)
        neg_step_size_N1, bc2_sqrt_N1 = self._bias_corrections(rows["step"], group["lr"], beta1, beta2, param.dtype)
        neg_step_size_N1 = neg_step_size_N1.where(touched_N1, 0.0)
        denom = exp_avg_sq.sqrt().div_(bc2_sqrt_N1).add_(group["eps"])
        param.addcdiv_(exp_avg * neg_step_size_N1, denom)

    # ---- pending decay --------------------------------------------------------------------------
    @torch.no_grad()
    def flush(self) -> None:
        """Apply to every row of the row-wise tables the weight decay it still owes (one pass over
        each table that has any), so the weights equal AdamW-decayed ones. Frozen rows of attached
        layers are left alone: they do not decay while frozen, and what they owed when frozen is
        applied once they are unfrozen (flush before freezing to settle it first). Idempotent;
        cheap when nothing is pending."""
        frozen = self._frozen_masks()
        for group in self.param_groups:
            if not group["rowwise"]:
                continue
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                rows = self._fit_rows(param, state)
                log_decay, last_N = state["log_decay"], rows["log_decay"]
                owed_N = last_N != log_decay
                if id(param) in frozen:  # frozen rows are never written; what they owe stays owed
                    owed_N &= ~frozen[id(param)]
                if bool(owed_N.any()):
                    param.mul_(torch.exp(log_decay - last_N).where(owed_N, 1.0).to(param.dtype).unsqueeze(1))
                    last_N.masked_fill_(owed_N, log_decay)

    # ---- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the per-row bookkeeping keeps its dtypes (torch casts every floating
        state tensor to the parameter's dtype: float64 decay sums would lose precision, int32
        step counts would become floats), and RowAdamW's own group options missing from the
        saved groups keep their current values. A torch.optim.AdamW state dict loads too (a run
        switching optimizer): its row-wise tables start with every row in lockstep. The other way
        round, flush() first: AdamW ignores the per-row state and so the pending decay."""
        saved_rows = {index: value["rows"] for index, value in state_dict["state"].items()
                      if isinstance(value, dict) and isinstance(value.get("rows"), dict)}
        # options a saved group lacks (a torch.optim.AdamW state has no 'rowwise') keep this
        # optimizer's values rather than the defaults
        ours = [{key: group[key] for key in ("rowwise", "dense_fallback", "foreach", "fused")}
                for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options, saved in zip(self.param_groups, ours, state_dict["param_groups"]):
            group.update({key: value for key, value in options.items() if key not in saved})
            _check_group_options(group)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        by_index = dict(zip(saved_ids, params))
        for index, rows in saved_rows.items():
            param = by_index[index]
            if set(rows) != {"step", "log_decay"}:
                raise ValueError(f"RowAdamW: saved per-row state has keys {sorted(rows)}, expected step and log_decay")
            self.state[param]["rows"] = {"step": rows["step"].to(param.device, torch.int32, copy=True),
                                         "log_decay": rows["log_decay"].to(param.device, torch.float64, copy=True)}


# ---- building -----------------------------------------------------------------------------------
def _expert_tables(model: nn.Module) -> list[torch.Tensor]:
    return [table for module in model.modules() if isinstance(module, PEER) for table in module.expert_tables()]


def rowwise_groups(model: nn.Module, groups: Iterable[dict] | None = None) -> list[dict]:
    """Parameter groups for RowAdamW: ``groups`` (default: one group of every trainable parameter)
    unchanged, except that the PEER expert tables (``expert_u``, ``expert_v``) of ``model`` move
    out of each group into a new group with the same settings plus ``rowwise=True``, appended
    after all the given groups (their indices stay valid; a group may be left empty). The new
    group is named ``<name>_rows`` after its source group (``expert_tables`` when unnamed)."""
    tables = {id(t) for t in _expert_tables(model)}
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    kept, moved = [], []
    for group in groups:
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError("rowwise_groups: groups must be dicts with a 'params' entry, as for torch optimizers")
        params = list(group["params"])
        rows = [p for p in params if id(p) in tables]
        kept.append({**group, "params": [p for p in params if id(p) not in tables]})
        if rows:
            name = f"{group['name']}_rows" if "name" in group else "expert_tables"
            moved.append({**group, "params": rows, "rowwise": True, "name": name})
    return kept + moved


def build_expert_optimizer(model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                           eps: float = 1e-8, weight_decay: float = 1e-2, dense_fallback: float = 0.5,
                           **kwargs) -> RowAdamW:
    """One RowAdamW for a whole model: AdamW for every parameter, row-wise for PEER expert tables
    (``rowwise_groups(model)``), with the growth warm-in and freeze guard attached
    (``experts.attach``) when the model has PEER / MoE layers. For decay / no-decay groups build
    them yourself and pass ``rowwise_groups(model, groups)`` to RowAdamW."""
    optimizer = RowAdamW(rowwise_groups(model), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         dense_fallback=dense_fallback, **kwargs)
    if growth.growable_layers(model):
        growth.attach(model, optimizer)
    return optimizer


def flush_pending_decay(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.flush()`` for a RowAdamW, nothing for any other optimizer: call it before
    evaluating or exporting weights, whichever optimizer a run uses."""
    if isinstance(optimizer, RowAdamW):
        optimizer.flush()
