"""One lifelong run: build the stream and the model, train over every experience, measure, write.

Stage 0 evaluates every domain's test split before any training; after each
training experience the whole test stream is evaluated again. The rows of
per-domain losses form the stage x domain matrix of `results.json`.

After every stage the run writes a checkpoint (model, optimizer, strategy
state, RNG states, the matrix so far), and with `checkpoint.every_steps` also
every N optimizer steps inside an experience (plus the data loader's position),
so `resume` can continue in a fresh process and end with exactly the results of
an uninterrupted run. With `train.rollback`, a run whose loss turns NaN/Inf
restarts from its last checkpoint with a lower learning rate.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin

import experts
from lifelong import checkpoint, distributed, snapshots
from lifelong import results as results_io
from lifelong.config import PER_PARAMETER_STRATEGIES, ConfigError, RunConfig, dump_yaml, from_dict
from lifelong.growth import GrowthPlugin, domain_sample, grow_layer, layer_inputs
from lifelong.loggers import CSVMetricLogger, ProgressPlugin, wandb_logger
from lifelong.metrics import DomainLossMetric, ExpertUsageMetric, TrainLossMetric
from lifelong.model import LanguageModel
from lifelong.plugins import LMDistillPlugin, PeriodicCheckpointPlugin, TrainingDiverged
from lifelong.runs import load_run
from lifelong.plots import save_matrix_heatmap
from lifelong.strategies import build_strategy, load_strategy_state, strategy_state_dict
from lifelong.training import build_optimizer
from scenarios import DomainSpec, build_benchmark

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"


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


def build_model(cfg: RunConfig, vocab_size: int) -> LanguageModel:
    try:
        return LanguageModel(cfg.model, vocab_size=vocab_size, context=cfg.stream.block_len)
    except ValueError as err:  # the experts' own argument checks
        raise ConfigError(f"model: {err}") from None


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run directory; ConfigError if `run_dir` is not a run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a run configuration")
    return from_dict(values)


def _aux_metrics(model: LanguageModel):
    def collect() -> dict[str, float]:
        return {f"{name}/{key}": value for name, ffn in model.expert_layers().items()
                for key, value in ffn.aux_metrics().items()}
    return collect


@dataclass
class Progress:
    """What a run has done so far; saved in every checkpoint."""

    next_experience: int = 0
    stages: list[str] = field(default_factory=list)
    loss_rows: list[list[float]] = field(default_factory=list)
    bpb_rows: list[list[float]] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    expert_stats: list[dict] = field(default_factory=list)
    experience_steps: list[int] = field(default_factory=list)  # optimizer steps taken in each experience
    rollbacks: list[dict] = field(default_factory=list)  # restarts after a diverged loss (train.rollback)
    lr_scale: float = 1.0  # product of the rollbacks' learning-rate factors
    eval_seconds: float = 0.0
    elapsed_seconds: float = 0.0

    def as_state(self) -> dict:
        return dict(self.__dict__)


class Run:
    """The objects of one run, built from its config, with save/restore of everything that evolves."""

    def __init__(self, cfg: RunConfig, out_dir: Path, progress_bars: bool | None, echo):
        self.cfg, self.out_dir, self.echo = cfg, out_dir, echo
        self.started = time.perf_counter()
        self.main = distributed.is_main()  # under torchrun only rank 0 writes the run directory
        seed_everything(cfg.seed)
        self.device = distributed.local_device(resolve_device(cfg.train.device))
        self.bench = load_stream(cfg)
        self.domains = self.bench.domains
        self.model = build_model(cfg, self.bench.vocab_size)
        self.sharded = distributed.active() and cfg.train.parallel == "fsdp"
        if self.sharded:  # FSDP2 before the optimizer, which must hold the sharded parameters
            distributed.shard_model(self.model.to(self.device))
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        # Warm-in of grown keys and the frozen-expert guard run as hooks on this optimizer.
        if self.model.expert_layers():
            experts.attach(self.model, self.optimizer)
        self.progress = Progress()
        self.manual_growth: list[dict] = []  # growth events of `lifelong grow` on a checkpoint
        self.csv_logger = CSVMetricLogger(out_dir / METRICS_FILE) if self.main else None
        self.tb_logger = TensorboardLogger(tb_log_dir=out_dir / "tb") if self.main else None
        self.domain_loss = DomainLossMetric(self.domains, [i["bytes_per_token"] for i in self.bench.domain_info],
                                            on_stage=self._record_stage)
        self.train_loss = TrainLossMetric(every=10, aux_metrics=_aux_metrics(self.model))
        self.expert_usage = ExpertUsageMetric(self.model.expert_layers, self.domains, on_stage=self._record_usage)
        loggers = [self.csv_logger, self.tb_logger] if self.main else []
        self.wandb = (wandb_logger(cfg.log.wandb_project, out_dir, cfg.to_dict())
                      if cfg.log.wandb and self.main else None)
        if self.wandb is not None:
            loggers.append(self.wandb)
        evaluator = EvaluationPlugin(self.domain_loss, self.train_loss, self.expert_usage, loggers=loggers)
        plugins = [ProgressPlugin(self.domains, enabled=progress_bars if self.main else False)]
        self.probes = snapshots.probe_blocks(self.bench.test_stream)
        self._stage_usage: dict = {}
        if cfg.eval.curve_every:
            plugins.append(snapshots.CurvePlugin(self.model, self.probes, cfg.eval.curve_every,
                                                 loggers=[self.csv_logger, self.tb_logger] if self.main else []))
        self.growth = None
        if cfg.growth.schedule != "none" or cfg.growth.freeze != "none":
            self.growth = GrowthPlugin(cfg.growth, self.model, echo=echo)
            plugins.append(self.growth)
        self.strategy = build_strategy(cfg, self.model, self.optimizer, evaluator, self.device, plugins=plugins)
        for plugin in self.strategy.plugins:
            if isinstance(plugin, LMDistillPlugin):  # a teacher saved before growth needs a model of its size
                plugin.make_model = lambda: build_model(cfg, self.bench.vocab_size).to(self.device)
        if cfg.checkpoint.every_steps:
            # Appended last, so it saves after every other plugin has finished the iteration.
            self.strategy.plugins.append(PeriodicCheckpointPlugin(cfg.checkpoint.every_steps, self.save_inside))

    def _record_stage(self, nats: list[float], bpb: list[float]) -> None:
        self.progress.loss_rows.append(nats)
        self.progress.bpb_rows.append(bpb)

    def _record_usage(self, stats: dict, counts: dict) -> None:
        """Usage summary into the results; the raw per-head counts go into the stage snapshot."""
        self.progress.expert_stats.append(stats)
        self._stage_usage = counts

    # -- checkpoints ---------------------------------------------------------

    def save(self, position: dict | None = None) -> None:
        """Checkpoint at a stage, or inside an experience at the strategy's `position` (rank 0 writes)."""
        self.progress.elapsed_seconds += time.perf_counter() - self.started
        self.started = time.perf_counter()
        weights = optimizer = None
        if self.sharded:  # gathered by every rank, written by rank 0
            weights, optimizer = distributed.full_state(self.model, self.optimizer)
        if not self.main:
            return
        state = {
            "config": self.cfg.to_dict(),
            "progress": self.progress.as_state(),
            "position": position,
            "optimizer": self.optimizer.state_dict() if optimizer is None else optimizer,
            "optimizer_format": "fsdp" if self.sharded else "plain",
            "strategy": strategy_state_dict(self.strategy),
            "metric_counters": {"stage": self.domain_loss.stage, "train_step": self.train_loss.step,
                                "usage_stage": self.expert_usage.stage, "train_window": self.train_loss.window()},
            "metrics_csv_bytes": self.csv_logger.tell(),
            "manual_growth_events": self.manual_growth,
            "rng": checkpoint.rng_state(),
        }
        checkpoint.save(self.out_dir, self.model, state, keep=self.cfg.checkpoint.keep, weights=weights)

    def save_inside(self) -> None:
        """The periodic checkpoint inside an experience (PeriodicCheckpointPlugin)."""
        self.save(position=self.strategy.position())

    def restore(self, path: Path, state: dict) -> None:
        """Load checkpoint `path`, whose state `state` was read (and so validated) by `checkpoint.load_state`.

        A checkpoint taken inside an experience is finished by the strategy itself: its next
        `train(experience)` replays the data loader to the saved position, and only after the
        experience-start hooks have run are the plugin state, metric windows and RNG put back.
        """
        if (state.get("optimizer_format", "plain") == "fsdp") != self.sharded:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written {'with' if not self.sharded else 'without'} FSDP-sharded "
                f"parameters; resume it {'under torchrun with ' if not self.sharded else 'with '}the same "
                "train.parallel setting")
        if self.sharded:
            distributed.load_full_state(self.model, self.optimizer, checkpoint.read_weights(path), state["optimizer"])
        else:
            checkpoint.load_weights(path, self.model)
            self.model.to(self.device)
            self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.manual_growth = list(state["manual_growth_events"])
        self.domain_loss.stage = state["metric_counters"]["stage"]
        self.expert_usage.stage = state["metric_counters"]["usage_stage"]
        if self.main:
            self.csv_logger.truncate(state["metrics_csv_bytes"])  # drop rows logged after the checkpoint
        self._restore_training_state(state)
        if state.get("position") is not None:
            self.strategy.resume_point = {**state["position"], "restore": lambda: self._restore_training_state(state)}

    def _restore_training_state(self, state: dict) -> None:
        load_strategy_state(self.strategy, state["strategy"])
        self.train_loss.step = state["metric_counters"]["train_step"]
        self.train_loss.set_window(*state["metric_counters"].get("train_window", (0.0, 0)))
        checkpoint.set_rng_state(state["rng"])

    def roll_back(self, error: TrainingDiverged, before: "Progress") -> None:
        """After `restore` of the last checkpoint: lower the learning rate and record the rollback."""
        target = before.lr_scale * self.cfg.train.rollback_lr_factor
        factor = target / self.progress.lr_scale
        for group in self.optimizer.param_groups:
            group["base_lr"] *= factor
            group["lr"] *= factor
        self.progress.lr_scale = target
        # the time spent since the checkpoint, now redone, stays counted
        self.progress.elapsed_seconds = before.elapsed_seconds
        self.progress.eval_seconds = before.eval_seconds
        self.progress.rollbacks = before.rollbacks + [
            {"step": int(error.step), "experience": int(error.experience), "resumed_step": self.strategy.optimizer_steps,
             "lr_scale": target}]

    # -- the loop -------------------------------------------------------------

    def _evaluate(self, stage: str) -> None:
        t0 = time.perf_counter()
        distributed.broadcast_buffers(self.model)  # one set of BatchNorm statistics for every rank
        self.strategy.eval(self.bench.test_stream)
        self.progress.eval_seconds += time.perf_counter() - t0
        self.progress.stages.append(stage)
        self.progress.num_experts.append(self.model.num_experts())
        if self.sharded:  # gathering sharded parameters is collective: every rank takes part
            with distributed.unsharded(self.model):
                tensors = snapshots.stage_tensors(self.model, self.probes, self._stage_usage)
        elif self.main:
            tensors = snapshots.stage_tensors(self.model, self.probes, self._stage_usage)
        if self.main:
            snapshots.write(self.out_dir, len(self.progress.stages) - 1, tensors)
        self._stage_usage = {}

    def execute(self) -> dict:
        try:
            return self._execute()
        except TrainingDiverged as err:
            err.run_dir = self.out_dir  # so the message can name the last good checkpoint
            raise

    def _execute(self) -> dict:
        p = self.progress
        if not p.stages:
            self._evaluate("init")
            self.echo(f"{'init':>16}: mean test loss {np.mean(p.bpb_rows[-1]):.3f} bpb")
            self.save()
        experiences = list(self.bench.train_stream)
        if self.cfg.strategy.name == "joint":
            # The upper bound: one model trained on the union of every domain, evaluated once.
            if p.next_experience == 0:
                self.strategy.train(self.bench.train_stream)
                p.experience_steps.append(self.strategy.optimizer_steps - sum(p.experience_steps))
                self._evaluate("after:joint")
                p.next_experience = len(experiences)
                self.echo(f"{'after:joint':>16}: mean {np.mean(p.bpb_rows[-1]):.3f} bpb")
                self.save()
        for experience in experiences[p.next_experience:]:
            self.strategy.train(experience)
            p.experience_steps.append(self.strategy.optimizer_steps - sum(p.experience_steps))
            self._evaluate(f"after:{experience.domain}")
            p.next_experience += 1
            own = p.bpb_rows[-1][experience.current_experience]
            self.echo(f"{p.stages[-1]:>16}: {experience.domain} {own:.3f} bpb, mean {np.mean(p.bpb_rows[-1]):.3f} bpb")
            self.save()
        return self.finish()

    def close(self) -> None:
        """Close the loggers (the run directory keeps what they wrote)."""
        if self.main:
            self.csv_logger.close()
            self.tb_logger.writer.flush()
            self.tb_logger.writer.close()
        if self.wandb is not None:
            self.wandb.close()

    def finish(self) -> dict:
        self.close()
        p = self.progress
        p.elapsed_seconds += time.perf_counter() - self.started
        self.started = time.perf_counter()
        flops = self.model.flops_per_token()
        res = results_io.assemble(
            self.domains, p.stages, p.loss_rows, p.bpb_rows, p.num_experts,
            # Whether a domain came from the cache says nothing about the results: leave it out.
            domain_info=[{k: v for k, v in info.items() if k not in ("cache_file", "cached")}
                         for info in self.bench.domain_info],
            experience_steps=p.experience_steps,
            rollbacks=p.rollbacks,
            experts=_per_layer(p.expert_stats),
            growth_events=sorted(self.manual_growth + (self.growth.events if self.growth else []),
                                 key=lambda e: (e["step"], e["layer"])),
            freeze_events=self.growth.frozen_events if self.growth else [],
            flops_per_token=int(sum(flops.values())),
            params=self.model.param_counts(),
            config=self.cfg.to_dict(),
        )
        # Timing and machine facts vary between identical runs, so they live beside results.json,
        # which stays bit-identical for the same seed on the same machine.
        info = {"wall_time_s": round(p.elapsed_seconds, 2), "eval_time_s": round(p.eval_seconds, 2),
                "python": platform.python_version(), "torch": torch.__version__,
                "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(), "device": str(self.device),
                "world_size": distributed.world_size()}
        if self.main:
            results_io.write_json_atomic(self.out_dir / results_io.RUN_INFO_FILE, info)
            results_io.write_json_atomic(self.out_dir / results_io.RESULTS_FILE, res)
            save_matrix_heatmap(res, self.out_dir / "bpb_matrix.png")
        distributed.barrier()  # the run directory is complete before any rank returns
        return {**res, "run_info": info}


def _per_layer(stats_per_stage: list[dict]) -> dict:
    """[stage]{layer}{key: value} -> {layer}{key: [value per stage]}."""
    out: dict = {}
    for stats in stats_per_stage:
        for layer, values in stats.items():
            for key, value in values.items():
                out.setdefault(layer, {}).setdefault(key, []).append(value)
    return out


def run(cfg: RunConfig, out_dir: str | Path, progress: bool | None = None, echo=print) -> dict:
    """Train and evaluate over the whole stream; write the run directory; return results.json's content."""
    out_dir = Path(out_dir)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
    distributed.barrier()
    session = Run(cfg, out_dir, progress, echo)
    _describe(session, echo)
    return _execute(session, progress, echo)


def resume(run_dir: str | Path, progress: bool | None = None, echo=print) -> dict:
    """Continue a run from its newest complete checkpoint; identical results to an uninterrupted run."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    path = checkpoint.latest(run_dir)
    if path is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint to resume from")
    # Validate before building anything, so a bad checkpoint leaves the run directory untouched.
    state = checkpoint.load_state(path)
    if state.get("config") != cfg.to_dict():
        raise checkpoint.CheckpointError(f"checkpoint {path} was written by a different configuration "
                                         f"than {run_dir / CONFIG_FILE}")
    session = Run(cfg, run_dir, progress, echo)
    session.restore(path, state)
    inside = state.get("position")
    echo(f"resuming from {path.name}: {len(session.progress.stages)} stages done "
         f"({', '.join(session.progress.stages)})"
         + (f", then step {state['strategy']['optimizer_steps']} inside the next experience" if inside else ""))
    return _execute(session, progress, echo)


def _execute(session: Run, progress: bool | None, echo) -> dict:
    """Run `session` to the end; on a diverged loss roll back to the last checkpoint with a
    lower learning rate, at most `train.rollback` times over the run."""
    while True:
        try:
            return session.execute()
        except TrainingDiverged as err:
            if len(session.progress.rollbacks) >= session.cfg.train.rollback:
                raise
            diverged = err  # outside the except block, so its traceback (and the old session) can go
        session = _roll_back(session, diverged, progress, echo)


def _roll_back(old: Run, err: TrainingDiverged, progress: bool | None, echo) -> Run:
    """A fresh session on the last checkpoint of `old`, with a lower learning rate; `old` is
    closed and released first (its model, optimizer and activations would double the memory)."""
    before, cfg, out_dir = old.progress, old.cfg, old.out_dir
    before.elapsed_seconds += time.perf_counter() - old.started  # the failed attempt's time counts too
    old.close()
    err.__traceback__ = None
    del old
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    path = checkpoint.latest(out_dir)
    state = checkpoint.load_state(path)
    session = Run(cfg, out_dir, progress, echo)
    session.restore(path, state)
    session.roll_back(err, before)
    echo(f"{err}; rolling back to {path.name} with learning rate x{session.progress.lr_scale:g} "
         f"(rollback {len(session.progress.rollbacks)} of {cfg.train.rollback})")
    return session


def _describe(session: Run, echo) -> None:
    info = session.bench.domain_info
    sizes = [f"{d} ({i['train_tokens']:,} train / {i['test_tokens']:,} test tokens)"
             for d, i in zip(session.domains, info)]
    echo(f"stream: {', '.join(sizes)}")
    params, flops = session.model.param_counts(), session.model.flops_per_token()
    echo(f"model: {params['total']:,} parameters ({params['active_per_token']:,} active per token), "
         f"{sum(flops.values()) / 1e6:.2f} MFLOPs per token, {session.model.num_experts():,} experts, "
         f"device {session.device}")


def _checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder given either itself or the run directory holding it."""
    path = Path(path)
    if (path / checkpoint.STATE_FILE).is_file():
        return path
    if (path / CONFIG_FILE).is_file():
        latest = checkpoint.latest(path)
        if latest is None:
            raise ConfigError(f"{path} has no complete checkpoint")
        return latest
    raise ConfigError(f"{path} is neither a run directory nor a checkpoint folder")


def grow_checkpoint(path: str | Path, experts_per_layer: int, warmup_steps: int = 100, init: str = "random",
                    layers: list[str] | None = None, echo=print) -> Path:
    """Grow the expert layers of a saved checkpoint; write a new checkpoint that `resume` continues.

    The optimizer state goes through the same surgery as growth during training (old moments
    kept, new rows zero), and the output change on the next domain's blocks is measured and
    recorded with the event, as for growth during a run.
    """
    folder = _checkpoint_folder(path)
    run_dir = folder.parent.parent
    cfg = read_run_config(run_dir)
    state = checkpoint.load_state(folder)
    if state.get("optimizer_format", "plain") != "plain":
        raise ConfigError(f"{folder} was written with FSDP-sharded parameters, whose growth is not supported")
    bench = load_stream(cfg)
    model = build_model(cfg, bench.vocab_size)
    checkpoint.load_weights(folder, model)
    available = model.expert_layers()
    if not available:
        raise ConfigError(f"{run_dir}: growth needs PEER or MoE layers, but this model has none "
                          f"(model.ffn is {cfg.model.ffn!r})")
    unknown = sorted(set(layers or []) - set(available))
    if unknown:
        raise ConfigError(f"no expert layer {unknown[0]!r} (layers: {', '.join(available)})")
    if cfg.strategy.name in PER_PARAMETER_STRATEGIES:
        raise ConfigError(f"{run_dir}: strategy {cfg.strategy.name!r} keeps per-parameter importances "
                          "that do not follow a growing expert table")
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(state["optimizer"])
    # Place keys (and measure the output change) on the domain that training continues with.
    progress = Progress(**state["progress"])
    experience = bench.train_stream[min(progress.next_experience, len(bench.domains) - 1)]
    inputs = layer_inputs(model, domain_sample(experience.dataset))
    events = list(state["manual_growth_events"])
    for name in layers or list(available):
        layer = available[name]
        old = layer.num_experts
        layer_init = init if isinstance(layer, experts.PEER) else "random"
        ids, change = grow_layer(layer, experts_per_layer, optimizer, warmup_steps, layer_init, inputs[name])
        events.append({"step": int(state["strategy"]["optimizer_steps"]), "experience": progress.next_experience,
                       "domain": experience.domain, "layer": name, "reason": "checkpoint", "init": layer_init,
                       "added": int(ids.numel()), "num_experts": layer.num_experts, "output_change": change})
        echo(f"grew {name}: {old:,} -> {layer.num_experts:,} experts, output change {change:.2e}")
    state.update(optimizer=optimizer.state_dict(), manual_growth_events=events)
    state.pop("format")
    new = checkpoint.save(run_dir, model, state, keep=cfg.checkpoint.keep + 1)
    if progress.next_experience >= len(bench.domains):
        echo("note: this run had finished; resuming it evaluates nothing new")
    return new


SEEDS_FILE = "seeds.json"


def _mean_std(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            "values": values}


def aggregate_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """results.json of a multi-seed run: matrices averaged over seeds, every figure recomputed from
    the mean matrices, plus `over_seeds`: mean, sample std and per-seed values of every summary figure."""
    first = per_seed[0]
    mean = lambda key: np.mean([r[key] for r in per_seed], axis=0).tolist()  # noqa: E731
    res = results_io.assemble(first["domains"], first["stages"], mean("loss_matrix"), mean("bpb_matrix"),
                              first["num_experts"], domain_info=first["domain_info"],
                              flops_per_token=first["flops_per_token"], params=first["params"],
                              config=first["config"])
    over: dict = {}
    for prefix, pick in (("", lambda r: r), ("bpb_", lambda r: r["bpb_summary"])):
        for key in ("final_average", "plasticity", "bwt", "fwt"):
            over[prefix + key] = _mean_std([pick(r)[key] for r in per_seed])
        for domain in first["forgetting"]:
            over[f"{prefix}forgetting/{domain}"] = _mean_std([pick(r)["forgetting"][domain] for r in per_seed])
    res.update(seeds=seeds, runs=[f"seed-{s}" for s in seeds], over_seeds=over)
    return res


def _finished(run_dir: Path) -> dict:
    """A finished run's results.json, with its run_info.json under "run_info" as `run` returns it."""
    finished = load_run(run_dir)
    return {**finished.results, "run_info": finished.run_info}


def run_seeds(cfg: RunConfig, seeds: list[int], out_dir: str | Path, progress: bool | None = None,
              echo=print, resuming: bool = False) -> dict:
    """One run per seed in `out_dir/seed-N/`, then the aggregate results.json in `out_dir`.

    When `resuming`, finished seeds are read back, interrupted ones resumed, missing ones started.
    """
    out_dir = Path(out_dir)
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if main and not resuming:
        (out_dir / CONFIG_FILE).write_text(dump_yaml(cfg))
        results_io.write_json_atomic(out_dir / SEEDS_FILE, {"seeds": seeds})
    per_seed = []
    for seed in seeds:
        seed_dir = out_dir / f"seed-{seed}"
        echo(f"--- seed {seed} ({seed_dir})")
        if resuming and (seed_dir / results_io.RESULTS_FILE).is_file():
            per_seed.append(_finished(seed_dir))
        elif resuming and checkpoint.latest(seed_dir) is not None:
            per_seed.append(resume(seed_dir, progress=progress, echo=echo))
        else:
            per_seed.append(run(dataclasses.replace(cfg, seed=seed), seed_dir, progress=progress, echo=echo))
    res = aggregate_seeds(per_seed, seeds)
    info = {key: round(sum(r["run_info"].get(key, 0.0) for r in per_seed), 2)
            for key in ("wall_time_s", "eval_time_s")}
    if main:
        results_io.write_json_atomic(out_dir / results_io.RESULTS_FILE, res)
        save_matrix_heatmap(res, out_dir / "bpb_matrix.png")
        results_io.write_json_atomic(out_dir / results_io.RUN_INFO_FILE, info)
    distributed.barrier()
    return {**res, "run_info": info}
