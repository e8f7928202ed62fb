"""The run directory's `results.json`: assembling it, writing it safely, printing it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lifelong.metrics import summarize

RESULTS_FILE = "results.json"
RUN_INFO_FILE = "run_info.json"


def assemble(domains: list[str], stages: list[str], loss_matrix: list[list[float]],
             bpb_matrix: list[list[float]], num_experts: list[int], **extra: Any) -> dict:
    """results.json content: the matrices plus every section-7 figure recomputed from them.

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


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / RESULTS_FILE).read_text())


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
