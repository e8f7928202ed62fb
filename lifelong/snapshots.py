"""What the analysis notebooks read from a run, beyond results.json.

Per stage, one file `snapshots/stage-NN.safetensors` (tensors only, safe to load):

    usage/LAYER/DOMAIN     float32 [heads, N]  routing weight each expert got on DOMAIN's test split
    keys1/LAYER            float32 [heads, n1, key_dim/2]  PEER first-codebook sub-keys
    keys2/LAYER            float32 [heads, n2, key_dim/2]  PEER second-codebook sub-keys
    router/LAYER           float32 [E, dim]                 MoE router rows
    generation/LAYER       int64 [N]   growth generation of each expert (0 = original, g = added by growth g)
    routes/LAYER/DOMAIN    int32 [tokens, heads, top_k]     expert ids chosen for fixed probe tokens

The probe tokens are the first `PROBE_BLOCKS` test blocks of every domain, the
same at every stage, so comparing `routes` between stages measures routing
drift (e.g. of an old domain's tokens after growth).

Learning curves: `CurvePlugin` evaluates the same probe blocks every
`eval.curve_every` optimizer steps and logs `Curve/test_stream/DOMAIN` (nats per
token, x = optimizer step), so a notebook can draw every domain's test loss
across the whole stream.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from safetensors.torch import load_file, save_file

from experts import PEER, MoE
from lifelong.growth import eval_mode, layer_inputs

SNAPSHOT_DIR = "snapshots"
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
def stage_tensors(model, probes: dict[str, torch.Tensor], usage: dict | None) -> dict[str, torch.Tensor]:
    """Everything `snapshots/stage-NN.safetensors` holds for the model as it is now."""
    out: dict[str, torch.Tensor] = {}
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
        inputs = layer_inputs(model, blocks[0].to(device))
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
    folder = Path(run_dir) / SNAPSHOT_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"stage-{stage:02d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load(run_dir: str | Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / SNAPSHOT_DIR / f"stage-{stage:02d}.safetensors"))


class CurvePlugin(SupervisedPlugin):
    """Every `every` optimizer steps, the test loss of every domain's probe blocks (a learning curve).

    Runs the model in eval mode under no_grad and draws no random numbers, so
    the training run is unchanged by it; values go to the run's loggers.
    """

    def __init__(self, model, probes: dict[str, torch.Tensor], every: int, loggers):
        super().__init__()
        self.model, self.probes, self.every, self.loggers = model, probes, every, loggers
        self.step = 0

    def state_dict(self, strategy=None) -> dict:
        return {"step": self.step}

    def load_state_dict(self, strategy, state: dict) -> None:
        self.step = int(state["step"])

    @torch.no_grad()
    def after_update(self, strategy, **kwargs) -> None:
        self.step += 1
        if self.step % self.every:
            return
        values = []
        with eval_mode(self.model):
            for domain, blocks in self.probes.items():
                x, y = blocks[0].to(strategy.device), blocks[1].to(strategy.device)
                loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
                values.append(MetricValue(self, f"Curve/test_stream/{domain}", float(loss), self.step))
        for logger in self.loggers:
            logger.log_metrics(values)
