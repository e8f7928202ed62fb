"""Dense vs MoE vs PEER at equal training compute: a tuning search on validation, then an isoFLOP sweep.

    python benchmarks/isoflop.py tune  --out runs/isoflop         # same search budget per arm, on validation
    python benchmarks/isoflop.py sweep --out runs/isoflop         # tuned arms at several budgets, 3 seeds, test
    python benchmarks/isoflop.py sweep --out runs/isoflop --untuned   # the presets' settings instead
    python benchmarks/isoflop.py presets --out runs/isoflop       # tuned.json -> lifelong/presets/iso-*.yaml

A *budget* is a total number of training FLOPs and a model width. Every run at a budget trains on
``C / (3 * F * domains)`` tokens per domain, F the model's forward FLOPs per token (``lifelong
flops``; backward = 2 x forward), so an arm whose model costs more per token sees fewer tokens and
no arm gets more compute than another. Each run is ``lifelong run`` of the builtin preset (joint
training over the builtin stream by default: the paper's claim is about language-model quality at
equal compute, which forgetting would only add noise to; ``--strategy naive`` for the sequential
stream) with the arm's settings.

tune: for each arm the same ``--trials`` runs: first the peak learning rates of LR_GRID at the arm's
starting settings, then settings drawn at random from the arm's space at the best of those rates
(common to all: weight decay, model width x 0.75 / 1 / 1.25 at the same compute; PEER: heads,
key_dim, experts, query norm, expert learning-rate multiplier, PEER in the middle block or all;
MoE: experts, top-k, the same placement), each trained once (seed 0) on the tuning budget and
measured on the validation split (``stream.evaluate_on=validation``: test is never read). PEER's
top_k and MoE's expert width follow from the FLOP match. The best of each arm by validation final
mean bpb goes to ``tuned.json``.

sweep: every budget x arm x seed, measured on the test split: ``sweep.md`` (table: final mean bpb
with 95% t intervals over seeds, the paired difference to dense), ``sweep.json`` and ``sweep.png``
(bpb against training FLOPs). Finished runs are read back, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lifelong.build import meta_model  # noqa: E402
from lifelong.presets import resolve  # noqa: E402
from benchmarks.isoflop_tables import markdown, plot, summarise  # noqa: E402
from scenarios import get_tokenizer  # noqa: E402
from scenarios.streams import resolve_domains  # noqa: E402

ARMS = ("dense", "moe", "peer")
#: (training FLOPs, model width) of the default sweep; the first is also the tuning budget.
BUDGETS = ((1e12, 64), (2.5e12, 96), (6.4e12, 128))
#: The first tuning stage: every arm at its DEFAULTS with each of these peak learning rates.
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
WIDTH_MULTS = (0.75, 1.0, 1.25)
#: Each arm's starting point: the first tuning stage sweeps the learning rate at these settings, and an
#: untuned sweep uses them (the shapes of the first iso presets; PEER's query net narrowed to 4 heads x
#: key_dim 32, since 8 x 64 costs more than a whole dense block below width 128).
DEFAULTS = {
    "dense": {"lr": 2e-3, "weight_decay": 0.1, "width_mult": 1.0},
    "moe": {"lr": 2e-3, "weight_decay": 0.1, "width_mult": 1.0, "num_experts": 8, "top_k": 2, "layers": "middle"},
    "peer": {"lr": 2e-3, "weight_decay": 0.1, "width_mult": 1.0, "heads": 4, "key_dim": 32, "num_experts": 4096,
             "query_norm": "batchnorm", "expert_lr_mult": 1.0, "layers": "middle"},
}


def sample_settings(arm: str, rng: np.random.Generator, lr: float) -> dict:
    """One draw from an arm's search space at learning rate ``lr`` (the same common knobs for every arm:
    weight decay and the width at equal compute)."""
    s = {"lr": lr, "weight_decay": float(rng.choice([0.0, 0.05, 0.1, 0.2])),
         "width_mult": float(rng.choice(WIDTH_MULTS))}
    if arm == "moe":
        s.update(num_experts=int(rng.choice([4, 8, 16, 32])), top_k=int(rng.choice([1, 2, 4])),
                 layers=str(rng.choice(["middle", "all"])))
    if arm == "peer":
        s.update(heads=int(rng.choice([2, 4, 8])), key_dim=int(rng.choice([32, 64, 128])),
                 num_experts=int(rng.choice([4096, 16384])),
                 query_norm=str(rng.choice(["batchnorm", "layernorm", "none"])),
                 expert_lr_mult=float(rng.choice([1.0, 2.0, 4.0, 8.0])), layers=str(rng.choice(["middle", "all"])))
    return s


def feasible_settings(arm: str, rng: np.random.Generator, width: int, lr: float) -> dict:
    """The next draw whose FLOPs can be matched at ``width`` (a PEER query net can cost more than the
    whole dense block on its own: such draws are skipped)."""
    while True:
        s = sample_settings(arm, rng, lr)
        try:
            model_overrides(arm, s, width_of(width, s["width_mult"]))
            return s
        except Unmatched:
            continue


def width_of(base: int, mult: float) -> int:
    """The model width for a multiplier: a multiple of 4 (4 attention heads)."""
    return max(16, int(round(base * mult / 4)) * 4)


def meta_of(overrides: list[str]):
    """(RunConfig, the model with shapes only) of the builtin preset with ``overrides``."""
    cfg = resolve("builtin", overrides=overrides)
    return cfg, meta_model(cfg, get_tokenizer(cfg.stream.tokenizer).vocab_size)


def flops_by_part(overrides: list[str]) -> dict[str, int]:
    """Forward FLOPs per token of each part of the configured model (``lifelong flops``)."""
    return meta_of(overrides)[1].flops_per_token()


#: Fewest active PEER neurons (heads x top_k) worth a trial: below it retrieval eats the budget.
MIN_ACTIVE = 32


class Refused(Exception):
    """Bad input or a state the stage cannot go on from: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like `lifelong`
        self.exit(2, f"isoflop: error: {message}\n")


class Unmatched(ValueError):
    """The FLOP match leaves PEER fewer than MIN_ACTIVE active neurons."""


def model_overrides(arm: str, s: dict, width: int, extra: list[str] = ()) -> list[str]:
    """The model keys of one arm's settings at ``width``, its FLOPs per token matched to the dense
    model's as closely as the arm allows (PEER: the closest top_k <= sqrt(experts); MoE: k experts of
    hidden (4 / k) x width). What remains apart is evened out by the tokens (run_config)."""
    common = [f"model.dim={width}", "model.n_heads=4", f"model.ffn={arm}"]
    if arm == "dense":
        return common
    common.append(f"model.ffn_layers={s['layers']}")
    if arm == "moe":  # k experts of hidden (4 / k) * dim: the dense block's active width
        mult = max(1, 4 // s["top_k"])
        return common + [f"model.moe.num_experts={s['num_experts']}", f"model.moe.top_k={s['top_k']}",
                         f"model.moe.hidden_mult={mult}"]
    dense = flops_by_part([*common[:2], "model.ffn=dense", *extra])
    target = sum(dense.values())
    side = math.isqrt(s["num_experts"])
    peer = [f"model.peer.num_experts={s['num_experts']}", f"model.peer.heads={s['heads']}",
            f"model.peer.key_dim={s['key_dim']}", f"model.peer.query_norm={s['query_norm']}"]
    _, model = meta_of([*common, *peer, "model.peer.top_k=1", *extra])
    layers = [b.ffn for b in model.blocks if b.ffn_kind == "peer"]
    rest = sum(model.flops_per_token().values()) - sum(layer.flops_per_token() for layer in layers)
    best = None
    for k in range(1, side + 1):  # the top_k whose model costs closest to dense (only the layers change)
        for layer in layers:
            layer.top_k = k
        flops = rest + sum(layer.flops_per_token() for layer in layers)
        if best is None or abs(flops - target) < abs(best[1] - target):
            best = (k, flops)
        if flops > target:
            break
    if s["heads"] * best[0] < MIN_ACTIVE:
        raise Unmatched(f"PEER with {s['heads']} heads x key_dim {s['key_dim']} at width {width}: retrieval leaves "
                        f"room for {s['heads'] * best[0]} active neurons only (fewer than {MIN_ACTIVE})")
    return common + peer + [f"model.peer.top_k={best[0]}"]


def run_config(arm: str, s: dict, budget: float, base_width: int, seed: int, split: str, strategy: str,
               extra: list[str]):
    """(RunConfig, forward FLOPs per token, train tokens per domain) of one run at a compute budget."""
    width = width_of(base_width, s["width_mult"])
    model = model_overrides(arm, s, width, extra)
    cfg, meta = meta_of(model + extra)
    flops = sum(meta.flops_per_token().values())
    domains = len(cfg.stream.domains) or len(resolve_domains(cfg.stream.name))
    block = cfg.stream.block_len
    tokens = max(block, int(budget / (3 * flops * domains)) // block * block)
    train = [f"train.lr={s['lr']}", f"train.weight_decay={s['weight_decay']}",
             f"train.expert_lr_mult={s.get('expert_lr_mult', 1.0)}"]
    cfg = resolve("builtin", overrides=model + train + [
        f"seed={seed}", f"strategy.name={strategy}", f"stream.evaluate_on={split}", f"stream.train_tokens={tokens}",
        "eval.bootstrap_samples=0", *extra])
    return cfg, flops, tokens


def run_once(cfg, out: Path) -> dict:
    """results.json of one run with run_info.json's wall time (read back when the directory already
    holds a finished one)."""
    from lifelong import experiment, rundir

    done = out / "results.json"
    if done.exists() and rundir.read_run_config(out) != cfg:
        raise Refused(f"{out} holds a run of other settings; remove it or choose another --out")
    if not done.exists():
        experiment.run(cfg, out, progress=False, echo=lambda *a, **k: None, replace=rundir.check_out_dir(out, True))
    results = json.loads(done.read_text())
    info = out / "run_info.json"
    results["wall_time_s"] = json.loads(info.read_text()).get("wall_time_s") if info.exists() else None
    return results


def measure(results: dict, flops: int) -> dict:
    trained = sum(int(d["train_tokens"]) for d in results["domain_info"])
    return {"bpb": float(results["bpb_summary"]["final_average"]), "train_tokens": trained,
            "train_flops": 3 * flops * trained, "flops_per_token": flops,
            "wall_s": float(results["wall_time_s"] if results.get("wall_time_s") is not None else "nan")}


def describe(arm: str, s: dict) -> str:
    parts = [f"lr {s['lr']:.2g}", f"wd {s['weight_decay']:g}", f"width x{s['width_mult']:g}"]
    if arm == "moe":
        parts += [f"{s['num_experts']} experts top-{s['top_k']} ({s['layers']})"]
    if arm == "peer":
        parts += [f"{s['num_experts']} experts, {s['heads']} heads, key_dim {s['key_dim']}, {s['query_norm']}, "
                  f"expert lr x{s['expert_lr_mult']:g} ({s['layers']})"]
    return ", ".join(parts)


def tune(args) -> None:
    """Per arm, the same trials: the learning rates of LR_GRID at the arm's DEFAULTS, then random draws
    of its other knobs at the best of those rates; each on the validation split, seed 0."""
    budget, width = args.budgets[0]
    best, rows = {}, []
    for arm in args.arms:
        rng = np.random.default_rng([args.search_seed, ARMS.index(arm)])
        trials = [(f"lr{lr:g}", dict(DEFAULTS[arm], lr=lr)) for lr in LR_GRID]
        for i in range(args.trials):
            if i == len(LR_GRID):  # the learning-rate stage is done: draw the rest at its best rate
                lr = best[arm]["settings"]["lr"]
            name, s = trials[i] if i < len(LR_GRID) else (str(i - len(LR_GRID)), feasible_settings(arm, rng, width, lr))
            cfg, flops, tokens = run_config(arm, s, budget, width, 0, "validation", args.strategy, args.overrides)
            start = time.time()
            m = measure(run_once(cfg, args.out / "tune" / f"{arm}-{name}"), flops)
            top_k = cfg.model.peer.top_k if arm == "peer" else None
            rows.append({"arm": arm, "trial": name, "settings": s, "peer_top_k": top_k, **m})
            print(f"tune {arm} {name}: validation bpb {m['bpb']:.4f}  ({describe(arm, s)}"
                  f"{f', top_k {top_k}' if top_k else ''}; {time.time() - start:.0f} s)", flush=True)
            if arm not in best or m["bpb"] < best[arm]["bpb"]:
                best[arm] = {"settings": s, "bpb": m["bpb"], "trial": name}
    (args.out / "tuned.json").write_text(json.dumps({"budget": [budget, width], "trials": args.trials,
                                                     "best": best, "all": rows}, indent=1))
    lines = ["| arm | trial | validation final mean bpb | settings |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arm"], r["bpb"])):
        k = f", top_k {r['peer_top_k']}" if r["peer_top_k"] else ""
        lines.append(f"| {r['arm']} | {r['trial']} | {r['bpb']:.4f} | {describe(r['arm'], r['settings'])}{k} |")
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'tuned.json'} and {args.out / 'tune.md'}")


def sweep(args) -> None:
    settings = dict(DEFAULTS)
    if not args.untuned:
        path = args.out / "tuned.json"
        if not path.exists():
            raise Refused(f"{path} not found; run the tune stage first, or pass --untuned")
        settings.update({arm: b["settings"] for arm, b in json.loads(path.read_text())["best"].items()})
    rows = []
    for budget, width in args.budgets:
        for arm in args.arms:
            for seed in args.seeds:
                cfg, flops, tokens = run_config(arm, settings[arm], budget, width, seed, "test", args.strategy,
                                                args.overrides)
                m = measure(run_once(cfg, args.out / "sweep" / f"{budget:.3g}" / f"{arm}-seed{seed}"), flops)
                rows.append({"budget": budget, "width": cfg.model.dim, "arm": arm, "seed": seed, **m})
                print(f"sweep {budget:.3g} {arm} seed {seed}: test bpb {m['bpb']:.4f} ({m['train_tokens']:,} tokens, "
                      f"{m['wall_s']:.0f} s)", flush=True)
    table = summarise(rows, [b for b, _ in args.budgets], args.arms)
    (args.out / "sweep.json").write_text(json.dumps({"settings": settings, "strategy": args.strategy,
                                                     "runs": rows, "table": table}, indent=1))
    described = {arm: describe(arm, settings[arm]) for arm in args.arms}
    (args.out / "sweep.md").write_text(markdown(table, described, args.strategy, args.seeds))
    plot(table, args.out / "sweep.png")
    print((args.out / "sweep.md").read_text())


#: The presets' targets: (suffix, training FLOPs, width, layers, extra keys). The CPU one is the sweep's
#: largest budget. The GPU one keeps the ratios (key_dim and the side of the expert grid scale with
#: width) at 4x the width and twice the layers, on a hub stream (the builtin one holds too little text
#: for a model that size: its smallest domain has about 790k train tokens), at the compute that about
#: fills the hub domains' 4.5M train tokens each.
PRESET_TARGETS = (
    ("", 6.4e12, 128, 4, []),
    ("-gpu", 1e15, 512, 8, ["stream.name=hub-wiki-code-science", "model.n_heads=8", "train.batch_size=32"]),
)
#: One comment per key the presets set: type, default, meaning.
KEY_NOTES = {
    "seed": "int, default 0",
    "stream.name": "str, default builtin: needs the network (and the datasets package)",
    "stream.train_tokens": "int, default 300000: per domain; the arm's share of the compute budget",
    "stream.evaluate_on": "str, default test",
    "model.dim": "int, default 128",
    "model.n_layers": "int, default 4",
    "model.n_heads": "int, default 4",
    "model.ffn": "str, default peer: peer | moe | dense",
    "model.ffn_layers": "str, default middle: middle | all | block indices",
    "model.peer.num_experts": "int, default 4096: a perfect square",
    "model.peer.heads": "int, default 4",
    "model.peer.top_k": "int, default 8: matched to dense FLOPs",
    "model.peer.key_dim": "int, default 64",
    "model.peer.query_norm": "str, default batchnorm",
    "model.moe.num_experts": "int, default 8",
    "model.moe.top_k": "int, default 2",
    "model.moe.hidden_mult": "int, default 2: (4 / top_k) x dim active, as dense",
    "train.lr": "float, default 0.002",
    "train.weight_decay": "float, default 0.1",
    "train.expert_lr_mult": "float, default 1.0",
    "train.batch_size": "int, default 16",
    "strategy.name": "str, default naive: joint = one mixed experience, the paper's setting",
}


def scaled_settings(arm: str, s: dict, base_width: int, width: int) -> dict:
    """An arm's tuned settings carried to another width: PEER's key_dim and the side of its expert grid
    grow with it (so top_k, at most that side, can keep matching the dense block)."""
    s = dict(s)
    if arm == "peer" and width != base_width:
        ratio = width / base_width
        s["key_dim"] = max(2, int(round(s["key_dim"] * ratio / 2)) * 2)
        s["num_experts"] = int(round(math.isqrt(s["num_experts"]) * ratio)) ** 2
    return s


def preset_yaml(arm: str, s: dict, target: tuple) -> str:
    """One preset: the sweep's settings at the CPU target (so it repeats the sweep's largest cell),
    carried to the GPU width by scaled_settings."""
    suffix, budget, width, layers, extra = target
    s = scaled_settings(arm, s, PRESET_TARGETS[0][2], width)
    extra = [f"model.n_layers={layers}", *extra]
    cfg, flops, tokens = run_config(arm, s, budget, width, 0, "test", "joint", extra)
    keys = model_overrides(arm, s, width_of(width, s["width_mult"]), extra) + extra + [
        f"stream.train_tokens={tokens}", f"train.lr={s['lr']:.3g}", f"train.weight_decay={s['weight_decay']}",
        "strategy.name=joint"]
    if arm == "peer":
        keys.append(f"train.expert_lr_mult={s['expert_lr_mult']}")
    tree: dict = {}
    for key in keys:
        path, value = key.split("=", 1)
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = (value, KEY_NOTES.get(path, ""))
    lines = [f"# {arm} at matched training compute ({budget:.2g} FLOPs = 3 x {flops:,} forward FLOPs per token x",
             f"# {tokens:,} train tokens x {len(resolve_domains(cfg.stream.name))} domains), the settings the "
             "validation search chose (benchmarks/isoflop.py;",
             "# README, 'PEER at matched compute'). Written by `python benchmarks/isoflop.py presets`.",
             "# Keys not listed keep the defaults shown in builtin.yaml.", ""]

    def emit(node: dict, depth: int) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                lines.append("  " * depth + f"{name}:")
                emit(value, depth + 1)
            else:
                text = "  " * depth + f"{name}: {value[0]}"
                lines.append(f"{text:<28} # {value[1]}" if value[1] else text)
    emit(tree, 0)
    return "\n".join(lines) + "\n"


def presets(args) -> None:
    tuned = json.loads((args.out / "tuned.json").read_text())
    for target in PRESET_TARGETS:
        for arm in args.arms:
            path = args.write / f"iso-{arm}{target[0]}.yaml"
            try:
                text = preset_yaml(arm, tuned["best"][arm]["settings"], target)
            except Unmatched as err:
                raise Refused(f"{arm}'s tuned settings at width {target[2]}: {err}") from None
            path.write_text(text)
            print(f"wrote {path}")


def parse_budgets(text: str) -> list[tuple[float, int]]:
    try:
        out = [(float(f), int(w)) for f, w in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must look like 1e12:64,2.5e12:96, got {text!r}") from None
    if not out or any(f <= 0 or w < 16 for f, w in out):
        raise argparse.ArgumentTypeError("every budget needs FLOPs > 0 and a width >= 16")
    return out


def main(argv=None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("tune", "sweep", "presets"))
    parser.add_argument("--write", type=Path, default=Path(__file__).resolve().parents[1] / "lifelong" / "presets",
                        help="presets: the folder the iso-* presets are written to")
    parser.add_argument("--out", type=Path, default=Path("runs/isoflop"))
    parser.add_argument("--budgets", type=parse_budgets, default=list(BUDGETS),
                        help="FLOPS:WIDTH,... (tune uses the first)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=8,
                        help=f"tune: runs per arm, the first {len(LR_GRID)} the learning-rate grid")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--strategy", default="joint")
    parser.add_argument("--untuned", action="store_true", help="sweep: the presets' settings, not tuned.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.arms or any(a not in ARMS for a in args.arms):
        parser.error(f"--arms: choose from {', '.join(ARMS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    from lifelong.errors import ConfigError
    from scenarios import StreamError

    try:
        {"tune": tune, "sweep": sweep, "presets": presets}[args.stage](args)
    except (Refused, Unmatched, ConfigError, StreamError) as err:
        sys.stderr.write(f"isoflop: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
