"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts",
arXiv 2407.04153), a pool of N single-neuron experts retrieved per token through product keys.

The layer, in the paper's terms (section 2):
    MoE layer      f(x) = sum_{i in I} g_i(x) e_i(x),  I = indices of the top-k of q(x)^T k_i,
                   g_i = softmax (or sigmoid) of those top-k scores;
    product keys   k_i = [c_a; c'_b], retrieved exactly with two top-k's over the sub-key
                   codebooks C, C' and a top-k over the k*k candidate sums (product_keys.py);
    expert         e_i(x) = act(u_i^T x) v_i, a singleton MLP with one hidden neuron, no biases;
    multi-head     f(x) = sum_{h=1}^{H} f^h(x): H heads, each with its own query and codebooks,
                   retrieve k experts each from the one shared pool.

Shape suffixes: T tokens (leading dims flattened), H heads, K top_k, N experts, D dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import growth, kernels
from .dense import activation_fn, check_choice, check_dropout, check_int
from .product_keys import ProductKeys, check_top_k

QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")
SCORES = ("softmax", "sigmoid")

# Approximate FLOPs per query feature of each query norm (mean, variance, subtract, scale, shift;
# RMSNorm has no mean/shift). Only a rough term: it is tiny next to the rest.
_NORM_FLOPS = {"batchnorm": 5, "layernorm": 5, "rmsnorm": 4, "none": 0}


def parse_grid(num_experts) -> tuple[int, int]:
    """num_experts: a perfect-square int n*n (an n x n grid) or an explicit tuple (n1, n2)."""
    if isinstance(num_experts, (tuple, list)):
        if len(num_experts) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                         for n in num_experts):
            return int(num_experts[0]), int(num_experts[1])
        raise ValueError(f"num_experts as a tuple must be (n1, n2) with two ints >= 1, got {num_experts!r}")
    if isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts >= 1:
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

    Pieces and parameter layout (all growable by appending rows, DESIGN.md section 5):
      query      Linear(dim, heads*key_dim, bias=False): one query per head.
      norm       query norm (``query_norm``), see QueryNorm.
      codebooks  ProductKeys: keys1 [H, n1, key_dim/2], keys2 [H, n2, key_dim/2], offset1 [H, n1].
      expert_u, expert_v   [n1*n2, dim]; expert id i*n2 + j = row i of keys1, column j of keys2.

    BatchNorm caveat: in train mode the query BatchNorm normalises every query feature with the
    mean and variance of *all tokens in the batch* (every leading dim is flattened into the
    batch), so a token's route and output depend on the other tokens, including later positions
    of the same sequence in a causal LM, and the statistics drift when the data domain changes.
    In eval mode it uses running statistics and each token is routed on its own. "layernorm",
    "rmsnorm" and "none" are exactly per-token in both modes. Calling route() in train mode with
    batchnorm also updates the running statistics, like forward() does.

    Initialisation (output scale matched to a dense FFN of the same active width m = heads*top_k
    with torch's default nn.Linear init, so swapping a dense block for PEER keeps the residual
    stream's scale at init):
      - u ~ U(-1/sqrt(dim), 1/sqrt(dim)), exactly the rows of Linear(dim, m).weight, so the
        pre-activations u . x have the dense block's distribution;
      - the dense output is sum over m neurons of W2 * act with W2 ~ U(-1/sqrt(m), 1/sqrt(m)).
        PEER multiplies each neuron by its weight w; softmax weights of a head sum to 1 and are
        close to uniform (1/top_k) at init, sigmoid weights of top-k scores are close to 1. So
        v ~ U(-c/sqrt(m), c/sqrt(m)) with c = top_k (softmax) or 1 (sigmoid) makes w * v match W2;
      - sub-keys ~ N(0, 2/key_dim) so that each half-score has unit variance for unit-variance
        queries: top-k scores stay O(1) and the softmax is smooth at init (ProductKeys);
      - query net: default nn.Linear init (the query norm rescales it anyway).

    Dropout (``dropout``) is applied to the layer's output, as in nanoGPT's MLP.

    Compute path (``kernel``, also a plain attribute that may be changed at any time; see
    experts/kernels): "auto" (default) runs the Triton kernels on CUDA when triton imports and the
    fused embedding-bag path ("bag", no [T, M, D] gathered tensors) otherwise; "reference" forces
    the plain torch implementation (einsum scores, torch.topk, two F.embedding gathers, einsum
    mixing); "bag" and "triton" force those paths. The environment variable EXPERTS_KERNEL
    overrides "auto". All paths compute the same function; "triton" breaks top-k ties by lowest
    index (torch.topk leaves them unspecified) and sums in fp32 in its own order.

    Usage recording: set ``layer.usage_counter = UsageCounter(layer.num_experts, layer.heads)``
    (or call experts.usage.track_usage(layer)); while the layer is in eval mode every forward adds
    its routing weights to the counter. Training forwards are not recorded.

    Growth and freezing (DESIGN.md section 5, experts/growth.py): grow() appends rows of experts
    that enter dormant and warm in; the ``frozen`` buffer [N] marks experts whose u/v the forward
    detaches and the optimizer guard (experts.attach) keeps bit-identical. Loading the state dict
    of a grown layer into a smaller one resizes it first.
    """

    def __init__(self, dim: int, num_experts, heads: int = 8, top_k: int = 16, key_dim: int = 128,
                 activation: str = "gelu", query_norm: str = "batchnorm", score: str = "softmax",
                 dropout: float = 0.0, kernel: str = "auto"):
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        check_int("key_dim", key_dim, minimum=2)
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (the query is split into two halves), got {key_dim}")
        n1, n2 = parse_grid(num_experts)
        check_top_k(top_k, n1, n2)
        check_choice("activation", activation, ("gelu", "relu"))
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The output-scale-matched initialisation described in the class docstring."""
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
        if x.shape[-1] != self.dim:
            raise ValueError(f"input's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.dim)

    def _queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.query(x_TD))  # [T, H, key_dim]

    def _path(self, x_TD: torch.Tensor) -> str:
        """The compute path of this call: kernels.resolve of ``self.kernel`` for these tensors."""
        return kernels.resolve(self.kernel, x_TD, self.expert_u)

    def _route(self, x_TD: torch.Tensor, path: str | None = None):
        """(weights [T, H, K], ids [T, H, K]): what forward mixes with."""
        cb = self.codebooks
        scores_THK, ids_THK = kernels.retrieve(path or self._path(x_TD), self._queries(x_TD), cb.keys1, cb.keys2,
                                               cb.offset1, self.top_k)
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
        # M = heads * top_k experts per token: y = sum_m w_m act(u_m . x) v_m (kernels.mix;
        # frozen experts compute as usual but their rows receive zero gradient)
        T = x_TD.shape[0]
        y_TD = kernels.mix(path, x_TD, weights_THK.reshape(T, -1), ids_THK.reshape(T, -1), self.expert_u,
                           self.expert_v, self.activation, self.frozen if self.has_frozen() else None)
        return self.dropout(y_TD).reshape(x.shape)

    # ---- growth (DESIGN.md section 5; mechanics and schedule in experts/growth.py) ------------
    def grow(self, n: int, optimizer=None, warmup_steps: int = 100, init: str = "random", inputs=None,
             usage=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Add at least ``n`` experts as ceil(n / n2) new grid rows; returns their ids, the int64
        range old_N ..< new_N on the layer's device. Old ids keep naming the same parameters.

        Function-preserving: each new row's score offset is -inf until the first optimizer step,
        so right after growth no new key can enter any top-k: routes (train and eval mode) are the
        old ones and outputs too, up to last-bit rounding of the wider score matmul; then the offset is -margin * (1 - t / warmup_steps), a handicap
        that starts where no new key can out-score an old one (Cauchy-Schwarz margin from the
        sub-key norms and the query norm) and reaches 0 after ``warmup_steps`` optimizer steps
        (justification: experts/growth.py). warmup_steps=0: the new rows are live at once and the
        output may change immediately.

        optimizer: its state for keys1, expert_u and expert_v is extended (old moments kept bit-
            identical, new rows zero, 'step' kept) and the warm-in / freeze hooks are attached to
            it (once; experts.attach). Optimizers the layer is already attached to get the same
            surgery. Without any, call advance_warmup() after each optimizer step yourself.
        init: new sub-keys "random" | "copy" (of the rows most used in ``usage``, a UsageCounter
            or counts [N] / [H, N]; random without usage) | "kmeans" (centres of the first-half
            queries of ``inputs``), see growth.new_subkeys. New u / v rows follow
            reset_parameters: a random v (not zero) lets a new expert contribute, and so send
            gradient to its sub-key, from the moment it is first retrieved; with v = 0 the key's
            gradient (through the weight times act(u . x) v) would vanish and the new rows could
            not learn where to go. Function preservation comes from the offset, not from v.
        inputs: recent inputs x [..., dim] of the layer; required by "kmeans", and when given the
            margin uses the largest first-half query norm among them instead of sqrt(key_dim/2).
            Queries are computed with the query norm in eval mode (no running-stat update).
        generator: a CPU torch.Generator for every random draw (None = torch's global RNG).
        """
        growth.check_grow_args(n, warmup_steps, optimizer)
        check_choice("init", init, growth.INITS)
        if init == "kmeans" and inputs is None:
            raise ValueError('init="kmeans" needs inputs: recent inputs x [..., dim] of the layer')
        n2 = self.grid[1]
        rows = -(-n // n2)
        old_n = self.num_experts
        q1_THd = None
        if inputs is not None:
            q1_THd = self._probe_queries(inputs)[..., : self.key_dim // 2].to("cpu", torch.float64)
            if init == "kmeans" and q1_THd.shape[0] < rows:
                raise ValueError(f'init="kmeans" needs at least {rows} input tokens (one per new row), '
                                 f"got {q1_THd.shape[0]}")
        keys_HRd = growth.new_subkeys(self, rows, init, q1_THd, usage, generator)
        half = self.key_dim // 2
        q_norm_H = (q1_THd.norm(dim=-1).amax(0) if q1_THd is not None
                    else torch.full((self.heads,), math.sqrt(half), dtype=torch.float64))
        margin_H = growth.score_margin(q_norm_H, self.codebooks.keys1.detach().to("cpu", torch.float64), keys_HRd)
        u_RD = growth.uniform((rows * n2, self.dim), self._u_bound, generator)
        v_RD = growth.uniform((rows * n2, self.dim), self._v_bound, generator)

        optimizers = growth.surgery_targets(self, optimizer)
        growth.check_resizable_state([self.codebooks.keys1, self.expert_u, self.expert_v], optimizers)
        self.codebooks.append_rows(keys_HRd, warmup_steps, margin_H, optimizers)
        growth.append_rows_(self.expert_u, u_RD, dim=0, optimizers=optimizers)
        growth.append_rows_(self.expert_v, v_RD, dim=0, optimizers=optimizers)
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(rows * n2)])
        if self.usage_counter is not None:
            self.usage_counter.grow_to(self.num_experts)
        if optimizer is not None:
            growth.attach(self, optimizer)
        return torch.arange(old_n, self.num_experts, device=self.expert_u.device)

    @torch.no_grad()
    def _probe_queries(self, inputs: torch.Tensor) -> torch.Tensor:
        """Queries [T, H, key_dim] of ``inputs`` with the query norm in eval mode (no side effects)."""
        if not torch.is_tensor(inputs):
            raise ValueError(f"inputs must be a tensor [..., dim], got {type(inputs).__name__}")
        x_TD = self._flatten(inputs.to(self.expert_u.device, self.query.weight.dtype))
        if x_TD.shape[0] == 0:
            raise ValueError("inputs must hold at least one token")
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

    def has_frozen(self) -> bool:
        """Whether any expert is frozen (cached on the buffer's version: no sync per forward)."""
        return growth.cached_stat(self.frozen, "any")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint of a grown layer (larger expert tables) resizes this one to match first;
        the codebooks resize themselves (ProductKeys._load_from_state_dict)."""
        saved = state_dict.get(prefix + "expert_u")
        if torch.is_tensor(saved) and saved.dim() == 2 and saved.shape[0] > self.expert_u.shape[0]:
            for name in ("expert_u", "expert_v", "frozen"):
                growth.resize_rows_(self, name, saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- FFN interface shared with DenseFFN / MoE --------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """PEER has no auxiliary loss: a zero scalar."""
        return torch.zeros((), device=self.expert_u.device)

    def aux_metrics(self) -> dict[str, float]:
        return {}

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (multiply-add = 2, add/multiply/comparison = 1, activation = 1):

          query projection        2 * dim * H * key_dim
          query norm (approx)     5 (batch/layernorm), 4 (rmsnorm) or 0 per query feature
          sub-key scoring         2 * H * (n1 + n2) * key_dim/2, plus H * n1 offset adds
          top-k of each half      H * (n1 + n2): selection modelled as one comparison per item
          candidates              H * k*k sums + H * k*k comparisons for the final top-k
          score function          3 * H * k (exp, sum/add, divide; softmax or sigmoid)
          experts                 H * k * (2*dim for u.x + 1 act + 1 weight mult + 2*dim v mix)
        """
        n1, n2 = self.grid
        h, k, kd, d = self.heads, self.top_k, self.key_dim, self.dim
        flops = 2 * d * h * kd
        flops += _NORM_FLOPS[self.query_norm] * h * kd
        flops += h * (n1 + n2) * kd + h * n1
        flops += h * (n1 + n2)
        flops += 2 * h * k * k
        flops += 3 * h * k
        flops += h * k * (4 * d + 2)
        return flops

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
