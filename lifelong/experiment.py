"""Running and resuming a lifelong run: `run` starts a `RunSession` in a new run directory,
`resume` continues one from its newest complete checkpoint (or starts it again when it stopped
before its first), and a run whose loss turns NaN/Inf rolls back to its last checkpoint with a
lower learning rate (`train.rollback`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from lifelong import checkpoint, distributed, rundir
from lifelong.checkpoint import RunState
from lifelong.config import RunConfig, dump_yaml
from lifelong.errors import TrainingDiverged
from lifelong.session import RunSession

__all__ = ["RunSession", "run", "resume"]


def run(cfg: RunConfig, out_dir: str | Path, progress: bool | None = None, echo=print,
        replace: list[str] | None = None, before_writing=None) -> dict:
    """Train and evaluate over the whole stream; write the run directory; return results.json's content.

    `out_dir` must not hold a run worth keeping unless its entries are listed in `replace`
    (`rundir.check_out_dir`); they are removed only once the stream, model and optimizer are
    built, right before the first file is written, after `before_writing()`.
    """
    out_dir = Path(out_dir)
    if replace is None:
        replace = rundir.check_out_dir(out_dir, overwrite=False)
    lock = rundir.RunLock(out_dir)

    def start_writing() -> None:
        if before_writing is not None:
            before_writing()
        if distributed.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # before anything of an old run is replaced
            rundir.replace_entries(out_dir, replace)
            rundir.write_text_atomic(out_dir / rundir.CONFIG_FILE, dump_yaml(cfg))
        distributed.barrier()

    try:
        session = RunSession(cfg, out_dir, progress, echo, before_writing=start_writing)
        session.describe()
        return _execute(session, progress, echo)
    finally:
        lock.release()


def resume(run_dir: str | Path, progress: bool | None = None, echo=print, allow_changed_data: bool = False) -> dict:
    """Continue a run from its newest complete checkpoint; identical results to an uninterrupted run.

    A run killed before its first checkpoint starts again from its saved config. A checkpoint that
    is refused (damaged, another configuration, changed data) leaves the run directory untouched.
    """
    run_dir = Path(run_dir)
    cfg = rundir.read_run_config(run_dir)
    rundir.check_writable(run_dir)
    path = checkpoint.latest(run_dir, warn=echo)
    if path is None:
        echo(f"{run_dir} has no complete checkpoint (stopped before its first one): starting it again")
        # its config stays (rewritten atomically), so a kill now still leaves a run to --resume
        leftovers = [name for name in rundir.run_entries(run_dir) if name != rundir.CONFIG_FILE]
        return run(cfg, run_dir, progress, echo, replace=leftovers)
    # Validate before building anything, so a bad checkpoint leaves the run directory untouched.
    state = RunState.from_dict(checkpoint.load_state(path))
    if state.config != cfg.to_dict():
        raise checkpoint.CheckpointError(f"checkpoint {path} was written by a different configuration "
                                         f"than {run_dir / rundir.CONFIG_FILE}")
    lock = rundir.RunLock(run_dir)
    if distributed.is_main():
        lock.acquire()
    try:
        session = RunSession(cfg, run_dir, progress, echo, resume_from=(path, state),
                             allow_changed_data=allow_changed_data)
        echo(f"resuming from {path.name}: {len(session.progress.stages)} stages done "
             f"({', '.join(session.progress.stages)})"
             + (f", then step {state.strategy['optimizer_steps']} inside the next experience"
                if state.position is not None else ""))
        return _execute(session, progress, echo)
    finally:
        lock.release()


def _execute(session: RunSession, progress: bool | None, echo) -> dict:
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


def _roll_back(old: RunSession, err: TrainingDiverged, progress: bool | None, echo) -> RunSession:
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
    state = RunState.from_dict(checkpoint.load_state(path))
    # the data were checked when this process started: the rollback continues on them
    session = RunSession(cfg, out_dir, progress, echo, resume_from=(path, state), allow_changed_data=True)
    session.roll_back(err, before)
    echo(f"{err}; rolling back to {path.name} with learning rate x{session.progress.lr_scale:g} "
         f"(rollback {len(session.progress.rollbacks)} of {cfg.train.rollback})")
    return session
