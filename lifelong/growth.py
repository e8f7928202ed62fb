"""Growing the expert layers of the harness's model, shared by the growth plugin (growth during a
run, lifelong/plugins/growth.py) and `lifelong grow` (growth of a saved checkpoint): the inputs
new keys are placed with, one growth with its measured output change, and the event recorded.
Free of Avalanche: `lifelong grow` reads the stream's token blocks without building a benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch

import experts
from experts import PEER, UsageCounter
from lifelong import checkpoint
from lifelong.build import build_model, check_fits, load_stream
from lifelong.strategy_config import PER_PARAMETER_STRATEGIES
from lifelong.errors import ConfigError
from lifelong.model import eval_mode
from lifelong.rundir import read_run_config
from lifelong.scopes import ScopeManager, trainable_of
from lifelong.training import build_optimizer

BOUNDARY_BLOCKS = 32  # blocks of a new domain run through the model to place its keys


def domain_sample(dataset, blocks: int = BOUNDARY_BLOCKS) -> torch.Tensor:
    """Evenly spaced input blocks [B, T] of a domain's dataset (no RNG drawn, so data order is untouched)."""
    picks = torch.linspace(0, len(dataset) - 1, min(blocks, len(dataset))).long().tolist()
    return torch.stack([dataset[i][0] for i in picks])


@torch.no_grad()
def usage_of(layer, inputs: torch.Tensor) -> UsageCounter:
    """Usage counts of `layer` routing `inputs` (eval mode, so batch statistics stay untouched)."""
    counter = UsageCounter(layer.num_experts, getattr(layer, "heads", 1))
    with eval_mode(layer):
        counter.update(*layer.route(inputs))
    return counter


@torch.no_grad()
def grow_layer(layer, n: int, optimizer, warmup_steps: int, init: str, inputs: torch.Tensor | None,
               usage=None, warmin: str = "calibrated", old_inputs: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, float]:
    """Grow one layer; return the new ids and the max |output change| on `inputs` (eval mode).
    A growth that cannot be placed (too few tokens for k-means) or allocated is a ConfigError."""
    with eval_mode(layer):
        before = layer(inputs) if inputs is not None else None
        try:
            if isinstance(layer, PEER):
                ids = layer.grow(n, optimizer=optimizer, warmup_steps=warmup_steps, init=init,
                                 inputs=inputs, usage=usage, warmin=warmin, old_inputs=old_inputs)
            else:  # MoE: router rows; no key placement to choose
                ids = layer.grow(n, optimizer=optimizer, warmup_steps=warmup_steps, inputs=inputs)
        except ValueError as err:
            raise ConfigError(f"growing by {n:,} experts: {err}") from None
        except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
                raise
            raise ConfigError(f"growing by {n:,} experts: not enough memory ({str(err).splitlines()[0][:120]})") from None
        change = float((layer(inputs) - before).abs().max()) if inputs is not None else float("nan")
    return ids, change


def grow_recorded(name: str, layer, n: int, optimizer, warmup_steps: int, init: str, inputs: torch.Tensor | None,
                  usage=None, *, step: int, experience: int, domain: str, reason: str, warmin: str = "calibrated",
                  old_inputs: torch.Tensor | None = None) -> dict:
    """`grow_layer`, then the growth event results.json records (`growth_events`): where it
    happened, why, how many experts it added and the output change at that moment (~0)."""
    ids, change = grow_layer(layer, n, optimizer, warmup_steps, init, inputs, usage, warmin, old_inputs)
    return {"step": step, "experience": experience, "domain": domain, "layer": name, "reason": reason,
            "init": init, "added": int(ids.numel()), "num_experts": layer.num_experts, "output_change": change}


def grow_checkpoint(path: str | Path, experts_per_layer: int, warmup_steps: int = 100, init: str = "random",
                    layers: list[str] | None = None, echo=print, warmin: str = "calibrated") -> Path:
    """Grow the expert layers of a saved checkpoint; write a new checkpoint that `resume` continues.

    The optimizer state goes through the same surgery as growth during training (old moments
    kept, new rows zero), and the output change on the next domain's blocks is measured and
    recorded with the event, as for growth during a run. "contrast" placement moves the new keys
    away from the queries of the domains already learned (`reservoir_blocks` of each).
    """
    folder = checkpoint.checkpoint_folder(path)
    run_dir = folder.parent.parent
    cfg = read_run_config(run_dir)
    state = checkpoint.RunState.from_dict(checkpoint.load_state(folder))
    if state.optimizer_format != "plain":
        raise ConfigError(f"{folder} was written with FSDP-sharded parameters, whose growth is not supported")
    stream = load_stream(cfg)
    model = build_model(cfg, stream.vocab_size)
    checkpoint.load_weights(folder, model, state.base_weights)
    available = model.expert_layers()
    if not available:
        raise ConfigError(f"{run_dir}: growth needs PEER or MoE layers, but this model has none "
                          f"(model.ffn is {cfg.model.ffn!r})")
    unknown = sorted(set(layers or []) - set(available))
    if unknown:
        raise ConfigError(f"no expert layer {unknown[0]!r} (layers: {', '.join(available)})")
    if cfg.strategy.name in PER_PARAMETER_STRATEGIES:
        raise ConfigError(f"{run_dir}: strategy {cfg.strategy.name!r} keeps per-parameter importances "
                          "that do not follow a growing expert table")
    # the grown tables are new tensors: the layers' full new size must fit beside the model
    grown = sum(sum(p.numel() for p in available[name].parameters()) * (available[name].num_experts + experts_per_layer)
                // available[name].num_experts for name in layers or list(available))
    check_fits(grown, torch.device("cpu"), f"grow --experts {experts_per_layer:,}", "add fewer experts")
    optimizer = build_optimizer(model, cfg)
    progress = checkpoint.Progress(**state.progress)
    ScopeManager(model, optimizer, trainable_of(cfg)).apply_saved(progress.next_experience,
                                                                    inside=state.position is not None)
    optimizer.load_state_dict(state.optimizer)
    # Place keys (and measure the output change) on the domain that training continues with.
    index = min(progress.next_experience, len(stream.domains) - 1)
    inputs = model.expert_inputs(domain_sample(stream.blocks[index].train))
    old_inputs = None
    if init == "contrast" and index > 0:
        old_inputs = model.expert_inputs(torch.cat([domain_sample(stream.blocks[j].train, cfg.growth.reservoir_blocks)
                                                    for j in range(index)]))
    for name in layers or list(available):
        layer = available[name]
        old = layer.num_experts
        layer_init = init if isinstance(layer, experts.PEER) else "random"
        event = grow_recorded(name, layer, experts_per_layer, optimizer, warmup_steps, layer_init, inputs[name],
                              step=int(state.strategy["optimizer_steps"]), experience=progress.next_experience,
                              domain=stream.domains[index], reason="checkpoint", warmin=warmin,
                              old_inputs=None if old_inputs is None else old_inputs[name])
        state.manual_growth_events.append(event)
        echo(f"grew {name}: {old:,} -> {layer.num_experts:,} experts, output change {event['output_change']:.2e}")
    state.optimizer = optimizer.state_dict()
    new = checkpoint.save(run_dir, model, state.to_dict(), keep=cfg.checkpoint.keep + 1)
    if progress.next_experience >= len(stream.domains):
        echo("note: this run had finished; resuming it evaluates nothing new")
    return new
