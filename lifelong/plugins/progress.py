"""Progress bars: one per training experience (optimizer steps, running loss) and per evaluation."""

from __future__ import annotations

import sys

from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm


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
