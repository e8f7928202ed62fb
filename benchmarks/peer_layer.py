"""PEER layer speed and memory: ours (``kernel="auto"``) vs the plain torch reference vs a dense FFN.

    python benchmarks/peer_layer.py                          # CPU: a small sweep, float32
    python benchmarks/peer_layer.py --cpu-target             # the CPU target (128^2 experts); prints the speedup
    python benchmarks/peer_layer.py --device cuda            # GPU sizes up to 1024^2 experts, bfloat16
    python benchmarks/peer_layer.py --experts 128,1024 --tokens 2048 --threads 2 --json peer.json

Rows per configuration (experts = n^2 on an n x n grid, T tokens):

* ours        PEER with kernel="auto": the Triton kernels on CUDA, the fused embedding-bag path on
              the CPU (experts/kernels);
* reference   the same layer and weights with kernel="reference": einsum sub-key scores, torch.topk
              on each half and on the k*k candidates, two F.embedding gathers, einsum mixing;
* dense       DenseFFN(dim, 4*dim), the dense 4x FFN on the same tokens;
* retrieval   ours, retrieval alone: query projection + norm, sub-key scores, both top-k stages and
              the softmax (PEER.route);
* optional (``--rows``; on by default with --device cuda): "bag" (PEER with kernel="bag", the
  embedding-bag path that "auto" takes without triton), "triton" (kernel="triton") and
  "retrieval_ref" (retrieval alone on the reference path).

Modes: "fwd" is a forward under torch.no_grad(); "fwd+bwd" a forward with autograd and a backward
from a fixed random upstream gradient (input gradient included; parameter gradients are reset to
None, outside the timed region, before each repetition). Layers are in train mode (BatchNorm uses
batch statistics). Times are medians over ``--repeat`` repetitions after ``--warmup`` runs; within a
repetition the rows run one after the other in an order that rotates every repetition, so that
load from other processes hits all rows alike.

Peak memory: on CUDA torch.cuda.max_memory_allocated() minus the allocation before the call; on the
CPU (Linux) the peak resident set during one call minus the resident set before it, in a fresh
subprocess per row and mode, the peak reset through /proc/self/clear_refs (tracemalloc does not
see torch's allocations). CPU memory is measured with ``--memory`` and by default for --cpu-target;
otherwise, and where /proc is missing, it is "n/a". A call on 8 tokens runs first so that the
process's one-time allocations (autograd engine, thread pools) are not counted.

Bandwidth floor (the layer is memory-bound): the bytes that must move at least are
    fwd      2*T*M*D*b_w + 2*T*D*b_a                 (each slot reads one u and one v row; x in, y out)
    fwd+bwd  fwd + 2*T*M*D*b_w + 2*N*D*b_w + 3*T*D*b_a
                                                     (u, v rows again; dU and dV written once; dy in,
                                                      x again, dx out)
with M = heads*top_k slots per token, D = dim, N experts, b_w / b_a bytes per weight / activation
element (sub-key tables and queries are ignored: they are small). floor fraction = bytes /
bandwidth / measured time; bandwidth from --bandwidth (GB/s) or, on CUDA, a table of known devices
(H100 SXM 3350 GB/s, ...). Without one the fraction is "n/a".

Prints a table with the machine it ran on; ``--json PATH`` also writes every figure.
Nothing here is asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from experts import PEER, DenseFFN  # noqa: E402

ROWS = ("ours", "reference", "dense", "retrieval", "bag", "triton", "retrieval_ref")
DEFAULT_ROWS = {"cpu": ("ours", "reference", "dense", "retrieval"),
                "cuda": ("ours", "bag", "reference", "dense", "retrieval", "retrieval_ref")}
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# peak memory bandwidth of known devices, GB/s (vendor figures)
BANDWIDTH_GBS = {"H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555,
                 "A100 80GB PCIe": 1935, "A100-PCIE-40GB": 1555}


@dataclass(frozen=True)
class Config:
    dim: int
    side: int  # experts = side^2
    heads: int
    top_k: int
    key_dim: int
    tokens: int
    dtype: str

    @property
    def experts(self) -> int:
        return self.side * self.side

    def label(self) -> str:
        return f"{self.side}^2 experts, {self.tokens} tok"


# ---- machine --------------------------------------------------------------------------------------
def machine(device: str) -> dict:
    """benchmarks.common.machine, plus the triton version on CUDA."""
    info = common.machine(device)
    if device == "cuda":
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def device_bandwidth(device: str, override_gbs: float | None) -> float | None:
    """Bytes per second, from --bandwidth or the table of known GPUs; None if unknown."""
    if override_gbs:
        return override_gbs * 1e9
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key in sorted(BANDWIDTH_GBS, key=len, reverse=True):  # "H100 PCIe" before "H100"
            if key in name:
                return BANDWIDTH_GBS[key] * 1e9
    return None


def floor_bytes(cfg: Config, mode: str) -> int:
    """The bytes a PEER layer must move at least (module docstring)."""
    b = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    T, M, D, N = cfg.tokens, cfg.heads * cfg.top_k, cfg.dim, cfg.experts
    fwd = 2 * T * M * D * b + 2 * T * D * b
    return fwd if mode == "fwd" else fwd + 2 * T * M * D * b + 2 * N * D * b + 3 * T * D * b


# ---- the rows -------------------------------------------------------------------------------------
def build(cfg: Config, device: str, seed: int = 0):
    """{row: (module, call(x) -> output tensor)} for one configuration, plus x and the upstream grads."""
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(seed)
    peer = PEER(cfg.dim, cfg.experts, heads=cfg.heads, top_k=cfg.top_k, key_dim=cfg.key_dim).to(device, dtype)
    dense = DenseFFN(cfg.dim, 4 * cfg.dim).to(device, dtype)
    x = torch.randn(cfg.tokens, cfg.dim, device=device, dtype=dtype)

    def with_kernel(kernel):
        def call(x):
            peer.kernel = kernel
            return peer(x)
        return call

    def retrieval(kernel):
        def call(x):
            peer.kernel = kernel
            return peer.route(x)[0]
        return call

    rows = {"ours": (peer, with_kernel("auto")), "reference": (peer, with_kernel("reference")),
            "dense": (dense, dense), "retrieval": (peer, retrieval("auto")), "bag": (peer, with_kernel("bag")),
            "triton": (peer, with_kernel("triton")), "retrieval_ref": (peer, retrieval("reference"))}
    shapes = {row: (cfg.tokens, cfg.heads, cfg.top_k) if row.startswith("retrieval") else (cfg.tokens, cfg.dim)
              for row in rows}
    # fixed upstream gradients, built lazily: nothing else may raise the CPU peak before a measurement
    grads = LazyGrads(lambda row: torch.randn(shapes[row], device=device, dtype=dtype))
    return rows, x, grads


class LazyGrads(dict):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, row):
        self[row] = value = self.make(row)
        return value


def run_once(module, call, x, grad, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            call(x)
    else:
        call(x).backward(grad)


def reset_grads(module, x) -> None:
    """Parameter and input gradients to None (outside the timed region: a real step does it once)."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rows(cfg: Config, device: str, rows: list[str], repeat: int, warmup: int) -> dict:
    """{mode: {row: median ms}} with interleaved, rotating repetitions."""
    built, x, grads = build(cfg, device)
    out = {}
    for mode in MODES:
        xm = x.detach().requires_grad_(mode == "fwd+bwd")
        for _ in range(warmup):
            for row in rows:
                reset_grads(built[row][0], xm)
                run_once(*built[row], xm, grads[row], mode)
        times = {row: [] for row in rows}
        for r in range(repeat):
            for row in rows[r % len(rows):] + rows[:r % len(rows)]:
                module, call = built[row]
                reset_grads(module, xm)
                sync(device)
                t0 = time.perf_counter()
                run_once(module, call, xm, grads[row], mode)
                sync(device)
                times[row].append((time.perf_counter() - t0) * 1e3)
        out[mode] = {row: statistics.median(ts) for row, ts in times.items()}
    return out


def cuda_peak_mb(cfg: Config, rows: list[str]) -> dict:
    built, x, grads = build(cfg, "cuda")
    out = {}
    for mode in MODES:
        xm = x.detach().requires_grad_(mode == "fwd+bwd")
        out[mode] = {}
        for row in rows:
            run_once(*built[row], xm, grads[row], mode)  # warm (allocator, autotuning, lazy state)
            reset_grads(built[row][0], xm)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run_once(*built[row], xm, grads[row], mode)
            torch.cuda.synchronize()
            out[mode][row] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def cpu_peak_mb(cfg: Config, row: str, mode: str, threads: int) -> float | None:
    """Peak resident memory over one call minus the resident memory before it, in a fresh process."""
    spec = json.dumps({"cfg": asdict(cfg), "row": row, "mode": mode, "threads": threads})
    out = subprocess.run([sys.executable, __file__, "--_memory-child", spec], capture_output=True, text=True,
                         check=True)
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "n/a" else float(value)


def memory_child(spec: str) -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so VmHWM after the call
    minus VmRSS before it is the call's own peak; elsewhere print n/a."""
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    cfg = Config(**spec["cfg"])
    built, x, grads = build(cfg, "cpu")
    x = x.detach().requires_grad_(spec["mode"] == "fwd+bwd")
    grad = grads[spec["row"]]
    # a call on 8 tokens first pays the process's one-time allocations (autograd engine, pools)
    small = x[:8].detach().requires_grad_(x.requires_grad)
    run_once(*built[spec["row"]], small, grad[:8], spec["mode"])
    reset_grads(built[spec["row"]][0], small)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = common.status_kib("VmRSS")
    except OSError:
        print("n/a")
        return
    run_once(*built[spec["row"]], x, grad, spec["mode"])
    print((common.status_kib("VmHWM") - before) / 1024)


# ---- driver ---------------------------------------------------------------------------------------
def measure(cfg: Config, args, rows: list[str]) -> dict:
    times = time_rows(cfg, args.device, rows, args.repeat, args.warmup)
    memory = None
    if args.device == "cuda" and args.memory:
        memory = cuda_peak_mb(cfg, rows)
    elif args.memory:
        memory = {mode: {row: cpu_peak_mb(cfg, row, mode, args.threads) for row in rows} for mode in MODES}
    bandwidth = device_bandwidth(args.device, args.bandwidth)
    result = {"config": asdict(cfg), "experts": cfg.experts, "ms": times, "peak_mb": memory,
              "floor_bytes": {mode: floor_bytes(cfg, mode) for mode in MODES}, "bandwidth_Bps": bandwidth}
    result["speedup_vs_reference"] = {mode: times[mode]["reference"] / times[mode]["ours"] for mode in MODES
                                      if "reference" in times[mode] and "ours" in times[mode]}
    if bandwidth:
        result["floor_fraction"] = {mode: {row: floor_bytes(cfg, mode) / bandwidth / (times[mode][row] / 1e3)
                                           for row in ("ours", "reference", "bag", "triton") if row in times[mode]}
                                    for mode in MODES}
    return result


def fmt(value, spec=".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    head = (f"{'configuration':<28}{'row':<14}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MB fwd':>13}"
            f"{'peak MB f+b':>13}{'ref/ours f+b':>14}{'floor f+b':>11}")
    print(head)
    print("-" * len(head))
    for res in results:
        cfg = Config(**res["config"])
        for row in res["ms"]["fwd"]:
            mem = res["peak_mb"]
            frac = res.get("floor_fraction", {}).get("fwd+bwd", {}).get(row)
            ratio = res["speedup_vs_reference"].get("fwd+bwd") if row == "ours" else None
            print(f"{cfg.label():<28}{row:<14}{res['ms']['fwd'][row]:>10.1f}{res['ms']['fwd+bwd'][row]:>12.1f}"
                  f"{fmt(mem and mem['fwd'][row]):>13}{fmt(mem and mem['fwd+bwd'][row]):>13}"
                  f"{fmt(ratio, '.2f'):>14}{fmt(frac and 100 * frac, '.1f') + ('%' if frac else ''):>11}")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cpu-target", action="store_true",
                   help="the CPU target: float32, dim 256, 128^2 experts, 8 heads, top-16, 2048 tokens")
    p.add_argument("--experts", type=parse_ints, help="grid sides n (experts = n^2), comma-separated")
    p.add_argument("--tokens", type=parse_ints, help="token counts, comma-separated")
    p.add_argument("--dim", type=int)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--key-dim", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: "
                   f"{','.join(DEFAULT_ROWS['cpu'])}; on CUDA {','.join(DEFAULT_ROWS['cuda'])})")
    p.add_argument("--repeat", type=int, help="timed repetitions per row (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory (default: on for CUDA and --cpu-target)")
    p.add_argument("--bandwidth", type=float, help="device memory bandwidth in GB/s for the floor fraction")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if args.cpu_target:
        if gpu:
            p.error("--cpu-target runs on the CPU")
        args.experts, args.tokens, args.dim, args.key_dim, args.dtype = [128], [2048], 256, 128, "float32"
        args.heads, args.top_k = 8, 16
    args.experts = args.experts or ([128, 256, 512, 1024] if gpu else [128, 256, 512])
    args.tokens = args.tokens or ([2048, 8192] if gpu else [512, 2048])
    args.dim = args.dim or (512 if gpu else 256)
    args.key_dim = args.key_dim or (256 if gpu else 128)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeat = args.repeat or (20 if gpu else 5)
    args.memory = args.memory if args.memory is not None else (gpu or args.cpu_target)
    rows = [r for r in (args.rows or ",".join(DEFAULT_ROWS[args.device])).split(",") if r]
    if not rows or any(r not in ROWS for r in rows):
        p.error(f"--rows must name some of {', '.join(ROWS)}")

    info = machine(args.device)
    print(f"# {info.get('gpu', info['cpu'])}, {info['cpus']} cores, {args.threads} threads, torch {info['torch']}, "
          f"load average {info['load_average_1min']}")
    print(f"# dim {args.dim}, {args.heads} heads, top-{args.top_k}, key_dim {args.key_dim}, {args.dtype}; "
          f"medians of {args.repeat} interleaved repetitions after {args.warmup} warm-up runs")
    results = []
    for side in args.experts:
        for tokens in args.tokens:
            cfg = Config(args.dim, side, args.heads, args.top_k, args.key_dim, tokens, args.dtype)
            results.append(measure(cfg, args, rows))
    print_table(results)
    if args.cpu_target and "ours" in rows and "reference" in rows:
        res = results[0]
        ref, ours = res["ms"]["fwd+bwd"]["reference"], res["ms"]["fwd+bwd"]["ours"]
        print(f"\nCPU target (float32, dim 256, 128^2 experts, 8 heads, top-16, 2048 tokens, forward+backward): "
              f"reference {ref:.1f} ms, ours {ours:.1f} ms, speedup {ref / ours:.2f}x (target >= 1.5x), "
              f"{args.threads} threads")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
