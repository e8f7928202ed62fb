"""One lifelong run session (`RunSession`): wire the stream, model, strategy and plugins; evaluate
every stage; checkpoint; finish the run directory. `lifelong.experiment` runs and resumes sessions.

Stage 0 evaluates every domain's test split before any training; after each training experience
the whole test stream is evaluated again, and the rows of per-domain losses form the stage x
domain matrix of `results.json`. After every stage (and with `checkpoint.every_steps` every N
optimizer steps) the session writes a checkpoint, so `resume` continues in a fresh process and
ends with exactly the results of an uninterrupted run. With `train.rollback`, a run whose loss
turns NaN/Inf restarts from its last checkpoint with a lower learning rate.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin

import experts
from lifelong import checkpoint, distributed, rundir, snapshots, transfer
from lifelong import results as results_io
from lifelong.build import (build_model, build_trainable_model, check_bootstrap_memory, load_benchmark,
                            resolve_device, seed_everything)
from lifelong.checkpoint import Progress, RunState
from lifelong.config import RunConfig
from lifelong.errors import ConfigError, TrainingDiverged
from lifelong.loggers import CSVMetricLogger, wandb_logger
from lifelong.metrics import DomainLossMetric, ExpertUsageMetric, TrainLossMetric
from lifelong.plots import save_matrix_heatmap
from lifelong.plugins import CurvePlugin, GrowthPlugin, ProgressPlugin, TrainableScopePlugin
from lifelong.reference import curve_mean, scratch_references
from lifelong.scopes import ScopeManager, check_base_frozen, trainable_of
from lifelong.strategies import build_strategy, load_strategy_state, strategy_state_dict
from lifelong.training import build_optimizer


def _aux_metrics(model):
    def collect() -> dict[str, float]:
        return {f"{name}/{key}": value for name, ffn in model.expert_layers().items()
                for key, value in ffn.aux_metrics().items()}
    return collect


class RunSession:
    """The objects of one run, built from its config, with save/restore of everything that evolves.

    Everything that can refuse (config, data, model size, the checkpoint to resume: its weights,
    optimizer state and data) is built and checked before anything is written to `out_dir`;
    `before_writing()` then runs (a new run replaces an old one there), and only after it are the
    loggers opened.
    """

    def __init__(self, cfg: RunConfig, out_dir: Path, progress_bars: bool | None, echo,
                 resume_from: tuple[Path, RunState] | None = None, before_writing=None,
                 allow_changed_data: bool = False):
        self.cfg, self.out_dir, self.echo = cfg, out_dir, echo
        self.started = time.perf_counter()
        self.main = distributed.is_main()  # under torchrun only rank 0 writes the run directory
        seed_everything(cfg.seed)
        self.device = distributed.local_device(resolve_device(cfg.train.device))
        self.bench = load_benchmark(cfg)
        self.domains = self.bench.domains
        background = cfg.strategy.sparse.background
        if cfg.strategy.name == "sparse" and background not in ("earlier", *self.domains):
            raise ConfigError(f"strategy.sparse.background: {background!r} is not a domain of the stream "
                              f"({', '.join(self.domains)}) nor 'earlier'")
        self.data_hashes = self.bench.content_hashes()
        check_bootstrap_memory(cfg.eval.bootstrap_samples, sum(int(i["test_blocks"]) for i in self.bench.domain_info))
        self.model = build_trainable_model(cfg, self.bench.vocab_size, self.device)
        self.trainable = trainable_of(cfg)
        # the pretrained weights' SHA-256 as loaded (before FSDP shards them): what referencing
        # checkpoints and cached references name
        referenced = cfg.checkpoint.base_weights == "reference"
        if referenced:
            check_base_frozen(self.model, self.trainable)
        self.base_digest = (self.model.base_digest() if referenced or (cfg.model.hf and cfg.eval.reference == "scratch")
                            else None)
        self.base_weights = checkpoint.base_record(self.model, self.base_digest) if referenced else None
        self.sharded = distributed.active() and cfg.train.parallel == "fsdp"
        if self.sharded:  # FSDP2 before the optimizer, which must hold the sharded parameters
            distributed.shard_model(self.model.to(self.device))
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        # Warm-in of grown keys and the frozen-expert guard run as hooks on this optimizer.
        if self.model.expert_layers():
            experts.attach(self.model, self.optimizer)
        self.scopes = ScopeManager(self.model, self.optimizer, self.trainable)
        self.progress = Progress(data_hashes=self.data_hashes)
        self.manual_growth: list[dict] = []  # growth events of `lifelong grow` on a checkpoint
        if resume_from is not None:
            self._load_checkpoint(*resume_from, allow_changed_data=allow_changed_data)
        if before_writing is not None:
            before_writing()
        self.csv_logger = CSVMetricLogger(out_dir / rundir.METRICS_FILE) if self.main else None
        self.tb_logger = TensorboardLogger(tb_log_dir=out_dir / rundir.TB_DIR) if self.main else None
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
            plugins.append(CurvePlugin(self.model, self.probes, cfg.eval.curve_every,
                                       loggers=[self.csv_logger, self.tb_logger] if self.main else []))
        self.growth = None
        if cfg.growth.schedule != "none" or cfg.growth.freeze != "none":
            self.growth = GrowthPlugin(cfg.growth, self.model, echo=echo,
                                       loggers=[self.csv_logger, self.tb_logger] if self.main else [],
                                       on_growth=self.scopes.apply if self.trainable else None)
            plugins.append(self.growth)
        if self.trainable:  # after the growth plugin: `new_experts` names what it just added
            plugins.append(TrainableScopePlugin(self.scopes))
        self.strategy = build_strategy(
            cfg, self.model, self.optimizer, evaluator, self.device, plugins=plugins,
            # a distillation teacher saved before growth is loaded into a model of its size
            make_model=lambda: build_model(cfg, self.bench.vocab_size).to(self.device),
            save_checkpoint=self.save_inside)
        if resume_from is not None:
            self._restore_counters(resume_from[1])

    def _record_stage(self, nats: list[float], bpb: list[float], blocks: list) -> None:
        self.progress.loss_rows.append(nats)
        self.progress.bpb_rows.append(bpb)
        self.progress.block_losses.append([b.tolist() for b in blocks])

    def _growth_events(self) -> list[dict]:
        """Every growth so far (`lifelong grow`'s and the plugin's), in (step, layer) order."""
        return sorted(self.manual_growth + (self.growth.events if self.growth else []),
                      key=lambda e: (e["step"], e["layer"]))

    def _record_usage(self, stats: dict, counts: dict) -> None:
        """Usage summary (with each domain's isolation from grown experts) into the results; the raw
        per-head counts go into the stage snapshot."""
        learned = len(self.progress.stages)  # this stage's index: the domains trained so far
        if self.cfg.strategy.name == "joint" and learned:
            learned = len(self.domains)
        events = self._growth_events()
        for name, layer in self.model.expert_layers().items():
            experience_of = {g + 1: e["experience"] for g, e in enumerate(x for x in events if x["layer"] == name)}
            per_domain = np.stack([counts[name][d].sum(0).cpu().numpy() for d in self.domains])
            stats[name]["intrusion"], stats[name]["own"] = transfer.isolation_shares(
                per_domain, layer.expert_generation().cpu().numpy(), experience_of, learned)
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
        state = RunState(
            config=self.cfg.to_dict(),
            progress=self.progress.as_state(),
            position=position,
            optimizer=self.optimizer.state_dict() if optimizer is None else optimizer,
            optimizer_format="fsdp" if self.sharded else "plain",
            strategy=strategy_state_dict(self.strategy),
            metric_counters={"stage": self.domain_loss.stage, "train_step": self.train_loss.step,
                             "usage_stage": self.expert_usage.stage, "train_window": self.train_loss.window()},
            metrics_csv_bytes=self.csv_logger.tell(),
            manual_growth_events=self.manual_growth,
            rng=checkpoint.rng_state(),
            base_weights=self.base_weights,
        )
        checkpoint.save(self.out_dir, self.model, state.to_dict(), keep=self.cfg.checkpoint.keep, weights=weights)

    def save_inside(self) -> None:
        """The periodic checkpoint inside an experience (checkpoint.every_steps)."""
        self.save(position=self.strategy.position())

    def _load_checkpoint(self, path: Path, state: RunState, allow_changed_data: bool) -> None:
        """Load checkpoint `path` (its state read, so validated, by `checkpoint.load_state`) into the
        model and optimizer, refusing one that does not fit this run; nothing is written yet."""
        if (state.optimizer_format == "fsdp") != self.sharded:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written {'with' if not self.sharded else 'without'} FSDP-sharded "
                f"parameters; resume it {'under torchrun with ' if not self.sharded else 'with '}the same "
                "train.parallel setting")
        try:
            progress = Progress(**state.progress)
            self._check_data(progress, allow_changed_data)
            if self.sharded:
                distributed.load_full_state(self.model, self.optimizer, checkpoint.read_weights(path),
                                            state.optimizer)
            else:
                checkpoint.load_weights(path, self.model, state.base_weights, digest=self.base_digest)
                self.model.to(self.device)
                self.scopes.apply_saved(progress.next_experience, inside=state.position is not None)
                self.optimizer.load_state_dict(state.optimizer)
            missing = {"stage", "usage_stage", "train_step"} - set(state.metric_counters)
            if missing:
                raise KeyError(f"metric counters {sorted(missing)}")
        except (KeyError, TypeError, ValueError, IndexError) as err:
            if isinstance(err, (ConfigError, checkpoint.CheckpointError)):
                raise
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this run "
                                             f"({type(err).__name__}: {str(err)[:120]})") from None
        self.progress = progress
        self.manual_growth = list(state.manual_growth_events)

    def _check_data(self, progress: Progress, allow_changed_data: bool) -> None:
        """Refuse to continue on data that differs from what the run started with (unless allowed)."""
        before = progress.data_hashes
        changed = [d for d, old, new in zip(self.domains, before or [], self.data_hashes) if old != new]
        if before is not None and len(before) != len(self.data_hashes):
            changed = list(self.domains)
        if not changed:
            return
        if not allow_changed_data:
            raise ConfigError(f"the data of domain {', '.join(map(repr, changed))} changed since this run started "
                              "(its token blocks differ); restore it, or pass --allow-changed-data to continue "
                              "on the new data")
        self.echo(f"warning: continuing on changed data of domain {', '.join(map(repr, changed))}")
        progress.data_changes.append({"stage": len(progress.stages), "domains": changed})
        progress.data_hashes = self.data_hashes

    def _restore_counters(self, state: RunState) -> None:
        """After the loggers and strategy exist: metric counters, metrics.csv and the training state.

        A checkpoint taken inside an experience is finished by the strategy itself: its next
        `train(experience)` replays the data loader to the saved position, and only after the
        experience-start hooks have run are the plugin state, metric windows and RNG put back.
        """
        self.domain_loss.stage = state.metric_counters["stage"]
        self.expert_usage.stage = state.metric_counters["usage_stage"]
        if self.main:
            self.csv_logger.truncate(state.metrics_csv_bytes)  # drop rows logged after the checkpoint
        self._restore_training_state(state)
        if state.position is not None:
            self.strategy.resume_point = {**state.position, "restore": lambda: self._restore_training_state(state)}

    def _restore_training_state(self, state: RunState) -> None:
        load_strategy_state(self.strategy, state.strategy)
        self.train_loss.step = state.metric_counters["train_step"]
        self.train_loss.set_window(*state.metric_counters.get("train_window", (0.0, 0)))
        checkpoint.set_rng_state(state.rng)

    def roll_back(self, error: TrainingDiverged, before: Progress) -> None:
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
        blocks = dict(zip(self.domains, self.progress.block_losses[-1]))
        if self.sharded:  # gathering sharded parameters is collective: every rank takes part
            with distributed.unsharded(self.model):
                tensors = snapshots.stage_tensors(self.model, self.probes, self._stage_usage, blocks)
        elif self.main:
            tensors = snapshots.stage_tensors(self.model, self.probes, self._stage_usage, blocks)
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

    def _references(self) -> list[dict] | None:
        """Each domain's model trained alone (eval.reference: scratch), None otherwise or for joint."""
        if self.cfg.eval.reference != "scratch" or self.cfg.strategy.name == "joint":
            return None
        return scratch_references(self.cfg, self.bench, self.device, self.probes, echo=self.echo,
                                  pretrained=self.base_digest)

    def _stream_curve_means(self) -> list[float | None]:
        """Each domain's mean probe-block loss along its own experience (from metrics.csv)."""
        series = rundir.read_metrics(self.out_dir / rundir.METRICS_FILE) if self.main else {}
        ends = np.cumsum(self.progress.experience_steps).tolist()
        starts = [0] + ends[:-1]
        return [curve_mean(list(zip(*series.get(rundir.CURVE_PREFIX + d, ([], [])))), start, end)
                for d, start, end in zip(self.domains, starts, ends)]

    def finish(self) -> dict:
        self.close()
        p = self.progress
        references = self._references()
        p.elapsed_seconds += time.perf_counter() - self.started
        self.started = time.perf_counter()
        flops = self.model.flops_per_token()
        bytes_per_token = [i["bytes_per_token"] for i in self.bench.domain_info]
        transfer_inputs = {}
        if references is not None:
            transfer_inputs = dict(reference=[r["loss"] for r in references],
                                   reference_blocks=[np.asarray(r["blocks"]) for r in references],
                                   stream_curves=self._stream_curve_means(),
                                   reference_curves=[curve_mean(r["curve"], 0, r["steps"]) for r in references])
        res = results_io.assemble(
            self.domains, p.stages, p.loss_rows, p.bpb_rows, p.num_experts,
            block_losses=p.block_losses if len(p.block_losses) == len(p.stages) else None,
            bytes_per_token=bytes_per_token, bootstrap_samples=self.cfg.eval.bootstrap_samples,
            interval_level=self.cfg.eval.interval_level, **transfer_inputs,
            # Whether a domain came from the cache says nothing about the results: leave it out.
            domain_info=[{k: v for k, v in info.items() if k not in ("cache_file", "cached")}
                         for info in self.bench.domain_info],
            experience_steps=p.experience_steps,
            rollbacks=p.rollbacks,
            experts=results_io.per_layer(p.expert_stats),
            **results_io.isolation(p.expert_stats),
            growth_events=self._growth_events(),
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
        if p.data_changes:  # continued with --allow-changed-data: these results mix two versions of the data
            info["data_changes"] = p.data_changes
        if self.main:
            rundir.write_json_atomic(self.out_dir / rundir.RUN_INFO_FILE, info)
            rundir.write_json_atomic(self.out_dir / rundir.RESULTS_FILE, res)
            save_matrix_heatmap(res, self.out_dir / rundir.HEATMAP_FILE)
        distributed.barrier()  # the run directory is complete before any rank returns
        return {**res, "run_info": info}

    def describe(self) -> None:
        """Print the stream's sizes and the model's size and compute."""
        sizes = [f"{d} ({i['train_tokens']:,} train / {i['test_tokens']:,} test tokens)"
                 for d, i in zip(self.domains, self.bench.domain_info)]
        self.echo(f"stream: {', '.join(sizes)}")
        params, flops = self.model.param_counts(), self.model.flops_per_token()
        self.echo(f"model: {params['total']:,} parameters ({params['active_per_token']:,} active per token), "
                  f"{sum(flops.values()) / 1e6:.2f} MFLOPs per token, {self.model.num_experts():,} experts, "
                  f"device {self.device}")
