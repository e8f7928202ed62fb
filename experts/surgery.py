"""Resizing parameters, buffers and optimizer state in place: the surgery behind growth.

Parameters keep their identity (their ``.data`` is swapped for a larger tensor), so optimizers'
param_groups stay valid; optimizer state shaped like a grown parameter keeps its old rows
bit-identical and gets zero rows, scalar state ('step') is kept, any other shape is refused
before anything changes (docs/growth.md, 'Optimizer surgery').
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
    """A new tensor: ``tensor`` with ``rows`` entries of ``fill`` appended along ``dim``."""
    shape = list(tensor.shape)
    shape[dim] = rows
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)


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
