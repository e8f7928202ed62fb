"""Figures shared by the command line, `lifelong report` and the notebooks (matplotlib, Agg-safe).

Every figure function takes loaded data (a results.json dict, or a `lifelong.runs.RunRecord`
where it needs metrics or snapshots) and an optional matplotlib Axes (or Figure for multi-panel
figures), and returns the Axes / Figure it drew on. It only draws: the numbers come from
`lifelong.analysis` and `lifelong.transfer`, where they can be checked or printed on their own.
Figures of the experts themselves are in `lifelong.expert_plots`.
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


def _error_bar(value: float, interval) -> list | None:
    """matplotlib's asymmetric error of one point from its [low, high] interval (None: no bar; a
    percentile interval can miss its point estimate, so each side is at least 0)."""
    return None if not interval else [[max(0.0, value - interval[0])], [max(0.0, interval[1] - value)]]


def frontier(runs, ax=None):
    """Runs on the forgetting-plasticity plane: plasticity (x) against maximum forgetting (y), both in
    bits per byte with their intervals as error bars; the lower left corner learns and keeps best, so
    "less forgetting" cannot hide "learned nothing". Takes RunRecords (`analysis.frontier_points`)."""
    ax = _new_axes(ax, 6.4, 4.6)
    points = [p for p in analysis.frontier_points(runs) if p["plasticity"] is not None
              and p["max_forgetting"] is not None]
    if not points:
        return _message(ax, "no run with both plasticity and forgetting (joint training has no forgetting)")
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(points):
        x, y = p["plasticity"], p["max_forgetting"]
        ax.errorbar([x], [y], xerr=_error_bar(x, p["plasticity_interval"]),
                    yerr=_error_bar(y, p["max_forgetting_interval"]), fmt="o", color=cmap(i % 10), capsize=3,
                    label=f"{p['name']} ({p['seeds']} seed{'s' if p['seeds'] > 1 else ''})")
    ax.axhline(0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("plasticity: loss right after learning each domain (bits/byte, lower = learned better)")
    ax.set_ylabel("max forgetting (bits/byte, lower = kept better)")
    ax.set_title("forgetting against plasticity (bars: 95% intervals)")
    ax.legend(fontsize=8, loc="best")
    return ax


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
