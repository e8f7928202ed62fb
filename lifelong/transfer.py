"""The stage x domain matrix maths, NumPy only: forgetting, backward and forward transfer, the
per-domain terms behind them, bits per byte, and how many optimizer steps each experience takes.

Matrix convention (README, "Metric definitions"): `L[s][j]` is the mean per-token loss (nats) on
domain j's test split at stage s; stage 0 is before any training and stage i (1..T) is after
training on the i-th domain. Domains are 0-based in code, so domain j is learned at stage j + 1.
Lower is better everywhere.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LN2 = math.log(2.0)


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
    """Every figure above for one matrix, keyed by name (forgetting keyed by domain).

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


def transfer_components(matrix) -> tuple[list[float | None], list[float | None]]:
    """Per-domain terms of BWT and FWT, 0-based domain j learned at stage j + 1:
    bwt_j = L[j+1][j] - L[T][j] for j < T-1, fwt_j = L[0][j] - L[j][j] for j >= 1; None elsewhere.
    Their means are the run's BWT and FWT; a matrix of another shape (joint training) gives Nones."""
    L = np.asarray(matrix, dtype=float)
    T = L.shape[1]
    if L.shape[0] != T + 1:
        return [None] * T, [None] * T
    bwt = [float(L[j + 1, j] - L[T, j]) if j < T - 1 else None for j in range(T)]
    fwt = [float(L[0, j] - L[j, j]) if j >= 1 else None for j in range(T)]
    return bwt, fwt


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """bpb = total nats / (ln 2 * total bytes) = (nats / token) / (ln 2 * bytes / token)."""
    return nats_per_token / (LN2 * bytes_per_token)


def steps_per_experience(blocks: int, batch_size: int, grad_accum: int = 1, epochs: int = 1) -> int:
    """Optimizer steps of one experience of `blocks` blocks: ceil(ceil(blocks / micro) / grad_accum)
    * epochs, micro = batch_size // grad_accum. Avalanche's train loader keeps the last partial
    micro-batch (in the replay loader too, whose length the current data sets) and the LM template
    steps the last partial accumulation group of every epoch."""
    micro_batches = math.ceil(blocks / (batch_size // grad_accum))
    return math.ceil(micro_batches / grad_accum) * epochs


def experience_steps(strategy: str, domain_blocks: Sequence[int], batch_size: int, grad_accum: int = 1,
                     epochs: int = 1) -> list[int]:
    """Optimizer steps of each training experience of a stream whose domains hold these many train blocks.

    Cumulative trains experience i on the union of the first i + 1 domains; joint trains once on the
    union of all (one experience); every other strategy's loader is set by the current domain alone
    (replay included). Their sum is the `total_steps` of a schedule with `train.rewarm=false`.
    """
    blocks = [int(b) for b in domain_blocks]
    if strategy == "joint":
        blocks = [sum(blocks)]
    elif strategy == "cumulative":
        blocks = [sum(blocks[:i + 1]) for i in range(len(blocks))]
    return [steps_per_experience(b, batch_size, grad_accum, epochs) for b in blocks]
