"""Figures of a run's experts: usage per stage, which experts each domain uses, overlap, traffic by
generation, routing drift, sub-key geometry, the entry curve of new experts and isolation.

Same contract as `lifelong.plots`: loaded data in (a `lifelong.runs.RunRecord`), an optional
matplotlib Axes or Figure, the Axes / Figure drawn on out; the numbers come from `lifelong.analysis`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from lifelong import analysis
from lifelong.plots import GROWTH_COLOR, _domain_colors, _message, _new_axes


def usage_by_stage(run, layer: str, fig=None):
    """Left: fraction of the layer's experts that receive any routing weight on each domain's test
    split, per stage (black: all domains pooled). Right: unevenness, KL(usage || uniform) in nats
    (0 = perfectly even; log N = one expert takes everything). Red: stages after growth."""
    stats = run.results["experts"][layer]
    if fig is None:
        fig = plt.figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    colors = _domain_colors(run.domains)
    x = np.arange(len(run.stages))
    for ax, key, label in ((axes[0], "usage", "fraction of experts used"),
                           (axes[1], "unevenness", "KL to uniform (nats)")):
        per_domain = np.asarray(stats[key], float)
        for j, domain in enumerate(run.domains):
            ax.plot(x, per_domain[:, j], "o-", color=colors[domain], markersize=3, label=domain)
        ax.plot(x, stats[f"{key}_all"], "s-", color="black", linewidth=2, markersize=4, label="all domains")
        for s in analysis.growth_stages(run, layer):
            ax.axvspan(s - 0.5, s + 0.5, color=GROWTH_COLOR, alpha=0.08)
        ax.set_xticks(x, analysis.stage_labels(run), rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.set_xlabel("stage")
    axes[0].legend(fontsize=7)
    experts = ", ".join(str(n) for n in stats["num_experts"])
    fig.suptitle(f"{run.name} {layer}: expert usage per stage (experts: {experts})", fontsize=10)
    return fig


def domain_expert_heatmap(run, layer: str, stage: int = -1, bins: int = 64, ax=None):
    """Which experts each domain uses: share of the domain's routing weight per block of expert
    ids (rows sum to 1). White lines: where the experts added by each growth begin."""
    usage = run.usage(layer, stage)
    starts = analysis.generation_starts(run.generation(layer, stage))
    share, edges = analysis.expert_bin_usage(usage, bins, breaks=list(starts.values()))
    ax = _new_axes(ax, 10, 0.45 * len(usage) + 1.8)
    image = ax.pcolormesh(edges, np.arange(len(usage) + 1) - 0.5, share, cmap="magma")
    ax.invert_yaxis()
    ax.set_yticks(range(len(usage)), list(usage))
    per_bin = edges[-1] / (len(edges) - 1)
    ax.set_xlabel("expert id" + ("" if per_bin == 1 else f" ({len(edges) - 1} bins of ~{per_bin:.0f} experts)"))
    for g, start in starts.items():
        ax.axvline(start, color="white", linewidth=1.2)
        ax.text(start, -0.6, f"g{g}", color=GROWTH_COLOR, fontsize=8, va="bottom")
    ax.figure.colorbar(image, ax=ax, label="share of the domain's routing weight")
    ax.set_title(f"{run.name} {layer} at {run.stages[run.stage_index(stage)]}: "
                 "where each domain's traffic goes", pad=14)
    return ax


def overlap_heatmap(run, layer: str, stage: int = -1, ax=None):
    """Jaccard overlap |A n B| / |A u B| of the expert sets two domains use (1 = the same experts)."""
    overlap = np.asarray(run.results["experts"][layer]["overlap"][run.stage_index(stage)], float)
    domains = run.domains
    ax = _new_axes(ax, 0.9 * len(domains) + 2.5, 0.8 * len(domains) + 1.5)
    image = ax.imshow(overlap, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(overlap):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    ax.figure.colorbar(image, ax=ax, label="Jaccard overlap")
    ax.set_title(f"{run.name} {layer} at {run.stages[run.stage_index(stage)]}", fontsize=10)
    return ax


def generation_traffic(run, layer: str, fig=None):
    """Left: at the last stage, how each domain's routing weight splits over the original experts and
    those each growth added. Right: across stages, the share of each domain's weight on experts
    added for later domains (new capacity an old domain borrows, or competes with)."""
    if run.is_joint:
        raise ValueError(f"{run.name}: joint training has no 'later domains'")
    if fig is None:
        fig = plt.figure(figsize=(12, 3.8))
    left, right = fig.subplots(1, 2)
    gens, share = analysis.traffic_by_generation(run, layer, -1)
    labels = analysis.generation_labels(run, layer)
    cmap = plt.get_cmap("tab10")
    bottom = np.zeros(len(run.domains))
    for k, g in enumerate(gens):
        left.bar(run.domains, share[:, k], bottom=bottom, label=labels[g],
                 color="lightgrey" if g == 0 else cmap(k % 10))
        bottom += share[:, k]
    left.set_ylabel("share of routing weight")
    left.set_title(f"at {run.stages[-1]}: traffic by generation", fontsize=10)
    left.legend(fontsize=7, loc="lower left")
    later = analysis.later_traffic_share(run, layer)
    colors = _domain_colors(run.domains)
    x = np.arange(len(run.stages))
    for j, domain in enumerate(run.domains):
        if not np.isnan(later[:, j]).all():
            right.plot(x, later[:, j], "o-", color=colors[domain], label=domain)
    right.set_xticks(x, analysis.stage_labels(run), rotation=20, ha="right")
    right.set_ylabel("share on experts added later")
    right.set_title("traffic to experts added for later domains", fontsize=10)
    if right.lines:
        right.legend(fontsize=7)
    else:
        _message(right, "no domain has experts added after it")
    fig.suptitle(f"{run.name} {layer}", fontsize=10)
    return fig


def drift_plot(run, layer: str, ax=None):
    """Routing drift of old domains: for every domain already learned, the fraction of its probe
    tokens' expert choices that changed at each later stage (solid) and the part of it that went to
    experts added since the previous stage (dashed). Shaded: stages after growth."""
    drift = analysis.routing_drift(run, layer)
    learned = analysis.learned_stage(run.results)
    ax = _new_axes(ax, 9, 3.8)
    colors = _domain_colors(run.domains)
    x = np.arange(1, len(run.stages))
    for j, domain in enumerate(run.domains):
        old = np.array([j in learned and s - 1 >= learned[j] for s in x])
        if not old.any():
            continue
        ax.plot(x[old], drift["changed"][old, j], "o-", color=colors[domain], label=f"{domain}: changed")
        ax.plot(x[old], drift["to_new"][old, j], "^--", color=colors[domain], label=f"{domain}: to new experts")
    if not ax.lines:
        return _message(ax, "no stage follows a learned domain: nothing to compare")
    for s in analysis.growth_stages(run, layer):
        ax.axvspan(s - 0.5, s + 0.5, color=GROWTH_COLOR, alpha=0.08)
    ax.set_xticks(x, [f"-> {label}" for label in analysis.stage_labels(run)[1:]], rotation=20, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of top-k ids")
    ax.set_title(f"{run.name} {layer}: routing drift of learned domains' probe tokens", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return ax


def subkey_pca(run, layer: str, stage: int = -1, head: int | None = None, ax=None):
    """2-D PCA of the layer's sub-keys (PEER) or router rows (MoE), coloured by the growth that
    added them: where new keys land relative to the original ones decides which tokens they win."""
    points, generation, what = analysis.subkey_points(run, layer, stage, head)
    ax = _new_axes(ax, 6.5, 5)
    if len(points) < 3:
        return _message(ax, f"only {len(points)} {what}s: nothing to project")
    xy, ratio = analysis.pca_2d(points)
    labels = analysis.generation_labels(run, layer)
    cmap = plt.get_cmap("tab10")
    for k, g in enumerate(np.unique(generation).astype(int)):
        pick = generation == g
        ax.scatter(xy[pick, 0], xy[pick, 1], s=18 if g else 12, label=labels.get(g, f"g{g}"),
                   color="grey" if g == 0 else cmap(k % 10), alpha=0.6 if g == 0 else 0.9)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    which = "" if "router" in what else ", all heads" if head is None else f", head {head}"
    ax.set_title(f"{run.name} {layer} at {run.stages[run.stage_index(stage)]}\n"
                 f"PCA of each {what}{which}", fontsize=10)
    ax.legend(fontsize=7)
    return ax


def entry_curve(run, layer: str, ax=None):
    """The share of the layer's routing weight on its newest experts, on recent training tokens,
    across the stream (`Growth/train_phase/LAYER/new_share`): a warm-in lets them in gradually.
    Red dotted lines: growths; shaded: each growth's warm-in."""
    ax = _new_axes(ax, 9, 3.4)
    steps, share = run.metric(f"Growth/train_phase/{layer}/new_share")
    if not len(steps):
        return _message(ax, f"{run.name} {layer}: no entry curve (no growth, or a run of an earlier version)")
    ax.plot(steps, share, "o-", markersize=3, color="tab:purple", label="newest experts' share")
    warmup = int(run.config.get("growth", {}).get("warmup_steps", 0))
    for i, event in enumerate(run.growth_events(layer)):
        ax.axvline(event["step"], color=GROWTH_COLOR, linestyle=":", linewidth=1.2, label="growth" if i == 0 else None)
        if warmup:
            ax.axvspan(event["step"], event["step"] + warmup, color=GROWTH_COLOR, alpha=0.06)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of routing weight")
    ax.set_title(f"{run.name} {layer}: how new experts enter (training tokens)", fontsize=10)
    ax.legend(fontsize=7)
    return ax


def isolation_plot(run, layer: str, fig=None):
    """Left: each learned domain's share of routing weight on experts added after it (intrusion, want
    small), per stage. Right: each domain's share on the experts added for it (own, want large)."""
    stats = run.results["experts"][layer]
    if fig is None:
        fig = plt.figure(figsize=(12, 3.6))
    colors = _domain_colors(run.domains)
    x = np.arange(len(run.stages))
    for ax, key, label in zip(fig.subplots(1, 2), ("intrusion", "own"),
                              ("share on experts added later", "share on its own experts")):
        values = np.array([[np.nan if v is None else v for v in row] for row in stats.get(key) or []], float)
        for j, domain in enumerate(run.domains):
            if len(values) and not np.isnan(values[:, j]).all():
                ax.plot(x, values[:, j], "o-", color=colors[domain], label=domain)
        if not ax.lines:
            _message(ax, f"no {key} figures: no growth in this run")
            continue
        ax.set_xticks(x, analysis.stage_labels(run), rotation=20, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name} {layer}: isolation of grown experts", fontsize=10)
    return fig
