"""`LMTemplate`: Avalanche's SupervisedTemplate for next-token prediction, with gradient
accumulation, bf16 autocast, joint training, data order on its own RNG stream (exact resume
inside an experience) and data parallelism. docs/strategies.md explains each mechanism.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.base import _experiences_parameter_as_iterable

from experts import MoE
from lifelong import distributed
from lifelong.training import autocast_dtype


class LMTemplate(SupervisedTemplate):
    """SupervisedTemplate for next-token prediction (docs/strategies.md, "The template").

    `grad_accum` micro-batches make one optimizer step (`is_update_step`, `optimizer_steps`);
    forwards run under `autocast()`; `joint=True` trains once on the union of the experiences
    given to `train`; the experience of domain `pretrain_domain` trains `pretrain_epochs` epochs with
    every peak learning rate times `pretrain_lr_mult`; `position()` / `resume_point` checkpoint and
    resume inside an experience; under torchrun every rank trains its slice of each micro-batch
    through a DDP wrapper. The optimizer is used as built: Avalanche never resets it.
    """

    def __init__(self, *, grad_accum: int = 1, precision: str = "fp32", joint: bool = False,
                 pretrain_domain: str | None = None, pretrain_epochs: int = 1, pretrain_lr_mult: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.grad_accum = grad_accum
        self.epochs = self.train_epochs
        self.pretrain = (pretrain_domain, pretrain_epochs, pretrain_lr_mult)
        self.lr_mult = 1.0  # the schedule scales every group's peak by this (the pretraining phase's own lr)
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

    # ---- the pretraining phase: its own epochs and peak learning rate --------------------------
    def _before_training_exp(self, **kwargs):
        domain, epochs, lr_mult = self.pretrain
        phase = domain is not None and getattr(self.experience, "domain", None) == domain
        self.train_epochs, self.lr_mult = (epochs, lr_mult) if phase else (self.epochs, 1.0)
        super()._before_training_exp(**kwargs)

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
        """The DDP wrapper of `self.model`, rebuilt after growth or a change of what trains; syncs
        gradients on update steps only."""
        from torch.nn.parallel import DistributedDataParallel

        shapes = tuple((id(p), tuple(p.shape), p.requires_grad) for p in self.model.parameters())
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
        # where this rank's blocks sit in the whole micro-batch (per-block evaluation metrics)
        self.mb_global_size = len(self.mbatch[0])
        self.mb_offset = 0
        if distributed.active():
            self.mb_offset = distributed.shard_bounds(self.mb_global_size)[0]
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
