"""The content of a run's `results.json`: assembling it and printing it as a table."""

from __future__ import annotations

from typing import Any

from lifelong.transfer import LN2, bootstrap_intervals, curve_transfer, summarize


def assemble(domains: list[str], stages: list[str], loss_matrix: list[list[float]],
             bpb_matrix: list[list[float]], num_experts: list[int], *, block_losses=None,
             bytes_per_token: list[float] | None = None, bootstrap_samples: int = 0, interval_level: float = 0.95,
             reference: list[float] | None = None, reference_blocks=None, stream_curves=None,
             reference_curves=None, **extra: Any) -> dict:
    """results.json content: the matrices plus every figure of lifelong/transfer.py recomputed from
    them, in nats per token (from `loss_matrix`) and in bits per byte (`bpb_summary`).

    `block_losses` [stage][domain][block] (and `bytes_per_token`) add percentile-bootstrap intervals
    over the test blocks of every cell (`loss_interval`, `bpb_interval`) and figure (`intervals`,
    `bpb_summary["intervals"]`). `reference` (each domain's loss after training on it alone, with
    its per-block losses and learning curve) adds fwt_zero_shot and fwt_auc.
    """
    bpb_reference = bpb_curves = None
    if reference is not None:
        scale = [1.0 / (LN2 * b) for b in bytes_per_token]
        bpb_reference = [r * c for r, c in zip(reference, scale)]
        bpb_curves = ([None if v is None else v * c for v, c in zip(stream_curves, scale)],
                      [None if v is None else v * c for v, c in zip(reference_curves, scale)])
    nats = summarize(loss_matrix, domains, reference)
    bpb = summarize(bpb_matrix, domains, bpb_reference)
    nats["fwt_auc"] = curve_transfer(stream_curves, reference_curves) if reference is not None else None
    bpb["fwt_auc"] = curve_transfer(*bpb_curves) if bpb_curves is not None else None
    results = {
        "domains": list(domains),
        "stages": list(stages),
        "loss_matrix": loss_matrix,
        "bpb_matrix": bpb_matrix,
        **{key: nats[key] for key in FIGURE_KEYS},
        "bpb_summary": bpb,
        "num_experts": list(num_experts),
    }
    if block_losses is not None and bootstrap_samples:
        iv = bootstrap_intervals(block_losses, domains, bytes_per_token, bootstrap_samples, interval_level,
                                 reference_blocks=reference_blocks)
        results["loss_interval"] = _enclose_cells(iv["loss_interval"], loss_matrix)
        results["bpb_interval"] = _enclose_cells(iv["bpb_interval"], bpb_matrix)
        results["intervals"], bpb["intervals"] = _enclose(iv["nats"], nats), _enclose(iv["bpb"], bpb)
        results["interval_method"] = {"kind": "percentile bootstrap over each domain's test blocks",
                                      "samples": bootstrap_samples, "level": interval_level}
    if reference is not None:
        results["reference"] = {"kind": "the same model trained on each domain alone", "loss": reference,
                                "bpb": bpb_reference, "curve_mean": reference_curves, "stream_curve_mean": stream_curves}
    results.update(extra)
    return results


def isolation(stats_per_stage: list[dict]) -> dict:
    """The headline isolation figures of grown experts, at the last stage, over every expert layer:
    `max_intrusion` (the largest share of an earlier domain's routing weight on experts added after
    it) and `min_own` (the smallest share of a domain's weight on the experts added for it); None
    without growth."""
    last = stats_per_stage[-1] if stats_per_stage else {}
    intrusion = [v for layer in last.values() for v in layer.get("intrusion") or [] if v is not None]
    own = [v for layer in last.values() for v in layer.get("own") or [] if v is not None]
    return {"max_intrusion": max(intrusion, default=None), "min_own": min(own, default=None)}


def _widen(interval: list[float], value: float) -> list[float]:
    # The cells are token-weighted float32 sums and the bootstrap averages float64 block means: the
    # same number up to rounding, which can leave a degenerate interval (one test block) beside it.
    return [min(interval[0], value), max(interval[1], value)]


def _enclose_cells(intervals: list, matrix: list) -> list:
    return [[_widen(iv, v) for iv, v in zip(iv_row, row)] for iv_row, row in zip(intervals, matrix)]


def _enclose(intervals: dict, summary: dict) -> dict:
    out = {}
    for key, iv in intervals.items():
        if key == "forgetting":
            out[key] = {d: _widen(i, summary[key][d]) for d, i in iv.items()}
        else:
            out[key] = None if iv is None or summary.get(key) is None else _widen(iv, summary[key])
    return out


# The figures of a summary, in the order results.json lists them.
FIGURE_KEYS = ("forgetting", "forgetting_first_last", "max_forgetting", "bwt", "fwt_gem", "fwt_zero_shot", "fwt_auc",
               "final_average", "plasticity")


def per_layer(stats_per_stage: list[dict]) -> dict:
    """Expert statistics [stage]{layer}{key: value} -> {layer}{key: [value per stage]} (`experts`)."""
    out: dict = {}
    for stats in stats_per_stage:
        for layer, values in stats.items():
            for key, value in values.items():
                out.setdefault(layer, {}).setdefault(key, []).append(value)
    return out


def _fmt(value: float | None, width: int = 8, signed: bool = False) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:+{width}.3f}" if signed else f"{value:{width}.3f}"


def _fmt_interval(interval, signed: bool) -> str:
    if not interval:
        return ""
    return "[" + ", ".join(f"{v:+.3f}" if signed else f"{v:.3f}" for v in interval) + "]"


# (key, label, signed) of the summary lines `format_table` prints
SUMMARY_LINES = (("final_average", "final mean", False), ("max_forgetting", "max forgetting", True),
                 ("plasticity", "plasticity", False), ("bwt", "BWT", True), ("fwt_gem", "FWT (GEM)", True),
                 ("fwt_zero_shot", "FWT zero-shot", True), ("fwt_auc", "FWT curve area", True))


def format_table(results: dict) -> str:
    """The loss matrix in bits per byte, forgetting per domain, and the summary figures with their
    intervals (over test blocks, or over seeds for a multi-seed run)."""
    domains, stages = results["domains"], results["stages"]
    width = max(8, *(len(d) for d in domains)) + 1
    stage_w = max(len(s) for s in stages) + 2
    lines = ["test loss, bits per byte (row = after stage, column = domain)",
             " " * stage_w + "".join(d.rjust(width) for d in domains) + "mean".rjust(width)]
    for stage, row in zip(stages, results["bpb_matrix"]):
        mean = sum(row) / len(row)
        lines.append(stage.ljust(stage_w) + "".join(_fmt(v, width) for v in row) + _fmt(mean, width))
    bpb = results["bpb_summary"]
    lines.append("forgetting".ljust(stage_w)
                 + "".join(_fmt(bpb["forgetting"].get(d), width, signed=True) for d in domains))
    lines.append("")
    intervals = bpb.get("intervals") or {}
    method = results.get("interval_method") or {}
    over = "seeds" if "seeds" in method.get("kind", "") else "test blocks"
    head = f"{method.get('level', 0.95):.0%} interval ({over})" if intervals else ""
    lines.append(f"{'':16}{'bpb':>9}  {head:<28}{'nats/token':>10}")
    for key, label, signed in SUMMARY_LINES:
        if key.startswith("fwt_") and key != "fwt_gem" and bpb.get(key) is None:
            continue  # measured against references only
        lines.append(f"{label:16}{_fmt(bpb.get(key), 9, signed)}  {_fmt_interval(intervals.get(key), signed):<28}"
                     f"{_fmt(results.get(key), 10, signed)}")
    lines.append("forgetting > 0 and BWT < 0 mean the final model got worse on earlier domains; FWT > 0 means "
                 "earlier domains helped before a domain was seen (zero-shot: as a fraction of what training "
                 "on the domain alone gains; curve area: along its own experience).")
    return "\n".join(lines)
