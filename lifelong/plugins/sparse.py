"""Sparse memory finetuning as a strategy plugin (`strategy.name: sparse`; Lin et al. 2025).

The first experience trains the whole model as usual. From the second on, every optimizer step
updates only the top-t experts of each PEER layer (their u and v rows), ranked by how much more the
step's batch retrieves them than background batches do (experts.sparse); every other parameter is
frozen (unless `train.trainable` chooses what learns). The unselected experts are marked frozen for
the step, so the freeze guard (experts.freezing) puts their rows and optimizer moments back exactly
after `optimizer.step()`, under AdamW as under row-wise AdamW. The background is the retrievals of
every step of the earlier experiences, or the train blocks of a named domain read in eval mode.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue

from experts import PEER, RetrievalStats, kl_scores, select_top, tfidf_scores
from lifelong import distributed
from lifelong.errors import ConfigError
from lifelong.strategy_config import SparseConfig

LOG_EVERY = 10  # optimizer steps between logged selection statistics


class SparseFinetunePlugin(SupervisedPlugin):
    """Top-t TF-IDF (or KL) expert updates per PEER layer and step, from the second experience on."""

    def __init__(self, cfg: SparseConfig, scoped: bool = False):
        """`scoped`: train.trainable decides what learns, so the plugin freezes no other parameter."""
        super().__init__()
        self.cfg, self.scoped = cfg, scoped
        self.layers: dict[str, PEER] = {}
        self.background: dict[str, RetrievalStats] = {}  # what ranks against (earlier experiences' steps)
        self.current: dict[str, RetrievalStats] = {}  # this experience's steps (tf_N: the step in progress)
        self.sparse = False
        self._base_frozen: dict[str, torch.Tensor] = {}
        self._chosen: dict[str, torch.Tensor] = {}
        self.last: dict[str, tuple[int, float]] = {}  # layer -> (experts selected, overlap with background top)

    # -- layers and their retrieval hooks ------------------------------------------------------

    def _attach(self, strategy) -> None:
        model = getattr(strategy.model, "module", strategy.model)
        layers = {name: layer for name, layer in model.expert_layers().items() if isinstance(layer, PEER)}
        if not layers:
            raise ConfigError("strategy.name 'sparse' needs PEER layers, and this model has none")
        for name, layer in layers.items():
            self.background.setdefault(name, RetrievalStats(layer.num_experts))
            self.current.setdefault(name, RetrievalStats(layer.num_experts))
            layer.retrieval_hook = self.current[name].record
        self.layers = layers

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._attach(strategy)  # at every experience: a growth may have resized the layers
        for name, layer in self.layers.items():
            self.background[name].grow_to(layer.num_experts)
            self.current[name].grow_to(layer.num_experts)
        self.sparse = strategy.experience.current_experience >= 1
        if not self.sparse:
            return
        if self.cfg.background != "earlier" and self.background[next(iter(self.layers))].batches == 0:
            self._read_background(strategy)
        if not self.scoped:  # only the expert tables learn; their rows are chosen step by step
            tables = {id(p) for layer in self.layers.values() for p in (layer.expert_u, layer.expert_v)}
            for param in strategy.model.parameters():
                param.requires_grad_(id(param) in tables)

    @torch.no_grad()
    def _read_background(self, strategy) -> None:
        """Document frequencies over the named domain's train blocks, in eval mode (no statistics moved)."""
        found = [exp for exp in strategy.experience.origin_stream if getattr(exp, "domain", None) == self.cfg.background]
        if not found:
            names = sorted({getattr(exp, "domain", "?") for exp in strategy.experience.origin_stream})
            raise ConfigError(f"strategy.sparse.background: {self.cfg.background!r} is not a domain of the stream "
                              f"({', '.join(names)})")
        model = getattr(strategy.model, "module", strategy.model)
        dataset, size = found[0].dataset, strategy.train_mb_size
        for start in range(0, min(len(dataset), size * self.cfg.background_batches), size):
            blocks = torch.stack([dataset[i][0] for i in range(start, min(start + size, len(dataset)))])
            inputs = model.expert_inputs(blocks.to(strategy.device))
            for name, layer in self.layers.items():
                with torch.autocast(blocks.device.type, enabled=False):
                    _, ids = layer.route(inputs[name])
                tf = torch.bincount(ids.reshape(-1).cpu(), minlength=layer.num_experts)
                self.background[name].add_background(tf)

    # -- one optimizer step ----------------------------------------------------------------

    def before_update(self, strategy, **kwargs) -> None:
        """Sum the step's retrievals over ranks; in sparse experiences freeze all but the top t."""
        for name, layer in self.layers.items():
            stats, background = self.current[name], self.background[name]
            stats.grow_to(layer.num_experts)
            background.grow_to(layer.num_experts)
            distributed.all_reduce_sum(stats.tf_N)
            if not self.sparse:
                continue
            if self.cfg.ranking == "tfidf":
                scores_N = tfidf_scores(stats.tf_N, background.df_N, background.batches)
            else:
                scores_N = kl_scores(stats.tf_N, background.count_N)
            base = layer.frozen.detach().clone()
            chosen = select_top(scores_N, self.cfg.top_t, (stats.tf_N > 0) & ~base.cpu())
            keep = torch.ones_like(base)
            keep[chosen.to(base.device)] = False
            with torch.no_grad():
                for table in (layer.expert_u, layer.expert_v):  # the clip norm sees only what learns
                    if table.grad is not None:
                        table.grad[base | keep] = 0
                # with SGD the run's optimizer moves no row: after_update steps the chosen ones
                layer.frozen.copy_(torch.ones_like(base) if self.cfg.optimizer == "sgd" else base | keep)
            self._base_frozen[name] = base
            self._chosen[name] = chosen
            top_bg = select_top(background.count_N.double(), self.cfg.top_t, background.count_N > 0)
            overlap = float(torch.isin(chosen, top_bg).double().mean()) if chosen.numel() else 0.0
            self.last[name] = (int(chosen.numel()), overlap)

    def after_update(self, strategy, **kwargs) -> None:
        """Give back each layer's own frozen set; the step's retrievals join this experience's background."""
        for name, layer in self.layers.items():
            base = self._base_frozen.pop(name, None)
            chosen = self._chosen.pop(name, None)
            if base is not None:
                with torch.no_grad():
                    if self.cfg.optimizer == "sgd":
                        self._sgd_step(strategy, layer, chosen.to(base.device))
                    layer.frozen.copy_(base)
            stats = self.current[name]
            stats.add_background(stats.tf_N)
            stats.tf_N.zero_()
        if self.sparse and strategy.optimizer_steps % LOG_EVERY == 0:
            self._log(strategy)

    def _sgd_step(self, strategy, layer: PEER, chosen: torch.Tensor) -> None:
        """row -= sgd_lr x (the experts group's lr / its base lr) x gradient, on the chosen rows only
        (the gradients clipped like every other, the schedule and rollbacks followed)."""
        group = next(g for g in strategy.optimizer.param_groups if any(p is layer.expert_u for p in g["params"]))
        lr = self.cfg.sgd_lr * group["lr"] / group.get("base_lr", group["lr"])
        for table in (layer.expert_u, layer.expert_v):
            if table.grad is not None:
                table[chosen] -= lr * table.grad[chosen]

    def after_training_exp(self, strategy, **kwargs) -> None:
        for name in self.layers:
            if self.cfg.background == "earlier":
                self.background[name].merge_background(self.current[name])
            self.current[name] = RetrievalStats(self.layers[name].num_experts)
            self.layers[name].retrieval_hook = self.current[name].record

    def _log(self, strategy) -> None:
        values = []
        for name, (selected, overlap) in self.last.items():
            values.append(MetricValue(self, f"Sparse/train_phase/{name}/selected", selected, strategy.optimizer_steps))
            values.append(MetricValue(self, f"Sparse/train_phase/{name}/overlap_background_top",
                                      overlap, strategy.optimizer_steps))
        for logger in strategy.evaluator.loggers:
            logger.log_metrics(values)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self, strategy) -> dict:
        return {"background": {n: s.state_dict() for n, s in self.background.items()},
                "current": {n: s.state_dict() for n, s in self.current.items()}}

    def load_state_dict(self, strategy, state: dict) -> None:
        for key, target in (("background", self.background), ("current", self.current)):
            for name, saved in state[key].items():
                stats = target.setdefault(name, RetrievalStats(0))
                stats.load_state_dict(saved)
        for name, layer in self.layers.items():  # the hook records into the restored counts
            layer.retrieval_hook = self.current[name].record
