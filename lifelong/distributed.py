"""Data-parallel runs under `torchrun`: process group, batch sharding, collective agreement.

`torchrun --nproc_per_node=N -m lifelong.cli run ...` starts N processes with RANK / WORLD_SIZE
in their environment; `init_from_env` joins them into one process group (NCCL on CUDA, gloo on
the CPU). Every rank builds the same stream, model and optimizer from the same seed, draws the
same data order, and takes its own contiguous slice of every micro-batch (`shard`); the
LM template wraps the model in DistributedDataParallel, so each optimizer step sees the
gradient of the whole global batch, as a single process would. Evaluation is sharded the same
way and its sums all-reduced, so the loss matrix is the single-process one up to the order of
float additions. Only rank 0 writes the run directory.

Without torchrun (or with WORLD_SIZE=1) every function here is a no-op on one process.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> bool:
    """Join the torchrun process group (once); returns whether the run is distributed."""
    if not launched():
        return False
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _avalanche_single_process()
    return active()


def _avalanche_single_process() -> None:
    """Keep Avalanche's loaders from sharding on their own.

    Avalanche 0.6 gives every loader a DistributedSampler once a process group exists
    (`DistributedHelper.is_distributed` is `torch.distributed.is_initialized()`): each rank would
    shuffle its own shard with its own seed, and evaluation would pad shards with repeated
    blocks. We shard every global micro-batch ourselves (`shard`), which keeps the data order
    of a single process and evaluates each block once, so Avalanche is told it runs alone.
    """
    from avalanche.distributed import DistributedHelper

    type(DistributedHelper).is_distributed = property(lambda self: False)


def local_device(device: torch.device) -> torch.device:
    """This rank's CUDA device under torchrun (LOCAL_RANK), `device` otherwise."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's contiguous slice [start, end) of a global micro-batch of n items."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


def shard(batch: list) -> list:
    """This rank's slice of every tensor of a micro-batch (items along dim 0)."""
    if not active():
        return batch
    start, end = shard_bounds(len(batch[0]))
    return [t[start:end] if torch.is_tensor(t) and t.dim() > 0 else t for t in batch]


def _collective(tensor: torch.Tensor, op) -> None:
    """Run `op` on `tensor` in place, through a CUDA copy where NCCL cannot take a CPU tensor and
    through int8 for bool tensors, which not every backend reduces."""
    work = tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    if work.dtype == torch.bool:
        work = work.to(torch.int8)
    op(work)
    if work is not tensor:
        tensor.copy_(work)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (float64 sums stay float64)."""
    if active():
        _collective(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def agree_any(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is true on any rank (one decision for all: grow, stop)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    _collective(value, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(value.item())


def from_main(flag: bool) -> bool:
    """Rank 0's decision, on every rank (a choice made from rank-local data, e.g. a growth trigger:
    rank 0's state is also what a checkpoint saves, so a resumed run decides the same)."""
    if not active():
        return flag
    value = [bool(flag)]
    dist.broadcast_object_list(value, src=0)
    return bool(value[0])


def check_same(tensor: torch.Tensor, what: str) -> None:
    """Raise if `tensor` differs between ranks (a cheap guard on state that must be replicated)."""
    if not active():
        return
    digest = int.from_bytes(hashlib.sha256(tensor.detach().cpu().numpy().tobytes()).digest()[:7], "little")
    low, high = torch.tensor([digest]), torch.tensor([digest])
    _collective(low, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    _collective(high, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    if low.item() != high.item():
        raise RuntimeError(f"{what} differs between ranks: the ranks would train on different data")


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every buffer (BatchNorm running statistics, ...) equal to rank `src`'s: each rank
    updated them from its own shard, and evaluation and checkpoints must see one set."""
    if not active():
        return
    for tensor in module.buffers():
        _collective(tensor.data, lambda t: dist.broadcast(t, src=src))


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every parameter and buffer of `module` equal to rank `src`'s (after growth or freezing,
    whose inputs, e.g. recently recorded tokens, are rank-local)."""
    if not active():
        return
    for tensor in module.parameters():
        _collective(tensor.data, lambda t: dist.broadcast(t, src=src))
    broadcast_buffers(module, src)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group while the interpreter is fully alive.

    destroy_process_group only drops c10d's own references: a DistributedDataParallel wrapper that
    still exists (often in a reference cycle of a finished strategy) keeps the gloo backend and its
    worker threads alive into interpreter finalization, where such threads can abort the process
    (torch's c10d notes a worker needing the GIL there); we saw "terminate called without an active
    exception" (SIGABRT) at the end of 2 of about 200 two-process runs. Callers drop their references to
    the run first; the collection here frees what cycles still hold, so that destroying the group
    joins its threads (5 native threads -> 2 at the end of `lifelong run` under torchrun).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ---- FSDP2: sharded parameters (train.parallel = "fsdp") ---------------------------------------


def shard_model(model: torch.nn.Module) -> None:
    """Shard `model` over the ranks with FSDP2: every transformer block is one unit (its
    parameters, expert tables included, gathered for its forward and backward only), the
    embeddings and head form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU (collective: every rank calls it);
    the optimizer's is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    fresh = not optimizer.state
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fresh:  # get_state_dict fills an empty optimizer state with a zero step (Adam's step count 1): undo
        optimizer.state.clear()
        optim_state["state"] = {}
    return model_state, optim_state


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict) -> None:
    """Load `full_state` dicts (read by every rank) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
    if not optim_state["state"]:  # saved before the first step: drop the zero step set_state_dict takes
        optimizer.state.clear()


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather every FSDP unit's parameters for a block that calls submodules outside the model's
    forward (e.g. a PEER layer's `route` in the stage snapshots); reshard after (collective)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if active() else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # or a forward inside would reshard
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP2's default: every unit reshards after its forward except the root
            unit.set_reshard_after_forward(unit is not model, recurse=False)
