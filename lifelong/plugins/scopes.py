"""Trainable scopes during a run: before every experience, freeze what its scope leaves out."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from lifelong.scopes import ScopeManager


class TrainableScopePlugin(SupervisedPlugin):
    """Applies `train.trainable` at the start of every experience (`ScopeManager`).

    Runs in `before_train_dataset_adaptation` after the growth plugin's boundary growth (list it
    after it), so `new_experts` names the experts just added.
    """

    def __init__(self, manager: ScopeManager):
        super().__init__()
        self.manager = manager

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        self.manager.apply(strategy.experience.current_experience)
