"""What the analysis notebooks read from a run beyond results.json: one file per stage,
`snapshots/stage-NN.safetensors` (tensors only, safe to load):

    usage/LAYER/DOMAIN     float32 [heads, N]  routing weight each expert got on DOMAIN's test split
    keys1/LAYER            float32 [heads, n1, key_dim/2]  PEER first-codebook sub-keys
    keys2/LAYER            float32 [heads, n2, key_dim/2]  PEER second-codebook sub-keys
    router/LAYER           float32 [E, dim]                 MoE router rows
    generation/LAYER       int64 [N]   growth generation of each expert (0 = original, g = added by growth g)
    routes/LAYER/DOMAIN    int32 [tokens, heads, top_k]     expert ids chosen for fixed probe tokens
    blocks/DOMAIN          float64 [test blocks]            each test block's mean loss (nats/token)

The probe tokens are the first `PROBE_BLOCKS` test blocks of every domain, the same at every
stage, so comparing `routes` between stages measures routing drift; the learning curves
(lifelong/plugins/curves.py) evaluate the same blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from experts import PEER, MoE
from lifelong import rundir
from lifelong.model import eval_mode

PROBE_BLOCKS = 4


def probe_blocks(test_stream, blocks: int = PROBE_BLOCKS) -> dict[str, torch.Tensor]:
    """The first `blocks` (input, target) blocks of each domain's test split: {domain: [2, B, T]}."""
    probes = {}
    for experience in test_stream:
        dataset = experience.dataset
        items = [dataset[i] for i in range(min(blocks, len(dataset)))]
        probes[experience.domain] = torch.stack([torch.stack([x, y]) for x, y in items], dim=1)
    return probes


@torch.no_grad()
def stage_tensors(model, probes: dict[str, torch.Tensor], usage: dict | None,
                  block_losses: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Everything `snapshots/stage-NN.safetensors` holds for the model as it is now."""
    out: dict[str, torch.Tensor] = {}
    for domain, losses in (block_losses or {}).items():
        out[f"blocks/{domain}"] = torch.as_tensor(np.asarray(losses, dtype=np.float64))
    for layer, by_domain in (usage or {}).items():
        for domain, counts in by_domain.items():
            out[f"usage/{layer}/{domain}"] = counts.float().cpu()
    layers = model.expert_layers()
    for name, layer in layers.items():
        out[f"generation/{name}"] = layer.expert_generation().cpu()
        if isinstance(layer, PEER):
            out[f"keys1/{name}"] = _full(layer.codebooks.keys1).float().cpu()
            out[f"keys2/{name}"] = _full(layer.codebooks.keys2).float().cpu()
        elif isinstance(layer, MoE):
            out[f"router/{name}"] = _full(layer.router.weight).float().cpu()
    if not layers:
        return out  # a dense model: nothing is routed
    device = next(model.parameters()).device
    for domain, blocks in probes.items():
        inputs = model.expert_inputs(blocks[0].to(device))
        for name, layer in layers.items():
            with eval_mode(layer):
                _, ids = layer.route(inputs[name])
            out[f"routes/{name}/{domain}"] = ids.to(torch.int32).cpu()
    return out


def _full(param: torch.Tensor) -> torch.Tensor:
    """A copy of a parameter's whole value, also under FSDP: a DTensor is gathered (collective),
    and an unsharded view is copied before its gathered storage is freed again."""
    data = param.detach()
    return data.full_tensor() if hasattr(data, "full_tensor") else data.clone()


def write(run_dir: str | Path, stage: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one stage's snapshot atomically (temporary file, then rename)."""
    path = rundir.snapshot_path(run_dir, stage)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load(run_dir: str | Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(rundir.snapshot_path(run_dir, stage)))
