#!/usr/bin/env python3
"""Check that a run's results.json is self-consistent, recomputing every summary from
its loss matrix with the formulas of the README's "Metric definitions" (independently of lifelong/).

    python examples/check_results.py runs/three-folders/results.json

Exit status 0 when everything matches, 1 otherwise (each mismatch is printed).
"""

from __future__ import annotations

import json
import math
import sys


def check(res: dict) -> list[str]:
    problems: list[str] = []

    def same(what: str, got: float, want: float) -> None:
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            problems.append(f"{what}: results.json has {got!r}, recomputed {want!r}")

    domains, L = res["domains"], res["loss_matrix"]
    T = len(domains)
    if res["stages"] != ["init"] + [f"after:{d}" for d in domains]:
        problems.append(f"stages {res['stages']} do not follow domains {domains}")
    if len(L) != T + 1 or any(len(row) != T for row in L):
        problems.append(f"loss_matrix is not {T + 1} x {T}")
        return problems
    if not all(math.isfinite(v) and v > 0 for row in L for v in row):
        problems.append("loss_matrix has a non-finite or non-positive entry")
    # L[s][j]: stage s (0 = init, i = after domain i, 1-based), domain j (0-based column).
    for j in range(T - 1):  # every domain but the last; it was learned at stage j + 1
        want = L[T][j] - min(L[s][j] for s in range(j + 1, T))
        same(f"forgetting[{domains[j]}]", res["forgetting"][domains[j]], want)
    if T > 1:
        same("bwt", res["bwt"], sum(L[j + 1][j] - L[T][j] for j in range(T - 1)) / (T - 1))
        fwt = res["fwt_gem"] if "fwt_gem" in res else res["fwt"]  # "fwt" in runs of earlier versions
        same("fwt_gem", fwt, sum(L[0][j] - L[j][j] for j in range(1, T)) / (T - 1))
    for key, matrix in (("loss_interval", L), ("bpb_interval", res["bpb_matrix"])):
        for s, (row, intervals) in enumerate(zip(matrix, res.get(key) or [])):
            for j, (value, (lo, hi)) in enumerate(zip(row, intervals)):
                if not lo <= value <= hi:
                    problems.append(f"{key}[{s}][{j}] = [{lo}, {hi}] does not contain {value}")
    bytes_per_token = [info["bytes_per_token"] for info in res["domain_info"]]
    for s, (row, bpb_row) in enumerate(zip(L, res["bpb_matrix"])):
        for j, (loss, bpb) in enumerate(zip(row, bpb_row)):
            same(f"bpb[{s}][{j}]", bpb, loss / (math.log(2) * bytes_per_token[j]))
    if len(res["num_experts"]) != T + 1:
        problems.append(f"num_experts has {len(res['num_experts'])} entries for {T + 1} stages")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        res = json.load(f)
    problems = check(res)
    for p in problems:
        print(f"MISMATCH {p}")
    T = len(res["domains"])
    if not problems:
        print(f"ok: {T + 1} x {T} loss and bpb matrices; forgetting, BWT, FWT and bits per byte recomputed "
              f"from the loss matrix match results.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
