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


# ---- the figures, for a batch of matrices L_BST [B, T + 1, T] (B bootstrap replicates, or 1)

def _forgetting_B(L_BST: np.ndarray) -> np.ndarray:
    """[B, T - 1]: L[T][j] - min_{s in [j, T-1]} L[s][j] (1-based) for every domain but the last."""
    T = L_BST.shape[2]
    return np.stack([L_BST[:, T, j] - L_BST[:, j + 1:T, j].min(axis=1) for j in range(T - 1)], axis=1) \
        if T > 1 else np.zeros((L_BST.shape[0], 0))


def _diagonal_B(L_BST: np.ndarray, shift: int) -> np.ndarray:
    """[B, T]: L[j + shift][j] for every domain j (0-based), the stage right after (shift 1) or
    right before (shift 0) its experience."""
    T = L_BST.shape[2]
    return L_BST[:, np.arange(T) + shift, np.arange(T)]


def batch_figures(L_BST: np.ndarray, reference_BT: np.ndarray | None = None) -> dict[str, np.ndarray | None]:
    """Every summary figure of each matrix in a batch, as arrays [B] (forgetting: [B, T - 1]):

        forgetting_j          L[T][j] - min_{s in [j, T-1]} L[s][j]      (1-based j < T)
        forgetting_first_last L[T][j] - L[j][j]                          (Avalanche's, sign-corrected)
        max_forgetting        max_j forgetting_j
        bwt                   mean_{j<T} (L[j][j] - L[T][j])
        fwt_gem               mean_{j>1} (L[0][j] - L[j-1][j])           (GEM's forward transfer)
        fwt_zero_shot         mean_{j>1} (L[0][j] - L[j-1][j]) / (L[0][j] - R[j]), R = a model trained
                              on domain j alone (`reference_BT`), else None
        final_average         mean_j L[T][j]
        plasticity            mean_j L[j][j]
    """
    L = np.asarray(L_BST, dtype=np.float64)
    T = L.shape[2]
    after, before = _diagonal_B(L, 1), _diagonal_B(L, 0)
    forgetting = _forgetting_B(L)
    out = {"forgetting": forgetting, "forgetting_first_last": L[:, T, :T - 1] - after[:, :T - 1],
           "max_forgetting": forgetting.max(axis=1) if T > 1 else None,
           "bwt": (after[:, :T - 1] - L[:, T, :T - 1]).mean(axis=1) if T > 1 else None,
           "fwt_gem": (L[:, 0, 1:] - before[:, 1:]).mean(axis=1) if T > 1 else None,
           "fwt_zero_shot": None,
           "final_average": L[:, T].mean(axis=1), "plasticity": after.mean(axis=1)}
    if reference_BT is not None and T > 1:
        R = np.asarray(reference_BT, dtype=np.float64)
        out["fwt_zero_shot"] = ((L[:, 0, 1:] - before[:, 1:]) / (L[:, 0, 1:] - R[:, 1:])).mean(axis=1)
    return out


def forgetting(matrix) -> list[float]:
    """forgetting_j = L[T][j] - min_{s in [j, T-1]} L[s][j] for the first T - 1 domains (1-based j).

    Positive means the final model is worse on j than at its best since j was learned.
    The last domain has no stage after its own, so it is left out.
    """
    return [float(v) for v in _forgetting_B(_as_matrix(matrix)[None])[0]]


def forgetting_first_last(matrix) -> list[float]:
    """Avalanche's `first - last` forgetting with the sign flipped for losses: L[T][j] - L[j][j] (1-based)."""
    return [float(v) for v in batch_figures(_as_matrix(matrix)[None])["forgetting_first_last"][0]]


def _one(matrix, key: str) -> float | None:
    value = batch_figures(_as_matrix(matrix)[None])[key]
    return None if value is None else float(value[0])


def backward_transfer(matrix) -> float | None:
    """BWT = mean_{j < T} (L[j][j] - L[T][j]); negative = forgetting. None for a single domain."""
    return _one(matrix, "bwt")


def forward_transfer(matrix) -> float | None:
    """FWT, GEM's form: mean_{j > 1} (L[0][j] - L[j-1][j]); positive = earlier domains helped before j was seen."""
    return _one(matrix, "fwt_gem")


def final_average(matrix) -> float:
    """mean_j L[T][j]: how good the final model is on everything it saw."""
    return _one(matrix, "final_average")


def plasticity(matrix) -> float:
    """mean_j L[j][j]: how well each domain was learned right after its own experience."""
    return _one(matrix, "plasticity")


SUMMARY_FIGURES = ("final_average", "plasticity", "bwt", "fwt_gem", "fwt_zero_shot", "max_forgetting")


def summarize(matrix, domains: Sequence[str], reference: Sequence[float] | None = None) -> dict:
    """Every figure of `batch_figures` for one matrix, keyed by name (forgetting keyed by domain);
    `reference`: each domain's loss after training on it alone (for fwt_zero_shot).

    A joint-training matrix has two rows (before training, after training on the
    union of all domains); only the final average is defined for it.
    """
    if len(matrix) == 2 and len(domains) > 1:
        return {"forgetting": {}, "forgetting_first_last": {}, "max_forgetting": None, "bwt": None,
                "fwt_gem": None, "fwt_zero_shot": None, "final_average": float(np.mean(matrix[-1])),
                "plasticity": None}
    figures = batch_figures(_as_matrix(matrix)[None], None if reference is None else np.asarray(reference)[None])
    out = {"forgetting": dict(zip(domains, map(float, figures["forgetting"][0]))),
           "forgetting_first_last": dict(zip(domains, map(float, figures["forgetting_first_last"][0])))}
    for key in ("max_forgetting", "bwt", "fwt_gem", "fwt_zero_shot", "final_average", "plasticity"):
        out[key] = None if figures[key] is None else float(figures[key][0])
    return out


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


# ---- bootstrap intervals over test blocks

def block_indices(counts: Sequence[int], samples: int, seed: int = 0) -> list[np.ndarray]:
    """For each domain, `samples` resamplings with replacement of its test blocks, [samples, n_j] each.
    Seeded: the same counts and seed give the same indices (paired comparisons reuse them)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(samples, n)) for n in counts]


def resampled(block_losses: Sequence[Sequence[np.ndarray]], indices: Sequence[np.ndarray]) -> np.ndarray:
    """[B, S, T] matrices from per-block losses `block_losses[s][j]` ([n_j]: the mean loss of each of
    domain j's test blocks at stage s; the same blocks at every stage) resampled by `indices`."""
    S, T = len(block_losses), len(indices)
    out = np.empty((indices[0].shape[0] if T else 0, S, T))
    for s in range(S):
        for j in range(T):
            out[:, s, j] = np.asarray(block_losses[s][j], dtype=np.float64)[indices[j]].mean(axis=1)
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> np.ndarray:
    """[..., 2]: the (1 - level) / 2 and (1 + level) / 2 percentiles over the first axis."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return np.stack([lo, hi], axis=-1)


def bootstrap_intervals(block_losses: Sequence[Sequence[np.ndarray]], domains: Sequence[str],
                        bytes_per_token: Sequence[float], samples: int = 1000, level: float = 0.95,
                        seed: int = 0, reference_blocks: Sequence[np.ndarray] | None = None) -> dict:
    """Percentile bootstrap intervals over each domain's test blocks (resampled with replacement, the
    same blocks at every stage) of every matrix cell and every summary figure, in nats and bits per
    byte: {"loss_interval": [S][T][2], "bpb_interval": ..., "nats": {figure: [lo, hi] | None,
    "forgetting": {domain: [lo, hi]}}, "bpb": {...}}. `reference_blocks[j]`: the per-block losses
    of a model trained on domain j alone (for fwt_zero_shot)."""
    indices = block_indices([len(b) for b in block_losses[0]], samples, seed)
    L_BST = resampled(block_losses, indices)
    ref_BT = None
    if reference_blocks is not None:
        ref_BT = resampled([reference_blocks], indices)[:, 0]
    scale_T = 1.0 / (LN2 * np.asarray(bytes_per_token, dtype=np.float64))
    out = {}
    for unit, factor in (("nats", 1.0), ("bpb", scale_T)):
        L = L_BST * factor
        out["loss_interval" if unit == "nats" else "bpb_interval"] = percentile_interval(L, level).tolist()
        joint = L.shape[1] == 2 and L.shape[2] > 1
        figures = ({"final_average": L[:, -1].mean(axis=1)} if joint or L.shape[1] != L.shape[2] + 1
                   else batch_figures(L, None if ref_BT is None else ref_BT * factor))
        summary: dict = {key: None for key in SUMMARY_FIGURES}
        summary["forgetting"] = {}
        for key, values in figures.items():
            if values is None or key == "forgetting_first_last":
                continue
            if key == "forgetting":
                summary[key] = dict(zip(domains, percentile_interval(values, level).tolist()))
            else:
                summary[key] = percentile_interval(values, level).tolist()
        out[unit] = summary
    return out


def curve_transfer(stream_means: Sequence[float | None], reference_means: Sequence[float | None]) -> float | None:
    """The learning-curve (area) form of forward transfer (Continual World, Wolczyk et al. 2021), for
    losses: mean_{j>1} (area_ref_j - area_j) / steps_j, i.e. the reference's mean loss on domain j's
    probe blocks while it learns j alone minus the stream's while it learns j (positive = the
    earlier domains made j learn faster or better). Inputs: each domain's mean curve loss (None
    where there is no curve); None when no domain after the first has both."""
    terms = [r - s for s, r in list(zip(stream_means, reference_means))[1:] if s is not None and r is not None]
    return float(np.mean(terms)) if terms else None


PAIRED_FIGURES = ("final_average", "max_forgetting", "bwt", "fwt_gem", "plasticity")


def _seed_figures(seeds: Sequence[Sequence[Sequence[np.ndarray]]], indices, scale_T) -> dict[str, np.ndarray]:
    """{figure: [n_seeds, B]} of every seed's resampled matrices (in `scale_T` units)."""
    per_seed = [batch_figures(resampled(blocks, indices) * scale_T) for blocks in seeds]
    return {key: np.stack([f[key] for f in per_seed]) for key in PAIRED_FIGURES if per_seed[0][key] is not None}


def paired_differences(first: Sequence, other: Sequence, bytes_per_token: Sequence[float], samples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{figure: (difference, lo, hi)} of `other` minus `first` in bits per byte, each figure the mean
    over a run's seeds of the per-seed figure. `first` / `other`: one [stage][domain] list of per-block
    losses per seed; every domain's test blocks must be the same in both. The bootstrap resamples
    the test blocks with the same indices for both runs (paired) and, with several seeds, the seeds
    too (paired by position when both runs have as many, independently otherwise)."""
    scale_T = 1.0 / (LN2 * np.asarray(bytes_per_token, dtype=np.float64))
    full = [np.arange(len(b))[None] for b in first[0][0]]  # the observed blocks, once
    indices = block_indices([len(b) for b in first[0][0]], samples, seed)
    rng = np.random.default_rng(seed + 1)
    seed_a = rng.integers(0, len(first), size=(samples, len(first)))
    seed_b = seed_a if len(first) == len(other) else rng.integers(0, len(other), size=(samples, len(other)))
    out = {}
    a_full, b_full = _seed_figures(first, full, scale_T), _seed_figures(other, full, scale_T)
    a_boot, b_boot = _seed_figures(first, indices, scale_T), _seed_figures(other, indices, scale_T)
    columns = np.arange(samples)
    for key in a_full.keys() & b_full.keys():
        a = a_boot[key][seed_a.T, columns].mean(axis=0)
        b = b_boot[key][seed_b.T, columns].mean(axis=0)
        lo, hi = percentile_interval(b - a, level)
        out[key] = (float(b_full[key].mean() - a_full[key].mean()), float(lo), float(hi))
    return {key: out[key] for key in PAIRED_FIGURES if key in out}


# ---- isolation of grown experts

def isolation_shares(counts_TN: np.ndarray, generation_N: np.ndarray, experience_of: dict[int, int],
                     learned: int) -> tuple[list[float | None], list[float | None]]:
    """(intrusion, own) of every domain j (0-based) from its routing weight per expert `counts_TN`:
    intrusion_j = the share of j's weight on experts added after j was learned (generation g >= 1
    added in experience e_g > j), own_j = the share on the experts added for j (e_g == j).
    `experience_of` maps each growth generation to the experience it was added in; only the first
    `learned` domains have been learned (None for the others, and where no such experts exist)."""
    counts = np.asarray(counts_TN, dtype=np.float64)
    added = np.array([experience_of.get(int(g), -1) if g > 0 else -1 for g in np.asarray(generation_N)])
    intrusion, own = [], []
    for j, row in enumerate(counts):
        total = row.sum()
        later, mine = added > j, added == j
        ok = j < learned and total > 0
        intrusion.append(float(row[later].sum() / total) if ok and later.any() else None)
        own.append(float(row[mine].sum() / total) if ok and mine.any() else None)
    return intrusion, own
