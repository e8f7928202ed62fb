"""Crash-safe checkpoints of a run, and the layout of the run state they hold (`RunState`).

    RUN_DIR/checkpoints/ckpt-000003/
        model.safetensors   weights and buffers (safetensors: no code can hide in it)
        state.pt            the RunState as plain data, loaded with torch.load(weights_only=True)

A checkpoint is assembled in a hidden temporary folder, fsync'ed and renamed into place (atomic
on POSIX); the previous one is deleted only afterwards, so a process killed at any moment leaves
a complete checkpoint to resume from (and at most a `.tmp-*` leftover, cleaned up later). A
`ckpt-*` entry missing a file is skipped by `latest` (with a warning), and a full disk is a
CheckpointError naming the space needed, with the previous checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from lifelong.errors import CheckpointError, ConfigError
from lifelong.rundir import CHECKPOINT_DIR, CHECKPOINT_NAME, CONFIG_FILE, MODEL_FILE, STATE_FILE, checkpoint_folders

FORMAT = "lifelong-experts/checkpoint/1"


@dataclass
class Progress:
    """What a run has done so far; saved in every checkpoint."""

    next_experience: int = 0
    stages: list[str] = field(default_factory=list)
    loss_rows: list[list[float]] = field(default_factory=list)
    bpb_rows: list[list[float]] = field(default_factory=list)
    block_losses: list[list[list[float]]] = field(default_factory=list)  # [stage][domain][test block], nats
    num_experts: list[int] = field(default_factory=list)
    expert_stats: list[dict] = field(default_factory=list)
    experience_steps: list[int] = field(default_factory=list)  # optimizer steps taken in each experience
    rollbacks: list[dict] = field(default_factory=list)  # restarts after a diverged loss (train.rollback)
    lr_scale: float = 1.0  # product of the rollbacks' learning-rate factors
    eval_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    data_hashes: list[str] | None = None  # each domain's token blocks (Stream.content_hashes) at the start
    data_changes: list[dict] = field(default_factory=list)  # resumes allowed on changed data

    def as_state(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunState:
    """Everything a run checkpoint holds besides the weights (state.pt), in plain data.

    `position` is None at a stage, or where the strategy stood inside an experience;
    `metric_counters` the metric plugins' counters (stage, train step, usage stage, train window);
    `metrics_csv_bytes` the size of metrics.csv (rows logged after it are dropped on resume);
    `manual_growth_events` the growths of `lifelong grow` on a checkpoint; `base_weights` where the
    pretrained weights left out of model.safetensors come from (checkpoint.base_weights: reference).
    """

    config: dict
    progress: dict
    optimizer: dict
    strategy: dict
    rng: dict
    metric_counters: dict
    metrics_csv_bytes: int = 0
    manual_growth_events: list = field(default_factory=list)
    position: dict | None = None
    optimizer_format: str = "plain"  # "fsdp": gathered from sharded parameters
    base_weights: dict | None = None  # a pretrained model's weights referenced, not copied (`base_record`)

    _ORDER = ("config", "progress", "position", "optimizer", "optimizer_format", "strategy", "metric_counters",
              "metrics_csv_bytes", "manual_growth_events", "rng", "base_weights")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._ORDER}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "RunState":
        """The state `load_state` read (checkpoints of earlier versions lack some keys: defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in state.items() if key in names})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors and lists (weights_only-loadable)."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(run_dir: str | Path, warn=None) -> Path | None:
    """The newest complete checkpoint folder of a run, or None. `warn(message)` hears of every
    `ckpt-*` entry skipped because it is incomplete (a stray file, a folder missing a file)."""
    complete, incomplete = checkpoint_folders(run_dir)
    if warn is not None:
        for stray in incomplete:
            warn(f"warning: skipping {stray}: not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    return complete[-1][1] if complete else None


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _full_disk(err: BaseException, root: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT from Python, or a writer (torch.save,
    safetensors) that words it its own way while the free space is below what the checkpoint needs."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, Exception) or not root.is_dir():
        return False
    return "no space left" in str(err).lower() or shutil.disk_usage(root).free < needed


def _no_space(root: Path, final: Path, needed: int, previous: Path | None) -> CheckpointError:
    free = shutil.disk_usage(root).free
    kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
    return CheckpointError(f"no space left on the device to write checkpoint {final}: it needs about "
                           f"{needed / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free; {kept}")


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder given either itself or the run directory holding it (its newest)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / CONFIG_FILE).is_file():
        newest = latest(path)
        if newest is None:
            raise ConfigError(f"{path} has no complete checkpoint")
        return newest
    raise ConfigError(f"{path} is neither a run directory nor a checkpoint folder")


def base_record(model: torch.nn.Module, digest: str) -> dict[str, Any]:
    """What identifies a pretrained model's weights (lifelong.pretrained.PretrainedLM): its name,
    revision (when it came from the Hugging Face cache) and `digest`, its `base_digest()`."""
    return {**model.source, "sha256": digest, "tensors": len(model.base_names())}


def save(run_dir: str | Path, model: torch.nn.Module, state: dict[str, Any], keep: int = 1,
         weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a new checkpoint atomically; keep the `keep` newest complete ones.

    `state` must hold only tensors, numbers, strings, None, lists, tuples and dicts. `weights`: the
    model's full state dict when `model` itself cannot give it (FSDP-sharded parameters). A state
    with `base_weights` (a `base_record`) leaves the pretrained weights out of model.safetensors.
    """
    if state.get("base_weights"):
        base = set(model.base_names())
        weights = {k: v for k, v in (model.state_dict() if weights is None else weights).items() if k not in base}
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):  # from a process killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    complete, incomplete = checkpoint_folders(run_dir)
    # numbered past stray ckpt-* entries too, so the rename never lands on one
    numbers = [n for n, _ in complete] + [int(CHECKPOINT_NAME.match(p.name).group(1)) for p in incomplete]
    number = max(numbers) + 1 if numbers else 0
    final = root / f"ckpt-{number:06d}"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        if weights is None:
            save_model(model, str(tmp / MODEL_FILE))
        else:  # one tensor per name (tied weights each get their copy)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp / MODEL_FILE))
        torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # what the checkpoint needs is counted only when a write failed, not on every save
        needed = _nbytes(weights if weights is not None else model.state_dict()) + _nbytes(state)
        if _full_disk(err, root, needed):
            raise _no_space(root, final, needed, complete[-1][1] if complete else None) from None
        raise
    for _, old in checkpoint_folders(run_dir)[0][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    """The non-weight state of checkpoint folder `path`, refusing anything that is not ours."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, pickled objects that weights_only refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {state_file} cannot be loaded safely ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {state_file} is not a lifelong-experts checkpoint")
    return state


def _weights_file(path: str | Path) -> Path:
    weights = Path(path) / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE}")
    return weights


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` in checkpoint folder `path` (for a model sharded with FSDP)."""
    weights = _weights_file(path)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {weights} is corrupted ({err})") from None


def load_weights(path: str | Path, model: torch.nn.Module, base_weights: dict | None = None,
                 digest: str | None = None) -> None:
    """Load `model.safetensors` of checkpoint folder `path` into `model` (strict: same architecture).
    `base_weights`: the checkpoint's `base_record`; the pretrained weights it left out must be those
    `model` was built with (same SHA-256: `digest`, computed when not given), and are the only names
    allowed to be missing."""
    weights = _weights_file(path)
    allowed: set[str] = set()
    if base_weights:
        if digest is None and hasattr(model, "base_digest"):
            digest = model.base_digest()
        if digest != base_weights.get("sha256"):
            raise CheckpointError(f"checkpoint {path} references the weights of {base_weights.get('hf')} "
                                  f"(sha256 {str(base_weights.get('sha256'))[:12]}...), but the model built for "
                                  f"this run has {'other weights' if digest else 'no pretrained weights'}; "
                                  "restore that model, or resume from a checkpoint that copies them")
        allowed = set(model.base_names())
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {weights} is corrupted ({err})") from None
    except RuntimeError as err:  # shape mismatch: another model
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint {weights} does not fit this model "
                              f"({first[-1].strip()[:160] if first else 'shape mismatch'})") from None
    missing = [name for name in missing if name not in allowed]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {weights} does not fit this model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
