"""`lifelong report RUN_DIR...`: one table comparing finished runs, as text, Markdown or CSV, the
paired differences of every run against the first with bootstrap intervals, and the runs'
bits-per-byte matrices side by side as a PNG.

Every figure is in bits per byte (comparable across tokenizers), taken from results.json's
`bpb_summary` with its interval (over test blocks for one run, over seeds for a multi-seed run
directory). The paired differences resample the same test blocks for both runs (and their seeds),
so they need runs measured on the same test blocks.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from lifelong.analysis import summary_figure
from lifelong.rundir import RESULTS_FILE, RUN_INFO_FILE
from lifelong.results_shape import is_number, json_kind, shape_error
from lifelong.runs import RunRecord, load_run
from lifelong.transfer import paired_differences

# (key, header, kind): kind picks the formatting of the value.
COLUMNS = (
    ("name", "run", "text"),
    ("strategy", "strategy", "text"),
    ("ffn", "ffn", "text"),
    ("growth", "growth", "text"),
    ("final_bpb", "final bpb", "bpb"),
    ("max_forgetting_bpb", "max forgetting bpb", "signed"),
    ("bwt_bpb", "BWT bpb", "signed"),
    ("fwt_bpb", "FWT bpb", "signed"),
    ("plasticity_bpb", "plasticity bpb", "bpb"),
    ("max_intrusion", "intrusion", "share"),
    ("min_own", "own", "share"),
    ("experts", "experts", "int"),
    ("flops_per_token", "FLOPs/token", "int"),
    ("wall_time_s", "wall time s", "seconds"),
)
# row key -> the figure of a summary it shows (the same figures are compared pairwise)
FIGURES = {"final_bpb": "final_average", "max_forgetting_bpb": "max_forgetting", "bwt_bpb": "bwt",
           "fwt_bpb": "fwt_gem", "plasticity_bpb": "plasticity"}


def _as_run(run: RunRecord | str | Path) -> RunRecord:
    return run if isinstance(run, RunRecord) else load_run(run)


def _pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(is_number, value))


def check_figures(run: RunRecord) -> None:
    """ValueError naming the run's results.json when a figure the table shows is not a number or
    null, or an interval not [low, high] (load_run has checked the rest of its shape)."""
    where, res = run.path / RESULTS_FILE if run.path else run.name, run.results
    bpb = res.get("bpb_summary")
    if not isinstance(bpb, dict):
        raise shape_error(where, "no bpb_summary" if bpb is None else f"bpb_summary: expected an object, got "
                          f"{json_kind(bpb)}")
    forgetting = bpb.get("forgetting") or {}
    if not (isinstance(forgetting, dict) and all(map(is_number, forgetting.values()))):
        raise shape_error(where, "bpb_summary.forgetting: expected a number per domain")
    figures = {f"bpb_summary.{f}": summary_figure(bpb, f) for f in FIGURES.values()}
    figures.update({key: res.get(key) for key in ("max_intrusion", "min_own", "flops_per_token", "wall_time_s")},
                   num_experts=(res.get("num_experts") or [None])[-1])
    for key, value in figures.items():
        if value is not None and not is_number(value):
            raise shape_error(where, f"{key}: expected a number, got {json_kind(value)}")
    wall = run.run_info.get("wall_time_s")
    if wall is not None and not is_number(wall):
        raise ValueError(f"{run.path / RUN_INFO_FILE if run.path else run.name} is not a lifelong run info file "
                         f"(wall_time_s: expected a number, got {json_kind(wall)})")
    for key, intervals, names in (("bpb_summary.intervals", bpb.get("intervals"), FIGURES.values()),
                                  ("intervals", res.get("intervals"), ("max_intrusion", "min_own"))):
        if intervals and not isinstance(intervals, dict):
            raise shape_error(where, f"{key}: expected an object, got {json_kind(intervals)}")
        for name in names:
            if (intervals or {}).get(name) and not _pair(intervals[name]):
                raise shape_error(where, f"{key}.{name}: expected [low, high]")


def _growth(run: RunRecord) -> str:
    """"SCHEDULE xN", N the growths (optimizer steps with one) of the run, or the range over its seeds."""
    growth = run.config.get("growth", {})
    schedule = growth.get("schedule", "none")
    counts = sorted({len(r.growth_steps()) for r in (run.seed_runs() if run.results.get("seeds") else [run])})
    if schedule == "none" and counts == [0]:
        return "-"
    return f"{schedule} x{counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "")


def row(run: RunRecord | str | Path) -> dict:
    """One table row: the run's identity and its summary figures (None where undefined), each with
    its interval under `<key>_interval` when the run recorded one."""
    run = _as_run(run)
    check_figures(run)
    res = run.results
    bpb = res["bpb_summary"]
    intervals = bpb.get("intervals") or {}
    experts = res.get("num_experts") or [None]
    out = {"name": run.name, "strategy": run.strategy, "ffn": run.ffn, "growth": _growth(run)}
    for key, figure in FIGURES.items():
        out[key] = summary_figure(bpb, figure)
        out[f"{key}_interval"] = intervals.get(figure)
    for key in ("max_intrusion", "min_own"):  # isolation of grown experts (README "Growing the expert pool")
        out[key], out[f"{key}_interval"] = res.get(key), (res.get("intervals") or {}).get(key)
    out.update(experts=experts[-1], flops_per_token=res.get("flops_per_token"),
               wall_time_s=run.run_info.get("wall_time_s", res.get("wall_time_s")),
               path=str(run.path) if run.path else "")
    if res.get("seeds"):
        out["name"] += f" ({len(res['seeds'])} seeds)"
    return out


def report(run_dirs: Sequence[RunRecord | str | Path]) -> list[dict]:
    """One row per run (see `row`), in the order given."""
    return [row(r) for r in run_dirs]


def _number(value: float, kind: str) -> str:
    if kind == "share":
        return f"{100 * value:.1f}%"
    return f"{value:+.3f}" if kind == "signed" else f"{value:.3f}"


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
    interval = r.get(f"{key}_interval")
    text = _number(value, kind)
    return text if not interval else f"{text} [{_number(interval[0], kind)}, {_number(interval[1], kind)}]"


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


# ---- paired differences against the first run ------------------------------------------------

def _seed_blocks(run: RunRecord) -> list | None:
    blocks = [r.block_losses() for r in run.seed_runs()]
    return None if any(b is None for b in blocks) else blocks


def paired(runs: Sequence[RunRecord], samples: int = 1000, level: float = 0.95) -> tuple[list[dict], list[str]]:
    """(one row per run after the first: {"name", "d_<key>": (difference, lo, hi)}, notes). ValueError
    when a run was measured on other test blocks than the first (a paired comparison needs the same)."""
    first = runs[0]
    rows, notes = [], []
    base = _seed_blocks(first)
    for other in runs[1:]:
        hashes = (first.test_hashes(), other.test_hashes())
        if other.domains != first.domains or (None not in hashes[0] + hashes[1] and hashes[0] != hashes[1]):
            raise ValueError(f"{other.name} and {first.name} were not evaluated on the same test blocks: a paired "
                             "comparison needs the same ones (lifelong report --no-paired shows the table alone)")
        if other.stages != first.stages:
            notes.append(f"note: no paired differences for {other.name}: its stages differ from {first.name}'s "
                         "(joint training has no per-domain stages)")
            continue
        blocks = _seed_blocks(other)
        if base is None or blocks is None or None in hashes[0] + hashes[1]:
            notes.append(f"note: no paired differences for {other.name}: its runs or {first.name}'s do not hold "
                         "per-block test losses (runs from an earlier version)")
            continue
        diffs = paired_differences(base, blocks, first.bytes_per_token(), samples, level)
        rows.append({"name": other.name, **{f"d_{key}": diffs.get(figure) for key, figure in FIGURES.items()}})
    return rows, notes


def _paired_cell(d: tuple | None, kind: str) -> str:
    if d is None:
        return "-"
    value, lo, hi = d
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def _paired_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = [(k, h, kind) for k, h, kind in COLUMNS if k in FIGURES]
    headers = ["run"] + [f"Δ {h}" for _, h, _ in keys]
    return headers, [[r["name"]] + [_paired_cell(r.get(f"d_{k}"), kind) for k, _, kind in keys] for r in rows]


def _text(headers: list[str], cells: list[list[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _markdown(headers: list[str], cells: list[list[str]], left: int = 1) -> str:
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(values) + " |" for values in (headers, align, *cells))


def format_text(rows: list[dict]) -> str:
    """An aligned plain-text table (text columns left-aligned, numbers right-aligned)."""
    return _text(*_table(rows), left=sum(kind == "text" for _, _, kind in COLUMNS))


def format_markdown(rows: list[dict]) -> str:
    """A GitHub-flavoured Markdown table."""
    return _markdown(*_table(rows), left=sum(kind == "text" for _, _, kind in COLUMNS))


def format_paired(rows: list[dict], first: str, markdown: bool = False, samples: int = 1000,
                  level: float = 0.95) -> str:
    """The paired differences against `first`, with what the intervals resample."""
    title = (f"paired differences against {first} (other - first), {level:.0%} bootstrap intervals over "
             f"{samples} resamplings of the same test blocks (and seeds); * = the interval excludes 0")
    return title + "\n" + (_markdown if markdown else _text)(*_paired_table(rows))


def write_csv(rows: list[dict], path: str | Path, paired_rows: Sequence[dict] = ()) -> Path:
    """The rows as CSV with full-precision numbers (empty cell = undefined): every figure with its
    interval (`_lo`, `_hi`) and, for runs after the first, its paired difference (`d_`, `d_..._lo`,
    `d_..._hi`); path last."""
    keys = [k for k, _, _ in COLUMNS]
    for key in (*FIGURES, "max_intrusion", "min_own"):
        keys.insert(keys.index(key) + 1, f"{key}_lo")
        keys.insert(keys.index(key) + 2, f"{key}_hi")
    keys += [f"d_{key}{part}" for key in FIGURES for part in ("", "_lo", "_hi")] + ["path"]
    by_name = {r["name"]: r for r in paired_rows}
    path = Path(path)
    try:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                flat = dict(r)
                for key in (*FIGURES, "max_intrusion", "min_own"):
                    flat[f"{key}_lo"], flat[f"{key}_hi"] = r.get(f"{key}_interval") or (None, None)
                for key in FIGURES:
                    d = by_name.get(r["name"], {}).get(f"d_{key}") or (None, None, None)
                    flat[f"d_{key}"], flat[f"d_{key}_lo"], flat[f"d_{key}_hi"] = d
                writer.writerow({k: "" if flat.get(k) is None else flat.get(k) for k in keys})
    except OSError as err:
        raise _cannot_write(path, err) from None
    return path


def save_comparison_png(runs: Sequence[RunRecord | str | Path], path: str | Path) -> Path:
    """The runs' bits-per-byte matrices side by side on one colour scale, saved as PNG."""
    from lifelong import plots

    fig = plots.compare_matrices([_as_run(r) for r in runs], "bpb_matrix")
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as err:
        raise _cannot_write(path, err) from None
    finally:
        plots.plt.close(fig)
    return Path(path)


def save_frontier_png(runs: Sequence[RunRecord | str | Path], path: str | Path) -> Path:
    """The runs on the forgetting-plasticity plane (`plots.frontier`), saved as PNG."""
    from lifelong import plots

    ax = plots.frontier([_as_run(r) for r in runs])
    try:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as err:
        raise _cannot_write(path, err) from None
    finally:
        plots.plt.close(ax.figure)
    return Path(path)


def _cannot_write(path: str | Path, err: OSError) -> ValueError:
    return ValueError(f"cannot write {path}: {err.strerror or err}")


def check_output(path: str | Path) -> None:
    """ValueError naming `path` when a file cannot be written there: its folder is missing, is not
    a folder or is not writable, or `path` is a folder."""
    folder = Path(path).parent
    if Path(path).is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: " + (f"{folder} is not a folder" if folder.exists()
                                                      else f"the folder {folder} does not exist"))
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: the folder {folder} is not writable")


def main_report(run_dirs: Sequence[str | Path], markdown: bool = False, csv_path: str | Path | None = None,
                png_path: str | Path | None = None, pair: bool = True, samples: int = 1000,
                frontier_path: str | Path | None = None) -> str:
    """What `lifelong report` prints: the comparison table (Markdown if asked), the paired
    differences against the first run (unless `pair` is false), notes on runs that are not
    comparable, and the files written. ValueError names a path that is not a run directory, a
    damaged results.json, an output file that cannot be written, or runs that cannot be paired."""
    if not run_dirs:
        raise ValueError("no run directory given")
    for path in (csv_path, png_path, frontier_path):  # before the bootstrap, which can take a while
        if path is not None:
            check_output(path)
            inside = [d for d in run_dirs if Path(path).resolve().is_relative_to(Path(d).resolve())]
            if inside:  # a run's own files (results.json, a checkpoint) must never be overwritten
                raise ValueError(f"cannot write {path}: it is inside the run directory {inside[0]} being reported")
    runs = [load_run(p) for p in run_dirs]
    rows = report(runs)
    paired_rows, notes = paired(runs, samples) if pair and len(runs) > 1 else ([], [])
    lines = [format_markdown(rows) if markdown else format_text(rows)]
    if paired_rows:
        lines += ["", format_paired(paired_rows, runs[0].name, markdown, samples)]
    lines += notes + comparability_notes(runs)
    if csv_path is not None:
        lines.append(f"wrote {write_csv(rows, csv_path, paired_rows)}")
    if png_path is not None:
        lines.append(f"wrote {save_comparison_png(runs, png_path)}")
    if frontier_path is not None:
        lines.append(f"wrote {save_frontier_png(runs, frontier_path)}")
    return "\n".join(lines)
