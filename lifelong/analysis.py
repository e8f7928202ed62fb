"""The numbers behind the figures of `lifelong.plots`, computed from loaded runs (NumPy, no
matplotlib, no torch): the largest forgetting, stage and generation labels, where each domain's
routing weight goes, traffic to experts added by growth, routing drift and the key geometry.

Functions take a `lifelong.runs.RunRecord` (or a results.json dict where that is all they need),
so their output can be checked, printed or reused without drawing anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lifelong.runs import RunRecord


# ---------------------------------------------------------------------------------------------
# Summary figures


def max_forgetting(summary: dict) -> float | None:
    """The largest per-domain forgetting of a summary (`transfer.summarize`); None without any."""
    return max((summary.get("forgetting") or {}).values(), default=None)


def summary_figure(summary: dict, key: str) -> float | None:
    """One figure of a summary (`transfer.summarize`), also for runs of earlier versions (which
    named GEM's forward transfer "fwt" and did not record max_forgetting)."""
    if key == "max_forgetting" and key not in summary:
        return max_forgetting(summary)
    if key == "fwt_gem" and key not in summary:
        return summary.get("fwt")
    return summary.get(key)


def frontier_points(runs) -> list[dict]:
    """Each run on the forgetting-plasticity plane (bits per byte): `plasticity` (mean loss on each
    domain right after learning it; lower = learned better) and `max_forgetting` (lower = kept
    better), each with its interval (over test blocks, or Student t over seeds for a multi-seed
    run); None where a run lacks the figure (joint training has no forgetting)."""
    points = []
    for run in runs:
        summary = run.results.get("bpb_summary") or {}
        intervals = summary.get("intervals") or {}
        points.append({"name": run.name, "plasticity": summary_figure(summary, "plasticity"),
                       "plasticity_interval": intervals.get("plasticity"),
                       "max_forgetting": summary_figure(summary, "max_forgetting"),
                       "max_forgetting_interval": intervals.get("max_forgetting"),
                       "seeds": len(run.results.get("seeds") or []) or 1})
    return points


# ---------------------------------------------------------------------------------------------
# Stages and generations


def learned_stage(results: dict) -> dict[int, int]:
    """{domain index: stage right after its experience} (empty for joint training)."""
    stages = results["stages"]
    return {j: stages.index(f"after:{d}") for j, d in enumerate(results["domains"]) if f"after:{d}" in stages}


def stage_labels(run: RunRecord) -> list[str]:
    """The stage names without their "after:" prefix (init, a, b, ...)."""
    return [s.replace("after:", "") for s in run.stages]


def growth_stages(run: RunRecord, layer: str) -> list[int]:
    """The stages at which the layer has more experts than at the stage before."""
    counts = run.results["experts"][layer]["num_experts"]
    return [s for s in range(1, len(counts)) if counts[s] > counts[s - 1]]


def generation_starts(generation: np.ndarray) -> dict[int, int]:
    """{g >= 1: first expert id of generation g} (growth appends, so each generation is one range)."""
    return {int(g): int(np.argmax(generation == g)) for g in np.unique(generation) if g > 0}


def generation_labels(run: RunRecord, layer: str) -> dict[int, str]:
    """{generation: "original" or "gG: added for DOMAIN"}, the domain whose stage first holds it."""
    first = run.generation_stage(layer)
    return {g: "original" if s == 0 else f"g{g}: added for {stage_labels(run)[s]}" for g, s in sorted(first.items())}


# ---------------------------------------------------------------------------------------------
# Where the routing weight goes


def expert_bin_usage(usage: dict[str, np.ndarray], bins: int,
                     breaks: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """({domains x bins} share of each domain's routing weight per contiguous block of expert
    ids, bin edges in expert ids). Each row sums to 1 (0 for a domain with no traffic).
    `breaks`: expert ids that must start a bin (e.g. where each growth's experts begin)."""
    counts = np.stack([np.asarray(u, float).reshape(-1, np.shape(u)[-1]).sum(0) for u in usage.values()])
    n = counts.shape[1]
    edges = np.linspace(0, n, min(bins, n) + 1).round().astype(int)
    edges = np.unique(np.concatenate([edges, [b for b in breaks if 0 < b < n]]).astype(int))
    binned = np.add.reduceat(counts, edges[:-1], axis=1)
    totals = binned.sum(1, keepdims=True)
    return np.divide(binned, totals, out=np.zeros_like(binned), where=totals > 0), edges


def traffic_by_generation(run: RunRecord, layer: str, stage: int = -1) -> tuple[list[int], np.ndarray]:
    """(generations, {domains x generations} share of each domain's routing weight on the experts
    of each generation) at one stage; rows sum to 1."""
    generation = run.generation(layer, stage)
    gens = np.unique(generation).astype(int).tolist()
    usage = run.usage(layer, stage)
    rows = []
    for counts in usage.values():
        per_expert = np.asarray(counts, float).reshape(-1, counts.shape[-1]).sum(0)
        per_gen = np.array([per_expert[generation == g].sum() for g in gens])
        rows.append(per_gen / per_gen.sum() if per_gen.sum() > 0 else per_gen)
    return gens, np.array(rows)


def later_traffic_share(run: RunRecord, layer: str) -> np.ndarray:
    """{stages x domains} share of domain j's routing weight on experts added for a later domain
    (first seen at a stage s >= j + 2, i.e. added while learning domain j + 1 or later); NaN where
    no such experts exist yet."""
    first = run.generation_stage(layer)
    out = np.full((len(run.stages), len(run.domains)), np.nan)
    for stage in range(len(run.stages)):
        gens, share = traffic_by_generation(run, layer, stage)
        for j in range(len(run.domains)):
            later = [k for k, g in enumerate(gens) if first[g] >= j + 2]
            if later:
                out[stage, j] = share[j, later].sum()
    return out


def routing_drift(run: RunRecord, layer: str) -> dict[str, np.ndarray]:
    """How the probe tokens' routes change between consecutive stages, {stages-1 x domains}:
    "changed": fraction of each token's top-k expert ids (per head) not chosen at the previous
    stage; "to_new": fraction of the ids that name experts added since the previous stage.
    Row s - 1 compares stage s with stage s - 1."""
    transitions = len(run.stages) - 1
    changed = np.full((transitions, len(run.domains)), np.nan)
    to_new = np.full_like(changed, np.nan)
    previous = run.routes(layer, 0)
    for s in range(1, len(run.stages)):
        current = run.routes(layer, s)
        old_n = len(run.generation(layer, s - 1))
        for j, domain in enumerate(run.domains):
            if domain not in current or domain not in previous:
                continue
            a, b = previous[domain], current[domain]
            kept = (b[..., :, None] == a[..., None, :]).any(-1)  # [tokens, heads, k]
            changed[s - 1, j] = 1.0 - kept.mean()
            to_new[s - 1, j] = (b >= old_n).mean()
        previous = current
    return {"changed": changed, "to_new": to_new}


# ---------------------------------------------------------------------------------------------
# Key geometry


def subkey_points(run: RunRecord, layer: str, stage: int = -1,
                  head: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(points [rows, features], generation of each row, what a row is) for the PCA figure.

    PEER: the first-codebook sub-keys, one row per expert-grid row i (experts i*n2 .. i*n2+n2-1;
    growth adds rows there), all heads concatenated unless `head` is given. MoE: router rows."""
    snap = run.snapshot(stage)
    generation = run.generation(layer, stage)
    if f"keys1/{layer}" in snap:
        keys = snap[f"keys1/{layer}"]  # [heads, n1, d]
        n2 = snap[f"keys2/{layer}"].shape[1]
        points = keys[head] if head is not None else keys.transpose(1, 0, 2).reshape(keys.shape[1], -1)
        return points, generation[::n2], "first-codebook sub-key (grid row)"
    if f"router/{layer}" in snap:
        return snap[f"router/{layer}"], generation, "router row (expert)"
    raise ValueError(f"{run.name}: no sub-keys or router rows for {layer} in the snapshot")


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points projected on their two principal components [rows, 2], the share of the variance
    each component explains); needs at least 3 rows."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2).fit(points)
    return pca.transform(points), pca.explained_variance_ratio_
