"""The content of a run's `results.json`: assembling it and printing it as a table."""

from __future__ import annotations

from typing import Any

from lifelong.transfer import summarize


def assemble(domains: list[str], stages: list[str], loss_matrix: list[list[float]],
             bpb_matrix: list[list[float]], num_experts: list[int], **extra: Any) -> dict:
    """results.json content: the matrices plus every figure of lifelong/transfer.py recomputed from them.

    Forgetting, BWT and FWT are computed from `loss_matrix` (nats/token), as the
    contract says; the same figures in bits per byte are under `bpb_summary`.
    """
    nats = summarize(loss_matrix, domains)
    results = {
        "domains": list(domains),
        "stages": list(stages),
        "loss_matrix": loss_matrix,
        "bpb_matrix": bpb_matrix,
        "forgetting": nats["forgetting"],
        "forgetting_first_last": nats["forgetting_first_last"],
        "bwt": nats["bwt"],
        "fwt": nats["fwt"],
        "final_average": nats["final_average"],
        "plasticity": nats["plasticity"],
        "bpb_summary": summarize(bpb_matrix, domains),
        "num_experts": list(num_experts),
    }
    results.update(extra)
    return results


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


def format_table(results: dict) -> str:
    """The loss matrix in bits per byte, forgetting per domain, and the summary figures."""
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
    lines.append(f"{'':14}{'bpb':>9}{'nats/token':>12}")
    for key, label in (("final_average", "final mean"), ("plasticity", "plasticity"),
                       ("bwt", "BWT"), ("fwt", "FWT")):
        lines.append(f"{label:14}{_fmt(bpb[key], 9, signed=key in ('bwt', 'fwt'))}"
                     f"{_fmt(results[key], 12, signed=key in ('bwt', 'fwt'))}")
    lines.append("forgetting > 0 and BWT < 0 mean the final model got worse on earlier domains; "
                 "FWT > 0 means earlier domains helped before a domain was seen.")
    return "\n".join(lines)
