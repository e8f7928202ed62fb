"""The harness's Avalanche plugins, one file per concern: schedule (learning rate, clipping),
guards (finite loss, periodic checkpoints), cl (cumulative, SI, distillation), growth, scopes
(what trains), curves, progress. Plugins with state implement `state_dict(strategy)` / `load_state_dict(strategy, state)`
holding plain data (lifelong/strategies/state.py collects them for checkpoints)."""

from lifelong.plugins.cl import CumulativePlugin, LMDistillPlugin, LMSynapticIntelligencePlugin, distill_kl
from lifelong.plugins.curves import CurvePlugin
from lifelong.plugins.growth import GrowthPlugin, InputRecorder
from lifelong.plugins.guards import FiniteLossPlugin, PeriodicCheckpointPlugin
from lifelong.plugins.progress import ProgressPlugin
from lifelong.plugins.schedule import GradClipPlugin, WarmupCosinePlugin, warmup_cosine
from lifelong.plugins.scopes import TrainableScopePlugin

__all__ = ["CumulativePlugin", "CurvePlugin", "FiniteLossPlugin", "GradClipPlugin", "GrowthPlugin", "InputRecorder",
           "LMDistillPlugin", "LMSynapticIntelligencePlugin", "PeriodicCheckpointPlugin", "ProgressPlugin",
           "TrainableScopePlugin", "WarmupCosinePlugin", "distill_kl", "warmup_cosine"]
