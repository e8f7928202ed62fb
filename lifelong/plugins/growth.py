"""`GrowthPlugin`: when the expert pools grow during a run, and what is recorded when they do.

Every PEER and MoE layer grows
  - at each domain boundary, in `before_train_dataset_adaptation`: the earliest hook of a new
    experience, before Avalanche prepares the optimizer for it (a parameter grown in
    `before_training_exp` would miss that update; our growth keeps parameter identities and
    does its own optimizer surgery, so Avalanche's update never resets the moments);
  - every N optimizer steps, or when a trigger fires (usage on recent training tokens
    saturated, or the training loss stopped improving).
Growth happens between optimizer steps, never between a forward and its backward. Each growth is
recorded with the output change at that moment (~0: new keys start dormant, docs/growth.md).
"""

from __future__ import annotations

from collections import deque

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue

import experts
from experts import PEER
from lifelong import distributed
from lifelong.config import GrowthConfig
from lifelong.growth import domain_sample, grow_recorded, usage_of

PROBE_TOKENS = 2048  # tokens kept per layer for k-means placement, triggers and the output check
LOG_EVERY = 10  # optimizer steps between points of the entry curve (as the training loss)
ISOLATE_BLOCKS = 4  # reservoir blocks per minibatch for the routing contrast loss


class InputRecorder:
    """The most recent training inputs of each expert layer (a bounded window of tokens).

    Cleared at the start of every experience, so what it holds depends only on
    the current experience's data: a run resumed from a boundary sees the same.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], max_tokens: int = PROBE_TOKENS):
        self.max_tokens = max_tokens
        self.inputs: dict[str, deque] = {name: deque() for name in layers}
        self._sizes = dict.fromkeys(layers, 0)
        self.enabled = True
        self._layers = layers
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def record(module, args):
            if not (self.enabled and module.training):
                return
            x_TD = args[0].detach().reshape(-1, args[0].shape[-1])[-self.max_tokens:]
            window = self.inputs[name]
            window.append(x_TD)
            self._sizes[name] += x_TD.shape[0]
            while self._sizes[name] - window[0].shape[0] >= self.max_tokens:
                self._sizes[name] -= window.popleft().shape[0]
        return record

    def get(self, name: str) -> torch.Tensor | None:
        window = self.inputs[name]
        return torch.cat(list(window))[-self.max_tokens:] if window else None

    def clear(self) -> None:
        for name in self.inputs:
            self.inputs[name].clear()
            self._sizes[name] = 0

    def state_dict(self) -> dict:
        """The recorded windows as CPU tensors (what a checkpoint inside an experience needs)."""
        return {name: [x.cpu().clone() for x in window] for name, window in self.inputs.items()}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        for name, window in state.items():
            device = next(self._layers[name].parameters()).device
            for x in window:
                self.inputs[name].append(x.to(device))
                self._sizes[name] += x.shape[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class GrowthPlugin(SupervisedPlugin):
    """Grows the model's PEER/MoE pools on the configured schedule and freezes by policy."""

    def __init__(self, cfg: GrowthConfig, model, echo=None, loggers=(), on_growth=None):
        """`loggers` receive the entry curve (`Growth/train_phase/LAYER/new_share`); `on_growth(experience)`
        is called after every growth (the trainable scope follows the newest experts)."""
        super().__init__()
        self.cfg, self.model, self.echo = cfg, model, echo or (lambda *_: None)
        self.loggers, self.on_growth = list(loggers), on_growth
        self.layers = model.expert_layers()
        self.recorder = InputRecorder(self.layers)
        self.events: list[dict] = []
        self.frozen_events: list[dict] = []
        self.step = 0
        self.losses: deque = deque(maxlen=cfg.plateau_window)
        self.reservoir: list[torch.Tensor] = []  # a few input blocks [B, T] of every finished domain
        self.known: list[dict[str, int]] = []  # per finished domain: each layer's newest generation then
        self.last_isolation: float | None = None  # the last minibatch's (unweighted) routing contrast loss

    # -- state for checkpoints (the protocol of lifelong.strategies.state) ---------

    def state_dict(self, strategy=None) -> dict:
        return {"events": list(self.events), "frozen_events": list(self.frozen_events), "step": self.step,
                "losses": list(self.losses), "inputs": self.recorder.state_dict(),
                "reservoir": [blocks.clone() for blocks in self.reservoir], "known": [dict(k) for k in self.known]}

    def load_state_dict(self, strategy, state: dict) -> None:
        self.events = list(state["events"])
        self.frozen_events = list(state["frozen_events"])
        self.step = int(state["step"])
        self.losses = deque(state["losses"], maxlen=self.cfg.plateau_window)
        self.recorder.load_state_dict(state.get("inputs", {}))  # absent in boundary checkpoints of earlier versions
        self.reservoir = [blocks.clone() for blocks in state.get("reservoir", [])]
        self.known = [dict(k) for k in state.get("known", [])]

    # -- growing -------------------------------------------------------------

    def _growths(self, name: str) -> int:
        return sum(1 for e in self.events if e["layer"] == name)

    def _old_inputs(self, strategy) -> dict[str, torch.Tensor] | None:
        """Each layer's inputs on the reservoir of finished domains (for "contrast" placement)."""
        if self.cfg.init != "contrast" or not self.reservoir:
            return None
        return self.model.expert_inputs(torch.cat(self.reservoir).to(strategy.device))

    def grow_all(self, strategy, reason: str, inputs: dict[str, torch.Tensor | None]) -> None:
        old_inputs = self._old_inputs(strategy)
        for name, layer in self.layers.items():
            if self.cfg.max_growths and self._growths(name) >= self.cfg.max_growths:
                continue
            x = inputs.get(name)
            usage = usage_of(layer, x) if x is not None and self.cfg.init == "copy" else None
            # MoE has no key placement; k-means needs inputs (none before the first recorded batch).
            peer = isinstance(layer, PEER)
            init = self.cfg.init if peer and (x is not None or self.cfg.init in ("random", "copy")) else "random"
            old = layer.num_experts
            event = grow_recorded(name, layer, self.cfg.experts, strategy.optimizer, self.cfg.warmup_steps, init,
                                  x, usage, step=self.step, experience=strategy.experience.current_experience,
                                  domain=getattr(strategy.experience, "domain", ""), reason=reason,
                                  warmin=self.cfg.warmin, old_inputs=None if old_inputs is None else old_inputs[name])
            self.events.append(event)
            self.echo(f"  grew {name} ({reason}): {old:,} -> {layer.num_experts:,} experts, "
                      f"output change {event['output_change']:.2e}")
            if self.cfg.freeze == "existing":
                frozen = experts.freeze_existing(layer, strategy.optimizer)
                self.frozen_events.append({"step": self.step, "layer": name, "policy": "existing",
                                           "frozen": int(frozen.numel())})
            # Under torchrun the new keys were placed on rank-local inputs: every rank takes rank 0's.
            distributed.broadcast_module(layer)
        if self.on_growth is not None:
            self.on_growth(strategy.experience.current_experience)

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        self.recorder.clear()
        index = strategy.experience.current_experience
        if self.cfg.schedule != "boundary" or index == 0:
            return
        if any(e["reason"] == "boundary" and e["experience"] == index for e in self.events):
            return  # a run resumed inside this experience grew at its start already
        blocks = domain_sample(strategy.experience.dataset).to(strategy.device)
        self.grow_all(strategy, "boundary", self.model.expert_inputs(blocks))

    def before_backward(self, strategy, **kwargs) -> None:
        """Adds `isolate` x the routing contrast loss of every grown PEER layer: its recent training inputs
        (the recorder's window, this minibatch's last) against a few reservoir blocks drawn by optimizer
        step (the same draw after a resume)."""
        if not self.cfg.isolate or not self.events:
            return
        old, domain_of = None, None
        if self.reservoir:
            pool = torch.cat(self.reservoir)
            owners = torch.cat([torch.full((len(b),), j) for j, b in enumerate(self.reservoir)])
            draw = torch.Generator().manual_seed(self.step)
            picks = torch.randperm(len(pool), generator=draw)[:ISOLATE_BLOCKS]
            domain_of = owners[picks].repeat_interleave(pool.shape[1])  # per token of the picked blocks
            with torch.no_grad():
                old = self.model.expert_inputs(pool[picks].to(strategy.device))
        loss = strategy.loss.new_zeros(())
        for name, layer in self.layers.items():
            x = self.recorder.get(name)
            if not isinstance(layer, PEER) or x is None:
                continue
            known = None  # without per-domain records: every row but the newest counts as known
            if old is not None and len(self.known) == len(self.reservoir):
                known = torch.tensor([self.known[j][name] for j in domain_of.tolist()])
            loss = loss + experts.row_contrast_loss(layer, x, None if old is None else old[name],
                                                    None if known is None else known.to(x.device),
                                                    self.cfg.isolate_margin, self.cfg.isolate_queries)
        self.last_isolation = float(loss.detach())
        strategy.loss = strategy.loss + self.cfg.isolate * loss

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.losses.append(float(strategy.loss.detach()))

    def after_update(self, strategy, **kwargs) -> None:
        self.step += 1
        if self.step % LOG_EVERY == 0 and self.loggers and self.events:
            self._log_entry()
        if self.cfg.schedule == "steps" and self.step % self.cfg.every_steps == 0:
            self.grow_all(strategy, "steps", self._recent())
        elif (self.cfg.schedule == "trigger" and self.step % self.cfg.check_every == 0
              and distributed.from_main(self._fired())):
            self.grow_all(strategy, f"trigger:{self.cfg.trigger}", self._recent())
            self.losses.clear()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.cfg.reservoir_blocks:
            self.reservoir.append(domain_sample(strategy.experience.dataset, self.cfg.reservoir_blocks).cpu())
            self.known.append({name: int(layer.expert_generation().max()) for name, layer in self.layers.items()})
        if self.cfg.freeze != "top_used":
            return
        for name, layer in self.layers.items():
            x = self.recorder.get(name)
            if x is None:
                continue
            frozen = experts.freeze_top_used(layer, usage_of(layer, x), float(self.cfg.freeze_fraction),
                                             strategy.optimizer)
            distributed.broadcast_module(layer)  # rank 0's choice (usage of rank-local inputs) for all
            self.frozen_events.append({"step": self.step, "layer": name, "policy": "top_used",
                                       "domain": getattr(strategy.experience, "domain", ""),
                                       "frozen": int(frozen.numel())})

    # -- the entry curve of new experts -----------------------------------------------

    @torch.no_grad()
    def _log_entry(self) -> None:
        """The share of routing weight on each grown layer's newest experts, over its recent training
        inputs (eval mode: routing statistics untouched), and the last routing contrast loss (with
        `isolate`), every LOG_EVERY optimizer steps."""
        values = []
        for name, layer in self.layers.items():
            x = self.recorder.get(name)
            generation = layer.expert_generation()
            if x is None or int(generation.max()) == 0:
                continue
            counts = usage_of(layer, x).counts.sum(0)
            newest = (generation == generation.max()).to(counts.device)
            share = float(counts[newest].sum() / counts.sum().clamp(min=1e-12))
            values.append(MetricValue(self, f"Growth/train_phase/{name}/new_share", share, self.step))
        if self.last_isolation is not None:
            values.append(MetricValue(self, "Growth/train_phase/isolation_loss", self.last_isolation, self.step))
        for logger in self.loggers:
            logger.log_metrics(values)

    # -- triggers --------------------------------------------------------------

    def _recent(self) -> dict[str, torch.Tensor | None]:
        return {name: self.recorder.get(name) for name in self.layers}

    def _fired(self) -> bool:
        if self.cfg.trigger == "usage":
            return any(x is not None and usage_of(layer, x).usage() >= self.cfg.usage_threshold
                       for layer, x in ((layer, self.recorder.get(n)) for n, layer in self.layers.items()))
        if len(self.losses) < self.cfg.plateau_window:
            return False
        half = len(self.losses) // 2
        old, new = list(self.losses)[:half], list(self.losses)[half:]
        before, after = sum(old) / len(old), sum(new) / len(new)
        return (before - after) < self.cfg.plateau_tolerance * abs(before)
