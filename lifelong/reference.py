"""Reference models for forward transfer: the run's model, trained from scratch on one domain alone
(`eval.reference: scratch`). Each domain's reference is trained once and cached by a hash of what
it depends on (model, training settings, seed, the domain's blocks), so runs that differ only in
strategy or growth share their references.

A reference is the run's config with the naive strategy and no growth, trained on the domain's
train experience and evaluated on its test split (per-block losses kept, so the paired bootstrap
resamples the same blocks) and along its learning curve on the domain's probe blocks. Training it
saves and restores every RNG, so the run itself is the same with or without references.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from avalanche.training.plugins import EvaluationPlugin

import experts
from lifelong import checkpoint, distributed, rundir, transfer
from lifelong.build import build_model, cache_dir, seed_everything
from lifelong.config import CheckpointConfig, EvalConfig, GrowthConfig, LogConfig, RunConfig
from lifelong.strategy_config import StrategyConfig
from lifelong.metrics import DomainLossMetric
from lifelong.plugins import CurvePlugin
from lifelong.strategies import build_strategy
from lifelong.training import build_optimizer

VERSION = 1  # bump when what a reference measures changes
REFERENCE_DIR = "references"  # under the stream's cache folder


def reference_config(cfg: RunConfig) -> RunConfig:
    """The run's config as a reference trains it: naive strategy, no growth, every parameter learning,
    no extra logging."""
    return dataclasses.replace(cfg, strategy=StrategyConfig(), growth=GrowthConfig(), log=LogConfig(),
                               train=dataclasses.replace(cfg.train, trainable=[]),
                               checkpoint=CheckpointConfig(), eval=EvalConfig(curve_every=cfg.eval.curve_every))


def reference_key(cfg: RunConfig, info: dict, pretrained: str | None = None) -> str:
    """What a domain's reference depends on, hashed: settings, seed, the domain's blocks and, for a
    pretrained model (`model.hf`), the SHA-256 of its weights (`pretrained`)."""
    ref = reference_config(cfg).to_dict()
    stream = {k: v for k, v in ref["stream"].items() if k not in ("name", "domains", "order", "cache_dir")}
    # A reference trains everything: its scope is no dependency (and keys from before the setting stay valid).
    train = {k: v for k, v in ref["train"].items() if k != "trainable"}
    blob = {"version": VERSION, "seed": ref["seed"], "model": ref["model"], "train": train,
            "stream": stream, "curve_every": cfg.eval.curve_every,
            "domain": {k: info.get(k) for k in ("name", "content_hash", "test_hash", "train_blocks", "test_blocks",
                                                "tokenizer", "block_len")}}
    if pretrained is not None:
        blob["pretrained"] = pretrained
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


class _Collect:
    """A logger that keeps the learning-curve values in memory."""

    def __init__(self):
        self.points: list[list[float]] = []

    def log_metrics(self, values) -> None:
        self.points += [[int(v.x_plot), float(v.value)] for v in values]


def train_reference(cfg: RunConfig, bench, index: int, device, probes: dict) -> dict:
    """Train the reference of domain `index` and measure it: {"loss": nats per token on its test split,
    "blocks": per-block losses, "curve": [[step, loss on the probe blocks], ...], "steps": optimizer steps}."""
    ref = reference_config(cfg)
    seed_everything(cfg.seed)
    model = build_model(ref, bench.vocab_size)
    optimizer = build_optimizer(model, ref, device)
    if model.expert_layers():
        experts.attach(model, optimizer)
    rows = []
    metric = DomainLossMetric(bench.domains, [i["bytes_per_token"] for i in bench.domain_info],
                              on_stage=lambda nats, bpb, blocks: rows.append((nats, blocks)))
    domain = bench.domains[index]
    curve = _Collect()
    plugins = ([CurvePlugin(model, {domain: probes[domain]}, cfg.eval.curve_every, loggers=[curve])]
               if cfg.eval.curve_every else [])
    t = ref.train
    steps = transfer.steps_per_experience(len(bench.train_stream[index].dataset), t.batch_size, t.grad_accum, t.epochs)
    with warnings.catch_warnings():  # no loggers on purpose: the metric hands its row to `rows`
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(metric, loggers=[])
    strategy = build_strategy(ref, model, optimizer, evaluator, device, plugins=plugins,
                              total_steps=steps)  # a schedule over this domain alone, also with rewarm: false
    strategy.train(bench.train_stream[index])
    strategy.eval(bench.test_stream)
    nats, blocks = rows[-1]
    return {"domain": domain, "loss": float(nats[index]), "blocks": blocks[index].tolist(),
            "curve": curve.points, "steps": int(strategy.optimizer_steps)}


def scratch_references(cfg: RunConfig, bench, device, probes: dict, echo=print,
                       pretrained: str | None = None) -> list[dict]:
    """Every domain's reference, from the cache when there (stream.cache_dir, or LIFELONG_CACHE),
    trained otherwise. `pretrained`: the SHA-256 of `model.hf`'s weights (PretrainedLM.base_digest),
    part of the cache key, since a model folder can change under the same name; required with
    `model.hf`. The global RNG states are restored afterwards."""
    if cfg.model.hf is not None and pretrained is None:
        raise ValueError("the references of a pretrained model are keyed by the SHA-256 of its weights (pretrained)")
    caches = cache_dir(cfg)
    folder = Path(caches) / REFERENCE_DIR if caches is not None else None
    rng = checkpoint.rng_state()
    out = []
    try:
        for j, (domain, info) in enumerate(zip(bench.domains, bench.domain_info)):
            key = reference_key(cfg, info, pretrained)
            path = folder / f"{domain}-{key[:32]}.json" if folder is not None else None
            if path is not None and path.is_file():
                out.append(rundir.read_json(path))
                continue
            echo(f"{'reference':>16}: training the model on {domain} alone (eval.reference=scratch)")
            result = train_reference(cfg, bench, j, device, probes)
            if path is not None and distributed.is_main():
                path.parent.mkdir(parents=True, exist_ok=True)
                rundir.write_json_atomic(path, result)
            out.append(result)
    finally:
        checkpoint.set_rng_state(rng)
    return out


def curve_mean(points, start: int, end: int) -> float | None:
    """The mean loss of the curve points with start < step <= end (None if there are none)."""
    values = [v for x, v in points if start < x <= end]
    return float(np.mean(values)) if values else None
