"""Optimizer step time on PEER's two expert tables: dense torch AdamW vs experts.optim.RowAdamW.

    python benchmarks/optimizer_step.py                          # CPU: N = 128^2, 256^2, dim 256
    python benchmarks/optimizer_step.py --device cuda            # N = 128^2 .. 1024^2
    python benchmarks/optimizer_step.py --device cuda --sizes 1048576 --dim 512 --json opt.json

One step updates two tables [N, dim] (``expert_u``, ``expert_v``) whose gradients have a given
fraction of nonzero rows: the fraction one batch of ``--tokens`` tokens x ``--heads`` x ``--top-k``
uniformly drawn expert ids touches ("routing", unique ids), plus the fixed ``--fractions``.
Methods, each with its own optimizer state over the same parameters:

  adamw          torch.optim.AdamW(foreach=False): the CPU default of train.optimizer_impl (lifelong/training.py)
  adamw_foreach  torch.optim.AdamW(foreach=True)
  adamw_fused    torch.optim.AdamW(fused=True), where this torch supports it on the device
  row_gather     RowAdamW, dense gradient, touched rows found in it, gathered and updated
                 (dense_fallback=1: never the masked pass)
  row_masked     RowAdamW, dense gradient, one masked pass over the tables (dense_fallback=0)
  row_auto       RowAdamW with the default dense_fallback=0.5 (gather below half the rows)
  row_ids        RowAdamW fed a sparse COO gradient: the touched ids come with the gradient
                 (what a layer recording its ids, or nn.Embedding(sparse=True), would give)
  detect         not a method: the cost of finding the touched rows in a dense gradient alone

Timing: every step is timed alone (CUDA: synchronised before and after, so host work and the
row selection's device sync count) and the methods are interleaved, in a rotating order, for
``--reps`` rounds after ``--warmup`` rounds; the table shows medians in milliseconds for both
tables together. The gradients are set, not computed: backward's own cost (e.g. the dense
gradient's zero fill by the embedding backward) is not included; see benchmarks/train_step.py.
Medians resist, but do not remove, noise from other processes on a shared machine: the load
average is printed before and after. Nothing here is asserted; tests never time anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import load_average, machine, write_json  # noqa: E402
from experts.optim import RowAdamW, touched_rows  # noqa: E402

METHODS = ("adamw", "adamw_foreach", "adamw_fused", "row_gather", "row_masked", "row_auto", "row_ids", "detect")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def routing_ids(n: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """The unique ids among ``draws`` uniform expert ids: the rows one batch touches."""
    return torch.randint(n, (draws,), generator=generator).unique()


def make_optimizer(method: str, params: list[nn.Parameter], weight_decay: float, device: torch.device):
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": weight_decay}
    if method == "adamw":
        return torch.optim.AdamW(params, foreach=False, **kw)
    if method == "adamw_foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if method == "adamw_fused":
        opt = torch.optim.AdamW(params, fused=True, **kw)
        for p in params:  # probe: this torch may lack the fused kernel on this device
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.state.clear()
        return opt
    fallback = {"row_gather": 1.0, "row_masked": 0.0, "row_auto": 0.5, "row_ids": 0.5}[method]
    return RowAdamW(params, rowwise=True, dense_fallback=fallback, **kw)


def bench_size(n: int, dim: int, fractions: list[float], draws: int, reps: int, warmup: int, weight_decay: float,
               device: torch.device, methods: list[str], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(n, dim, generator=g).mul_(0.02).to(device)) for _ in range(2)]
    optimizers = {}
    for method in methods:
        if method == "detect":
            continue
        try:
            optimizers[method] = make_optimizer(method, params, weight_decay, device)
        except (RuntimeError, ValueError) as err:  # e.g. no fused AdamW for this device
            print(f"  {method}: unavailable ({str(err).splitlines()[0][:80]})")
    active = [m for m in methods if m in optimizers or m == "detect"]
    cases = [("routing", routing_ids(n, draws, g))]
    cases += [(f"{f:g}", torch.randperm(n, generator=g)[:max(1, round(f * n))].sort().values) for f in fractions]
    rows = []
    for label, ids in cases:
        dense = []
        sparse = []
        for _ in params:
            values = torch.randn(ids.numel(), dim, generator=g).to(device)
            ids_d = ids.to(device)
            grad = torch.zeros(n, dim, device=device).index_copy_(0, ids_d, values)
            dense.append(grad)
            coo = torch.sparse_coo_tensor(ids_d.unsqueeze(0), values, (n, dim), check_invariants=False)
            sparse.append(coo.coalesce())
        times = {m: [] for m in active}
        for rnd in range(warmup + reps):
            order = active[rnd % len(active):] + active[:rnd % len(active)]  # rotate: no method always first
            for method in order:
                grads = sparse if method == "row_ids" else dense
                if method != "detect":
                    for p, grad in zip(params, grads):
                        p.grad = grad
                sync(device)
                start = time.perf_counter()
                if method == "detect":
                    for grad in dense:
                        touched_rows(grad).nonzero()
                else:
                    optimizers[method].step()
                sync(device)
                if rnd >= warmup:
                    times[method].append((time.perf_counter() - start) * 1e3)
        row = {"N": n, "dim": dim, "case": label, "touched_fraction": ids.numel() / n,
               "ms": {m: statistics.median(t) for m, t in times.items()}}
        rows.append(row)
        print(format_row(row, active), flush=True)
    for p in params:
        p.grad = None
    return rows


def header(methods: list[str]) -> str:
    return f"{'N':>9} {'dim':>4} {'case':>8} {'touched':>8} " + " ".join(f"{m:>13}" for m in methods) + \
        f" {'auto/best AdamW':>16}"


def format_row(row: dict, methods: list[str]) -> str:
    ms = row["ms"]
    best = min((ms[m] for m in ("adamw", "adamw_foreach", "adamw_fused") if m in ms), default=float("nan"))
    ratio = ms.get("row_auto", float("nan")) / best
    cells = " ".join(f"{ms[m]:13.3f}" if m in ms else f"{'-':>13}" for m in methods)
    return f"{row['N']:>9} {row['dim']:>4} {row['case']:>8} {row['touched_fraction']:8.3f} {cells} {ratio:16.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated N (default: 128^2,256^2 on cpu; 128^2,256^2,512^2,1024^2 on cuda)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fractions", default="0.01,0.05,0.2,0.5,1",
                        help="touched-row fractions besides the routing case")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch for the routing case")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="on the tables (0.1 exercises the deferred decay; the project's expert group uses 0)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    default_sizes = [128 ** 2, 256 ** 2] + ([512 ** 2, 1024 ** 2] if device.type == "cuda" else [])
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or any(not 0 < f <= 1 for f in fractions) or args.reps < 1 or args.warmup < 0:
        parser.error(f"bad --methods {bad} (choose from {', '.join(METHODS)}), --fractions in (0, 1], "
                     f"--reps >= 1 or --warmup >= 0")
    info = machine(device)
    print(f"# {info}")
    print(f"# two tables [N, {args.dim}] float32, weight_decay={args.weight_decay}; routing case = unique ids of "
          f"{args.tokens} tokens x {args.heads} heads x top-{args.top_k}; median ms of {args.reps} interleaved "
          f"steps after {args.warmup} warm-up rounds")
    print(header(methods))
    results = []
    for n in sizes:
        results += bench_size(n, args.dim, fractions, args.tokens * args.heads * args.top_k, args.reps, args.warmup,
                              args.weight_decay, device, methods, args.seed)
    info["load_average_1min_after"] = load_average()
    print(f"# load average (1 min) before {info['load_average_1min']}, after {info['load_average_1min_after']}")
    write_json(args.json, machine=info, args=vars(args), results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
