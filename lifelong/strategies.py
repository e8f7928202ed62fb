"""Avalanche strategies wired for language modelling.

Every strategy is one `LMTemplate` (a `SupervisedTemplate`) plus Avalanche plugins:

    naive       no plugin
    replay      ReplayPlugin + ExperienceBalancedBuffer (class-free: it never reads targets)
    ewc         EWCPlugin (mode separate | online with decay)
    si          LMSynapticIntelligencePlugin (Avalanche's, with real weight snapshots on the CPU)
    mas         MASPlugin
    agem        AGEMPlugin
    cumulative  CumulativePlugin (union of the experiences seen so far)
    joint       LMTemplate(joint=True): one pass over the union of the stream given to train()
    distill     LMDistillPlugin (token-level LwF)

Avalanche assumes classification in places we cover here: the criterion gets `[B, T, V]`
logits against `[B, T]` targets (`LMCriterion` flattens them; EWC and A-GEM call it directly),
and the default evaluator computes accuracy with `max(dim=1)` (so an own `EvaluationPlugin`
is always passed in). The Avalanche plugins run unchanged on our data; what they do with LM
logits was checked against their source (Avalanche 0.6.0):

- EWC: squared gradients of the criterion per micro-batch (the empirical Fisher), model in eval
  mode; the `batch[-1]` it reads as task label is the target tensor, ignored by a model that is
  not a `MultiTaskModule`.
- SI: path integral of gradient x update, read after every training iteration. Avalanche's
  weight snapshots are views of the parameters on the CPU, which silently zeroes SI there;
  `LMSynapticIntelligencePlugin` clones them (see its docstring). With gradient
  accumulation the updates in between are zero and the step's update meets the whole
  accumulated gradient, so it still integrates per optimizer step. It copies every parameter to
  the CPU twice per iteration: slow for large expert tables.
- MAS: |gradient| of `torch.norm(out, dim=1) ** 2` averaged over batches, which for `[B, T, V]`
  logits is T / V times the per-token squared L2 norm of the logits (a constant that
  `mas_lambda` absorbs); its importance pass runs the model in train mode, so BatchNorm
  query-norm running statistics see the experience once more.
- A-GEM: zeroes the gradients before every iteration to compute its reference gradient, which
  is why it refuses `grad_accum > 1`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict

import torch
import torch.nn as nn
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.training.plugins import AGEMPlugin, EWCPlugin, MASPlugin, ReplayPlugin, SynapticIntelligencePlugin
from avalanche.training.plugins.clock import Clock
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.base import _experiences_parameter_as_iterable
from avalanche.training.utils import ParamData
from torch.utils.data import DataLoader, TensorDataset

from experts import MoE
from lifelong import distributed
from lifelong.config import ConfigError, RunConfig
from lifelong.plugins import (
    CumulativePlugin,
    FiniteLossPlugin,
    GradClipPlugin,
    LMDistillPlugin,
    LMSynapticIntelligencePlugin,
    WarmupCosinePlugin,
    steps_per_experience,
)
# The training-step pieces without Avalanche live in lifelong.training; re-exported here for callers
# that import them from lifelong.strategies.
from lifelong.training import LMCriterion, adamw_impl, autocast_dtype, build_optimizer, param_groups  # noqa: F401

STATE_FORMAT = 1


class LMTemplate(SupervisedTemplate):
    """SupervisedTemplate for next-token prediction with gradient accumulation and bf16 autocast.

    Gradient accumulation: the train loader yields micro-batches of `train_mb_size` blocks;
    groups of `grad_accum` of them make one optimizer step. Every micro-batch still fires the
    usual iteration callbacks (forward, backward, `strategy.loss` unscaled for logging); the
    optimizer callbacks (`before_update` / `after_update`) fire once per group, after its last
    micro-batch, and gradients are zeroed before its first. Each micro-batch's loss is scaled by
    its share of the group's blocks before backward (1 / grad_accum for full groups), so the
    step sees the mean gradient of the group, plugin penalties included once; the last, partial
    group of an epoch is stepped too. `is_update_step` tells plugins whether the current
    iteration ends with a step, `optimizer_steps` counts them.

    Mixed precision: the forward pass (training, evaluation, distillation teacher) runs under
    `autocast()` (see `autocast_dtype`); the criterion is float32. bf16 needs no loss scaling.

    Joint training (`joint=True`): `train(stream)` trains once, as a single experience, on the
    concatenation of every experience given (Avalanche's JointTraining; callbacks see the first
    experience as `strategy.experience`).

    Data order and resuming mid-experience: the train loader's shuffling draws from its own
    torch RNG stream, forked from the global one at the start of every epoch; the global RNG
    continues from the data stream's state when the epoch ends. So the data order depends only
    on that fork point and on how many micro-batches were taken, whatever random numbers the
    training steps draw in between (dropout). `position()` names the point reached (epoch,
    micro-batches taken, the fork state); a strategy given a `resume_point` (that position plus
    a `restore` callable) replays the loader to it on its next `train(experience)` without
    training on the skipped micro-batches, then calls `restore()` once every experience-start
    hook has run, so saved plugin state wins over what those hooks reset.

    Data parallel (under torchrun, `lifelong.distributed`): every rank draws the same global
    micro-batches and keeps its own slice of each (training and evaluation); training forwards
    go through a DistributedDataParallel wrapper of the model (rebuilt when growth changes the
    parameters' shapes; its construction broadcasts rank 0's weights), gradients are all-reduced
    only on the last micro-batch of a group, and each rank's loss is scaled by its share of the
    group's blocks times the world size, so the averaged gradient is the global batch's mean.
    `strategy.model` stays the plain module: plugins never see the wrapper.

    The optimizer is never touched by Avalanche: `make_optimizer` keeps it as built. Avalanche's
    `update_optimizer` would wipe its state on the first experience (a resumed run would lose
    its Adam moments) and file parameters it did not know into group 0; growth keeps parameter
    identity and does its own optimizer surgery (experts/growth.py).
    """

    def __init__(self, *, grad_accum: int = 1, precision: str = "fp32", joint: bool = False, **kwargs):
        super().__init__(**kwargs)
        if grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {grad_accum}")
        self.grad_accum = grad_accum
        self.precision_dtype = autocast_dtype(precision, self.device)
        self.joint = joint
        self.is_update_step = False
        self.optimizer_steps = 0
        self._loss_scale = 1.0
        self._joint_datasets: list | None = None
        self.resume_point: dict | None = None
        self._ddp = None
        self._ddp_shapes: tuple = ()
        self.epoch_index = 0
        self.epoch_micro_batches = 0
        self._epoch_data_rng: torch.Tensor | None = None
        self._data_rng: torch.Tensor | None = None

    # ---- mixed precision -------------------------------------------------------------------
    def autocast(self):
        if self.precision_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.precision_dtype)

    def forward(self):
        model = self.model
        if self.is_training and distributed.active():
            if distributed.is_sharded(model):  # FSDP2: reduce-scatter gradients on update steps only
                model.set_requires_gradient_sync(self.is_update_step)
            else:
                model = self._ddp_model()
        with self.autocast():
            return model(self.mb_x)

    # ---- data parallel ---------------------------------------------------------------------
    def _ddp_model(self):
        """The DDP wrapper of `self.model`, rebuilt after growth; syncs gradients on update steps only."""
        from torch.nn.parallel import DistributedDataParallel

        shapes = tuple((id(p), tuple(p.shape)) for p in self.model.parameters())
        if self._ddp is None or shapes != self._ddp_shapes:
            cuda = self.device.type == "cuda"
            moe = any(isinstance(m, MoE) for m in self.model.modules())  # unrouted experts get no gradient
            self._ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None,
                                                find_unused_parameters=moe)
            self._ddp_shapes = shapes
        self._ddp.require_backward_grad_sync = self.is_update_step
        return self._ddp

    def _unpack_minibatch(self):
        self._shard_empty = False
        if distributed.active():
            local = distributed.shard(list(self.mbatch))
            # A rank whose training slice is empty (a last micro-batch smaller than the world)
            # still runs the whole micro-batch with a zero loss scale, so every rank joins the
            # gradient all-reduce; an empty evaluation slice stays empty.
            self._shard_empty = self.is_training and len(local[0]) == 0
            self.mbatch = self.mbatch if self._shard_empty else local
        super()._unpack_minibatch()

    def criterion(self):
        loss = self._criterion(self.mb_output, self.mb_y)
        aux_loss = getattr(self.model, "aux_loss", None)
        if self.is_training and aux_loss is not None:
            loss = loss + aux_loss()
        return loss

    # ---- gradient accumulation -------------------------------------------------------------
    def backward(self):
        (self.loss * self._loss_scale).backward(retain_graph=self.retain_graph)

    # ---- data order on its own RNG stream; positions for mid-experience checkpoints ----------
    @contextlib.contextmanager
    def _data_rng_stream(self):
        """Run a block (loader creation, fetching a micro-batch) on the data RNG stream."""
        train_state = torch.get_rng_state()
        torch.set_rng_state(self._data_rng)
        try:
            yield
        finally:
            self._data_rng = torch.get_rng_state()
            torch.set_rng_state(train_state)

    def position(self) -> dict:
        """Where training stands inside the current experience (see the class docstring)."""
        return {"epoch": self.epoch_index, "micro_batches": self.epoch_micro_batches,
                "data_rng_start": self._epoch_data_rng.clone(), "data_rng_now": self._data_rng.clone()}

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        first = int(self.resume_point["epoch"]) if self.resume_point is not None else 0
        for self.epoch_index in range(first, self.train_epochs):
            self._before_training_epoch(**kwargs)
            if self._stop_training:  # early stopping, as in Avalanche's loop
                self._stop_training = False
                break
            self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)

    def _open_epoch(self):
        """The epoch's micro-batch iterator, replayed to the resume point if there is one."""
        point, self.resume_point = self.resume_point, None
        self._epoch_data_rng = torch.get_rng_state() if point is None else point["data_rng_start"].clone()
        self._data_rng = self._epoch_data_rng.clone()
        distributed.check_same(self._epoch_data_rng, "the data-order RNG")
        if point is None:
            # The steps' own draws (dropout, A-GEM's memory sampler) get a stream of their own,
            # seeded from the fork point but distinct from the data stream.
            torch.manual_seed(int.from_bytes(hashlib.sha256(b"train" + self._epoch_data_rng.numpy().tobytes())
                                             .digest()[:8], "little") >> 1)
        self.epoch_micro_batches = 0
        with self._data_rng_stream():
            batches = iter(self.dataloader)
            if point is not None:
                for _ in range(int(point["micro_batches"])):
                    next(batches)
                self.epoch_micro_batches = int(point["micro_batches"])
        if point is not None:
            if not torch.equal(self._data_rng, point["data_rng_now"]):
                raise RuntimeError("cannot replay the data loader to the checkpoint's position: its random "
                                   "draws differ from the interrupted run's")
            point["restore"]()
        return batches

    def _next_micro_batch(self, batches):
        with self._data_rng_stream():
            mbatch = next(batches, None)
        if mbatch is not None:
            self.epoch_micro_batches += 1
        return mbatch

    def training_epoch(self, **kwargs):
        batches = self._open_epoch()
        try:
            self._training_groups(batches, **kwargs)
        finally:
            torch.set_rng_state(self._data_rng)  # the global stream continues after the data draws

    def _training_groups(self, batches, **kwargs):
        while not self._stop_training:
            group = []
            while len(group) < self.grad_accum:
                mbatch = self._next_micro_batch(batches)
                if mbatch is None:
                    break
                group.append(mbatch)
            if not group:
                return
            blocks = sum(len(mbatch[0]) for mbatch in group)
            for position, self.mbatch in enumerate(group):
                self._unpack_minibatch()
                self._before_training_iteration(**kwargs)
                if position == 0:
                    self.optimizer.zero_grad()
                self.is_update_step = position == len(group) - 1
                local = 0 if self._shard_empty else len(self.mb_x)
                self._loss_scale = distributed.world_size() * local / blocks
                self.loss = self._make_empty_loss()

                self._before_forward(**kwargs)
                self.mb_output = self.forward()
                self._after_forward(**kwargs)

                self.loss += self.criterion()
                self._before_backward(**kwargs)
                self.backward()
                self._after_backward(**kwargs)

                if self.is_update_step:
                    self._before_update(**kwargs)
                    self.optimizer_step()
                    self.optimizer_steps += 1
                    self._after_update(**kwargs)
                self._after_training_iteration(**kwargs)

    # ---- optimizer: built once by build_optimizer, never reset -----------------------------
    def make_optimizer(self, **kwargs):
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in optimized]
        if missing:
            raise RuntimeError(f"trainable parameters missing from the optimizer: {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}; rebuild it with build_optimizer")

    # ---- joint training --------------------------------------------------------------------
    def train(self, experiences, eval_streams=None, **kwargs):
        if not self.joint:
            return super().train(experiences, eval_streams, **kwargs)
        experiences = list(_experiences_parameter_as_iterable(experiences))
        self._joint_datasets = [exp.dataset for exp in experiences]
        try:
            return super().train(experiences[:1], eval_streams if eval_streams is not None else [experiences[:1]],
                                 **kwargs)
        finally:
            self._joint_datasets = None

    def train_dataset_adaptation(self, **kwargs):
        if self._joint_datasets is None:
            return super().train_dataset_adaptation(**kwargs)
        self.adapted_dataset = concat_datasets(self._joint_datasets).train()


# ---------------------------------------------------------------------------------------------
# Strategies (the optimizer is built by lifelong.training.build_optimizer)


def is_joint(cfg: RunConfig) -> bool:
    """Joint training is trained once: call `strategy.train(bench.train_stream)` (not per experience)."""
    return cfg.strategy.name == "joint"


def replay_sizes(cfg: RunConfig) -> tuple[int, int]:
    """(memory size in blocks, replayed blocks per micro-batch).

    The memory holds buffer_tokens // block_len blocks. Each optimizer step replays
    round(batch_ratio * batch_size) blocks, spread over its grad_accum micro-batches (at least
    one per micro-batch), on top of the micro-batch's current-experience blocks.
    """
    r, t = cfg.strategy.replay, cfg.train
    return r.buffer_tokens // cfg.stream.block_len, max(1, round(r.batch_ratio * t.batch_size / t.grad_accum))


def check_strategy_config(cfg: RunConfig) -> None:
    """Combinations that cannot work, as ConfigErrors."""
    s, t = cfg.strategy, cfg.train
    if s.name == "agem" and t.grad_accum > 1:
        raise ConfigError("strategy.name=agem cannot use train.grad_accum > 1: A-GEM zeroes the gradients before "
                          "every micro-batch to compute its reference gradient (set train.grad_accum=1 and "
                          "lower train.batch_size instead)")
    if s.name == "replay" and s.replay.buffer_tokens < cfg.stream.block_len:
        raise ConfigError(f"strategy.replay.buffer_tokens ({s.replay.buffer_tokens}) holds no whole block of "
                          f"stream.block_len={cfg.stream.block_len} tokens")
    autocast_dtype(t.precision, torch.device("cpu"))


def stream_steps(cfg: RunConfig, experience_lengths: list[int]) -> int:
    """Optimizer steps over a whole stream whose train experiences hold these many blocks.

    Cumulative trains experience i on the union of the first i + 1; joint trains once on the
    union of all; every other strategy's loader length is set by the current experience alone
    (replay included). This is the `total_steps` of a schedule with `train.rewarm=false`.
    """
    if is_joint(cfg):
        return steps_per_experience(sum(experience_lengths), cfg)
    if cfg.strategy.name == "cumulative":
        return sum(steps_per_experience(sum(experience_lengths[:i + 1]), cfg) for i in range(len(experience_lengths)))
    return sum(steps_per_experience(n, cfg) for n in experience_lengths)


def _strategy_plugins(cfg: RunConfig) -> list:
    s = cfg.strategy
    if s.name == "replay":
        mem_size, mem_batch = replay_sizes(cfg)
        return [ReplayPlugin(mem_size=mem_size, batch_size_mem=mem_batch,
                             storage_policy=ExperienceBalancedBuffer(max_size=mem_size, adaptive_size=True))]
    if s.name == "ewc":
        online = s.ewc_mode == "online"
        return [EWCPlugin(s.ewc_lambda, mode=s.ewc_mode, decay_factor=s.ewc_decay if online else None)]
    if s.name == "si":
        return [LMSynapticIntelligencePlugin(si_lambda=s.si_lambda)]
    if s.name == "mas":
        return [MASPlugin(lambda_reg=s.mas_lambda)]
    if s.name == "agem":
        return [AGEMPlugin(patterns_per_experience=s.agem_patterns, sample_size=s.agem_sample_size)]
    if s.name == "cumulative":
        return [CumulativePlugin()]
    if s.name == "distill":
        return [LMDistillPlugin(weight=s.distill.weight, temperature=s.distill.temperature)]
    if s.name in ("naive", "joint"):
        return []
    raise ConfigError(f"strategy.name: unknown strategy {s.name!r}")


def build_strategy(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, evaluator,
                   device: torch.device, plugins: list | None = None, total_steps: int | None = None) -> LMTemplate:
    """The configured strategy: an `LMTemplate` with the strategy's plugins, the LR schedule and
    gradient clipping, the LM criterion and our evaluator (`eval_every=-1`: the caller evaluates).

    The train loader's micro-batch is batch_size // grad_accum blocks. With `train.rewarm=false`
    the schedule spans the whole stream: pass `total_steps` (see `stream_steps`) or leave it None
    to have it computed from the first experience's `origin_stream`. For joint training call
    `strategy.train(bench.train_stream)` once (`is_joint`).
    """
    check_strategy_config(cfg)
    t = cfg.train
    schedule_total = None
    if not t.rewarm:
        schedule_total = total_steps if total_steps is not None else (
            lambda strategy: stream_steps(cfg, [len(exp.dataset) for exp in strategy.experience.origin_stream]))
    plugins = list(plugins or []) + _strategy_plugins(cfg) + [FiniteLossPlugin()]
    plugins.append(WarmupCosinePlugin(t.warmup_steps, t.min_lr_ratio, total_steps=schedule_total))
    if t.grad_clip > 0:
        plugins.append(GradClipPlugin(t.grad_clip))
    return LMTemplate(model=model, optimizer=optimizer, criterion=LMCriterion(),
                      train_mb_size=t.batch_size // t.grad_accum, train_epochs=t.epochs,
                      eval_mb_size=t.eval_batch_size, device=device, plugins=plugins, evaluator=evaluator,
                      eval_every=-1, grad_accum=t.grad_accum, precision=t.precision, joint=is_joint(cfg))


# ---------------------------------------------------------------------------------------------
# Strategy state for checkpoints
#
# What a strategy carries across experiences beyond model and optimizer, as plain data
# (tensors, numbers, strings, lists, dicts) for torch.save / torch.load(weights_only=True).
# Memories (replay buffer, A-GEM buffers) are saved as their token blocks, so a restored run
# replays exactly the same blocks without depending on how Avalanche nested its subsets;
# regularizer state (EWC, SI, MAS) as CPU tensors keyed by parameter name; the clock because
# EWC, SI and MAS read `clock.train_exp_counter`; our own plugins through their
# `state_dict(strategy)` / `load_state_dict(strategy, state)` methods.


def _blocks(dataset) -> dict:
    """A dataset of (input_ids[T], target_ids[T]) blocks as two [N, T] tensors, in order."""
    inputs, targets = [], []
    # Its own generator: a DataLoader iterator draws a seed even unshuffled, and saving a checkpoint
    # must not move the global RNG (under torchrun only rank 0 saves; the ranks would drift apart).
    loader = DataLoader(dataset, batch_size=256, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None),
                        generator=torch.Generator())
    for x, y, *_ in loader:
        inputs.append(x)
        targets.append(y)
    if not inputs:
        return {"inputs": torch.zeros(0, 0, dtype=torch.int64), "targets": torch.zeros(0, 0, dtype=torch.int64)}
    return {"inputs": torch.cat(inputs).cpu(), "targets": torch.cat(targets).cpu()}


def _blocks_dataset(blocks: dict) -> AvalancheDataset:
    """Saved blocks as an AvalancheDataset shaped like the benchmark's (items (x, y), task label 0 attribute)."""
    inputs, targets = blocks["inputs"], blocks["targets"]
    return AvalancheDataset([TensorDataset(inputs, targets)],
                            data_attributes=[DataAttribute(ConstantSequence(0, len(inputs)), "targets_task_labels")])


def _tensors(params: dict | None) -> dict | None:
    return None if params is None else {name: pd.data.detach().cpu().clone() for name, pd in params.items()}


def _param_data(tensors: dict | None, device) -> dict | None:
    if tensors is None:
        return None
    # A copy: plugins update these in place, and a checkpoint's state may be applied twice.
    return {name: ParamData(name, init_tensor=t.to(device, copy=True), device=device) for name, t in tensors.items()}


_CLOCK_COUNTERS = ("train_iterations", "train_exp_counter", "train_exp_epochs", "train_exp_iterations",
                   "train_epoch_iterations", "total_iterations")


def _clock_state(clock: Clock) -> dict:
    return {key: int(getattr(clock, key)) for key in _CLOCK_COUNTERS}


def _save_replay(plugin: ReplayPlugin) -> dict:
    policy = plugin.storage_policy
    if not isinstance(policy, ExperienceBalancedBuffer):
        raise TypeError(f"cannot checkpoint a {type(policy).__name__} replay buffer")
    groups = [{"key": int(key), "max_size": group.max_size, "weights": group._buffer_weights.clone(),
               **_blocks(group.buffer)} for key, group in policy.buffer_groups.items()]
    return {"num_exps": policy._num_exps, "max_size": policy.max_size, "groups": groups}


def _load_replay(plugin: ReplayPlugin, state: dict, strategy) -> None:
    policy = plugin.storage_policy
    policy._num_exps, policy.max_size = int(state["num_exps"]), int(state["max_size"])
    policy.buffer_groups = {}
    for saved in state["groups"]:
        group = ReservoirSamplingBuffer(int(saved["max_size"]))
        group.buffer = _blocks_dataset(saved)
        group._buffer_weights = saved["weights"].clone()
        policy.buffer_groups[int(saved["key"])] = group


def _save_ewc(plugin: EWCPlugin) -> dict:
    return {"saved_params": {int(e): _tensors(p) for e, p in plugin.saved_params.items()},
            "importances": {int(e): _tensors(p) for e, p in plugin.importances.items()}}


def _load_ewc(plugin: EWCPlugin, state: dict, strategy) -> None:
    plugin.saved_params = defaultdict(dict, {int(e): _param_data(p, strategy.device)
                                             for e, p in state["saved_params"].items()})
    plugin.importances = defaultdict(dict, {int(e): _param_data(p, strategy.device)
                                            for e, p in state["importances"].items()})


def _save_si(plugin: SynapticIntelligencePlugin) -> dict:
    # The anchor weights, the importances, the accumulated path integral and the current
    # experience's trajectory (non-zero inside an experience). The per-iteration buffers
    # (old/new weights, gradient) are overwritten before their next use.
    return {"ewc_data": [_tensors(plugin.ewc_data[0]), _tensors(plugin.ewc_data[1])],
            "cum_trajectory": _tensors(plugin.syn_data["cum_trajectory"]),
            "trajectory": _tensors(plugin.syn_data["trajectory"])}


def _load_si(plugin: SynapticIntelligencePlugin, state: dict, strategy) -> None:
    # SI keeps its data on the CPU whatever the strategy's device.
    plugin.ewc_data = (_param_data(state["ewc_data"][0], "cpu"), _param_data(state["ewc_data"][1], "cpu"))
    cum = state["cum_trajectory"]
    plugin.syn_data = {key: _param_data({n: torch.zeros_like(t) for n, t in cum.items()}, "cpu")
                       for key in ("old_theta", "new_theta", "grad")}
    plugin.syn_data["cum_trajectory"] = _param_data(cum, "cpu")
    # (checkpoints of earlier versions, written at boundaries only, have no trajectory: zeros)
    plugin.syn_data["trajectory"] = _param_data(state.get("trajectory") or {n: torch.zeros_like(t)
                                                                           for n, t in cum.items()}, "cpu")


def _save_mas(plugin: MASPlugin) -> dict:
    return {"params": _tensors(plugin.params), "importance": _tensors(plugin.importance)}


def _load_mas(plugin: MASPlugin, state: dict, strategy) -> None:
    plugin.params = _param_data(state["params"], strategy.device)
    plugin.importance = _param_data(state["importance"], strategy.device)


def _save_agem(plugin: AGEMPlugin) -> dict:
    return {"buffers": [_blocks(buffer) for buffer in plugin.buffers]}


def _load_agem(plugin: AGEMPlugin, state: dict, strategy) -> None:
    # Rebuilt as AGEMPlugin.update_memory leaves it: a fresh, not yet started memory iterator.
    plugin.buffers = [_blocks_dataset(b) for b in state["buffers"]]
    if plugin.buffers:
        plugin.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            plugin.buffers, batch_size=plugin.sample_size // len(plugin.buffers), num_workers=0,
            pin_memory=False, persistent_workers=False)
        plugin.buffer_dliter = iter(plugin.buffer_dataloader)


def _load_clock(clock: Clock, state: dict, strategy) -> None:
    for key in _CLOCK_COUNTERS:
        setattr(clock, key, int(state[key]))


_AVALANCHE_STATE = {
    Clock: (_clock_state, _load_clock),
    ReplayPlugin: (_save_replay, _load_replay),
    EWCPlugin: (_save_ewc, _load_ewc),
    SynapticIntelligencePlugin: (_save_si, _load_si),
    MASPlugin: (_save_mas, _load_mas),
    AGEMPlugin: (_save_agem, _load_agem),
}


def _avalanche_handler(plugin):
    return next((handler for cls, handler in _AVALANCHE_STATE.items() if isinstance(plugin, cls)), None)


def _stateful_plugins(strategy) -> dict[str, object]:
    """Plugins with state, keyed by class name (two stateful plugins of one class are refused)."""
    out: dict[str, object] = {}
    for plugin in strategy.plugins:
        if _avalanche_handler(plugin) or callable(getattr(plugin, "state_dict", None)):
            key = type(plugin).__name__
            if key in out:
                raise ValueError(f"two {key} plugins: their checkpoint state would collide")
            out[key] = plugin
    return out


def _check_plain(value, where: str) -> None:
    """Fail at save time, with the path, on anything torch.load(weights_only=True) would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
        raise TypeError(f"{where}: {type(value).__name__} cannot go into a weights-only checkpoint")


def strategy_state_dict(strategy: LMTemplate) -> dict:
    """Everything `strategy` carries across experiences beyond the model and optimizer state.

    Call at an experience boundary (after `train(exp)`). The result holds only tensors (on the
    CPU), numbers, strings, lists and dicts: save it with torch.save, load it with
    torch.load(weights_only=True). It does not include RNG states: restore those separately.
    """
    plugins = {}
    for key, plugin in _stateful_plugins(strategy).items():
        handler = _avalanche_handler(plugin)
        plugins[key] = handler[0](plugin) if handler else plugin.state_dict(strategy)
    state = {"format": STATE_FORMAT, "optimizer_steps": strategy.optimizer_steps, "plugins": plugins}
    _check_plain(state, "strategy_state")
    return state


def load_strategy_state(strategy: LMTemplate, state: dict) -> None:
    """Restore `strategy_state_dict` into a freshly built strategy of the same configuration.

    Load the model's weights first (a distillation teacher equal to the model at the boundary
    is rebuilt from it) and call this before the next `train`.
    """
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"strategy state format {state.get('format')!r} is not {STATE_FORMAT}")
    plugins = _stateful_plugins(strategy)
    saved = state["plugins"]
    if set(plugins) != set(saved):
        raise ValueError(f"strategy state is for plugins {sorted(saved)}, this strategy has {sorted(plugins)}")
    for key, plugin in plugins.items():
        handler = _avalanche_handler(plugin)
        if handler:
            handler[1](plugin, saved[key], strategy)
        else:
            plugin.load_state_dict(strategy, saved[key])
    strategy.optimizer_steps = int(state["optimizer_steps"])
