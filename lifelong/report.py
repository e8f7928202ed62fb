"""`lifelong report RUN_DIR...`: one table comparing finished runs, as text, Markdown or CSV,
and their bits-per-byte matrices side by side as a PNG.

Every figure is in bits per byte (comparable across tokenizers), taken from results.json's
`bpb_summary`; for a multi-seed run directory the table shows mean +- standard deviation over
seeds (its `over_seeds`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from lifelong.analysis import max_forgetting
from lifelong.runs import RunRecord, load_run

# (key, header, kind): kind picks the formatting of the value.
COLUMNS = (
    ("name", "run", "text"),
    ("strategy", "strategy", "text"),
    ("ffn", "ffn", "text"),
    ("growth", "growth", "text"),
    ("final_bpb", "final bpb", "bpb"),
    ("bwt_bpb", "BWT bpb", "signed"),
    ("fwt_bpb", "FWT bpb", "signed"),
    ("max_forgetting_bpb", "max forgetting bpb", "signed"),
    ("experts", "experts", "int"),
    ("flops_per_token", "FLOPs/token", "int"),
    ("wall_time_s", "wall time s", "seconds"),
)
# Figures that a multi-seed run reports with a standard deviation: row key -> over_seeds key.
SEED_FIGURES = {"final_bpb": "bpb_final_average", "bwt_bpb": "bpb_bwt", "fwt_bpb": "bpb_fwt"}


def _as_run(run: RunRecord | str | Path) -> RunRecord:
    return run if isinstance(run, RunRecord) else load_run(run)


def _growth(run: RunRecord) -> str:
    growth = run.config.get("growth", {})
    schedule = growth.get("schedule", "none")
    if schedule == "none" and not run.growth_events():
        return "-"
    return f"{schedule} x{len(run.growth_steps())}"


def row(run: RunRecord | str | Path) -> dict:
    """One table row: the run's identity and its summary figures (None where undefined)."""
    run = _as_run(run)
    res = run.results
    bpb = res["bpb_summary"]
    experts = res.get("num_experts") or [None]
    out = {
        "name": run.name,
        "strategy": run.strategy,
        "ffn": run.ffn,
        "growth": _growth(run),
        "final_bpb": bpb.get("final_average"),
        "bwt_bpb": bpb.get("bwt"),
        "fwt_bpb": bpb.get("fwt"),
        "max_forgetting_bpb": max_forgetting(bpb),
        "experts": experts[-1],
        "flops_per_token": res.get("flops_per_token"),
        "wall_time_s": run.run_info.get("wall_time_s", res.get("wall_time_s")),
        "path": str(run.path) if run.path else "",
    }
    over = res.get("over_seeds") or {}
    for key, seed_key in SEED_FIGURES.items():
        if seed_key in over:
            out[f"{key}_std"] = over[seed_key]["std"]
    if res.get("seeds"):
        out["name"] += f" ({len(res['seeds'])} seeds)"
    return out


def report(run_dirs: Sequence[RunRecord | str | Path]) -> list[dict]:
    """One row per run (see `row`), in the order given."""
    return [row(r) for r in run_dirs]


def _cell(r: dict, key: str, kind: str) -> str:
    value = r.get(key)
    if value is None:
        return "-"
    if kind == "text":
        return str(value)
    if kind == "int":
        return f"{int(value):,}"
    if kind == "seconds":
        return f"{value:.1f}"
    text = f"{value:+.3f}" if kind == "signed" else f"{value:.3f}"
    std = r.get(f"{key}_std")
    return text if std is None else f"{text} ±{std:.3f}"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [h for _, h, _ in COLUMNS], [[_cell(r, k, kind) for k, _, kind in COLUMNS] for r in rows]


def _content_hashes(run: RunRecord) -> list:
    return [d.get("content_hash") for d in run.results.get("domain_info") or []]


def comparability_notes(runs: Sequence[RunRecord]) -> list[str]:
    """Warnings when runs were not measured on the same domains and text (content hashes)."""
    notes = []
    first = runs[0]
    for other in runs[1:]:
        if other.domains != first.domains:
            notes.append(f"note: {other.name} has domains {other.domains}, {first.name} has {first.domains}")
            continue
        if _content_hashes(other) != _content_hashes(first):
            notes.append(f"note: {other.name} and {first.name} were measured on different text "
                         "(domain_info content hashes differ): compare with care")
    return notes


def format_text(rows: list[dict]) -> str:
    """An aligned plain-text table (text columns left-aligned, numbers right-aligned)."""
    headers, cells = _table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    kinds = [kind for _, _, kind in COLUMNS]

    def line(values):
        return "  ".join(v.ljust(w) if k == "text" else v.rjust(w)
                         for v, w, k in zip(values, widths, kinds)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def format_markdown(rows: list[dict]) -> str:
    """A GitHub-flavoured Markdown table."""
    headers, cells = _table(rows)
    align = ["---" if kind == "text" else "---:" for _, _, kind in COLUMNS]
    return "\n".join("| " + " | ".join(values) + " |" for values in (headers, align, *cells))


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The rows as CSV with full-precision numbers (empty cell = undefined), path last."""
    keys = [k for k, _, _ in COLUMNS]
    keys += sorted({k for r in rows for k in r if k.endswith("_std")}) + ["path"]
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    return path


def save_comparison_png(runs: Sequence[RunRecord | str | Path], path: str | Path) -> Path:
    """The runs' bits-per-byte matrices side by side on one colour scale, saved as PNG."""
    from lifelong import plots

    fig = plots.compare_matrices([_as_run(r) for r in runs], "bpb_matrix")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plots.plt.close(fig)
    return Path(path)


def main_report(run_dirs: Sequence[str | Path], markdown: bool = False, csv_path: str | Path | None = None,
                png_path: str | Path | None = None) -> str:
    """What `lifelong report` prints: the comparison table (Markdown if asked), notes on runs that
    are not comparable, and the files written. ValueError names a path that is not a run directory."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = [load_run(p) for p in run_dirs]
    rows = report(runs)
    lines = [format_markdown(rows) if markdown else format_text(rows), *comparability_notes(runs)]
    if csv_path is not None:
        lines.append(f"wrote {write_csv(rows, csv_path)}")
    if png_path is not None:
        lines.append(f"wrote {save_comparison_png(runs, png_path)}")
    return "\n".join(lines)
