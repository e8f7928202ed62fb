"""Crash-safe checkpoints of a run: written whole or not at all, loaded without unpickling code.

Layout under `RUN_DIR/checkpoints/`:

    ckpt-000003/
        model.safetensors   weights and buffers (safetensors: no code can hide in it)
        state.pt            everything else, as tensors, numbers, strings, lists and dicts,
                            loaded with torch.load(weights_only=True)

A checkpoint is assembled in a hidden temporary folder, every file is fsync'ed,
and the folder is renamed into place, which is atomic on POSIX: a process killed
at any moment leaves either a complete `ckpt-*` folder or a `.tmp-*` leftover
that is ignored and cleaned up. The previous checkpoint is deleted only after
the new one is in place, so there is always a complete one to resume from.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
FORMAT = "lifelong-experts/checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or not ours."""


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


def _complete(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _NAME.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = _complete(Path(run_dir) / CHECKPOINT_DIR)
    return found[-1][1] if found else None


def save(run_dir: str | Path, model: torch.nn.Module, state: dict[str, Any], keep: int = 1,
         weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a new checkpoint atomically; keep the `keep` newest complete ones.

    `state` must hold only tensors, numbers, strings, None, lists, tuples and dicts. `weights`: the
    model's full state dict when `model` itself cannot give it (FSDP-sharded parameters).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):  # from a process killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    existing = _complete(root)
    number = existing[-1][0] + 1 if existing else 0
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        if weights is None:
            save_model(model, str(tmp / MODEL_FILE))
        else:  # one tensor per name (tied weights each get their copy)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp / MODEL_FILE))
        torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        final = root / f"ckpt-{number:06d}"
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _complete(root)[:-keep]:
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


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` of checkpoint folder `path` into `model` (strict: same architecture)."""
    weights = _weights_file(path)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {weights} is corrupted ({err})") from None
    except RuntimeError as err:  # shape mismatch: another model
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint {weights} does not fit this model "
                              f"({first[-1].strip()[:160] if first else 'shape mismatch'})") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {weights} does not fit this model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
