"""The strategy section of the run configuration (`strategy.*`): which continual-learning strategy
runs and one nested section of settings per strategy. Loaded and checked like every section of
lifelong/config.py, which re-exports these names."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from lifelong.errors import ConfigError, check_non_negative, check_positive


@dataclass
class ReplayConfig:
    """Experience replay from a class-free reservoir of past blocks."""

    buffer_tokens: int = 65_536
    """Memory size in tokens (rounded down to whole blocks)."""
    batch_ratio: float = 0.5
    """Replayed blocks per minibatch, as a fraction of train.batch_size."""

    def __post_init__(self) -> None:
        check_positive("strategy.replay", buffer_tokens=self.buffer_tokens, batch_ratio=self.batch_ratio)


@dataclass
class DistillConfig:
    """Token-level distillation from the model frozen at the end of the previous experience (LwF for LMs)."""

    weight: float = 1.0
    """Weight of the KL term added to the next-token loss."""
    temperature: float = 2.0
    """Softmax temperature of both distributions; the KL is scaled by temperature^2."""

    def __post_init__(self) -> None:
        check_positive("strategy.distill", temperature=self.temperature)
        check_non_negative("strategy.distill", weight=self.weight)


@dataclass
class EWCConfig:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017): a quadratic penalty weighted by the Fisher."""

    weight: float = 100.0
    """Penalty weight (lambda)."""
    mode: Literal["separate", "online"] = "separate"
    """"separate" (one penalty per past experience) or "online" (one decayed running penalty)."""
    decay: float = 0.9
    """Decay of the online importance (mode "online")."""

    def __post_init__(self) -> None:
        check_non_negative("strategy.ewc", weight=self.weight)
        if not 0 <= self.decay <= 1:
            raise ConfigError(f"strategy.ewc.decay must be in [0, 1], got {self.decay!r}")


@dataclass
class SIConfig:
    """Synaptic Intelligence (Zenke et al. 2017): importances from the path integral of the updates."""

    weight: float = 1.0
    """Penalty weight (lambda)."""

    def __post_init__(self) -> None:
        check_non_negative("strategy.si", weight=self.weight)


@dataclass
class MASConfig:
    """Memory Aware Synapses (Aljundi et al. 2018): importances from the output's sensitivity."""

    weight: float = 1.0
    """Penalty weight (lambda)."""

    def __post_init__(self) -> None:
        check_non_negative("strategy.mas", weight=self.weight)


@dataclass
class AGEMConfig:
    """Averaged Gradient Episodic Memory (Chaudhry et al. 2019)."""

    patterns: int = 256
    """Blocks stored per experience."""
    sample_size: int = 64
    """Blocks sampled from memory to compute the reference gradient."""

    def __post_init__(self) -> None:
        check_positive("strategy.agem", patterns=self.patterns, sample_size=self.sample_size)


@dataclass
class SparseConfig:
    """Sparse memory finetuning (Lin et al. 2025) on PEER experts: from the second experience on, each
    optimizer step updates only the top-t experts of each PEER layer by how much more the step's
    batch retrieves them than background batches do; every other parameter stays frozen (unless
    train.trainable says what learns)."""

    top_t: int = 64
    """Experts (u and v rows) updated per PEER layer and optimizer step (the paper: 500 of 1M slots)."""
    ranking: Literal["tfidf", "kl"] = "tfidf"
    """"tfidf" (retrievals in the step x log((|B| + 1) / (df + 1)), the paper's) or "kl" (each
    expert's term of KL(step || background), the follow-ups')."""
    background: str = "earlier"
    """"earlier" (the retrievals recorded while training earlier experiences) or the name of a
    domain of the stream whose train blocks are read (in eval mode) as the background."""
    background_batches: int = 1000
    """Batches of a named background domain read (at most); earlier experiences contribute all theirs."""
    optimizer: Literal["run", "sgd"] = "run"
    """How the selected rows learn: "run" (the run's optimizer, AdamW or row-wise AdamW) or "sgd"
    (plain SGD as in the paper, step sgd_lr times the run's schedule; the run's optimizer then moves
    no expert row)."""
    sgd_lr: float = 1.0
    """Peak SGD learning rate of the selected rows (optimizer "sgd")."""

    def __post_init__(self) -> None:
        check_positive("strategy.sparse", top_t=self.top_t, background_batches=self.background_batches,
                       sgd_lr=self.sgd_lr)
        if not self.background:
            raise ConfigError("strategy.sparse.background must be 'earlier' or a domain name")


# Linear layers a LoRA target group names (lifelong/adapters.py).
LORA_TARGET_GROUPS = ("attention", "dense", "queries")


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021) through peft: from the second experience on only low-rank adapters on
    the transformer's linear layers learn, W x + (alpha / rank) B A x, every base weight frozen."""

    rank: int = 8
    """Rank r of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["attention", "dense"])
    """Which linear layers get adapters: groups (attention: qkv and output projections; dense: the dense
    FFN blocks' two layers; queries: PEER query networks) and module-name patterns (`blocks.0.attn.*`)."""

    def __post_init__(self) -> None:
        check_positive("strategy.lora", rank=self.rank, alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"strategy.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(t.strip() for t in self.targets):
            raise ConfigError("strategy.lora.targets must name at least one group or layer pattern, "
                              f"e.g. [{', '.join(LORA_TARGET_GROUPS)}]")


StrategyName = Literal["naive", "replay", "ewc", "si", "mas", "agem", "cumulative", "joint", "distill",
                       "sparse", "lora"]
STRATEGIES: tuple[str, ...] = typing.get_args(StrategyName)
# Strategies with per-parameter importances, which do not follow a growing expert table.
PER_PARAMETER_STRATEGIES = ("ewc", "si", "mas")
# Strategies that run with FSDP-sharded parameters: none keeps a copy of the model or per-parameter state.
FSDP_STRATEGIES = ("naive", "replay", "cumulative", "joint")


@dataclass
class StrategyConfig:
    """The continual-learning strategy and its settings, one nested section per strategy."""

    name: StrategyName = "naive"
    """One of naive, replay, ewc, si, mas, agem, cumulative, joint (the upper bound), distill, sparse, lora."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    si: SIConfig = field(default_factory=SIConfig)
    mas: MASConfig = field(default_factory=MASConfig)
    agem: AGEMConfig = field(default_factory=AGEMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
