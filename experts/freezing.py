"""Freezing experts and the optimizer hooks of PEER / MoE layers (warm-in and freeze guard).

A frozen expert's weights are detached in the forward pass (zero gradient) and, while a guard is
attached, restored with their same-shaped optimizer state after every ``optimizer.step()``, so
they and their moments stay bit-identical (docs/growth.md, 'Freezing'). ``attach`` installs, per
layer and optimizer, a step pre-hook (snapshot) and post-hook (restore, then advance the warm-in
by one step); hooks are not saved in checkpoints (docs/growth.md, 'Hooks and checkpoints').
Layers are found by duck typing: anything with ``expert_tables`` and ``advance_warmup``. (Named
freezing.py so that the package attribute ``experts.freeze``, the function, shadows no module.)
Shape suffixes: N experts.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn

from .checks import check_optimizer, is_int
from .growth import usage_counts


# ---- freezing -------------------------------------------------------------------------------------
def _check_growable(layer) -> None:
    """Raise ValueError unless ``layer`` is a PEER / MoE-like module (expert_tables and frozen)."""
    if not (isinstance(layer, nn.Module) and hasattr(layer, "expert_tables") and hasattr(layer, "frozen")):
        raise ValueError(f"expected a PEER or MoE layer, got {type(layer).__name__}")


def _ids_tensor(layer, ids) -> torch.Tensor:
    """Expert ids (an int, an iterable or a tensor) as int64 [n] on the CPU, checked against the pool."""
    if is_int(ids):
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
    elif is_int(fraction_or_n) and fraction_or_n >= 1:
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
    """A step pre-hook that snapshots the layer's frozen slices (``layer.frozen_slices()``: parameters
    and same-shaped optimizer state) and a post-hook that restores them, then advances the warm-in."""

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
        if layer is None:
            return
        saved = []
        for param, dim, ids in layer.frozen_slices():
            state = optimizer.state.get(param, {})
            moments = {key: value.index_select(dim, ids) for key, value in state.items()
                       if torch.is_tensor(value) and value.shape == param.shape}
            saved.append((param, dim, ids, param.index_select(dim, ids), moments))
        self.snapshot = saved or None

    @torch.no_grad()
    def post_step(self, optimizer, args, kwargs) -> None:
        layer = self.layer_ref()
        if layer is None:
            return
        if self.snapshot is not None:
            saved, self.snapshot = self.snapshot, None
            for param, dim, ids, rows, moments in saved:
                param.index_copy_(dim, ids, rows)
                for key, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        # state created by this very step started at zero for the frozen rows too
                        value.index_copy_(dim, ids, moments[key] if key in moments else value.new_zeros(rows.shape))
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
