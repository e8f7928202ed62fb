"""Figures shared by the command line, `lifelong report` and the notebooks (matplotlib, Agg-safe).

Every figure function takes loaded data (a results.json dict, or a `lifelong.runs.RunRecord`
where it needs metrics or snapshots) and an optional matplotlib Axes (or Figure for multi-panel
figures), and returns the Axes / Figure it drew on. It only draws: the numbers come from
`lifelong.analysis` and `lifelong.transfer`, where they can be checked or printed on their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

if "IPython" not in sys.modules:  # scripts and the CLI draw off-screen; notebooks keep their inline backend
    matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lifelong import analysis  # noqa: E402
from lifelong.transfer import transfer_components  # noqa: E402

GROWTH_COLOR = "crimson"


def _unit(key: str) -> str:
    return "bits/byte" if key.startswith("bpb") else "nats/token"


def _new_axes(ax, width: float, height: float):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height))
    return ax


def _named(runs) -> list[tuple[str, dict]]:
    """(name, results) pairs from RunRecords, (name, results) pairs, a {name: results} dict or results dicts."""
    if isinstance(runs, dict):
        return [("run 1", runs)] if "domains" in runs else list(runs.items())
    out = []
    for i, run in enumerate(runs):
        if hasattr(run, "results"):
            out.append((run.name, run.results))
        elif isinstance(run, tuple):
            out.append((str(run[0]), run[1]))
        else:
            out.append((f"run {i + 1}", run))
    return out


def _domain_colors(domains: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {d: cmap(i % 10) for i, d in enumerate(domains)}


def _message(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


# ---------------------------------------------------------------------------------------------
# The stage x domain matrix, forgetting and transfer


def matrix_heatmap(results: dict, key: str = "bpb_matrix", ax=None, title: str | None = None,
                   vmin: float | None = None, vmax: float | None = None, colorbar: bool = True,
                   mark_learned: bool = True):
    """Annotated stage x domain heatmap of `results[key]` (lower is better, so the colour map is reversed).

    With `mark_learned`, the cell of each domain right after its own experience is outlined:
    reading a column downwards from there shows what later domains did to it.
    """
    matrix = np.asarray(results[key], dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.4 * matrix.shape[1] + 2.5, 0.55 * matrix.shape[0] + 1.8))
    lo = np.nanmin(matrix) if vmin is None else vmin
    hi = np.nanmax(matrix) if vmax is None else vmax
    image = ax.imshow(matrix, cmap="viridis_r", aspect="auto", vmin=lo, vmax=hi)
    ax.set_xticks(range(matrix.shape[1]), results["domains"], rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), results["stages"])
    ax.set_xlabel("evaluated domain")
    ax.set_ylabel("stage")
    unit = _unit(key)
    ax.set_title(title or f"test loss ({unit})")
    for (i, j), value in np.ndenumerate(matrix):
        dark = value > lo + 0.5 * (hi - lo)  # viridis_r: high loss is dark purple, low loss light yellow
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    if mark_learned:
        for j, stage in analysis.learned_stage(results).items():
            ax.add_patch(Rectangle((j - 0.5, stage - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=unit)
    return ax


def save_matrix_heatmap(results: dict, path: str | Path, key: str = "bpb_matrix") -> Path:
    ax = matrix_heatmap(results, key)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
    return Path(path)


def _summary(results: dict, unit: str) -> dict:
    return results["bpb_summary"] if unit == "bpb" else results


def _bar_chart(ax, labels: Sequence[str], series, fmt: str, ylabel: str, title: str, **tick_kw):
    """Grouped bars: at each label one bar per (name, heights, colour) of `series` (None = no bar),
    annotated with `fmt`, over a zero line; then the ticks, axis labels, title and legend."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for k, (name, heights, color) in enumerate(series):
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, [np.nan if h is None else h for h in heights],
                      width=width, label=name, color=color)
        ax.bar_label(bars, fmt=fmt, fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, **tick_kw)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    return ax


def forgetting_bars(results: dict, unit: str = "bpb", ax=None):
    """Forgetting of every domain but the last: the final loss minus the best loss since the
    domain was learned (positive = forgot), beside Avalanche's first-minus-last form."""
    summary = _summary(results, unit)
    best, first_last = summary.get("forgetting") or {}, summary.get("forgetting_first_last") or {}
    ax = _new_axes(ax, 1.1 * len(results["domains"]) + 3, 3.6)
    if not best:
        return _message(ax, "no forgetting figures: joint training (or a single domain) has no "
                            "stage after a domain's own")
    domains = list(best)
    series = [("final - best since learned", [best[d] for d in domains], "tab:red"),
              ("final - just after learned (Avalanche)", [first_last.get(d) for d in domains], "tab:gray")]
    return _bar_chart(ax, domains, series, "%+.3f", f"forgetting ({_unit(unit)})",
                      "forgetting per domain (> 0: the final model is worse)")


def transfer_bars(results: dict, unit: str = "bpb", ax=None):
    """Each domain's share of BWT (learned loss minus final loss; < 0 = forgotten) and FWT (loss
    before training minus loss just before the domain's experience; > 0 = earlier domains helped),
    with the run's BWT and FWT (their means) as dashed lines."""
    key = "bpb_matrix" if unit == "bpb" else "loss_matrix"
    bwt, fwt = transfer_components(results[key])
    ax = _new_axes(ax, 1.1 * len(results["domains"]) + 3, 3.6)
    summary = _summary(results, unit)
    if summary.get("bwt") is None:
        return _message(ax, "BWT and FWT are not defined for this run (joint training or one domain)")
    for name, key, color in (("BWT", "bwt", "tab:blue"), ("FWT", "fwt_gem", "tab:orange")):
        value = analysis.summary_figure(summary, key)
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{name} = {value:+.3f}")
    series = [("BWT term", bwt, "tab:blue"), ("FWT term", fwt, "tab:orange")]
    return _bar_chart(ax, results["domains"], series, "%+.2f", f"{_unit(unit)} (> 0 = better)",
                      "backward (BWT) and forward (FWT) transfer per domain")


def summary_bars(runs, ax=None):
    """BWT, FWT and the largest forgetting (bits/byte) of several runs side by side."""
    named = _named(runs)
    ax = _new_axes(ax, 1.6 * len(named) + 3, 3.6)
    summaries = [res["bpb_summary"] for _, res in named]
    series = [("BWT", [s.get("bwt") for s in summaries], "tab:blue"),
              ("FWT", [analysis.summary_figure(s, "fwt_gem") for s in summaries], "tab:orange"),
              ("max forgetting", [analysis.summary_figure(s, "max_forgetting") for s in summaries], "tab:red")]
    return _bar_chart(ax, [name for name, _ in named], series, "%+.2f", "bits/byte",
                      "transfer and forgetting per run (BWT, FWT > 0 better; forgetting > 0 worse)",
                      rotation=15, ha="right")


def compare_matrices(runs, key: str = "bpb_matrix", fig=None):
    """The stage x domain matrices of several runs side by side on one colour scale."""
    named = _named(runs)
    values = np.concatenate([np.ravel(np.asarray(res[key], float)) for _, res in named])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    n_domains = max(len(res["domains"]) for _, res in named)
    n_stages = max(len(res["stages"]) for _, res in named)
    if fig is None:
        fig = plt.figure(figsize=((1.2 * n_domains + 1.2) * len(named) + 2.5, 0.5 * n_stages + 2.4),
                         layout="constrained")
    axes = fig.subplots(1, len(named), squeeze=False)[0]
    for ax, (name, res) in zip(axes, named):
        matrix_heatmap(res, key, ax=ax, title=name, vmin=lo, vmax=hi, colorbar=False)
        if ax is not axes[0] and res["stages"] == named[0][1]["stages"]:
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
    fig.colorbar(axes[0].images[0], ax=list(axes), label=_unit(key))
    fig.suptitle(f"test loss ({_unit(key)}); outlined: just after learning the domain")
    return fig


# ---------------------------------------------------------------------------------------------
# Learning curves


def _mark_stream(ax, run, boundaries) -> None:
    """Experience boundaries (grey dashes, domain names on top) and growth events (red dotted lines)."""
    if boundaries:
        starts = [0, *boundaries[:-1]]
        names = ["joint"] if run.is_joint else run.domains
        for start, end, name in zip(starts, boundaries, names):
            if start > 0:
                ax.axvline(start, color="grey", linestyle="--", linewidth=0.9)
            ax.text((start + end) / 2, 1.01, name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="dimgrey")
    for i, (step, added) in enumerate(run.growth_steps().items()):
        ax.axvline(step, color=GROWTH_COLOR, linestyle=":", linewidth=1.2,
                   label="growth" if i == 0 else None)
        ax.text(step, 0.98, f" +{added}", transform=ax.get_xaxis_transform(), color=GROWTH_COLOR,
                fontsize=7, va="top")


def learning_curves(run, ax=None):
    """Every domain's test loss (nats/token) across the stream against the optimizer step.

    Lines: the fixed probe blocks, every `eval.curve_every` steps. Dots: the full test split at
    each stage. Grey dashes separate experiences (domain names on top); red dotted lines mark
    growth. Without curves (eval.curve_every = 0) the stage evaluations are joined by lines; when
    the steps per experience are unknown, stages are placed by index (or left out beside curves).
    """
    ax = _new_axes(ax, 9, 4.2)
    colors = _domain_colors(run.domains)
    curves = run.curves()
    stage_x = run.stage_steps()
    boundaries = stage_x[1:] if stage_x else None
    if stage_x is None and not curves:  # no steps to place stages at, nor curves in steps beside them
        stage_x = list(range(len(run.stages)))
    matrix = np.asarray(run.results["loss_matrix"], float)
    for j, domain in enumerate(run.domains):
        if domain in curves:
            ax.plot(*curves[domain], color=colors[domain], linewidth=1.3, label=domain)
        if stage_x is not None:
            ax.plot(stage_x, matrix[:, j], "o" if domain in curves else "o-", color=colors[domain],
                    markersize=4, label=None if domain in curves else domain)
    if curves or boundaries:
        _mark_stream(ax, run, boundaries)
        ax.set_xlabel("optimizer step")
    else:
        ax.set_xticks(stage_x, run.stages, rotation=20, ha="right")
        ax.set_xlabel("stage (steps per experience unknown)")
    if not curves:
        how = "stage evaluations only: run with eval.curve_every > 0 for curves"
    elif stage_x is None:
        how = "probe blocks; steps per experience unknown, so no stage evaluations"
    else:
        how = "lines: probe blocks; dots: full test split at each stage"
    ax.set_title(f"{run.name}: test loss across the stream ({how})", fontsize=10, pad=16)
    ax.set_ylabel("test loss (nats/token)")
    ax.legend(fontsize=8, ncol=2)
    return ax


# ---------------------------------------------------------------------------------------------
# Experts: usage, overlap, traffic by generation, routing drift, sub-key geometry


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
