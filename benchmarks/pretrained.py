"""Memory and speed of a pretrained causal LM with PEER retrofitted (`model.hf`), against the same
model without it, and the memory plan of a ~0.5B model on a GPU.

    python benchmarks/pretrained.py                     # a small Llama-shaped model built here, on the CPU
    python benchmarks/pretrained.py --model DIR         # a model folder of your own (local files only)
    python benchmarks/pretrained.py --device cuda --shape qwen2.5-0.5b --batch 8 --block-len 1024 --frozen \
        --set model.peer.num_experts=262144 --set model.peer.heads=8 --json pretrained.json   # the plan, measured
    python benchmarks/pretrained.py --plan              # Qwen2.5-0.5B's shape: sizes and expected memory
                                                        # from its config alone (meta tensors, no weights)

Variants, each built as a run builds it (``lifelong.build.build_model`` from the smoke preset with
``model.hf``, ``--set`` overrides on top): "pretrained" (``model.ffn=dense``: the model as it is),
"parallel" (PEER beside the MLP of the blocks ``--blocks`` names, every expert's output at zero) and
"replace" (PEER in place of those MLPs); with ``--frozen``, a fourth, "parallel, base frozen": only
the PEER layer learns (``train.trainable=['queries,keys,experts']``, what
``checkpoint.base_weights=reference`` needs). One step = forward on random token blocks
(``--batch`` x ``--block-len``, under the run's autocast) + next-token loss + backward + clipping +
AdamW step. Each variant runs in a fresh process so that its peak memory is its own: the peak
resident set (VmHWM) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA; "state MiB" counts
parameters + gradients + optimizer state from the tensors themselves. Timing: median of ``--steps``
steps after ``--warmup`` untimed ones. Nothing here is asserted; the tests never time anything.

The plan (``--plan``) builds the Qwen2.5-0.5B architecture (hidden 896, 24 blocks, 14 heads with 2
KV heads, MLP 4864, vocabulary 151,936, tied embeddings) on meta tensors with a PEER layer beside
its middle block's MLP at several pool sizes, and writes down what training it needs: fp32 weights,
gradients and AdamW moments (16 bytes per trained parameter, 4 per frozen one), the logits
(bf16 under autocast, the fp32 copy the loss reads and its gradient) and the other activations
(Korthikanti et al. 2022's 34 bytes x tokens x hidden per block in 16-bit, attention matrices not
stored with SDPA) of a step on 8 blocks of 1024 tokens, for full finetuning and for PEER alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine, status_kib, write_json  # noqa: E402

VARIANTS = {"pretrained": ["model.ffn=dense"], "parallel": ["model.hf_insert=parallel"],
            "replace": ["model.hf_insert=replace"],
            "parallel, base frozen": ["model.hf_insert=parallel", "train.trainable=['queries,keys,experts']"]}
PEER = ["model.peer.num_experts=16384", "model.peer.heads=4", "model.peer.top_k=16", "model.peer.key_dim=128"]


def shape_config(shape: str):
    """The transformers config of a named shape: "small" (Llama-shaped: hidden 256, 4 blocks, 4 heads
    with 2 KV heads, MLP 688, vocabulary 4096) or "qwen2.5-0.5b" (Qwen2.5-0.5B's architecture)."""
    import transformers

    if shape == "small":
        return transformers.LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=688, max_position_embeddings=512)
    return transformers.Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                    num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                                    tie_word_embeddings=True)


def random_model(shape: str, folder: Path) -> str:
    """A model of `shape` with random weights saved in `folder` (no tokenizer: the steps read random
    token ids, and a run's config needs none to build the model)."""
    import transformers

    torch.manual_seed(0)
    transformers.logging.disable_progress_bar()
    transformers.AutoModelForCausalLM.from_config(shape_config(shape)).save_pretrained(folder)
    return str(folder)


def measure(args, variant: str) -> dict:
    """Build `variant`, train `args.warmup + args.steps` steps on random blocks, time and weigh them."""
    from lifelong.build import build_model
    from lifelong.presets import resolve
    from lifelong.scopes import ScopeManager, trainable_of
    from lifelong.training import LMCriterion, autocast_dtype, build_optimizer

    overrides = [f"model.hf={args.model}", f"model.ffn_layers={args.blocks}", f"stream.block_len={args.block_len}",
                 f"train.device={args.device}", *PEER, *VARIANTS[variant], *args.set]
    cfg = resolve("smoke", overrides=overrides)
    device = torch.device(args.device)
    model = build_model(cfg, vocab_size=1).to(device).train()  # from_pretrained leaves it in eval mode
    optimizer = build_optimizer(model, cfg, device)
    ScopeManager(model, optimizer, trainable_of(cfg)).apply(0)
    criterion, dtype = LMCriterion(), autocast_dtype(cfg.train.precision, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (args.batch, args.block_len + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(x), y) + model.aux_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between a run's steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    trained = [p for p in model.parameters() if p.requires_grad]
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(p.numel() * p.element_size() for p in trained)  # gradients
    state += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else status_kib("VmHWM") / 1024)
    median = statistics.median(times)
    params = model.param_counts()
    return {"variant": variant, "params": params["total"], "trained_params": sum(p.numel() for p in trained),
            "active_per_token": params["active_per_token"], "experts": model.num_experts(),
            "forward_mflops_per_token": sum(model.flops_per_token().values()) / 1e6,
            "step_ms": 1000 * median, "tokens_per_s": args.batch * args.block_len / median,
            "state_mib": state / 2**20, "peak_mib": peak, "loss_first": losses[0], "loss_last": losses[-1]}


def plan(pools: list[int]) -> list[dict]:
    """Sizes and expected training memory of Qwen2.5-0.5B's architecture with PEER beside its middle
    block's MLP (meta tensors: nothing allocated, no weights read)."""
    from lifelong.build import meta_model
    from lifelong.presets import resolve

    config = shape_config("qwen2.5-0.5b")
    tokens, hidden, layers, vocab = 8 * 1024, 896, 24, 151936
    logits = tokens * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    activations = 34 * tokens * hidden * layers
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        for pool in [0, *pools]:
            overrides = [f"model.hf={folder}", "stream.block_len=1024", "model.peer.heads=8", "model.peer.top_k=16",
                         "model.peer.key_dim=128", f"model.peer.num_experts={max(pool, 256)}"]
            overrides += ["model.ffn=dense"] if pool == 0 else []
            cfg = resolve("smoke", overrides=overrides)
            model = meta_model(cfg, vocab)
            total = model.param_counts()["total"]
            peer = sum(p.numel() for layer in model.expert_layers().values() for p in layer.parameters())
            base = total - peer
            full = 16 * total + logits + activations
            peer_only = 4 * base + 16 * peer + logits + activations
            rows.append({"experts": pool, "params": total, "peer_params": peer,
                         "forward_gflops_per_token": sum(model.flops_per_token().values()) / 1e9,
                         "full_finetune_gib": full / 2**30, "peer_only_gib": peer_only / 2**30 if peer else None,
                         "logits_gib": logits / 2**30, "activations_gib": activations / 2**30,
                         "checkpoint_copy_gib": 4 * total / 2**30, "checkpoint_reference_gib": 4 * peer / 2**30 if peer else None})
    return rows


def _gib(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local model folder (default: a random model of --shape built here)")
    parser.add_argument("--shape", choices=["small", "qwen2.5-0.5b"], default="small",
                        help="the random model's architecture when no --model is given")
    parser.add_argument("--blocks", default="middle", help="model.ffn_layers of the PEER variants")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--frozen", action="store_true", help="also the variant training PEER alone")
    parser.add_argument("--set", action="append", default=[], help="a config override for every variant")
    parser.add_argument("--plan", action="store_true", help="the Qwen2.5-0.5B memory plan (meta tensors)")
    parser.add_argument("--json")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # the child process measuring one variant
    args = parser.parse_args()
    if args.plan:
        rows = plan([256**2, 512**2, 1024**2])
        print("| PEER experts | parameters | PEER parameters | forward GFLOPs/token | full finetune GiB "
              "| PEER only GiB | checkpoint copy GiB | checkpoint reference GiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['experts']:,} | {r['params'] / 1e6:,.0f}M | {r['peer_params'] / 1e6:,.0f}M | "
                  f"{r['forward_gflops_per_token']:.2f} | {r['full_finetune_gib']:.1f} | "
                  f"{_gib(r['peer_only_gib'], '.1f')} | "
                  f"{r['checkpoint_copy_gib']:.2f} | {_gib(r['checkpoint_reference_gib'], '.2f')} |")
        print(f"# of which logits {rows[0]['logits_gib']:.1f} GiB and other activations "
              f"{rows[0]['activations_gib']:.1f} GiB (8 x 1024 tokens per step, bf16 autocast)")
        write_json(args.json, machine=machine(), plan=rows)
        return
    if args.only:
        print(json.dumps(measure(args, args.only)))
        return
    with tempfile.TemporaryDirectory() as folder:
        args.model = args.model or random_model(args.shape, Path(folder))
        rows = []
        for variant in [v for v in VARIANTS if args.frozen or v != "parallel, base frozen"]:
            child = [sys.executable, __file__, "--only", variant, "--model", args.model, "--blocks", args.blocks,
                     "--device", args.device, "--batch", str(args.batch), "--block-len", str(args.block_len),
                     "--steps", str(args.steps), "--warmup", str(args.warmup),
                     *(a for s in args.set for a in ("--set", s))]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"# {args.batch} x {args.block_len} tokens per step, {args.device}, median of {args.steps} steps")
    print("| variant | parameters | trained | experts | MFLOPs/token | step ms | tokens/s | state MiB | peak MiB "
          "| loss first → last |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['trained_params'] / 1e6:.2f}M | {r['experts']:,} | "
              f"{r['forward_mflops_per_token']:.1f} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['state_mib']:.0f} | {r['peak_mib']:.0f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    write_json(args.json, machine=machine(args.device), args=vars(args), results=rows)


if __name__ == "__main__":
    main()
