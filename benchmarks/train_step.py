"""Training throughput of the matched-compute presets: iso-dense, iso-moe, iso-peer.

It prints each preset's tokens/s and training FLOP/s (3 x forward FLOPs per token, `lifelong flops`'
count, x tokens/s), and both as ratios to iso-dense. The presets match the compute of a whole run
(FLOPs per token x train tokens), so a preset that costs less per token trains on more tokens; the
FLOP/s ratio is then how much sooner or later it spends the same budget.

    python benchmarks/train_step.py                              # CPU, the presets as they are
    python benchmarks/train_step.py --device cuda --steps 20
    python benchmarks/train_step.py --device cuda --set model.peer.num_experts=1048576 --json train.json

Each preset's model is built exactly as a run builds it (``lifelong.presets.resolve`` and
``lifelong.model.LanguageModel``, vocabulary of the preset's tokenizer, context = block_len) and
trained on random token blocks of the preset's ``stream.block_len`` x ``train.batch_size``: one
step = forward (under the run's autocast: bf16 on CUDA with precision auto) + next-token loss
(plus the FFNs' auxiliary losses) + backward + gradient clipping (train.grad_clip) + optimizer
step + zero_grad, with the growth / freeze hooks attached as in a run (experts.attach).

Optimizers: ``adamw`` is ``lifelong.training.build_optimizer`` (torch AdamW; its implementation
follows ``train.optimizer_impl``: single-tensor on the CPU, fused on CUDA, unless ``--set`` says
otherwise);
``rowwise`` is the same function with ``train.optimizer=rowwise_adamw``: experts.optim.RowAdamW
over the same parameter groups with the PEER expert tables moved to a row-wise group, the same
betas and settings. It only differs for models with PEER layers, so it is run for those only.

Memory: "state GiB" is what the run holds between steps, counted from the tensors themselves:
parameters + their gradients (as allocated during a step) + the optimizer's state. The footer
gives the process's peak: torch.cuda.max_memory_allocated() on CUDA, the peak resident set
(VmHWM) on the CPU, which also counts the allocator's retained memory, Python and the libraries.
Run one preset and optimizer alone to read one model's peak, e.g. a 1024^2-expert layer:

    python benchmarks/train_step.py --presets iso-peer --optimizers adamw --steps 2 --warmup 1 \
        --set model.dim=512 --set model.n_heads=8 --set model.peer.num_experts=1048576 \
        --set model.peer.key_dim=256 --set model.peer.heads=8 --set model.peer.top_k=16 \
        --set model.ffn_layers=middle

"loss" is the training loss on the trainer's fixed batch at its first and last step: it falls when
the model trains.

Timing: the (preset, optimizer) pairs are interleaved step by step, each step timed alone
(synchronised on CUDA), ``--warmup`` untimed steps first; tokens/s = tokens per step / median
step time; "opt ms" is the median of ``optimizer.step()`` alone (hooks included). Other processes on a shared machine slow everything down: the load average is
printed before and after. Nothing here is asserted; tests never time anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import experts  # noqa: E402
from benchmarks.common import load_average, machine, status_kib, write_json  # noqa: E402
from lifelong.presets import resolve  # noqa: E402
from lifelong.model import LanguageModel  # noqa: E402
from lifelong.training import LMCriterion, autocast_dtype, build_optimizer  # noqa: E402
from scenarios import get_tokenizer  # noqa: E402

PRESETS = ("iso-dense", "iso-moe", "iso-peer")
# benchmark optimizer name -> train.optimizer (both built by lifelong.training.build_optimizer)
TRAIN_OPTIMIZER = {"adamw": "adamw", "rowwise": "rowwise_adamw"}
OPTIMIZERS = tuple(TRAIN_OPTIMIZER)


class Trainer:
    """One (preset, optimizer) pair: model, optimizer and a fixed random batch."""

    def __init__(self, preset: str, optimizer: str, overrides: list[str], device: torch.device, seed: int):
        self.cfg = cfg = resolve(preset, overrides=[*overrides, f"train.optimizer={TRAIN_OPTIMIZER[optimizer]}"])
        self.name, self.optimizer_name, self.device = preset, optimizer, device
        torch.manual_seed(seed)
        vocab = get_tokenizer(cfg.stream.tokenizer).vocab_size
        self.model = LanguageModel(cfg.model, vocab_size=vocab, context=cfg.stream.block_len).to(device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        if self.model.expert_layers():
            experts.attach(self.model, self.optimizer)
        self.criterion = LMCriterion()
        self.dtype = autocast_dtype(cfg.train.precision, device)
        shape = (cfg.train.batch_size, cfg.stream.block_len)
        self.x = torch.randint(vocab, shape, device=device)
        self.y = torch.randint(vocab, shape, device=device)
        self.tokens = self.x.numel()
        self.flops_per_token = sum(self.model.flops_per_token().values())  # forward, lifelong flops' count
        self.times: list[float] = []  # whole training steps
        self.step_times: list[float] = []  # optimizer.step() alone
        self.last_step_time = 0.0
        self.losses: list[torch.Tensor] = []
        self.grad_bytes = 0

    def step(self) -> float:
        model, opt = self.model, self.optimizer
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = model(self.x)
        loss = self.criterion(logits, self.y) + model.aux_loss()
        loss.backward()
        self.losses.append(loss.detach())  # read after the timing: .item() here would sync mid-step
        if not self.grad_bytes:  # the gradients' size is the same every step
            self.grad_bytes = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        self._sync()
        before_step = time.perf_counter()
        opt.step()
        self._sync()
        self.last_step_time = time.perf_counter() - before_step
        opt.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self) -> dict:
        median = statistics.median(self.times)
        peer = [m for m in self.model.expert_layers().values() if isinstance(m, experts.PEER)]
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        state_bytes = (sum(tensor_bytes(p) for p in self.model.parameters()) + self.grad_bytes
                       + sum(tensor_bytes(v) for v in state))
        return {"preset": self.name, "optimizer": self.optimizer_name, "tokens_per_step": self.tokens,
                "ms_per_step": median * 1e3, "tokens_per_s": self.tokens / median,
                "flops_per_token": self.flops_per_token,
                "train_flops_per_s": 3 * self.flops_per_token * self.tokens / median,
                "optimizer_ms": statistics.median(self.step_times) * 1e3,
                "params": sum(p.numel() for p in self.model.parameters()),
                "num_experts": self.model.num_experts(), "peer_experts": sum(m.num_experts for m in peer),
                "steps_timed": len(self.times), "state_gib": state_bytes / 2**30,
                "loss_first": self.losses[0].item(), "loss_last": self.losses[-1].item()}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peak_memory_gib(device: torch.device) -> tuple[str, float | None]:
    """(what was measured, GiB): CUDA's peak allocation, or the CPU process's peak resident set."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return "peak resident set (VmHWM)", status_kib("VmHWM") / 2**20
    except (OSError, StopIteration):
        return "peak resident set (not available here)", None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="adamw,rowwise")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per (preset, optimizer)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every preset, e.g. model.peer.num_experts=1048576")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if any(o not in OPTIMIZERS for o in optimizers) or args.steps < 1 or args.warmup < 0:
        parser.error(f"--optimizers from {OPTIMIZERS}, --steps >= 1, --warmup >= 0")

    info = machine(device)
    print(f"# {info}")
    trainers = []
    for preset in presets:
        for optimizer in optimizers:
            trainer = Trainer(preset, optimizer, args.overrides, device, args.seed)
            if optimizer == "rowwise" and not any(isinstance(m, experts.PEER) for m in trainer.model.modules()):
                continue  # no expert tables: identical to adamw
            trainers.append(trainer)
    if not trainers:
        parser.error("nothing to run: the rowwise optimizer only runs for presets with PEER layers")
    for rnd in range(args.warmup + args.steps):
        for trainer in trainers[rnd % len(trainers):] + trainers[:rnd % len(trainers)]:
            elapsed = trainer.step()
            if rnd >= args.warmup:
                trainer.times.append(elapsed)
                trainer.step_times.append(trainer.last_step_time)
    results = [t.summary() for t in trainers]
    by_key = {(r["preset"], r["optimizer"]): r for r in results}
    print(f"{'preset':>10} {'optimizer':>9} {'params':>10} {'experts':>8} {'ms/step':>9} {'opt ms':>8} "
          f"{'tokens/s':>10} {'vs iso-dense':>12} {'GFLOP/s':>8} {'vs iso-dense':>12} {'state GiB':>9} {'loss':>13}")
    dense = by_key.get(("iso-dense", "adamw"))
    for r in results:
        ratio = r["tokens_per_s"] / dense["tokens_per_s"] if dense else float("nan")
        flops_ratio = r["train_flops_per_s"] / dense["train_flops_per_s"] if dense else float("nan")
        r["ratio_to_iso_dense"], r["flops_ratio_to_iso_dense"] = ratio, flops_ratio
        print(f"{r['preset']:>10} {r['optimizer']:>9} {r['params']:>10} {r['num_experts']:>8} "
              f"{r['ms_per_step']:9.1f} {r['optimizer_ms']:8.1f} {r['tokens_per_s']:10.0f} {ratio:12.2f} "
              f"{r['train_flops_per_s'] / 1e9:8.2f} {flops_ratio:12.2f} "
              f"{r['state_gib']:9.2f} {r['loss_first']:6.3f}>{r['loss_last']:6.3f}")
    if dense:
        for preset in ("iso-moe", "iso-peer"):
            for opt in OPTIMIZERS:
                if (r := by_key.get((preset, opt))) is not None:
                    print(f"# {preset}/iso-dense ({opt}): tokens/s {r['ratio_to_iso_dense']:.2f}, training FLOP/s "
                          f"{r['flops_ratio_to_iso_dense']:.2f} (the presets match compute per run, not per token)")
    what, peak = peak_memory_gib(device)
    info["peak_memory"], info["peak_memory_gib"] = what, peak
    print(f"# peak memory of the process, all trainers together ({what}): "
          + (f"{peak:.2f} GiB" if peak is not None else "n/a"))
    info["load_average_1min_after"] = load_average()
    print(f"# median of {args.steps} interleaved steps after {args.warmup} warm-up; load average (1 min) "
          f"before {info['load_average_1min']}, after {info['load_average_1min_after']}")
    write_json(args.json, machine=info, args=vars(args), results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
