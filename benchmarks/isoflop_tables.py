"""The tables and the figure of benchmarks/isoflop.py's sweep (no training here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lifelong.seeds import t_interval


def summarise(rows: list[dict], budgets: list[float], arms: list[str]) -> list[dict]:
    """Per budget and arm: mean bpb with a t interval, and the paired (same seed) difference to dense."""
    out = []
    for budget in budgets:
        by_arm = {a: sorted((r for r in rows if r["budget"] == budget and r["arm"] == a), key=lambda r: r["seed"])
                  for a in arms}
        for arm, rs in by_arm.items():
            bpb = [r["bpb"] for r in rs]
            row = {"budget": budget, "arm": arm, "width": rs[0]["width"], "seeds": [r["seed"] for r in rs],
                   "bpb": float(np.mean(bpb)), "interval": t_interval(bpb),
                   "train_flops": float(np.mean([r["train_flops"] for r in rs])),
                   "train_tokens": rs[0]["train_tokens"], "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
            if "dense" in by_arm and arm != "dense":
                diff = [r["bpb"] - d["bpb"] for r, d in zip(rs, by_arm["dense"])]
                row["vs_dense"] = float(np.mean(diff))
                row["vs_dense_interval"] = t_interval(diff)
                row["vs_dense_rel"] = float(np.mean(diff)) / float(np.mean([d["bpb"] for d in by_arm["dense"]]))
            out.append(row)
    return out


def _iv(iv, signed=False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return "-" if iv is None else f"[{f.format(iv[0])}, {f.format(iv[1])}]"


def markdown(table: list[dict], described: dict[str, str], strategy: str, seeds: list[int]) -> str:
    """The sweep's table; ``described``: each arm's settings in words."""
    lines = [f"Final mean bpb on the test split, {strategy} training over the builtin stream, seeds "
             f"{', '.join(map(str, seeds))} (mean, 95% t interval); vs dense: paired by seed.", "",
             "| training FLOPs | arm | width | train tokens | final mean bpb | vs dense | vs dense % | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        vs = f"{r['vs_dense']:+.3f} {_iv(r['vs_dense_interval'], True)}" if "vs_dense" in r else "-"
        rel = f"{100 * r['vs_dense_rel']:+.1f}%" if "vs_dense" in r else "-"
        lines.append(f"| {r['train_flops']:.2e} | {r['arm']} | {r['width']} | {r['train_tokens']:,} | "
                     f"{r['bpb']:.3f} {_iv(r['interval'])} | {vs} | {rel} | {r['wall_s']:.0f} |")
    lines += ["", "Settings (width x0.75: the model is 0.75 x the budget's base width, on more tokens):"]
    lines += [f"- {arm}: {text}" for arm, text in described.items()]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    """Left: each arm's final mean bpb against training FLOPs (t intervals over seeds, which hold the
    seeds' different test blocks too). Right: the paired difference to dense, the comparison itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in table)):
        rs = [r for r in table if r["arm"] == arm]
        x, style = [r["train_flops"] for r in rs], dict(marker="o", capsize=3, color=f"C{i}")
        left.errorbar(x, [r["bpb"] for r in rs], yerr=_errors(rs, "bpb", "interval"), label=arm, **style)
        if all("vs_dense" in r for r in rs):
            right.errorbar(x, [r["vs_dense"] for r in rs], yerr=_errors(rs, "vs_dense", "vs_dense_interval"),
                           label=f"{arm} - dense", **style)
    right.axhline(0.0, color="grey", linewidth=0.8)
    for ax, label in ((left, "final mean bits per byte (test)"), (right, "paired difference to dense, bpb")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(label)
        ax.legend()
    left.set_title("Dense vs MoE vs PEER at equal compute")
    right.set_title("Below zero: better than dense")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _errors(rows: list[dict], value: str, interval: str) -> np.ndarray:
    """[2, n] distances from each value to its interval's ends (0 where there is none)."""
    return np.array([[r[value] - r[interval][0], r[interval][1] - r[value]] if r.get(interval) else [0.0, 0.0]
                     for r in rows]).T
