"""Retrofit PEER layers into a pretrained transformer (a Hugging Face causal LM or any model whose
blocks keep their MLP under one attribute), for people with their own training loop.

Two ways in:

- ``replace``: the block's MLP becomes a PEER layer (a new model: it must be trained).
- ``parallel``: the block computes ``mlp(x) + peer(x)`` with every expert's output vector ``v`` at
  zero, so the retrofitted model computes exactly what the pretrained one did (function-preserving
  insertion, the discipline of growth); training then moves ``v`` away from zero first.

Where each architecture keeps its blocks and MLPs is a small table (:data:`ARCHITECTURES`), keyed
by ``model.config.model_type``; other types are refused with one line naming the type. Depends on
torch only: the model is walked by attribute names, transformers is never imported here.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .checks import check_choice
from .peer import PEER

MODES = ("replace", "parallel")

# model_type -> (paths to the list of blocks, tried in turn, for the LM-head model and the bare one;
# the MLP attribute of a block)
ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    "gpt2": (("transformer.h", "h"), "mlp"),
    "gpt_neox": (("gpt_neox.layers", "layers"), "mlp"),
    "llama": (("model.layers", "layers"), "mlp"),
    "qwen2": (("model.layers", "layers"), "mlp"),
    "qwen3": (("model.layers", "layers"), "mlp"),
    "mistral": (("model.layers", "layers"), "mlp"),
}


class ParallelPEER(nn.Module):
    """A pretrained MLP with a PEER layer beside it: ``mlp(x) + peer(x)``."""

    def __init__(self, mlp: nn.Module, peer: PEER):
        super().__init__()
        self.mlp, self.peer = mlp, peer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.mlp(x, *args, **kwargs) + self.peer(x)


def model_type(model: nn.Module) -> str:
    """The architecture name of a Hugging Face model (``config.model_type``), or "" without one."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def hidden_size(model: nn.Module) -> int:
    """The residual width of a Hugging Face model (``config.hidden_size``, GPT-2's ``n_embd``)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the hidden size of model type {model_type(model)!r} (no config.hidden_size)")


def blocks_of(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """(the model's transformer blocks, the attribute holding each block's MLP)."""
    kind = model_type(model)
    if kind not in ARCHITECTURES:
        raise ValueError(f"model type {kind or 'unknown'!r} is not supported for PEER retrofit "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    paths, mlp = ARCHITECTURES[kind]
    for path in paths:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found, mlp
    raise ValueError(f"model type {kind!r}: no block list at {' or '.join(paths)}")


def resolve_blocks(spec: str | Iterable[int], n_blocks: int) -> list[int]:
    """Block indices from "middle" (the middle block), "all", or indices (negatives count from the end)."""
    if spec == "middle":
        return [n_blocks // 2]
    if spec == "all":
        return list(range(n_blocks))
    if isinstance(spec, str):
        raise ValueError(f"blocks must be 'middle', 'all' or a list of block indices, got {spec!r}")
    out = []
    for index in spec:
        if isinstance(index, bool) or not isinstance(index, int) or not -n_blocks <= index < n_blocks:
            raise ValueError(f"block {index!r} is not a block of this model (it has {n_blocks})")
        if index % n_blocks not in out:
            out.append(index % n_blocks)
    if not out:
        raise ValueError("blocks names no block")
    return out


def retrofit(model: nn.Module, blocks: str | Iterable[int] = "middle", mode: str = "parallel",
             **peer_args) -> dict[int, PEER]:
    """Put PEER layers into the chosen blocks of ``model`` (in place) and return them by block index.

    mode "replace": the block's MLP becomes the PEER layer; "parallel": the MLP is wrapped as
    ``ParallelPEER(mlp, peer)`` with the experts' ``v`` rows at zero (the output is unchanged).
    ``peer_args`` go to :class:`PEER` (num_experts, heads, top_k, key_dim, ...); its width is the
    model's hidden size, and it takes the MLP's device and floating dtype.
    """
    check_choice("mode", mode, MODES)
    layers, attr = blocks_of(model)
    dim = hidden_size(model)
    inserted: dict[int, PEER] = {}
    for index in resolve_blocks(blocks, len(layers)):
        block = layers[index]
        mlp = getattr(block, attr)
        if isinstance(mlp, (PEER, ParallelPEER)):
            raise ValueError(f"block {index} already has a PEER layer")
        reference = next(mlp.parameters(), None)
        peer = PEER(dim, **peer_args)
        if reference is not None:
            peer.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        if mode == "parallel":
            with torch.no_grad():
                peer.expert_v.zero_()
            setattr(block, attr, ParallelPEER(mlp, peer))
        else:
            setattr(block, attr, peer)
        inserted[index] = peer
    return inserted
