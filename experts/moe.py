"""Coarse top-k mixture of experts with the ST-MoE stabilisers (Zoph et al. 2022), the baseline
PEER is compared against at matched compute.

Implementations disagree on many details; ours (router in float32, renormalised top-k gates,
load-balancing loss N * sum_i f_i * P_i, router z-loss, dropless dispatch or GShard-style capacity,
dormant growth) are spelled out in docs/peer.md, 'The coarse MoE baseline'.

Shape suffixes: T tokens (leading dims flattened), E experts, K top_k, D dim, S = K * T slots,
C tokens routed to one expert, N new experts (grow).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import growth
from .checks import (ACTIVATIONS, activation_fn, check_choice, check_dropout, check_inputs, check_int, check_last_dim,
                     check_tokens, is_number)
from .freezing import attach, surgery_targets
from .surgery import append_rows_, check_resizable_state, resize_rows_


def load_balancing_loss(probs_TE: torch.Tensor, expert_index_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """N * sum_i f_i * P_i; f_i = fraction of the T*k slots routed to expert i, P_i = mean prob.

    f is a count (no gradient); the gradient reaches the router through P. Equals 1 when both f
    and P are uniform.
    """
    if probs_TE.shape[-1] != num_experts:
        raise ValueError(f"probs' last dimension must be num_experts={num_experts}, got {tuple(probs_TE.shape)}")
    flat_index = expert_index_TK.reshape(-1)
    if flat_index.numel() == 0:
        raise ValueError("load_balancing_loss needs at least one routed token")
    counts_E = torch.bincount(flat_index, minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / flat_index.numel()
    P_E = probs_TE.reshape(-1, num_experts).mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def _check_capacity(name: str, value) -> None:
    if value is None:
        return
    if not is_number(value) or not value > 0:
        raise ValueError(f"{name} must be None (dropless) or a number > 0, got {value!r}")


class MoE(nn.Module):
    """Top-k MoE FFN: x [..., dim] -> sum over the token's k experts of gate * FFN_e(x).

    Expert e is Linear(dim, hidden) -> act -> Linear(hidden, dim) (biases by default), stored as
    batched w1 [E, dim, hidden], b1 [E, hidden], w2 [E, hidden, dim], b2 [E, dim] with nn.Linear's
    default init; tokens are grouped per expert by a stable sort, one matmul per group.
    capacity_factor=None is dropless in training and eval; otherwise training uses capacity_factor
    and eval eval_capacity_factor (None there = dropless eval). aux_loss(): balance_coef * balance
    + z_coef * z of the *last training* forward (carries gradient; zero after an eval forward or
    before any), to add to the loss after each forward; aux_metrics(): the last forward's losses
    and dropped fraction. ``usage_counter`` (experts.usage.track_usage) adds the chosen experts'
    gates in eval mode. Design choices: docs/peer.md, 'The coarse MoE baseline'.
    """

    def __init__(self, dim: int, num_experts: int = 8, hidden: int | None = None, top_k: int = 2,
                 activation: str = "gelu", balance_coef: float = 0.01, z_coef: float = 0.001,
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = 2.0,
                 normalize_gates: bool = True, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        check_int("dim", dim)
        check_int("num_experts", num_experts)
        hidden = 4 * dim if hidden is None else hidden
        check_int("hidden", hidden)
        check_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        check_choice("activation", activation, ACTIVATIONS)
        for name, coef in (("balance_coef", balance_coef), ("z_coef", z_coef)):
            if not is_number(coef) or coef < 0:
                raise ValueError(f"{name} must be a number >= 0, got {coef!r}")
        _check_capacity("capacity_factor", capacity_factor)
        _check_capacity("eval_capacity_factor", eval_capacity_factor)
        check_dropout(dropout)
        self.dim, self.num_experts, self.hidden, self.top_k = dim, num_experts, hidden, top_k
        self.activation, self.act = activation, activation_fn(activation)
        self.balance_coef, self.z_coef = float(balance_coef), float(z_coef)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.normalize_gates, self.bias = bool(normalize_gates), bool(bias)

        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        if bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
            self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.dropout = nn.Dropout(dropout)
        # growth state per expert (docs/growth.md); buffers, so checkpoints carry it
        self.register_buffer("logit_offset", torch.zeros(num_experts))
        self.register_buffer("warmup_left", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("warmup_total", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("warmup_margin", torch.zeros(num_experts))
        self.register_buffer("generation", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("frozen", torch.zeros(num_experts, dtype=torch.bool))
        self.usage_counter = None
        self._aux = None
        self._metrics = {"balance_loss": 0.0, "z_loss": 0.0, "dropped_fraction": 0.0}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self._router_std)
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        b_in, b_hid = 1.0 / math.sqrt(self.dim), 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.w1, -b_in, b_in)
        nn.init.uniform_(self.w2, -b_hid, b_hid)
        if self.bias:
            nn.init.uniform_(self.b1, -b_in, b_in)
            nn.init.uniform_(self.b2, -b_hid, b_hid)

    @property
    def _router_std(self) -> float:
        return math.sqrt(0.1 / self.dim)

    # ---- routing ------------------------------------------------------------------------------
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.dim)
        return x.reshape(-1, self.dim)

    def _router(self, x_TD: torch.Tensor):
        """(logits [T, E] fp32, probs [T, E], gates [T, K], expert index [T, K])."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # float32 at least (float64 stays float64 so tests can check to 1e-12)
            dtype = torch.promote_types(x_TD.dtype, torch.float32)
            logits_TE = F.linear(x_TD.to(dtype), self.router.weight.to(dtype)) + self.logit_offset.to(dtype)
            probs_TE = logits_TE.softmax(dim=-1)
            top_TK, index_TK = probs_TE.topk(self.top_k, dim=-1)
            gates_TK = top_TK / top_TK.sum(dim=-1, keepdim=True) if self.normalize_gates else top_TK
        return logits_TE, probs_TE, gates_TK, index_TK

    def route(self, x: torch.Tensor):
        """(gates, expert index), both [..., top_k]: the mixing weights forward uses (before any
        capacity dropping) and the chosen experts."""
        _, _, gates_TK, index_TK = self._router(self._flatten(x))
        out_shape = x.shape[:-1] + (self.top_k,)
        return gates_TK.reshape(out_shape), index_TK.reshape(out_shape)

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a batch of num_tokens in the current mode (None = dropless)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.capacity_factor is None or factor is None:
            return None
        return math.ceil(factor * num_tokens * self.top_k / self.num_live_experts())

    def num_live_experts(self) -> int:
        """Experts that can be routed to: all but the dormant ones (offset -inf, just grown)."""
        return self.num_experts - growth.cached_stat(self.logit_offset, "num_neginf")

    # ---- forward ------------------------------------------------------------------------------
    def _expert(self, e: int, x_CD: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """FFN of expert e; a frozen expert runs on detached weights (no gradient reaches them)."""
        def weight(p):
            return None if p is None else (p[e].detach() if frozen else p[e])
        w1, b1, w2, b2 = weight(self.w1), weight(self.b1), weight(self.w2), weight(self.b2)
        h = x_CD @ w1
        if b1 is not None:
            h = h + b1
        out = self.act(h) @ w2
        if b2 is not None:
            out = out + b2
        return out

    def _dispatch(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, index_TK: torch.Tensor):
        """Group slots by expert, run each expert on its group, scatter-add gate * output back."""
        T, K = index_TK.shape
        # slot s = k * T + t: all first choices come before all second choices (capacity priority)
        expert_S = index_TK.t().reshape(-1)
        token_S = torch.arange(T, device=x_TD.device).repeat(K)
        gate_S = gates_TK.t().reshape(-1)
        order_S = torch.argsort(expert_S, stable=True)  # stable: keeps the priority order per expert
        counts_E = torch.bincount(expert_S, minlength=self.num_experts)
        cap = self.capacity(T)
        num_slots = expert_S.numel()
        if cap is not None:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            position_S = torch.arange(num_slots, device=x_TD.device) - starts_E[expert_S[order_S]]
            order_S = order_S[position_S < cap]
            counts_E = counts_E.clamp(max=cap)
        dropped = num_slots - order_S.numel()

        y_TD = torch.zeros_like(x_TD)
        frozen_E = self.frozen.tolist() if self.has_frozen() else [False] * self.num_experts
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            slots = order_S[start:start + count]
            start += count
            tokens = token_S[slots]
            out_CD = self._expert(e, x_TD[tokens], frozen_E[e])
            y_TD.index_add_(0, tokens, (out_CD * gate_S[slots, None]).to(y_TD.dtype))
        return y_TD, dropped / max(num_slots, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = self._flatten(x)
        logits_TE, probs_TE, gates_TK, index_TK = self._router(x_TD)
        if x_TD.shape[0] == 0:
            self._aux = None
            return torch.zeros_like(x)
        balance = load_balancing_loss(probs_TE, index_TK, self.num_experts)
        live = self.num_live_experts()
        if live != self.num_experts:  # dormant experts have f = P = 0: count N over the live ones
            balance = balance * (live / self.num_experts)
        z = router_z_loss(logits_TE)
        self._aux = self.balance_coef * balance + self.z_coef * z if self.training else None
        if self.usage_counter is not None and not self.training:
            if self.usage_counter.num_experts < self.num_experts:  # the pool grew
                self.usage_counter.grow_to(self.num_experts)
            self.usage_counter.update(gates_TK.detach(), index_TK)
        y_TD, dropped_fraction = self._dispatch(x_TD, gates_TK, index_TK)
        if self.training:  # an evaluation forward between training steps must not overwrite them
            self._metrics = {"balance_loss": float(balance.detach()), "z_loss": float(z.detach()),
                             "dropped_fraction": float(dropped_fraction)}
        return self.dropout(y_TD).reshape(x.shape)

    def __getstate__(self):
        # The last training forward's auxiliary loss belongs to its autograd graph, which
        # deepcopy cannot copy (a distillation teacher, a checkpoint): copies start without it.
        state = super().__getstate__()
        state["_aux"] = None
        return state

    # ---- growth (docs/growth.md) ---------------------------------------------------------------
    def grow(self, n: int, optimizer=None, warmup_steps: int = 100, inputs=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Add ``n`` experts; returns their ids, the int64 range old_E ..< new_E on the layer's device.

        New router rows start dormant: logit offset -inf until the first optimizer step (probability
        exactly 0: routes, gates and output unchanged, dropless or not), then -margin * (1 - t /
        warmup_steps), 0 after warmup_steps steps; margin = |x|max * (max |new router row| + max |old
        router row|), |x|max from ``inputs`` [..., dim] or sqrt(dim) (docs/growth.md, 'Warm-in').
        warmup_steps=0: live at once, not function-preserving. New rows and experts follow
        reset_parameters; ``optimizer``: state surgery and hooks, exactly as PEER.grow.
        """
        growth.check_grow_args(n, warmup_steps, optimizer)
        old_e = self.num_experts
        b_in, b_hid = 1.0 / math.sqrt(self.dim), 1.0 / math.sqrt(self.hidden)
        router_ND = growth.normal((n, self.dim), self._router_std, generator)
        if inputs is not None:
            check_inputs(inputs)
            x_TD = self._flatten(inputs.detach()).to("cpu", torch.float64)
            check_tokens(x_TD)
            x_norm = x_TD.norm(dim=-1).max()
        else:
            x_norm = torch.tensor(math.sqrt(self.dim), dtype=torch.float64)
        margin = growth.score_margin(x_norm, self.router.weight.detach().to("cpu", torch.float64), router_ND)

        optimizers = surgery_targets(self, optimizer)
        check_resizable_state([self.router.weight, *self.expert_tables()], optimizers)
        append_rows_(self.router.weight, router_ND, dim=0, optimizers=optimizers)
        append_rows_(self.w1, growth.uniform((n, self.dim, self.hidden), b_in, generator), 0, optimizers)
        append_rows_(self.w2, growth.uniform((n, self.hidden, self.dim), b_hid, generator), 0, optimizers)
        if self.bias:
            append_rows_(self.b1, growth.uniform((n, self.hidden), b_in, generator), 0, optimizers)
            append_rows_(self.b2, growth.uniform((n, self.dim), b_hid, generator), 0, optimizers)
        steps_N = self.warmup_left.new_full((n,), warmup_steps)
        margin_N = margin.to(self.warmup_margin).expand(n)
        self.warmup_left = torch.cat([self.warmup_left, steps_N])
        self.warmup_total = torch.cat([self.warmup_total, steps_N])
        self.warmup_margin = torch.cat([self.warmup_margin, margin_N])
        self.logit_offset = torch.cat([self.logit_offset,
                                       growth.warmup_offsets(steps_N, steps_N, margin_N).to(self.logit_offset)])
        self.generation = torch.cat([self.generation, self.generation.new_full((n,), int(self.generation.max()) + 1)])
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(n)])
        self.num_experts = old_e + n
        if self.usage_counter is not None:
            self.usage_counter.grow_to(self.num_experts)
        if optimizer is not None:
            attach(self, optimizer)
        return torch.arange(old_e, self.num_experts, device=self.w1.device)

    def advance_warmup(self, steps: int = 1) -> None:
        """Anneal the dormant logit offsets by ``steps`` optimizer steps (experts.attach does it)."""
        check_int("steps", steps)
        if growth.cached_stat(self.warmup_left, "any_positive"):
            with torch.no_grad():
                growth.advance_warmup_(self.logit_offset, self.warmup_left, self.warmup_total,
                                       self.warmup_margin, steps)

    def expert_generation(self) -> torch.Tensor:
        """Per expert [E]: 0 for the original experts, g for those added by the g-th growth."""
        return self.generation.clone()

    def expert_tables(self) -> list[nn.Parameter]:
        """The parameters whose dim-0 rows are experts (what freezing protects)."""
        return [p for p in (self.w1, self.b1, self.w2, self.b2) if p is not None]

    def has_frozen(self) -> bool:
        """Whether any expert is frozen (cached on the buffer's version: no sync per forward)."""
        return growth.cached_stat(self.frozen, "any")

    def frozen_slices(self) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim 0, frozen expert ids) of every expert table (the optimizer guard keeps them)."""
        if not self.has_frozen():
            return []
        ids = torch.nonzero(self.frozen).flatten()
        return [(table, 0, ids) for table in self.expert_tables()]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of a grown MoE (more experts) resizes this one to match first."""
        saved = state_dict.get(prefix + "router.weight")
        if torch.is_tensor(saved) and saved.dim() == 2 and saved.shape[0] > self.num_experts:
            e = saved.shape[0]
            resize_rows_(self.router, "weight", e)
            for name in ("w1", "w2", "b1", "b2", "logit_offset", "warmup_left", "warmup_total",
                         "warmup_margin", "generation", "frozen"):
                if getattr(self, name) is not None:
                    resize_rows_(self, name, e)
            self.num_experts = e
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- FFN interface ------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """balance_coef * balance + z_coef * z of the last training forward (0 in eval)."""
        if self._aux is None:
            return torch.zeros((), device=self.router.weight.device)
        return self._aux

    def aux_metrics(self) -> dict[str, float]:
        """{'balance_loss', 'z_loss', 'dropped_fraction'} of the last training forward."""
        return dict(self._metrics)

    def _expert_params(self) -> int:
        return 2 * self.dim * self.hidden + ((self.hidden + self.dim) if self.bias else 0)

    def flops_per_token(self) -> int:
        """Nominal forward FLOPs per token (dropped slots not subtracted):

          router      2*dim*E (matmul) + 3*E (softmax) + E (top-k comparisons)
                      + 2*k (gate renormalisation, if enabled)
          k experts   k * (4*dim*hidden + hidden (act) + hidden + dim (biases, if any)
                           + 2*dim (gate multiply and combine add))
        """
        d, e, k, h = self.dim, self.num_experts, self.top_k, self.hidden
        router = 2 * d * e + 3 * e + e + (2 * k if self.normalize_gates else 0)
        expert = 4 * d * h + h + ((h + d) if self.bias else 0) + 2 * d
        return router + k * expert

    def matmul_flops_per_token(self) -> int:
        """The router's and the k chosen experts' matrix products only."""
        return 2 * self.dim * self.num_experts + self.top_k * 4 * self.dim * self.hidden

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Router + the k chosen experts' weights."""
        return self.router.weight.numel() + self.top_k * self._expert_params()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, top_k={self.top_k}, "
                f"activation={self.activation!r}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, normalize_gates={self.normalize_gates}")
