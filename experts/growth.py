"""Online growth of expert pools: function-preserving warm-in, optimizer-state surgery, freezing
(DESIGN.md section 5).

Growth appends experts to a PEER layer (a new row of the n1 x n2 grid per n2 experts: a new
sub-key in every head's first codebook, new rows of expert_u / expert_v; flat ids i * n2 + j stay
stable and the new ids are appended) or to a coarse MoE (new router rows and expert weights).

Warm-in. A new key that wins a top-k slot displaces an old expert and renormalises the softmax, so
a zero output vector alone does not preserve the function (DESIGN.md section 5). Every new row
therefore gets an additive score offset (PEER: ProductKeys.offset1, MoE: MoE.logit_offset) that
follows, with W = warmup_steps and t = optimizer steps since the growth,

    offset(0) = -inf,   offset(t) = -margin * (1 - t / W)  for 0 < t < W,   offset(t >= W) = 0.

  t = 0: -inf ranks the new row below every old one, whatever the query, so right after growth the
      routes are those of the smaller layer (train and eval mode) and so are weights and outputs,
      up to the last bit: the old keys are now scored by a wider matmul, which BLAS may round
      differently (~1 ulp; <= 1e-6 in float32 in the tests; a route could only flip on a tie at
      that level). It is NaN-free: retrieval takes top_k <= (old rows) entries, so only finite scores are ever
      selected; a softmax over rows that include -inf gives them exactly 0, with gradient 0; and
      -inf + finite = -inf never meets +inf.
  t > 0: the function changes anyway once the optimizer moves the old parameters, so strict
      preservation is no longer the goal; the aim is that new experts *enter gradually*. The
      margin is a Cauchy-Schwarz bound on how much a new key can out-score an old one:
          score_new - score_old <= |q| (|c_new| + |c_old|) <= margin = q_max (max|c_new| + max|c_old|)
      with q_max the largest query norm seen in ``inputs`` (when given) or sqrt(feature dim)
      otherwise (PEER's query norms and the pre-norm LayerNorm in front of an MoE give features of
      unit variance). At offset -margin no new row can out-score any old row, so the handicap
      starts where no token can be captured and shrinks linearly to 0. Scores are log-weights
      (softmax), so a new expert that does enter early gets its weight scaled by exp(offset),
      i.e. it first takes the tokens its key is most aligned with, and only with a small weight.
  warmup_steps = 0: the new rows are live at once, and the growth is NOT function-preserving
      (a new key may win top-k slots on the very next forward).

The warm-in state is buffers of the layer (remaining steps, total, margin per row), so
checkpoints carry it. Each optimizer step advances it by one through a step post-hook; hooks are
not part of a checkpoint, so a fresh process must re-install them after loading::

    model.load_state_dict(state)          # resizes grown PEER / MoE layers to the saved sizes
    optimizer = build_optimizer(model)    # built after the load, over the grown parameters
    optimizer.load_state_dict(opt_state)
    experts.attach(model, optimizer)      # warm-in + freeze guard for every PEER / MoE in model

Without ``attach`` call ``layer.advance_warmup()`` after every optimizer step yourself.

Optimizer surgery. Parameters keep their identity (their ``.data`` is swapped for a larger tensor),
so the optimizer's param_groups stay valid. Every state tensor shaped like a grown parameter
(Adam/AdamW exp_avg, exp_avg_sq, max_exp_avg_sq; SGD momentum_buffer; RMSprop / Adagrad
accumulators) keeps its old rows bit-identical and gets zero rows (the fresh value) for the new
ones; scalar state such as 'step' is kept as is. State of any other shape cannot be resized and
is refused with a ValueError before anything is changed. Grow between optimizer steps, never
between a forward and its backward (the pending gradient would have the old shape).

Freezing (``freeze``). Zero gradients do not keep a row still under AdamW (momentum and weight
decay move it), so frozen experts are protected twice: their gathered weights are detached in the
forward pass (zero gradient: gradient clipping and norms ignore them), and an optimizer guard,
installed by ``attach``, snapshots the frozen rows of every expert table and of its same-shaped
optimizer state before ``optimizer.step()`` and writes them back afterwards. So the frozen
experts' parameters *and* moments are bit-identical after any number of steps; unfrozen later,
they resume from their old moments. Only the experts' own weights are frozen: sub-keys and router
rows are shared with other experts, so which tokens reach a frozen expert can still change.

torch.compile and CUDA graphs. Growth changes parameter and buffer shapes. A compiled module
guards on them and recompiles on its next call, once per growth (many growths can reach
dynamo's recompile limit, after which that code runs eagerly); a compiled optimizer step
likewise. CUDA graphs capture fixed addresses and shapes: re-capture after every growth or
resize-on-load, and keep the optimizer hooks (Python code) outside any captured region. The
forward's cheap "anything frozen?" check reads a buffer's version counter, a graph break under
torch.compile. The project uses neither by default.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .dense import check_int

INITS = ("random", "copy", "kmeans")


# ---- small shared helpers ---------------------------------------------------------------------
_STATS = {
    "any": lambda t: bool(t.any()),
    "any_positive": lambda t: bool((t > 0).any()),
    "num_neginf": lambda t: int(torch.isneginf(t).sum()),
}
_STAT_CACHE: dict = {}  # (id(tensor), stat) -> (weakref to tensor, version, value)


def cached_stat(tensor: torch.Tensor, stat: str):
    """A Python-side summary of a buffer ("any", "any_positive", "num_neginf"), recomputed only when
    the buffer is modified in place (its version counter moves) or is another tensor. Lets a
    forward pass ask "is anything frozen?" without a device sync per call."""
    key = (id(tensor), stat)
    hit = _STAT_CACHE.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    value = _STATS[stat](tensor)
    _STAT_CACHE[key] = (weakref.ref(tensor, lambda _, key=key: _STAT_CACHE.pop(key, None)), tensor._version, value)
    return value


def check_optimizer(optimizer) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def set_data_(param: nn.Parameter, data: torch.Tensor) -> None:
    """param.data = data for data of a new shape, keeping the Parameter object.

    Tensor.set_data keeps the parameter's cached gradient accumulator unless the dtype or device
    changes; an accumulator kept alive by a graph built before the resize would impose the old
    shape on every new graph ("invalid gradient ... expected shape compatible with [old]"), so
    the data is first set to an empty tensor of another dtype, which drops the cached node.
    """
    other = torch.float32 if data.dtype != torch.float32 else torch.float64
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


def _pad(tensor: torch.Tensor, rows: int, dim: int, fill: float = 0.0) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = rows
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)


# ---- optimizer surgery ------------------------------------------------------------------------
def check_resizable_state(params: Iterable[nn.Parameter], optimizers: Iterable) -> None:
    """Raise ValueError unless every tensor state the optimizers hold for ``params`` is a scalar
    or shaped like its parameter (the state append_rows_ can extend). Growth calls this for all
    its parameters before changing any of them."""
    optimizers = [opt for opt in optimizers if opt is not None]
    for param in params:
        for opt in optimizers:
            for key, value in opt.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"cannot grow the {type(opt).__name__} state {key!r} of shape "
                                     f"{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}: only "
                                     f"state shaped like the parameter (Adam/AdamW/SGD moments) can be resized")


def append_rows_(param: nn.Parameter, rows: torch.Tensor, dim: int = 0, optimizers: Iterable = ()) -> None:
    """Append ``rows`` to ``param`` along ``dim`` in place, keeping the Parameter object.

    Every optimizer state tensor shaped like the parameter is extended with zeros along ``dim``
    (old entries bit-identical), scalar state ('step') is kept, a pending .grad is zero-padded.
    """
    if rows.dim() != param.dim() or any(rows.shape[d] != param.shape[d] for d in range(param.dim()) if d != dim):
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit a parameter of shape "
                         f"{tuple(param.shape)} along dim {dim}")
    optimizers = [opt for opt in optimizers if opt is not None]
    check_resizable_state([param], optimizers)
    new_rows = rows.shape[dim]
    with torch.no_grad():
        set_data_(param, torch.cat([param.data, rows.to(param.device, param.dtype)], dim=dim))
        if param.grad is not None:
            param.grad = _pad(param.grad, new_rows, dim)
        for opt in optimizers:
            state = opt.state.get(param)
            if not state:
                continue
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = _pad(value, new_rows, dim)


def resize_rows_(module: nn.Module, name: str, size: int, dim: int = 0, fill: float = 0.0) -> None:
    """Grow the parameter or buffer ``module.<name>`` to ``size`` along ``dim`` with ``fill``
    (placeholder rows, e.g. before a state dict's values are copied in). Parameters keep their
    identity; no optimizer is touched."""
    tensor = getattr(module, name)
    extra = size - tensor.shape[dim]
    if extra <= 0:
        return
    if isinstance(tensor, nn.Parameter):
        with torch.no_grad():
            set_data_(tensor, _pad(tensor.data, extra, dim, fill))
        tensor.grad = None
    else:
        setattr(module, name, _pad(tensor, extra, dim, fill))


# ---- warm-in schedule -------------------------------------------------------------------------
def warmup_offsets(left: torch.Tensor, total: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Dormant score offsets (module docstring): -inf while no step was taken (left == total > 0),
    then -margin * left / total, 0 once left == 0. left/total broadcast against margin."""
    frac = left.to(margin.dtype) / total.clamp(min=1).to(margin.dtype)
    offset = torch.where(left > 0, -margin * frac, torch.zeros_like(margin))
    return torch.where((left == total) & (total > 0), torch.full_like(offset, -math.inf), offset)


def advance_warmup_(offset: torch.Tensor, left: torch.Tensor, total: torch.Tensor, margin: torch.Tensor,
                    steps: int) -> None:
    """Take ``steps`` warm-in steps: decrement ``left`` (>= 0) and rewrite the offsets of the rows
    that were warming up. Rows that were not (left == 0) keep whatever offset they have."""
    check_int("steps", steps)
    active = left > 0
    left.sub_(steps).clamp_(min=0)
    offset.copy_(torch.where(active, warmup_offsets(left, total, margin), offset))


def score_margin(q_norm: torch.Tensor, old_keys: torch.Tensor, new_keys: torch.Tensor) -> torch.Tensor:
    """Cauchy-Schwarz margin q_norm * (max |new key| + max |old key|) over the last two dims
    (keys [..., rows, dim], q_norm [...]): no new key out-scores any old one by more than this
    for a query of norm <= q_norm."""
    return q_norm * (new_keys.norm(dim=-1).amax(-1) + old_keys.norm(dim=-1).amax(-1))


# ---- k-means ----------------------------------------------------------------------------------
@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, iters: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means centres [..., k, D] of points [..., T, D] (a batch of independent problems, e.g.
    one per head): k-means++ seeding, then Lloyd iterations until the assignment is stable.

    Runs on the CPU in at least float32 (samples of recent inputs are small); an empty cluster
    keeps its previous centre. ``generator`` (a CPU torch.Generator) makes it reproducible.
    """
    check_int("k", k)
    check_int("iters", iters)
    if points.dim() < 2:
        raise ValueError(f"points must be [..., T, D], got shape {tuple(points.shape)}")
    lead, (T, D) = points.shape[:-2], points.shape[-2:]
    if T < k:
        raise ValueError(f"k-means needs at least k={k} points, got {T}")
    x_BTD = points.detach().reshape(-1, T, D).to("cpu", torch.promote_types(points.dtype, torch.float32))
    B = x_BTD.shape[0]
    batch_B = torch.arange(B)
    centres_BKD = x_BTD.new_empty(B, k, D)
    pick_B = torch.randint(T, (B,), generator=generator)
    centres_BKD[:, 0] = x_BTD[batch_B, pick_B]
    d2_BT = (x_BTD - centres_BKD[:, :1]).pow(2).sum(-1)
    for c in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        weights_BT = torch.where(d2_BT.sum(-1, keepdim=True) > 0, d2_BT, torch.ones_like(d2_BT))
        pick_B = torch.multinomial(weights_BT, 1, generator=generator).squeeze(-1)
        centres_BKD[:, c] = x_BTD[batch_B, pick_B]
        d2_BT = torch.minimum(d2_BT, (x_BTD - centres_BKD[:, c:c + 1]).pow(2).sum(-1))
    assign_BT = None
    for _ in range(iters):
        new_assign_BT = torch.cdist(x_BTD, centres_BKD).argmin(-1)
        if assign_BT is not None and torch.equal(new_assign_BT, assign_BT):
            break
        assign_BT = new_assign_BT
        sums_BKD = x_BTD.new_zeros(B, k, D).scatter_add_(1, assign_BT.unsqueeze(-1).expand(-1, -1, D), x_BTD)
        counts_BK = x_BTD.new_zeros(B, k).scatter_add_(1, assign_BT, torch.ones_like(x_BTD[..., 0]))
        centres_BKD = torch.where(counts_BK.unsqueeze(-1) > 0,
                                  sums_BKD / counts_BK.clamp(min=1).unsqueeze(-1), centres_BKD)
    return centres_BKD.reshape(*lead, k, D)


# ---- usage ------------------------------------------------------------------------------------
def usage_counts(usage, num_experts: int) -> torch.Tensor:
    """A UsageCounter or a counts tensor [N] / [heads, N] -> float64 counts [rows, num_experts] on
    the CPU; a counter smaller than the pool (it grows lazily) is zero-padded."""
    counts = getattr(usage, "counts", usage)
    if not torch.is_tensor(counts):
        raise ValueError(f"usage must be a UsageCounter or a counts tensor [N] or [heads, N], "
                         f"got {type(usage).__name__}")
    counts = counts.detach().to("cpu", torch.float64)
    if counts.dim() == 1:
        counts = counts.unsqueeze(0)
    if counts.dim() != 2 or counts.shape[1] > num_experts:
        raise ValueError(f"usage counts must be [N] or [heads, N] with N <= num_experts={num_experts}, "
                         f"got shape {tuple(counts.shape)}")
    return _pad(counts, num_experts - counts.shape[1], 1)


# ---- freezing ---------------------------------------------------------------------------------
def _check_growable(layer) -> None:
    if not (isinstance(layer, nn.Module) and hasattr(layer, "expert_tables") and hasattr(layer, "frozen")):
        raise ValueError(f"expected a PEER or MoE layer, got {type(layer).__name__}")


def _ids_tensor(layer, ids) -> torch.Tensor:
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    ids = torch.as_tensor(ids if torch.is_tensor(ids) else list(ids)).reshape(-1)
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"expert ids must be integers, got dtype {ids.dtype}")
    ids = ids.to("cpu", torch.int64)
    n = layer.num_experts
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"expert ids must lie in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")
    return ids


def freeze(layer, ids, optimizer=None) -> torch.Tensor:
    """Freeze the experts ``ids`` (ints, a list or a tensor) of a PEER or MoE layer; returns the ids.

    Their weights get zero gradient at once; they stay bit-identical under AdamW/SGD (momentum,
    weight decay) only while a guard is attached: pass ``optimizer`` (or call attach(model, opt)).
    The frozen set is the layer's ``frozen`` buffer, so checkpoints carry it.
    """
    _check_growable(layer)
    ids = _ids_tensor(layer, ids)
    with torch.no_grad():
        layer.frozen[ids.to(layer.frozen.device)] = True
    if optimizer is not None:
        attach(layer, optimizer)
    elif ids.numel() and not attached_optimizers(layer):
        warnings.warn("frozen experts get zero gradient, but AdamW / momentum / weight decay still move them "
                      "until experts.attach(model, optimizer) installs the freeze guard", stacklevel=2)
    return ids


def unfreeze(layer, ids=None) -> torch.Tensor:
    """Unfreeze the experts ``ids`` (None = all); returns the ids that were unfrozen."""
    _check_growable(layer)
    ids = frozen_ids(layer) if ids is None else _ids_tensor(layer, ids)
    with torch.no_grad():
        layer.frozen[ids.to(layer.frozen.device)] = False
    return ids


def frozen_ids(layer) -> torch.Tensor:
    """The frozen experts' ids, ascending, int64 on the CPU."""
    _check_growable(layer)
    return torch.nonzero(layer.frozen.cpu()).flatten()


def freeze_existing(layer, optimizer=None) -> torch.Tensor:
    """Freeze every expert that existed before the layer's newest growth (generation < newest)."""
    _check_growable(layer)
    generation_N = layer.expert_generation()
    newest = int(generation_N.max())
    if newest == 0:
        raise ValueError("freeze_existing needs a layer that has grown: all its experts are original")
    return freeze(layer, torch.nonzero(generation_N < newest).flatten(), optimizer)


def freeze_top_used(layer, usage, fraction_or_n, optimizer=None) -> torch.Tensor:
    """Freeze the experts a finished domain used most: the ``n`` (int >= 1) or ``fraction`` (float in
    (0, 1], of the pool, rounded up) experts with the largest usage counts, pooled over heads.
    Experts with zero usage are never frozen. ``usage``: a UsageCounter or counts [N] / [heads, N]."""
    _check_growable(layer)
    N = layer.num_experts
    if isinstance(fraction_or_n, float) and 0.0 < fraction_or_n <= 1.0:
        n = math.ceil(fraction_or_n * N)
    elif isinstance(fraction_or_n, int) and not isinstance(fraction_or_n, bool) and fraction_or_n >= 1:
        n = min(fraction_or_n, N)
    else:
        raise ValueError(f"fraction_or_n must be a float in (0, 1] or an int >= 1, got {fraction_or_n!r}")
    counts_N = usage_counts(usage, N).sum(0)
    top_counts, top_ids = counts_N.topk(n)
    return freeze(layer, top_ids[top_counts > 0], optimizer)


# ---- optimizer hooks: warm-in and freeze guard ---------------------------------------------------
# optimizer -> {layer -> _Hooks}; weak on both sides, so neither is kept alive by the registry.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Hooks:
    """A step pre-hook that snapshots the layer's frozen rows (parameters and same-shaped
    optimizer state) and a post-hook that restores them, then advances the warm-in by one step."""

    def __init__(self, layer: nn.Module, optimizer: torch.optim.Optimizer):
        self.layer_ref = weakref.ref(layer)
        self.snapshot = None
        self.handles = [optimizer.register_step_pre_hook(self.pre_step),
                        optimizer.register_step_post_hook(self.post_step)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def pre_step(self, optimizer, args, kwargs) -> None:
        self.snapshot = None
        layer = self.layer_ref()
        if layer is None or not layer.has_frozen():
            return
        ids = torch.nonzero(layer.frozen).flatten()
        saved = []
        for param in layer.expert_tables():
            state = optimizer.state.get(param, {})
            moments = {key: value.index_select(0, ids) for key, value in state.items()
                       if torch.is_tensor(value) and value.shape == param.shape}
            saved.append((param, param.index_select(0, ids), moments))
        self.snapshot = (ids, saved)

    @torch.no_grad()
    def post_step(self, optimizer, args, kwargs) -> None:
        layer = self.layer_ref()
        if layer is None:
            return
        if self.snapshot is not None:
            ids, saved = self.snapshot
            self.snapshot = None
            for param, rows, moments in saved:
                param.index_copy_(0, ids, rows)
                for key, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        # state created by this very step started at zero for the frozen rows too
                        value.index_copy_(0, ids, moments[key] if key in moments else value.new_zeros(rows.shape))
        layer.advance_warmup(1)


def growable_layers(module: nn.Module) -> list[nn.Module]:
    """Every PEER / MoE layer in ``module`` (itself included)."""
    return [m for m in module.modules() if hasattr(m, "expert_tables") and hasattr(m, "advance_warmup")]


def attach(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """Install the warm-in and freeze-guard step hooks of every PEER / MoE in ``module`` on
    ``optimizer`` (idempotent per layer and optimizer); returns the layers found.

    Attach each layer to the one optimizer that trains it: every attached optimizer's step
    advances the warm-in. PEER.grow / MoE.grow also do optimizer surgery on every optimizer the
    layer is attached to. Hooks are not saved in checkpoints: call this again after loading.
    """
    check_optimizer(optimizer)
    if optimizer is None:
        raise ValueError("attach needs an optimizer")
    layers = growable_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no PEER or MoE layer to attach")
    per_layer = _ATTACHED.setdefault(optimizer, weakref.WeakKeyDictionary())
    for layer in layers:
        if layer not in per_layer:
            per_layer[layer] = _Hooks(layer, optimizer)
    return layers


def detach(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Remove the hooks attach(module, optimizer) installed (no-op where there are none)."""
    per_layer = _ATTACHED.get(optimizer)
    if per_layer is None:
        return
    for layer in growable_layers(module):
        hooks = per_layer.pop(layer, None)
        if hooks is not None:
            hooks.remove()


def attached_optimizers(layer: nn.Module) -> list[torch.optim.Optimizer]:
    """The live optimizers ``layer`` is attached to."""
    return [opt for opt, per_layer in list(_ATTACHED.items()) if layer in per_layer]


def attached_layers(optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """The live layers attached to ``optimizer`` (``attach``), in attach order."""
    return list(_ATTACHED.get(optimizer, {}).keys())


def surgery_targets(layer: nn.Module, optimizer) -> list[torch.optim.Optimizer]:
    """The given optimizer (validated) plus every optimizer the layer is attached to."""
    check_optimizer(optimizer)
    targets = attached_optimizers(layer)
    if optimizer is not None and all(opt is not optimizer for opt in targets):
        targets.append(optimizer)
    return targets


# ---- growth helpers shared by PEER and MoE --------------------------------------------------------
def check_grow_args(n, warmup_steps, optimizer) -> None:
    check_int("n", n)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_optimizer(optimizer)


def uniform(shape, bound: float, generator) -> torch.Tensor:
    """U(-bound, bound) on the CPU from ``generator`` (None = the global RNG)."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def normal(shape, std: float, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def new_subkeys(layer, rows: int, init: str, q1_THd: torch.Tensor | None, usage, generator) -> torch.Tensor:
    """Initial sub-keys [H, rows, key_dim/2] for new rows of a PEER's first codebook.

    random  N(0, 2/key_dim), as ProductKeys.reset_parameters.
    copy    the keys of each head's most-used rows (by ``usage``; cycled when rows exceed n1) plus
            1% relative noise: the copy ties with its original and splits its traffic (noise
            breaks the symmetry). Without usage, or with all-zero usage: random.
    kmeans  k-means centres of the first-half queries q1 of ``inputs`` per head, rescaled to the
            mean norm of the head's existing sub-keys, so the new rows point where the current
            domain's queries are and score on the old keys' scale.
    """
    keys1 = layer.codebooks.keys1.detach()
    H, n1, d = keys1.shape
    std = 1.0 / math.sqrt(d)
    if init == "copy" and usage is not None:
        counts_xN = usage_counts(usage, layer.num_experts)
        if counts_xN.shape[0] not in (1, H):
            counts_xN = counts_xN.sum(0, keepdim=True)
        rows_xR = counts_xN.view(-1, n1, layer.grid[1]).sum(-1)  # usage per first-codebook row
        if bool((rows_xR.sum(-1) > 0).all()):
            order_xR = rows_xR.argsort(dim=-1, descending=True, stable=True)
            pick_HR = order_xR[:, torch.arange(rows) % n1].expand(H, rows)
            base_HRd = keys1.to("cpu", torch.float64).gather(1, pick_HR.unsqueeze(-1).expand(H, rows, d))
            rms_HR1 = base_HRd.pow(2).mean(-1, keepdim=True).sqrt()
            return base_HRd + 0.01 * rms_HR1 * normal((H, rows, d), 1.0, generator)
    if init == "kmeans":
        centres_HRd = kmeans(q1_THd.transpose(0, 1), rows, generator=generator).to(torch.float64)
        scale_H11 = keys1.to("cpu", torch.float64).norm(dim=-1).mean(-1).view(H, 1, 1)
        return centres_HRd / centres_HRd.norm(dim=-1, keepdim=True).clamp(min=1e-12) * scale_H11
    return normal((H, rows, d), std, generator)
