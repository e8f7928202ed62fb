"""Where metric values go: a CSV file, TensorBoard (Avalanche's logger) and progress bars."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger
from tqdm.auto import tqdm


class CSVMetricLogger(BaseLogger):
    """Appends every scalar metric value as a row `name,x,value` to one CSV file.

    Avalanche's own CSVLogger hard-codes classification columns (accuracy), so
    the LM harness keeps a long-format file that any metric can land in. Each
    row is flushed at once: a run killed mid-way keeps what it logged.
    """

    FIELDS = ("name", "x", "value")

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(self.FIELDS)
            self._file.flush()

    def log_single_metric(self, name, value, x_plot) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        self._writer.writerow((name, x_plot, repr(float(value))))
        self._file.flush()

    def tell(self) -> int:
        """Bytes written so far (a checkpoint records it to undo rows logged after it)."""
        return self._file.tell()

    def truncate(self, size: int) -> None:
        """Drop everything after byte `size`: rows logged after the checkpoint being resumed."""
        self._file.flush()
        self._file.truncate(size)
        self._file.seek(size)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class ProgressPlugin(SupervisedPlugin):
    """One progress bar per training experience (optimizer steps, running loss) and per evaluation."""

    def __init__(self, domains: list[str], enabled: bool | None = None):
        super().__init__()
        self.domains = domains
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._loss = None

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_training_epoch(self, strategy, **kwargs) -> None:
        exp = strategy.experience
        domain = self.domains[exp.current_experience]
        self._bar = tqdm(total=len(strategy.dataloader), disable=not self.enabled, leave=False,
                         desc=f"train {domain} (epoch {strategy.clock.train_exp_epochs + 1})",
                         unit="step", dynamic_ncols=True)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self._bar is None:
            return
        loss = float(strategy.loss.detach())
        self._loss = loss if self._loss is None else 0.95 * self._loss + 0.05 * loss
        self._bar.set_postfix(loss=f"{self._loss:.3f}", refresh=False)
        self._bar.update()

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self._close()

    def before_eval_exp(self, strategy, **kwargs) -> None:
        domain = self.domains[strategy.experience.current_experience]
        self._bar = tqdm(total=len(strategy.dataloader), disable=not self.enabled, leave=False,
                         desc=f"eval {domain}", unit="batch", dynamic_ncols=True)

    def after_eval_iteration(self, strategy, **kwargs) -> None:
        if self._bar is not None:
            self._bar.update()

    def after_eval_exp(self, strategy, **kwargs) -> None:
        self._close()


class WandBMetricLogger(BaseLogger):
    """Sends every scalar metric value to a Weights & Biases run.

    Avalanche 0.6's WandBLogger calls `wandb.util.generate_id`, which current wandb releases no
    longer have, so the harness keeps this small logger. Values indexed by stage (`*_Exp/...`,
    `*_Stream/...`) are plotted against `stage`, all others against the optimizer `step`, using
    W&B step metrics so both x axes stay right.
    """

    def __init__(self, project: str, run_dir: Path, config: dict):
        super().__init__()
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, name=Path(run_dir).name, config=config, dir=str(run_dir),
                              reinit="finish_previous")
        self.run.define_metric("stage")
        self.run.define_metric("step")
        self._axes: dict[str, str] = {}

    def log_single_metric(self, name, value, x_plot) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        axis = self._axes.get(name)
        if axis is None:
            axis = self._axes[name] = "stage" if ("_Exp/" in name or "_Stream/" in name) else "step"
            self.run.define_metric(name, step_metric=axis)
        self.run.log({name: float(value), axis: x_plot})

    def close(self) -> None:
        self.run.finish()


def wandb_logger(project: str, run_dir: Path, config: dict) -> BaseLogger:
    """A Weights & Biases logger named after the run directory; a clear error without wandb."""
    import importlib.util

    from lifelong.config import ConfigError

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb is true but the 'wandb' package is not installed (pip install wandb)")
    return WandBMetricLogger(project, Path(run_dir), config)
