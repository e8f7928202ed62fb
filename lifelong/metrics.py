"""Language-model continual-learning metrics.

Two halves:
- pure functions over a stage x domain loss matrix (forgetting, BWT, FWT, ...),
  the definitions of DESIGN.md section 7, written out in the README;
- Avalanche plugin metrics that fill that matrix during evaluation
  (token-weighted NLL and bits per byte per domain) and report training loss.

Matrix convention: `L[s][j]` is the mean per-token loss (nats) on domain j's
test split at stage s; stage 0 is before any training and stage i (1..T) is
after training on the i-th domain. Domains are 0-based in code, so domain j is
learned at stage j + 1. Lower is better everywhere.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from lifelong import distributed
from experts import jaccard_overlap, kl_to_uniform, track_usage, usage_fraction

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# Matrix metrics (section 7). Each takes L with T + 1 rows and T columns.


def _as_matrix(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    L = np.asarray(matrix, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] != L.shape[1] + 1:
        raise ValueError(f"expected a (T + 1) x T stage-by-domain matrix, got shape {L.shape}")
    return L


def forgetting(matrix) -> list[float]:
    """forgetting_j = L[T][j] - min_{s in [j, T-1]} L[s][j] for the first T - 1 domains (1-based j).

    Positive means the final model is worse on j than at its best since j was learned.
    The last domain has no stage after its own, so it is left out.
    """
    L = _as_matrix(matrix)
    T = L.shape[1]
    return [float(L[T, j] - L[j + 1:T, j].min()) for j in range(T - 1)]


def forgetting_first_last(matrix) -> list[float]:
    """Avalanche's `first - last` forgetting with the sign flipped for losses: L[T][j] - L[j][j] (1-based)."""
    L = _as_matrix(matrix)
    T = L.shape[1]
    return [float(L[T, j] - L[j + 1, j]) for j in range(T - 1)]


def backward_transfer(matrix) -> float | None:
    """BWT = mean_{j < T} (L[j][j] - L[T][j]); negative = forgetting. None for a single domain."""
    L = _as_matrix(matrix)
    T = L.shape[1]
    if T < 2:
        return None
    return float(np.mean([L[j + 1, j] - L[T, j] for j in range(T - 1)]))


def forward_transfer(matrix) -> float | None:
    """FWT = mean_{j > 1} (L[0][j] - L[j-1][j]); positive = earlier domains helped before j was seen."""
    L = _as_matrix(matrix)
    T = L.shape[1]
    if T < 2:
        return None
    # 0-based domain j is learned at stage j + 1, so stage j is "just before j".
    return float(np.mean([L[0, j] - L[j, j] for j in range(1, T)]))


def final_average(matrix) -> float:
    """mean_j L[T][j]: how good the final model is on everything it saw."""
    L = _as_matrix(matrix)
    return float(L[-1].mean())


def plasticity(matrix) -> float:
    """mean_j L[j][j]: how well each domain was learned right after its own experience."""
    L = _as_matrix(matrix)
    return float(np.mean([L[j + 1, j] for j in range(L.shape[1])]))


def summarize(matrix, domains: Sequence[str]) -> dict:
    """Every section-7 figure of one matrix, keyed by name (forgetting keyed by domain).

    A joint-training matrix has two rows (before training, after training on the
    union of all domains); only the final average is defined for it.
    """
    if len(matrix) == 2 and len(domains) > 1:
        return {"forgetting": {}, "forgetting_first_last": {}, "bwt": None, "fwt": None,
                "final_average": float(np.mean(matrix[-1])), "plasticity": None}
    return {
        "forgetting": dict(zip(domains, forgetting(matrix))),
        "forgetting_first_last": dict(zip(domains, forgetting_first_last(matrix))),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix),
        "final_average": final_average(matrix),
        "plasticity": plasticity(matrix),
    }


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """bpb = total nats / (ln 2 * total bytes) = (nats / token) / (ln 2 * bytes / token)."""
    return nats_per_token / (LN2 * bytes_per_token)


# ---------------------------------------------------------------------------
# Avalanche plugin metrics


def _exp_suffix(strategy) -> str:
    return f"Exp{strategy.experience.current_experience:03d}"


class DomainLossMetric(PluginMetric[dict]):
    """Token-weighted test loss of each evaluated experience, in nats/token, bits/byte and perplexity.

    Sums the per-token NLL and counts tokens over every eval minibatch (so a
    partial last batch weighs what it holds), then divides once at the end of
    the experience. After each full pass over the test stream the per-domain
    row is handed to `on_stage(row_nats, row_bpb)`; the harness stacks those
    rows into the stage x domain matrix.
    """

    def __init__(self, domains: Sequence[str], bytes_per_token: Sequence[float],
                 on_stage: Callable[[list[float], list[float]], None] | None = None):
        super().__init__()
        self.domains = list(domains)
        self.bytes_per_token = list(bytes_per_token)
        self.on_stage = on_stage
        self._nats = torch.zeros((), dtype=torch.float64)
        self._tokens = 0
        self._row: dict[int, float] = {}
        self.stage = 0

    def reset(self) -> None:
        self._row = {}

    def result(self) -> dict:
        return {self.domains[j]: loss for j, loss in sorted(self._row.items())}

    def before_eval(self, strategy) -> None:
        self.reset()

    def before_eval_exp(self, strategy) -> None:
        self._nats = torch.zeros((), dtype=torch.float64, device=strategy.device)
        self._tokens = 0

    def after_eval_iteration(self, strategy) -> None:
        logits, targets = strategy.mb_output, strategy.mb_y
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="sum")
        self._nats += nll.double()
        self._tokens += targets.numel()

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        j = strategy.experience.current_experience
        if distributed.active():  # each rank evaluated its slice of every batch
            totals = distributed.all_reduce_sum(torch.stack([self._nats, self._nats.new_tensor(self._tokens)]))
            self._nats, self._tokens = totals[0], int(totals[1].item())
        loss = self._nats.item() / max(self._tokens, 1)
        self._row[j] = loss
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
                self.on_stage(row, row_bpb)
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
