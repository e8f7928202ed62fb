"""Avalanche plugin metrics of the LM harness: the token-weighted test loss of every domain (nats
per token, bits per byte) that fills the stage x domain matrix, the training loss, and expert
usage per domain. The matrix maths is in lifelong/transfer.py.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from experts import jaccard_overlap, kl_to_uniform, track_usage, usage_fraction
from lifelong import distributed
from lifelong.transfer import bits_per_byte


def _exp_suffix(strategy) -> str:
    return f"Exp{strategy.experience.current_experience:03d}"


class DomainLossMetric(PluginMetric[dict]):
    """Token-weighted test loss of each evaluated experience, in nats/token, bits/byte and perplexity.

    Sums the per-token NLL and counts tokens over every eval minibatch (so a
    partial last batch weighs what it holds), then divides once at the end of
    the experience; it also keeps each test block's mean NLL, in test-stream order
    (what the bootstrap intervals resample). After each full pass over the test stream
    `on_stage(row_nats, row_bpb, row_blocks)` receives the per-domain row and each
    domain's per-block losses [n_blocks]; the harness stacks the rows into the matrix.
    """

    def __init__(self, domains: Sequence[str], bytes_per_token: Sequence[float],
                 on_stage: Callable[[list[float], list[float], list[np.ndarray]], None] | None = None):
        super().__init__()
        self.domains = list(domains)
        self.bytes_per_token = list(bytes_per_token)
        self.on_stage = on_stage
        self._nats = torch.zeros((), dtype=torch.float64)
        self._tokens = 0
        self._row: dict[int, float] = {}
        self._block_row: dict[int, np.ndarray] = {}
        self._blocks: list[tuple[int, torch.Tensor]] = []
        self._seen = 0
        self.stage = 0

    def reset(self) -> None:
        self._row, self._block_row = {}, {}

    def result(self) -> dict:
        return {self.domains[j]: loss for j, loss in sorted(self._row.items())}

    def before_eval(self, strategy) -> None:
        self.reset()

    def before_eval_exp(self, strategy) -> None:
        self._nats = torch.zeros((), dtype=torch.float64, device=strategy.device)
        self._tokens = 0
        self._blocks, self._seen = [], 0

    def after_eval_iteration(self, strategy) -> None:
        logits, targets = strategy.mb_output, strategy.mb_y
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="sum")
        self._nats += nll.double()
        self._tokens += targets.numel()
        per_token = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
        self._blocks.append((self._seen + getattr(strategy, "mb_offset", 0),
                             per_token.view(targets.shape).double().mean(dim=1)))
        self._seen += getattr(strategy, "mb_global_size", len(targets))

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        j = strategy.experience.current_experience
        if distributed.active():  # each rank evaluated its slice of every batch
            totals = distributed.all_reduce_sum(torch.stack([self._nats, self._nats.new_tensor(self._tokens)]))
            self._nats, self._tokens = totals[0], int(totals[1].item())
        loss = self._nats.item() / max(self._tokens, 1)
        self._row[j] = loss
        blocks = self._nats.new_zeros(self._seen)
        for start, values in self._blocks:
            blocks[start:start + len(values)] = values
        self._block_row[j] = distributed.all_reduce_sum(blocks).cpu().numpy()  # each rank filled its slice
        bpb = bits_per_byte(loss, self.bytes_per_token[j])
        name = f"eval_phase/test_stream/{_exp_suffix(strategy)}"
        x = self.stage
        return [MetricValue(self, f"Loss_Exp/{name}", loss, x),
                MetricValue(self, f"BPB_Exp/{name}", bpb, x),
                MetricValue(self, f"PPL_Exp/{name}", math.exp(min(loss, 50.0)), x)]

    def after_eval(self, strategy) -> list[MetricValue]:
        values = []
        if len(self._row) == len(self.domains):
            row = [self._row[j] for j in range(len(self.domains))]
            row_bpb = [bits_per_byte(v, b) for v, b in zip(row, self.bytes_per_token)]
            values = [MetricValue(self, "Loss_Stream/eval_phase/test_stream", float(np.mean(row)), self.stage),
                      MetricValue(self, "BPB_Stream/eval_phase/test_stream", float(np.mean(row_bpb)), self.stage)]
            if self.on_stage is not None:
                self.on_stage(row, row_bpb, [self._block_row[j] for j in range(len(self.domains))])
            self.stage += 1
        return values

    def __str__(self) -> str:
        return "DomainLoss"


class TrainLossMetric(PluginMetric[float]):
    """Training loss (nats/token, without auxiliary losses), learning rate and FFN auxiliary metrics.

    Emits a value every `every` optimizer steps, x = global step; averaging over
    the window smooths the curve without hiding trends.
    """

    def __init__(self, every: int = 10, aux_metrics: Callable[[], dict[str, float]] | None = None):
        super().__init__()
        self.every = every
        self.aux_metrics = aux_metrics
        self.step = 0
        self._sum = 0.0
        self._count = 0

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def window(self) -> list:
        """The current averaging window [sum, count] (what a checkpoint inside an experience keeps)."""
        return [self._sum, self._count]

    def set_window(self, total: float, count: int) -> None:
        self._sum, self._count = float(total), int(count)

    def result(self) -> float | None:
        return self._sum / self._count if self._count else None

    def after_training_iteration(self, strategy) -> list[MetricValue] | None:
        nll = F.cross_entropy(strategy.mb_output.detach().flatten(0, -2).float(), strategy.mb_y.flatten())
        self._sum += nll.item()
        self._count += 1
        if not getattr(strategy, "is_update_step", True):
            return None  # a micro-batch of a gradient-accumulation group: count optimizer steps only
        self.step += 1
        if self.step % self.every:
            return None
        values = [MetricValue(self, "Loss_MB/train_phase/train_stream", self.result(), self.step),
                  MetricValue(self, "LR/train_phase", strategy.optimizer.param_groups[0]["lr"], self.step)]
        if self.aux_metrics is not None:
            for key, value in self.aux_metrics().items():
                values.append(MetricValue(self, f"Aux_MB/train_phase/{key}", value, self.step))
        self.reset()
        return values

    def __str__(self) -> str:
        return "TrainLoss"


class ExpertUsageMetric(PluginMetric[dict]):
    """Expert usage of every PEER and MoE layer on each evaluated domain (He 2024, Table 2).

    For each domain's test split, the routing weights every expert receives are
    accumulated (`experts.UsageCounter`, attached only while that domain is
    evaluated); then per layer: usage = fraction of experts with weight > 0,
    unevenness = KL(z || uniform), the top experts, and the Jaccard overlap of
    the expert sets of every pair of domains. After a full pass over the test
    stream, `on_stage(stats, counts)` receives the summary (plain lists, for
    results.json) and the raw per-head counts {layer: {domain: [heads, N]}}.
    """

    def __init__(self, layers: Callable[[], dict], domains: Sequence[str],
                 on_stage: Callable[[dict, dict], None] | None = None, top: int = 8):
        super().__init__()
        self.layers, self.domains, self.on_stage, self.top = layers, list(domains), on_stage, top
        self.stage = 0
        self._counters: dict = {}
        self._by_domain: dict[int, dict] = {}

    def reset(self) -> None:
        self._by_domain = {}

    def result(self) -> dict:
        return self._by_domain

    def before_eval(self, strategy) -> None:
        self.reset()

    def before_eval_exp(self, strategy) -> None:
        self._counters = {name: track_usage(layer) for name, layer in self.layers().items()}

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        for layer in self.layers().values():
            layer.usage_counter = None
        for counter in self._counters.values():  # each rank routed its slice of the tokens
            distributed.all_reduce_sum(counter.counts)
            distributed.all_reduce_sum(counter.hits)
            counter.tokens = int(distributed.all_reduce_sum(torch.tensor([counter.tokens]))[0])
        j = strategy.experience.current_experience
        self._by_domain[j] = self._counters
        values = []
        for name, counter in self._counters.items():
            suffix = f"eval_phase/test_stream/{name}/{_exp_suffix(strategy)}"
            values.append(MetricValue(self, f"ExpertUsage_Exp/{suffix}", counter.usage(), self.stage))
            values.append(MetricValue(self, f"ExpertKL_Exp/{suffix}", counter.unevenness(), self.stage))
        return values

    def after_eval(self, strategy) -> list[MetricValue]:
        if len(self._by_domain) != len(self.domains) or not self._counters:
            return []
        order = range(len(self.domains))
        stats, counts, values = {}, {}, []
        for name in self._counters:
            per_domain = [self._by_domain[j][name] for j in order]
            pooled = sum(c.counts.sum(0) for c in per_domain)
            stats[name] = {
                "num_experts": per_domain[0].num_experts,
                "usage": [c.usage() for c in per_domain],
                "unevenness": [c.unevenness() for c in per_domain],
                "usage_all": usage_fraction(pooled),
                "unevenness_all": kl_to_uniform(pooled),
                "overlap": [[jaccard_overlap(a.counts, b.counts) for b in per_domain] for a in per_domain],
                "top_experts": [c.top_experts(self.top)[0].tolist() for c in per_domain],
            }
            counts[name] = {self.domains[j]: per_domain[j].counts.float() for j in order}
            x = self.stage
            where = f"eval_phase/test_stream/{name}"
            values.append(MetricValue(self, f"ExpertUsage_Stream/{where}", stats[name]["usage_all"], x))
            values.append(MetricValue(self, f"ExpertKL_Stream/{where}", stats[name]["unevenness_all"], x))
        if self.on_stage is not None:
            self.on_stage(stats, counts)
        self.stage += 1
        return values

    def __str__(self) -> str:
        return "ExpertUsage"
