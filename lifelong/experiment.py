"""One lifelong run: build the stream and the model, train over every experience, measure, write.

Stage 0 evaluates every domain's test split before any training; after each
training experience the whole test stream is evaluated again. The rows of
per-domain losses form the stage x domain matrix of `results.json`.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin

from lifelong import results as results_io
from lifelong.config import ConfigError, RunConfig, dump_yaml
from lifelong.loggers import CSVMetricLogger, ProgressPlugin
from lifelong.metrics import DomainLossMetric, TrainLossMetric
from lifelong.model import LanguageModel
from lifelong.plots import save_matrix_heatmap
from lifelong.strategies import build_optimizer, build_strategy
from scenarios import DomainSpec, build_benchmark

CONFIG_FILE = "config.yaml"


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (data order included: Avalanche's loaders draw from torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def load_stream(cfg: RunConfig):
    """The Avalanche benchmark the config describes."""
    s = cfg.stream
    spec = [DomainSpec(**d) if isinstance(d, dict) else d for d in s.domains] if s.domains else s.preset
    cache_dir = None if s.cache_dir is None else os.path.expanduser(os.environ.get("LIFELONG_CACHE", s.cache_dir))
    return build_benchmark(spec, block_len=s.block_len, train_tokens=s.train_tokens, test_tokens=s.test_tokens,
                           test_fraction=s.test_fraction, seed=cfg.seed, order=s.order,
                           tokenizer=s.tokenizer, cache_dir=cache_dir)


def _aux_metrics(model: LanguageModel):
    def collect() -> dict[str, float]:
        out = {}
        for name, ffn in model.expert_layers().items():
            for key, value in ffn.aux_metrics().items():
                out[f"{name}/{key}"] = value
        return out
    return collect


def run(cfg: RunConfig, out_dir: str | Path, progress: bool | None = None, echo=print) -> dict:
    """Train and evaluate over the whole stream; write the run directory; return results.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)

    bench = load_stream(cfg)
    domains = bench.domains
    sizes = [f"{d} ({info['train_tokens']:,} train / {info['test_tokens']:,} test tokens)"
             for d, info in zip(domains, bench.domain_info)]
    echo(f"stream: {', '.join(sizes)}")

    try:
        model = LanguageModel(cfg.model, vocab_size=bench.vocab_size, context=cfg.stream.block_len)
    except ValueError as err:  # the experts' own argument checks, e.g. a non-square pool
        raise ConfigError(f"model: {err}") from None
    flops = model.flops_per_token()
    params = model.param_counts()
    echo(f"model: {params['total']:,} parameters ({params['active_per_token']:,} active per token), "
         f"{sum(flops.values()) / 1e6:.2f} MFLOPs per token, {model.num_experts():,} experts, device {device}")
    optimizer = build_optimizer(model, cfg)

    loss_rows: list[list[float]] = []
    bpb_rows: list[list[float]] = []
    csv_logger = CSVMetricLogger(out_dir / "metrics.csv")
    tb_logger = TensorboardLogger(tb_log_dir=out_dir / "tb")
    domain_loss = DomainLossMetric(domains, [i["bytes_per_token"] for i in bench.domain_info],
                                   on_stage=lambda nats, bpb: (loss_rows.append(nats), bpb_rows.append(bpb)))
    evaluator = EvaluationPlugin(domain_loss, TrainLossMetric(every=10, aux_metrics=_aux_metrics(model)),
                                 loggers=[csv_logger, tb_logger])
    strategy = build_strategy(cfg, model, optimizer, evaluator, device,
                              plugins=[ProgressPlugin(domains, enabled=progress)])

    stages = ["init"]
    num_experts = [model.num_experts()]
    eval_seconds = 0.0
    t0 = time.perf_counter()
    strategy.eval(bench.test_stream)
    eval_seconds += time.perf_counter() - t0
    echo(f"{'init':>16}: mean test loss {np.mean(bpb_rows[-1]):.3f} bpb")
    for experience in bench.train_stream:
        strategy.train(experience)
        t0 = time.perf_counter()
        strategy.eval(bench.test_stream)
        eval_seconds += time.perf_counter() - t0
        stages.append(f"after:{experience.domain}")
        num_experts.append(model.num_experts())
        own = bpb_rows[-1][experience.current_experience]
        echo(f"{stages[-1]:>16}: {experience.domain} {own:.3f} bpb, mean {np.mean(bpb_rows[-1]):.3f} bpb")
    csv_logger.close()
    tb_logger.writer.flush()

    wall = time.perf_counter() - started
    results = results_io.assemble(
        domains, stages, loss_rows, bpb_rows, num_experts,
        domain_info=bench.domain_info,
        flops_per_token=int(sum(flops.values())),
        params=params,
        wall_time_s=round(wall, 2),
        eval_time_s=round(eval_seconds, 2),
        environment={"python": platform.python_version(), "torch": torch.__version__,
                     "platform": platform.platform(), "device": str(device),
                     "cpu_threads": torch.get_num_threads(), "argv": sys.argv[1:]},
        config=cfg.to_dict(),
    )
    results_io.write_json_atomic(out_dir / results_io.RESULTS_FILE, results)
    save_matrix_heatmap(results, out_dir / "bpb_matrix.png")
    return results
