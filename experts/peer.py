"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts",
arXiv 2407.04153), a pool of N single-neuron experts retrieved per token through product keys.

Per head h, f^h(x) = sum_{i in I} g_i(x) act(u_i^T x) v_i (section 2, eq. (1) with singleton-MLP
experts), I the top-k of the product-key scores q(x)^T k_i, g a softmax (or sigmoid) of those
scores; the layer sums its H heads. The equations, the layout, the BatchNorm caveat and the
initialisation are in docs/peer.md; growth and freezing in docs/growth.md.

Shape suffixes: T tokens (leading dims flattened), H heads, K top_k, N experts, D dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import growth, kernels
from .checks import (ACTIVATIONS, activation_fn, check_choice, check_dropout, check_inputs, check_int, check_key_dim,
                     check_last_dim, check_tokens, is_int)
from .freezing import attach, surgery_targets
from .product_keys import ProductKeys, check_top_k, product_topk
from .surgery import append_rows_, check_resizable_state, resize_rows_

QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")
SCORES = ("softmax", "sigmoid")

#: The stages of PEER.flops_breakdown that are matrix products with weights.
MATMUL_STAGES = ("query projection", "sub-key scoring", "experts")

# rough FLOPs per query feature (mean, variance, subtract, scale, shift; RMSNorm: no mean/shift): tiny
_NORM_FLOPS = {"batchnorm": 5, "layernorm": 5, "rmsnorm": 4, "none": 0}


def parse_grid(num_experts) -> tuple[int, int]:
    """num_experts: a perfect-square int n*n (an n x n grid) or an explicit tuple (n1, n2)."""
    if isinstance(num_experts, (tuple, list)):
        if len(num_experts) == 2 and all(is_int(n) and n >= 1 for n in num_experts):
            return int(num_experts[0]), int(num_experts[1])
        raise ValueError(f"num_experts as a tuple must be (n1, n2) with two ints >= 1, got {num_experts!r}")
    if is_int(num_experts) and num_experts >= 1:
        side = math.isqrt(num_experts)
        if side * side == num_experts:
            return side, side
        lo, hi = side * side, (side + 1) ** 2
        raise ValueError(f"num_experts={num_experts} is not a perfect square; give an n*n int (e.g. {lo} = "
                         f"{side}^2 or {hi} = {side + 1}^2) or an explicit grid tuple (n1, n2)")
    raise ValueError(f"num_experts must be a perfect-square int or a tuple (n1, n2), got {num_experts!r}")


class QueryNorm(nn.Module):
    """Normalises queries [T, H*key_dim] and returns them as [T, H, key_dim].

    batchnorm: BatchNorm1d over the H*key_dim features, all tokens of the batch pooled (paper).
    layernorm / rmsnorm: per token and per head over key_dim, with a per-head affine [H, key_dim].
    none: identity.
    """

    def __init__(self, kind: str, heads: int, key_dim: int, eps: float = 1e-5):
        super().__init__()
        check_choice("query_norm", kind, QUERY_NORMS)
        self.kind, self.heads, self.key_dim, self.eps = kind, heads, key_dim, eps
        if kind == "batchnorm":
            self.bn = nn.BatchNorm1d(heads * key_dim, eps=eps)
        if kind in ("layernorm", "rmsnorm"):
            self.weight = nn.Parameter(torch.ones(heads, key_dim))
        if kind == "layernorm":
            self.bias = nn.Parameter(torch.zeros(heads, key_dim))

    def forward(self, q_TF: torch.Tensor) -> torch.Tensor:
        if self.kind == "batchnorm":
            q_TF = self.bn(q_TF)
        q_THD = q_TF.view(q_TF.shape[0], self.heads, self.key_dim)
        if self.kind == "layernorm":
            q_THD = F.layer_norm(q_THD, (self.key_dim,), eps=self.eps) * self.weight + self.bias
        elif self.kind == "rmsnorm":
            rms = torch.rsqrt(q_THD.pow(2).mean(-1, keepdim=True) + self.eps)
            q_THD = q_THD * rms * self.weight
        return q_THD

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class PEER(nn.Module):
    """PEER layer: x [..., dim] -> y [..., dim] = sum_h sum_k w[h,k] * act(u_id . x) * v_id.

    Parameters: query Linear(dim, heads*key_dim, bias=False), ``norm`` (QueryNorm), ``codebooks``
    (ProductKeys), expert_u / expert_v [n1*n2, dim] with id i*n2 + j = row i of keys1, column j
    of keys2 (docs/peer.md, 'Pieces and layout'). With query_norm="batchnorm" a token's route
    depends on its batch in train mode (docs/peer.md, 'BatchNorm caveat'). Initialisation
    matches a dense FFN of width heads*top_k in output scale (docs/peer.md, 'Initialisation').
    ``kernel`` picks the compute path (docs/kernels.md); ``dropout`` acts on the output;
    ``usage_counter`` records routing weights in eval mode (experts.usage.track_usage);
    ``retrieval_hook`` hears the ids of every training forward (experts.sparse). grow()
    and the ``frozen`` buffer: docs/growth.md.
    """

    def __init__(self, dim: int, num_experts, heads: int = 8, top_k: int = 16, key_dim: int = 128,
                 activation: str = "gelu", query_norm: str = "batchnorm", score: str = "softmax",
                 dropout: float = 0.0, kernel: str = "auto"):
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        check_key_dim(key_dim)
        n1, n2 = parse_grid(num_experts)
        check_top_k(top_k, n1, n2)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("query_norm", query_norm, QUERY_NORMS)
        check_choice("score", score, SCORES)
        check_dropout(dropout)
        kernels.check_kernel(kernel)
        self.kernel = kernel
        self.dim, self.heads, self.top_k, self.key_dim = dim, heads, top_k, key_dim
        self.activation, self.query_norm, self.score = activation, query_norm, score
        self.act = activation_fn(activation)

        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.norm = QueryNorm(query_norm, heads, key_dim)
        self.codebooks = ProductKeys(heads, n1, n2, key_dim)
        self.expert_u = nn.Parameter(torch.empty(n1 * n2, dim))
        self.expert_v = nn.Parameter(torch.empty(n1 * n2, dim))
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("frozen", torch.zeros(n1 * n2, dtype=torch.bool))
        self.usage_counter = None  # an experts.usage.UsageCounter, fed in eval mode when set
        self.retrieval_hook = None  # called with the ids [T, heads, top_k] of every training forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The output-scale-matched initialisation (docs/peer.md, 'Initialisation')."""
        self.query.reset_parameters()
        self.codebooks.reset_parameters()
        nn.init.uniform_(self.expert_u, -self._u_bound, self._u_bound)
        nn.init.uniform_(self.expert_v, -self._v_bound, self._v_bound)

    @property
    def _u_bound(self) -> float:
        return 1.0 / math.sqrt(self.dim)

    @property
    def _v_bound(self) -> float:
        c = self.top_k if self.score == "softmax" else 1.0
        return c / math.sqrt(self.heads * self.top_k)

    # ---- shape / size -------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.codebooks.grid

    @property
    def num_experts(self) -> int:
        n1, n2 = self.grid
        return n1 * n2

    # ---- routing ------------------------------------------------------------------------------
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.dim)
        return x.reshape(-1, self.dim)

    def _queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.query(x_TD))  # [T, H, key_dim]

    def _path(self, x_TD: torch.Tensor) -> str:
        """The compute path of this call: kernels.resolve of ``self.kernel`` for these tensors."""
        return kernels.resolve(self.kernel, x_TD, self.expert_u)

    def _route(self, x_TD: torch.Tensor, path: str | None = None):
        """(weights [T, H, K], ids [T, H, K]): what forward mixes with."""
        cb = self.codebooks
        scores_THK, ids_THK = kernels.retrieve(path or self._path(x_TD), self._queries(x_TD), cb.live_keys1(), cb.keys2,
                                               cb.offset1, self.top_k)
        if cb.warming_up():
            # A warm-in offset gates which experts are selected, not their weight once selected: an
            # expert that enters a token's top-k mixes (and learns) with its full score at once.
            warm_offset_Hn = torch.where(cb.warmup_left > 0, cb.offset1, torch.zeros_like(cb.offset1))
            rows_THK = torch.div(ids_THK, self.grid[1], rounding_mode="floor")
            heads_1H1 = torch.arange(self.heads, device=ids_THK.device).view(1, -1, 1)
            scores_THK = scores_THK - warm_offset_Hn[heads_1H1, rows_THK].to(scores_THK.dtype)
        if self.score == "softmax":
            weights_THK = scores_THK.softmax(dim=-1)
        else:
            weights_THK = torch.sigmoid(scores_THK)
        return weights_THK, ids_THK

    def route(self, x: torch.Tensor):
        """(weights, ids), both [..., heads, top_k]; weights after the score function, ids flat."""
        x_TD = self._flatten(x)
        weights_THK, ids_THK = self._route(x_TD)
        out_shape = x.shape[:-1] + (self.heads, self.top_k)
        return weights_THK.reshape(out_shape), ids_THK.reshape(out_shape)

    def all_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's raw key score [..., heads, num_experts] incl. offsets (small N only)."""
        x_TD = self._flatten(x)
        scores_THN = self.codebooks.all_scores(self._queries(x_TD))
        return scores_THN.reshape(x.shape[:-1] + (self.heads, self.num_experts))

    def experts(self, ids: torch.Tensor):
        """(u, v) of the experts named by ``ids`` (any shape), each ids.shape + (dim,)."""
        return F.embedding(ids, self.expert_u), F.embedding(ids, self.expert_v)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = self._flatten(x)
        if x_TD.shape[0] == 0:  # no tokens (e.g. an empty shard of a batch): nothing to route
            return x.new_zeros(x.shape)
        path = self._path(x_TD)
        weights_THK, ids_THK = self._route(x_TD, path)
        if self.usage_counter is not None and not self.training:
            if self.usage_counter.num_experts < self.num_experts:  # the pool grew
                self.usage_counter.grow_to(self.num_experts)
            self.usage_counter.update(weights_THK.detach(), ids_THK)
        if self.retrieval_hook is not None and self.training:  # sparse finetuning ranks these (experts.sparse)
            self.retrieval_hook(ids_THK)
        # M = heads * top_k slots per token; frozen experts compute as usual but get zero gradient
        T = x_TD.shape[0]
        y_TD = kernels.mix(path, x_TD, weights_THK.reshape(T, -1), ids_THK.reshape(T, -1), self.expert_u,
                           self.expert_v, self.activation, self.frozen if self.has_frozen() else None)
        return self.dropout(y_TD).reshape(x.shape)

    # ---- growth (docs/growth.md) ---------------------------------------------------------------
    def grow(self, n: int, optimizer=None, warmup_steps: int = 100, init: str = "random", inputs=None,
             usage=None, generator: torch.Generator | None = None, warmin: str = "calibrated",
             old_inputs=None) -> torch.Tensor:
        """Add at least ``n`` experts as ceil(n / n2) new grid rows; returns their ids, the int64 range
        old_N ..< new_N on the layer's device. Function-preserving: new rows score -inf until the first
        optimizer step, then follow a schedule that reaches 0 after warmup_steps (docs/growth.md, 'Warm-in').

        optimizer: gets the state surgery (docs/growth.md, 'Optimizer surgery') and the hooks (attach);
            optimizers already attached get the same surgery. With none, call advance_warmup() per step.
        init: new sub-keys "random" | "copy" (most-used rows of ``usage``) | "kmeans" (of ``inputs``) |
            "contrast" (kmeans moved away from ``old_inputs``' queries), see growth.new_subkeys.
        warmin: "calibrated" (the share of ``inputs``' queries new experts reach grows linearly) or
            "bound" (linear from a margin no query can beat); "bound" without inputs.
        inputs / old_inputs: recent x [..., dim] of the current / of earlier domains.
        generator: a CPU torch.Generator for every random draw (None = torch's global RNG).
        """
        growth.check_grow_args(n, warmup_steps, optimizer)
        check_choice("init", init, growth.INITS)
        check_choice("warmin", warmin, growth.WARMINS)
        if init in ("kmeans", "contrast") and inputs is None:
            raise ValueError(f'init="{init}" needs inputs: recent inputs x [..., dim] of the layer')
        n2 = self.grid[1]
        rows = -(-n // n2)
        old_n = self.num_experts
        q1_THd = None
        if inputs is not None:
            q1_THd = self._probe_queries(inputs)[..., : self.key_dim // 2].to("cpu", torch.float64)
            if init == "kmeans" and q1_THd.shape[0] < rows:
                raise ValueError(f'init="kmeans" needs at least {rows} input tokens (one per new row), '
                                 f"got {q1_THd.shape[0]}")
        old_q1_UHd = None
        if old_inputs is not None and init == "contrast":
            old_q1_UHd = self._probe_queries(old_inputs)[..., : self.key_dim // 2].to("cpu", torch.float64)
        keys_HRd = growth.new_subkeys(self, rows, init, q1_THd, usage, generator, old_q1_UHd)
        if warmin == "calibrated" and inputs is not None:
            knots_HK = growth.calibrated_knots(self._score_gaps(inputs, keys_HRd))
        else:
            half = self.key_dim // 2
            q_norm_H = (q1_THd.norm(dim=-1).amax(0) if q1_THd is not None
                        else torch.full((self.heads,), math.sqrt(half), dtype=torch.float64))
            knots_HK = growth.linear_knots(
                growth.score_margin(q_norm_H, self.codebooks.keys1.detach().to("cpu", torch.float64), keys_HRd))
        u_RD = growth.uniform((rows * n2, self.dim), self._u_bound, generator)
        v_RD = growth.uniform((rows * n2, self.dim), self._v_bound, generator)

        optimizers = surgery_targets(self, optimizer)
        check_resizable_state([self.codebooks.keys1, self.expert_u, self.expert_v], optimizers)
        self.codebooks.append_rows(keys_HRd, warmup_steps, knots_HK, optimizers)
        append_rows_(self.expert_u, u_RD, dim=0, optimizers=optimizers)
        append_rows_(self.expert_v, v_RD, dim=0, optimizers=optimizers)
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(rows * n2)])
        if self.usage_counter is not None:
            self.usage_counter.grow_to(self.num_experts)
        if optimizer is not None:
            attach(self, optimizer)
        return torch.arange(old_n, self.num_experts, device=self.expert_u.device)

    @torch.no_grad()
    def _score_gaps(self, inputs: torch.Tensor, new_keys_HRd: torch.Tensor) -> torch.Tensor:
        """[T, H]: each query's k-th best score among the current experts minus the best score among
        experts of the new first-codebook rows ``new_keys_HRd`` (any column), before their offset."""
        q_THD = self._probe_queries(inputs).to("cpu", torch.float64)
        half = self.key_dim // 2
        cb = self.codebooks
        keys1, keys2 = cb.keys1.detach().to("cpu", torch.float64), cb.keys2.detach().to("cpu", torch.float64)
        s1_THn = torch.einsum("thd,hnd->thn", q_THD[..., :half], keys1) + cb.offset1.to("cpu", torch.float64)
        s2_THn = torch.einsum("thd,hnd->thn", q_THD[..., half:], keys2)
        kth_TH = product_topk(s1_THn, s2_THn, self.top_k)[0][..., -1]
        new_best_TH = torch.einsum("thd,hrd->thr", q_THD[..., :half], new_keys_HRd).amax(-1) + s2_THn.amax(-1)
        return kth_TH - new_best_TH

    @torch.no_grad()
    def _probe_queries(self, inputs: torch.Tensor) -> torch.Tensor:
        """Queries [T, H, key_dim] of ``inputs`` with the query norm in eval mode (no side effects)."""
        check_inputs(inputs)
        x_TD = self._flatten(inputs.to(self.expert_u.device, self.query.weight.dtype))
        check_tokens(x_TD)
        was_training = self.norm.training
        self.norm.eval()
        try:
            return self._queries(x_TD)
        finally:
            self.norm.train(was_training)

    def advance_warmup(self, steps: int = 1) -> None:
        """Anneal the dormant offsets of rows still warming in by ``steps`` optimizer steps.
        experts.attach(model, optimizer) calls this after every optimizer step."""
        self.codebooks.advance_warmup(steps)

    def expert_generation(self) -> torch.Tensor:
        """Per expert [N]: 0 for the original experts, g for those added by the g-th growth."""
        return self.codebooks.generation.repeat_interleave(self.grid[1])

    def expert_tables(self) -> list[nn.Parameter]:
        """The parameters whose dim-0 rows are experts (what freezing protects)."""
        return [self.expert_u, self.expert_v]

    def row_sparse_tables(self) -> list[nn.Parameter]:
        """The 2-D tables [N, dim] whose rows are retrieved per token, so that one step touches few of
        them: expert_u and expert_v. experts.optim.rowwise_groups puts the tables of every module with
        this method in RowAdamW's row-wise groups (docs/optim.md); MoE, whose few experts each see
        many tokens, has no such method and stays dense."""
        return [self.expert_u, self.expert_v]

    def has_frozen(self) -> bool:
        """Whether any expert is frozen (cached on the buffer's version: no sync per forward)."""
        return growth.cached_stat(self.frozen, "any")

    def frozen_slices(self) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, indices) of everything frozen: expert rows of both tables and frozen
        first-codebook sub-key rows (what the optimizer guard of experts.attach keeps)."""
        out = []
        if self.has_frozen():
            ids = torch.nonzero(self.frozen).flatten()
            out += [(table, 0, ids) for table in self.expert_tables()]
        if self.codebooks.has_frozen_rows():
            out.append((self.codebooks.keys1, 1, torch.nonzero(self.codebooks.frozen_rows).flatten()))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of a grown layer (larger expert tables) resizes this one to match first;
        the codebooks resize themselves (ProductKeys._load_from_state_dict)."""
        saved = state_dict.get(prefix + "expert_u")
        if torch.is_tensor(saved) and saved.dim() == 2 and saved.shape[0] > self.expert_u.shape[0]:
            for name in ("expert_u", "expert_v", "frozen"):
                resize_rows_(self, name, saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- FFN interface shared with DenseFFN / MoE --------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """PEER has no auxiliary loss: a zero scalar."""
        return torch.zeros((), device=self.expert_u.device)

    def aux_metrics(self) -> dict[str, float]:
        return {}

    def flops_breakdown(self) -> dict[str, int]:
        """Forward FLOPs per token by stage (multiply-add = 2, add/multiply/comparison = 1, activation = 1):

          query projection        2 * dim * H * key_dim
          query norm (approx)     5 (batch/layernorm), 4 (rmsnorm) or 0 per query feature
          sub-key scoring         2 * H * (n1 + n2) * key_dim/2
          sub-key offsets         H * n1 adds (offset1)
          top-k of each half      H * (n1 + n2): selection modelled as one comparison per item
          candidates              H * k*k sums + H * k*k comparisons for the final top-k (the
                                  nominal product-key search; fewer pairs are formed, see
                                  product_keys._candidate_groups)
          score function          3 * H * k (exp, sum/add, divide; softmax or sigmoid)
          experts                 H * k * 4 * dim (u.x and the v mix)
          expert activation       H * k * 2 (activation and the weight multiply)
        """
        n1, n2 = self.grid
        h, k, kd, d = self.heads, self.top_k, self.key_dim, self.dim
        return {"query projection": 2 * d * h * kd, "query norm": _NORM_FLOPS[self.query_norm] * h * kd,
                "sub-key scoring": h * (n1 + n2) * kd, "sub-key offsets": h * n1, "top-k of each half": h * (n1 + n2),
                "candidates and final top-k": 2 * h * k * k, "score function": 3 * h * k,
                "experts": h * k * 4 * d, "expert activation": h * k * 2}

    def flops_per_token(self) -> int:
        """Forward FLOPs per token: the sum of flops_breakdown()."""
        return sum(self.flops_breakdown().values())

    def matmul_flops_per_token(self) -> int:
        """Only the matrix products with weights (MATMUL_STAGES of flops_breakdown): the count most
        scaling studies use, 2 FLOPs per multiply-add, norms, selection and activations left out."""
        return sum(n for stage, n in self.flops_breakdown().items() if stage in MATMUL_STAGES)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Query net + query-norm affine + every sub-key (all are scored) + H*k*2*dim expert weights."""
        n1, n2 = self.grid
        norm = sum(p.numel() for p in self.norm.parameters())
        return (self.query.weight.numel() + norm + self.heads * (n1 + n2) * self.key_dim // 2
                + self.heads * self.top_k * 2 * self.dim)

    def extra_repr(self) -> str:
        n1, n2 = self.grid
        return (f"dim={self.dim}, num_experts={self.num_experts} ({n1}x{n2}), heads={self.heads}, "
                f"top_k={self.top_k}, key_dim={self.key_dim}, activation={self.activation!r}, "
                f"query_norm={self.query_norm!r}, score={self.score!r}"
                + (f", kernel={self.kernel!r}" if self.kernel != "auto" else ""))
