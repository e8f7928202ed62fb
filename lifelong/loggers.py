"""Where metric values go besides TensorBoard (Avalanche's own logger): a CSV file and Weights & Biases."""

from __future__ import annotations

import csv
from pathlib import Path

from avalanche.logging import BaseLogger


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

    from lifelong.errors import ConfigError

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb is true but the 'wandb' package is not installed (pip install wandb)")
    return WandBMetricLogger(project, Path(run_dir), config)
