"""Learning curves across the stream: every domain's test loss on a few fixed probe blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue

from lifelong.model import eval_mode
from lifelong.rundir import CURVE_PREFIX


class CurvePlugin(SupervisedPlugin):
    """Every `every` optimizer steps, the test loss of every domain's probe blocks (a learning curve).

    Runs the model in eval mode under no_grad and draws no random numbers, so
    the training run is unchanged by it; values go to the run's loggers.
    """

    def __init__(self, model, probes: dict[str, torch.Tensor], every: int, loggers):
        super().__init__()
        self.model, self.probes, self.every, self.loggers = model, probes, every, loggers
        self.step = 0

    def state_dict(self, strategy=None) -> dict:
        return {"step": self.step}

    def load_state_dict(self, strategy, state: dict) -> None:
        self.step = int(state["step"])

    @torch.no_grad()
    def after_update(self, strategy, **kwargs) -> None:
        self.step += 1
        if self.step % self.every:
            return
        values = []
        with eval_mode(self.model):
            for domain, blocks in self.probes.items():
                x, y = blocks[0].to(strategy.device), blocks[1].to(strategy.device)
                loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
                values.append(MetricValue(self, f"{CURVE_PREFIX}{domain}", float(loss), self.step))
        for logger in self.loggers:
            logger.log_metrics(values)
