"""The typed run configuration: nested dataclasses, built from a nested mapping by the one typed
loader (`scenarios.spec.load_dataclass`): unknown keys are rejected with the list of valid keys of
their section and every value is checked against its annotation (`Literal[...]` for every
choice), so a typo never silently falls back to a default. Semantic checks live in each
section's `__post_init__` (litgpt style), cross-section checks in `RunConfig`. The model's
settings are defined next to the model (lifelong/model.py), the strategy section in
lifelong/strategy_config.py; presets, YAML files and `--set` overrides are layered in
lifelong/presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from lifelong.errors import ConfigError, check_non_negative, check_positive
from lifelong.model import ModelConfig
from lifelong.strategy_config import FSDP_STRATEGIES, PER_PARAMETER_STRATEGIES, StrategyConfig
from scenarios.pretrain import PretrainSpec
from scenarios.spec import DomainSpec, load_dataclass

# Keys of earlier versions, refused with the key that replaced them.
RENAMED_KEYS = {
    "stream.preset": "stream.name",
    "strategy.ewc_lambda": "strategy.ewc.weight",
    "strategy.ewc_mode": "strategy.ewc.mode",
    "strategy.ewc_decay": "strategy.ewc.decay",
    "strategy.si_lambda": "strategy.si.weight",
    "strategy.mas_lambda": "strategy.mas.weight",
    "strategy.agem_patterns": "strategy.agem.patterns",
    "strategy.agem_sample_size": "strategy.agem.sample_size",
}

# The named groups of a trainable scope (train.trainable; lifelong/scopes.py).
SCOPE_GROUPS = ("all", "embeddings", "attention", "norms", "dense", "queries", "keys", "experts", "new_experts",
                "new_keys", "adapters")


@dataclass
class StreamConfig:
    """Which text domains are learned, in which order, cut into which blocks."""

    name: str = "builtin"
    """A named stream of `scenarios.STREAMS` (builtin, smoke, hub-...); ignored when `domains` is given."""
    domains: list[DomainSpec] = field(default_factory=list)
    """Explicit domains, e.g. `{name: wiki, path: data/wiki}` or `{name: code, hf: ..., text_field: text}`
    (`scenarios.DomainSpec`, read by the same loader as every setting)."""
    block_len: int = 128
    """Tokens per training/evaluation block (the model's context length)."""
    train_tokens: int = 300_000
    """Train-split token budget per domain."""
    test_tokens: int = 20_000
    """Test-split token budget per domain."""
    test_fraction: float = 0.1
    """Share of each domain's documents (chosen by hash) held out for testing."""
    evaluate_on: Literal["test", "validation"] = "test"
    """Which held-out split the matrices measure: "test", or "validation" (the test documents are never
    read; a `test_fraction` of the train documents, by an independent hash, stands in for them), for
    choosing settings without touching test (scenarios/validation.py)."""
    order: Literal["given", "shuffle"] = "given"
    """Domain order: "given" or "shuffle" (by the run's seed)."""
    tokenizer: str = "byte"
    """"byte" (256 symbols) or a local Hugging Face tokenizer name or path."""
    lossy_tokenizer: bool = False
    """Accept a tokenizer that does not give the text back (lowercasing, accent stripping, unknown
    tokens); bits per byte then still divides by the raw text's bytes, which the model never saw."""
    cache_dir: str | None = "~/.cache/lifelong-experts"
    """Where tokenised blocks are cached (null disables the cache)."""
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    """A pretraining phase learned first, as a domain of its own (`pretrain.name`): a `share` of every
    domain's documents (by hash, then taken out of that domain) and any further `domains` read whole
    (scenarios/pretrain.py). Off while share is 0 and domains is empty."""

    def __post_init__(self) -> None:
        check_positive("stream", block_len=self.block_len, train_tokens=self.train_tokens,
                       test_tokens=self.test_tokens)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"stream.test_fraction must be in (0, 1), got {self.test_fraction!r}")


@dataclass
class TrainConfig:
    """Optimisation of each experience."""

    batch_size: int = 16
    """Blocks per optimizer step (split into `grad_accum` micro-batches)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    epochs: int = 1
    """Passes over each experience's train split."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    expert_lr_mult: float = 1.0
    """Learning-rate multiplier of PEER sub-keys and expert tables (their own parameter group)."""
    weight_decay: float = 0.1
    """On matrices only; never on embeddings, norms, biases, PEER sub-keys or expert tables."""
    warmup_steps: int = 20
    """Linear warmup at the start of every experience (or of the stream, see `rewarm`)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    rewarm: bool = True
    """Warm up and decay again in every experience (continual pre-training); false = one schedule over the stream."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """"auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"."""
    eval_batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    optimizer: Literal["adamw", "rowwise_adamw"] = "adamw"
    """"adamw" (torch AdamW) or "rowwise_adamw" (PEER expert tables updated only in the rows a step
    retrieved, lazy moments, exact deferred weight decay: docs/optim.md)."""
    optimizer_impl: Literal["auto", "single", "foreach", "fused"] = "auto"
    """How AdamW loops over tensors (torch's choices): "single" (one tensor at a time, bit-reproducible,
    the CPU default), "foreach" (batched per group), "fused" (one kernel per group: fewest bytes moved
    and no table-sized temporaries, the CUDA default) or "auto"."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: "ddp" (DistributedDataParallel, full replicas) or "fsdp" (FSDP2: parameters,
    gradients and optimizer state sharded over the ranks; no growth, naive/replay/cumulative/joint only)."""
    rollback: int = 0
    """Times a diverged run (NaN/Inf loss) restarts from its last checkpoint with a lower lr (0 = stop)."""
    rollback_lr_factor: float = 0.5
    """Each rollback multiplies every parameter group's learning rate by this factor."""
    pretrain_epochs: int = 1
    """Passes over the pretraining phase (`stream.pretrain`), in place of `epochs`."""
    pretrain_lr: float | None = None
    """Peak learning rate of the pretraining phase (null = `lr`); every group keeps its ratio to lr."""
    trainable: list[str] = field(default_factory=list)
    """What learns in each experience: entry i is experience i's scope (the last one repeats; [] =
    everything, always). A scope is a comma-separated list of groups (all, embeddings, attention,
    norms, dense, queries, keys, experts, new_experts, new_keys, adapters) and parameter-name patterns
    (`blocks.3.*`). The rest is frozen: out of the optimizer, bit-identical (lifelong/scopes.py)."""

    def __post_init__(self) -> None:
        check_positive("train", batch_size=self.batch_size, grad_accum=self.grad_accum, epochs=self.epochs,
                        lr=self.lr, expert_lr_mult=self.expert_lr_mult, eval_batch_size=self.eval_batch_size,
                        pretrain_epochs=self.pretrain_epochs)
        if self.pretrain_lr is not None:
            check_positive("train", pretrain_lr=self.pretrain_lr)
        check_non_negative("train", rollback=self.rollback, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        if not 0 < self.rollback_lr_factor < 1:
            raise ConfigError(f"train.rollback_lr_factor must be in (0, 1), got {self.rollback_lr_factor!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                              f"({self.grad_accum})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for i, scope in enumerate(self.trainable):
            items = [item.strip() for item in scope.split(",")]
            bad = [item for item in items if not item or (item not in SCOPE_GROUPS and not any(
                c in item for c in ".*?["))]
            if bad:
                raise ConfigError(f"train.trainable[{i}]: {bad[0]!r} is neither a group ({', '.join(SCOPE_GROUPS)}) "
                                  "nor a parameter-name pattern like 'blocks.3.*'")
        if self.optimizer == "rowwise_adamw" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer 'rowwise_adamw' cannot update FSDP-sharded tables "
                              "(use train.parallel=ddp or train.optimizer=adamw)")


@dataclass
class GrowthConfig:
    """When and how the PEER / MoE expert pools grow during training (docs/growth.md)."""

    schedule: Literal["none", "boundary", "steps", "trigger"] = "none"
    """"none", "boundary" (before every experience after the first), "steps" (every `every_steps`
    optimizer steps) or "trigger" (when `trigger` fires, checked every `check_every` steps)."""
    experts: int = 1024
    """Experts added per growth and layer (PEER rounds up to whole rows of the product-key grid)."""
    warmup_steps: int = 100
    """Optimizer steps over which new keys' dormant score offset anneals to 0."""
    warmin: Literal["calibrated", "bound"] = "calibrated"
    """PEER warm-in schedule: "calibrated" (from the score gaps of recent queries: the share of them
    new experts reach grows linearly) or "bound" (linear from a margin no query can beat)."""
    init: Literal["random", "copy", "kmeans", "contrast"] = "kmeans"
    """New PEER sub-keys: "random", "copy" (of the most-used keys, with noise), "kmeans" (centres of
    the current data's first-half queries) or "contrast" (kmeans, moved away from the queries of the
    earlier domains kept in `reservoir_blocks`)."""
    reservoir_blocks: int = 16
    """Blocks of each finished domain kept (and checkpointed) for "contrast" placement and `isolate`."""
    isolate: float = 0.0
    """Weight of the routing contrast loss (experts.row_contrast_loss) on every grown PEER layer: the
    newest rows should win the current domain's queries and lose the reservoir's by `isolate_margin`
    (0 = off)."""
    isolate_margin: float = 1.0
    """Score margin of the routing contrast loss."""
    isolate_queries: bool = False
    """Whether the PEER query networks learn from the routing contrast loss too (keys alone cannot
    separate domains whose queries overlap)."""
    every_steps: int = 500
    """Growth period for schedule "steps"."""
    trigger: Literal["usage", "plateau"] = "usage"
    """For schedule "trigger": "usage" (the layer's expert usage on recent training tokens exceeds
    `usage_threshold`) or "plateau" (training loss improved by less than `plateau_tolerance`
    (relative) over the last `plateau_window` steps)."""
    check_every: int = 50
    usage_threshold: float = 0.9
    plateau_window: int = 100
    plateau_tolerance: float = 0.01
    max_growths: int = 0
    """Stop growing after this many growths per layer (0 = no limit)."""
    freeze: Literal["none", "existing", "top_used"] = "none"
    """"none", "existing" (after each growth, freeze every expert that existed before it) or
    "top_used" (at the end of each experience, freeze the experts that domain used most)."""
    freeze_fraction: float = 0.1
    """Share of the pool frozen per finished domain under freeze "top_used"."""

    def __post_init__(self) -> None:
        check_positive("growth", experts=self.experts, every_steps=self.every_steps,
                        check_every=self.check_every, plateau_window=self.plateau_window)
        check_non_negative("growth", warmup_steps=self.warmup_steps, max_growths=self.max_growths,
                           reservoir_blocks=self.reservoir_blocks, isolate=self.isolate,
                           isolate_margin=self.isolate_margin)
        if not 0 < self.usage_threshold <= 1 or not 0 < self.freeze_fraction <= 1:
            raise ConfigError("growth.usage_threshold and growth.freeze_fraction must be in (0, 1]")
        if self.freeze == "existing" and self.schedule == "none":
            raise ConfigError("growth.freeze 'existing' freezes what existed before a growth: "
                              "set growth.schedule too")


@dataclass
class EvalConfig:
    """Evaluation beyond the stage x domain matrix: learning curves, intervals, references."""

    curve_every: int = 25
    """Every this many optimizer steps, log each domain's loss on a few fixed test blocks
    (`Curve/test_stream/DOMAIN` in metrics.csv): learning curves across the stream. 0 = off."""
    bootstrap_samples: int = 1000
    """Resamplings of each domain's test blocks for the intervals of results.json (0 = none)."""
    interval_level: float = 0.95
    """Coverage of every interval (percentile bootstrap over test blocks; Student t over seeds)."""
    reference: Literal["none", "scratch"] = "none"
    """"scratch": also train, once per domain, the same model on that domain alone (cached by config
    hash) for the forward transfer measured against it (fwt_zero_shot, fwt_auc)."""

    def __post_init__(self) -> None:
        check_non_negative("eval", curve_every=self.curve_every, bootstrap_samples=self.bootstrap_samples)
        if not 0 < self.interval_level < 1:
            raise ConfigError(f"eval.interval_level must be in (0, 1), got {self.interval_level!r}")


@dataclass
class LogConfig:
    """Where metric values go besides metrics.csv and TensorBoard (always written)."""

    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package; WANDB_MODE=offline works without network)."""
    wandb_project: str = "lifelong-experts"

    def __post_init__(self) -> None:
        if not self.wandb_project.strip():
            raise ConfigError("log.wandb_project must not be empty")


@dataclass
class CheckpointConfig:
    """Crash-safe checkpoints, written after every stage (before training and after each
    experience) and, with `every_steps`, every N optimizer steps inside an experience."""

    keep: int = 1
    """Complete checkpoints kept on disk (the newest ones)."""
    every_steps: int = 0
    """Also checkpoint every N optimizer steps (0 = at stages only); `--resume` continues mid-experience."""
    base_weights: Literal["copy", "reference"] = "copy"
    """A pretrained model's (`model.hf`) weights in each checkpoint: "copy", or "reference": left out,
    with the model's name, revision and a SHA-256 of its weights checked on resume (they must be
    frozen in every experience: `train.trainable` scopes that leave them out)."""

    def __post_init__(self) -> None:
        check_positive("checkpoint", keep=self.keep)
        check_non_negative("checkpoint", every_steps=self.every_steps)


MAX_SEED = 2**32 - 1  # the largest seed NumPy's legacy generator (and so every library seeded with it) accepts


@dataclass
class RunConfig:
    """Everything that defines a run; saved resolved in the run directory."""

    seed: int = 0
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: expected an integer in 0..{MAX_SEED} (what NumPy's generators take), got {self.seed}")
        if self.model.hf is not None and self.stream.tokenizer == "byte":
            self.stream.tokenizer = self.model.hf  # a pretrained model reads its own tokens
        growing = self.growth.schedule != "none" or self.growth.freeze != "none"
        if growing and self.model.ffn == "dense":
            raise ConfigError("growth needs PEER or MoE layers, but model.ffn is 'dense'")
        if self.model.ffn == "peer" and self.model.peer.query_norm == "batchnorm" and self.stream.block_len < 2:
            # A micro-batch can be a single block; batch statistics of one token do not exist.
            raise ConfigError("model.peer.query_norm 'batchnorm' needs stream.block_len >= 2 "
                              "(or use layernorm, rmsnorm or none)")
        if self.train.parallel == "fsdp":
            if self.train.trainable:
                raise ConfigError("train.trainable with train.parallel 'fsdp' is not supported: the scopes change "
                                  "the optimizer's groups, which FSDP shards (use train.parallel=ddp)")
            if growing:
                raise ConfigError("growth with train.parallel 'fsdp' is not supported: growing a sharded expert "
                                  "table needs a re-shard of the model and optimizer (use train.parallel=ddp)")
            if self.strategy.name == "lora":
                raise ConfigError("strategy.name 'lora' with train.parallel 'fsdp' is not supported: it switches "
                                  "from the whole model to the adapters with trainable scopes, which change the "
                                  "optimizer's groups that FSDP shards (use train.parallel=ddp)")
            if self.strategy.name not in FSDP_STRATEGIES:
                raise ConfigError(f"strategy.name {self.strategy.name!r} with train.parallel 'fsdp' is not "
                                  f"supported: it keeps copies of the whole model or per-parameter state "
                                  f"(fsdp runs {', '.join(FSDP_STRATEGIES)}; use train.parallel=ddp)")
        if self.strategy.name == "sparse":
            if self.model.ffn != "peer":
                raise ConfigError(f"strategy.name 'sparse' updates PEER experts, but model.ffn is {self.model.ffn!r}")
            background = self.strategy.sparse.background
            named = [d.name for d in self.stream.domains] + [self.stream.pretrain.name] * self.stream.pretrain.enabled
            if background != "earlier" and self.stream.domains and background not in named:
                raise ConfigError(f"strategy.sparse.background: {background!r} is not a domain of the stream")
        if self.checkpoint.base_weights == "reference":
            if self.model.hf is None:
                raise ConfigError("checkpoint.base_weights 'reference' needs a pretrained model (model.hf)")
            if not self.train.trainable:
                raise ConfigError("checkpoint.base_weights 'reference' leaves the pretrained weights out of "
                                  "checkpoints, so they must stay frozen: set train.trainable (e.g. "
                                  "[\"queries,keys,experts\"])")
        if self.stream.pretrain.enabled and self.strategy.name == "joint":
            raise ConfigError("stream.pretrain with strategy.name 'joint' is not supported: joint training learns "
                              "every domain at once, so there is no phase before the others (turn one off)")
        if self.checkpoint.every_steps and self.strategy.name == "agem":
            raise ConfigError("checkpoint.every_steps is not supported with strategy.name 'agem': its memory "
                              "sampler cannot be put back mid-experience (agem checkpoints at stages only; "
                              "set checkpoint.every_steps=0)")
        if self.growth.schedule != "none" and self.strategy.name in PER_PARAMETER_STRATEGIES:
            raise ConfigError(f"growth.schedule with strategy.name {self.strategy.name!r} is not supported: its "
                              "per-parameter importances do not follow a growing expert table")
        if self.strategy.name == "agem" and self.train.grad_accum > 1:
            raise ConfigError("strategy.name=agem cannot use train.grad_accum > 1: A-GEM zeroes the gradients "
                              "before every micro-batch to compute its reference gradient (set train.grad_accum=1 "
                              "and lower train.batch_size instead)")
        if self.strategy.name == "replay" and self.strategy.replay.buffer_tokens < self.stream.block_len:
            raise ConfigError(f"strategy.replay.buffer_tokens ({self.strategy.replay.buffer_tokens}) holds no whole "
                              f"block of stream.block_len={self.stream.block_len} tokens")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _refuse_renamed(values: dict) -> None:
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"config key {old} was renamed: use {new}")


def from_dict(values: dict) -> RunConfig:
    """Build and validate a `RunConfig` from a nested dict (e.g. a saved resolved config)."""
    _refuse_renamed(values)
    return load_dataclass(RunConfig, values, "", ConfigError, noun="config key")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
