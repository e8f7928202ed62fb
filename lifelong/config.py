"""Typed run configuration: nested dataclasses, YAML presets, dotted overrides.

A run's config is resolved in layers: the dataclass defaults, then a preset
(`lifelong/presets/NAME.yaml`), then an optional user YAML file, then each
`--set a.b=c` override. Unknown keys are rejected with the list of valid keys
of that section, and every value is type-checked, so a typo never silently
falls back to a default. Semantic checks live in each section's
`__post_init__` (litgpt style); cross-section checks in `RunConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A problem in what the user configured; the CLI prints it and exits with status 2."""


def _check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


@dataclass
class StreamConfig:
    """Which text domains are learned, in which order, cut into which blocks."""

    preset: str = "builtin"
    """Named domain list from `scenarios.PRESETS`; ignored when `domains` is given."""
    domains: list[dict] = field(default_factory=list)
    """Explicit domains, e.g. `{name: wiki, path: data/wiki}` or `{name: code, hf: ..., text_field: text}`."""
    block_len: int = 128
    """Tokens per training/evaluation block (the model's context length)."""
    train_tokens: int = 300_000
    """Train-split token budget per domain."""
    test_tokens: int = 20_000
    """Test-split token budget per domain."""
    test_fraction: float = 0.1
    """Share of each domain's documents (chosen by hash) held out for testing."""
    order: str = "given"
    """Domain order: "given" or "shuffle" (by the run's seed)."""
    tokenizer: str = "byte"
    """"byte" (256 symbols) or a local Hugging Face tokenizer name or path."""
    cache_dir: str | None = "~/.cache/lifelong-experts"
    """Where tokenised blocks are cached (null disables the cache)."""

    def __post_init__(self) -> None:
        _check_positive("stream", block_len=self.block_len, train_tokens=self.train_tokens,
                        test_tokens=self.test_tokens)
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"stream.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        _check_choice("stream", "order", self.order, ("given", "shuffle"))
        for i, domain in enumerate(self.domains):
            if not isinstance(domain, dict):
                raise ConfigError(f"stream.domains[{i}] must be a mapping like {{name: wiki, path: data/wiki}}, "
                                  f"got {domain!r}")


@dataclass
class DenseConfig:
    """Dense feed-forward block: dim -> hidden_mult * dim -> dim."""

    hidden_mult: int = 4
    activation: str = "gelu"

    def __post_init__(self) -> None:
        _check_positive("model.dense", hidden_mult=self.hidden_mult)
        _check_choice("model.dense", "activation", self.activation, ("gelu", "relu"))


@dataclass
class PEERConfig:
    """PEER layer (He 2024): a product-key pool of single-neuron experts."""

    num_experts: int = 64 * 64
    """Pool size; a perfect square n*n (an n x n grid of product keys)."""
    heads: int = 4
    """Retrieval heads sharing the pool."""
    top_k: int = 8
    """Experts retrieved per head (must not exceed a codebook side, sqrt(num_experts))."""
    key_dim: int = 64
    """Query/key width, split into two halves for the two sub-key codebooks."""
    activation: str = "gelu"
    query_norm: str = "batchnorm"
    """"batchnorm" (paper), "layernorm", "rmsnorm" or "none"."""
    score: str = "softmax"
    """"softmax" over each head's top-k scores (paper) or "sigmoid"."""

    def __post_init__(self) -> None:
        _check_positive("model.peer", num_experts=self.num_experts, heads=self.heads,
                        top_k=self.top_k, key_dim=self.key_dim)
        _check_choice("model.peer", "activation", self.activation, ("gelu", "relu"))
        _check_choice("model.peer", "query_norm", self.query_norm, ("batchnorm", "layernorm", "rmsnorm", "none"))
        _check_choice("model.peer", "score", self.score, ("softmax", "sigmoid"))
        side = math.isqrt(self.num_experts)
        if side * side != self.num_experts:
            raise ConfigError(f"model.peer.num_experts: {self.num_experts} is not a perfect square "
                              f"(the pool is an n x n grid of product keys; e.g. {side * side} or {(side + 1) ** 2})")
        if self.top_k > side:
            raise ConfigError(f"model.peer.top_k ({self.top_k}) exceeds the codebook side "
                              f"sqrt(model.peer.num_experts) = {side}")
        if self.key_dim % 2:
            raise ConfigError(f"model.peer.key_dim must be even (two halves), got {self.key_dim}")


@dataclass
class MoEConfig:
    """Coarse top-k mixture of experts with the ST-MoE stabilisers."""

    num_experts: int = 8
    top_k: int = 2
    hidden_mult: int = 2
    """Each expert is a dense FFN of width hidden_mult * dim."""
    activation: str = "gelu"
    balance_coef: float = 0.01
    z_coef: float = 0.001
    capacity_factor: float | None = None
    """null = dropless (default); e.g. 1.25 drops tokens past capacity in training."""
    eval_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        _check_positive("model.moe", num_experts=self.num_experts, top_k=self.top_k, hidden_mult=self.hidden_mult)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) exceeds model.moe.num_experts ({self.num_experts})")
        _check_choice("model.moe", "activation", self.activation, ("gelu", "relu"))


@dataclass
class ModelConfig:
    """Decoder-only transformer; each block's FFN is dense, PEER or MoE."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.0
    ffn: str = "peer"
    """FFN kind of the blocks named by `ffn_layers`: "peer", "moe" or "dense"; the rest are dense."""
    ffn_layers: str | int = "middle"
    """Which blocks get `ffn`: "middle" (paper), "all", or comma-separated indices like "1,3"."""
    dense: DenseConfig = field(default_factory=DenseConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        _check_positive("model", dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads)
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice("model", "ffn", self.ffn, ("peer", "moe", "dense"))
        self.special_layers()  # validates ffn_layers

    def special_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is `ffn` (the others are dense)."""
        spec = str(self.ffn_layers).strip()
        if spec == "middle":
            return [self.n_layers // 2]
        if spec == "all":
            return list(range(self.n_layers))
        try:
            layers = sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(f"model.ffn_layers: {spec!r} is not 'middle', 'all' or a list like '1,3'") from None
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad or not layers:
            raise ConfigError(f"model.ffn_layers: {spec!r} names no block in 0..{self.n_layers - 1}")
        return layers


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
    precision: str = "auto"
    """"auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"."""
    eval_batch_size: int = 64
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    optimizer: str = "adamw"
    """"adamw" (torch AdamW) or "rowwise_adamw" (PEER expert tables updated only in the rows a step
    retrieved, lazy moments, exact deferred weight decay: experts/optim.py)."""
    optimizer_impl: str = "auto"
    """How AdamW loops over tensors (torch's choices): "single" (one tensor at a time, bit-reproducible,
    the CPU default), "foreach" (batched per group), "fused" (one kernel per group: fewest bytes moved
    and no table-sized temporaries, the CUDA default) or "auto"."""
    parallel: str = "ddp"
    """Under torchrun: "ddp" (DistributedDataParallel, full replicas) or "fsdp" (FSDP2: parameters,
    gradients and optimizer state sharded over the ranks; no growth, naive/replay/cumulative/joint only)."""
    rollback: int = 0
    """Times a diverged run (NaN/Inf loss) restarts from its last checkpoint with a lower lr (0 = stop)."""
    rollback_lr_factor: float = 0.5
    """Each rollback multiplies every parameter group's learning rate by this factor."""

    def __post_init__(self) -> None:
        _check_positive("train", batch_size=self.batch_size, grad_accum=self.grad_accum, epochs=self.epochs,
                        lr=self.lr, expert_lr_mult=self.expert_lr_mult, eval_batch_size=self.eval_batch_size)
        if self.rollback < 0:
            raise ConfigError(f"train.rollback must be >= 0, got {self.rollback}")
        if not 0 < self.rollback_lr_factor < 1:
            raise ConfigError(f"train.rollback_lr_factor must be in (0, 1), got {self.rollback_lr_factor!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                              f"({self.grad_accum})")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _check_choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("train", "parallel", self.parallel, ("ddp", "fsdp"))
        _check_choice("train", "optimizer", self.optimizer, ("adamw", "rowwise_adamw"))
        _check_choice("train", "optimizer_impl", self.optimizer_impl, ("auto", "single", "foreach", "fused"))
        if self.optimizer == "rowwise_adamw" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer 'rowwise_adamw' cannot update FSDP-sharded tables "
                              "(use train.parallel=ddp or train.optimizer=adamw)")


@dataclass
class ReplayConfig:
    """Experience replay from a class-free reservoir of past blocks."""

    buffer_tokens: int = 65_536
    """Memory size in tokens (rounded down to whole blocks)."""
    batch_ratio: float = 0.5
    """Replayed blocks per minibatch, as a fraction of train.batch_size."""

    def __post_init__(self) -> None:
        _check_positive("strategy.replay", buffer_tokens=self.buffer_tokens, batch_ratio=self.batch_ratio)


@dataclass
class DistillConfig:
    """Token-level distillation from the model frozen at the end of the previous experience (LwF for LMs)."""

    weight: float = 1.0
    """Weight of the KL term added to the next-token loss."""
    temperature: float = 2.0
    """Softmax temperature of both distributions; the KL is scaled by temperature^2."""

    def __post_init__(self) -> None:
        _check_positive("strategy.distill", temperature=self.temperature)
        if self.weight < 0:
            raise ConfigError(f"strategy.distill.weight must be >= 0, got {self.weight!r}")


PER_PARAMETER_STRATEGIES = ("ewc", "si", "mas")
# Strategies that run with FSDP-sharded parameters: none keeps a copy of the model or per-parameter state.
FSDP_STRATEGIES = ("naive", "replay", "cumulative", "joint")
STRATEGIES = ("naive", "replay", "ewc", "si", "mas", "agem", "cumulative", "joint", "distill")


@dataclass
class StrategyConfig:
    """The Avalanche continual-learning strategy and its settings."""

    name: str = "naive"
    """One of naive, replay, ewc, si, mas, agem, cumulative, joint (the upper bound), distill."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc_lambda: float = 100.0
    """EWC penalty weight."""
    ewc_mode: str = "separate"
    """EWC: "separate" (one penalty per past experience) or "online" (one decayed running penalty)."""
    ewc_decay: float = 0.9
    """EWC: decay of the online importance (mode "online")."""
    si_lambda: float = 1.0
    """Synaptic Intelligence penalty weight."""
    mas_lambda: float = 1.0
    """Memory Aware Synapses penalty weight."""
    agem_patterns: int = 256
    """A-GEM: blocks stored per experience."""
    agem_sample_size: int = 64
    """A-GEM: blocks sampled from memory to compute the reference gradient."""
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check_choice("strategy", "name", self.name, STRATEGIES)
        _check_positive("strategy", agem_patterns=self.agem_patterns, agem_sample_size=self.agem_sample_size)
        _check_choice("strategy", "ewc_mode", self.ewc_mode, ("separate", "online"))
        if min(self.ewc_lambda, self.si_lambda, self.mas_lambda) < 0:
            raise ConfigError("strategy.ewc_lambda, strategy.si_lambda and strategy.mas_lambda must be >= 0")
        if not 0 <= self.ewc_decay <= 1:
            raise ConfigError(f"strategy.ewc_decay must be in [0, 1], got {self.ewc_decay!r}")


@dataclass
class GrowthConfig:
    """When and how the PEER / MoE expert pools grow during training (DESIGN.md section 5)."""

    schedule: str = "none"
    """"none", "boundary" (before every experience after the first), "steps" (every `every_steps`
    optimizer steps) or "trigger" (when `trigger` fires, checked every `check_every` steps)."""
    experts: int = 1024
    """Experts added per growth and layer (PEER rounds up to whole rows of the product-key grid)."""
    warmup_steps: int = 100
    """Optimizer steps over which new keys' dormant score offset anneals to 0."""
    init: str = "kmeans"
    """New PEER sub-keys: "random", "copy" (of the most-used keys, with noise) or "kmeans"
    (centres of the current data's first-half queries, so new experts attract the new domain)."""
    every_steps: int = 500
    """Growth period for schedule "steps"."""
    trigger: str = "usage"
    """For schedule "trigger": "usage" (the layer's expert usage on recent training tokens exceeds
    `usage_threshold`) or "plateau" (training loss improved by less than `plateau_tolerance`
    (relative) over the last `plateau_window` steps)."""
    check_every: int = 50
    usage_threshold: float = 0.9
    plateau_window: int = 100
    plateau_tolerance: float = 0.01
    max_growths: int = 0
    """Stop growing after this many growths per layer (0 = no limit)."""
    freeze: str = "none"
    """"none", "existing" (after each growth, freeze every expert that existed before it) or
    "top_used" (at the end of each experience, freeze the experts that domain used most)."""
    freeze_fraction: float = 0.1
    """Share of the pool frozen per finished domain under freeze "top_used"."""

    def __post_init__(self) -> None:
        _check_choice("growth", "schedule", self.schedule, ("none", "boundary", "steps", "trigger"))
        _check_choice("growth", "init", self.init, ("random", "copy", "kmeans"))
        _check_choice("growth", "trigger", self.trigger, ("usage", "plateau"))
        _check_choice("growth", "freeze", self.freeze, ("none", "existing", "top_used"))
        _check_positive("growth", experts=self.experts, every_steps=self.every_steps,
                        check_every=self.check_every, plateau_window=self.plateau_window)
        if self.warmup_steps < 0 or self.max_growths < 0:
            raise ConfigError("growth.warmup_steps and growth.max_growths must be >= 0")
        if not 0 < self.usage_threshold <= 1 or not 0 < self.freeze_fraction <= 1:
            raise ConfigError("growth.usage_threshold and growth.freeze_fraction must be in (0, 1]")
        if self.freeze == "existing" and self.schedule == "none":
            raise ConfigError("growth.freeze 'existing' freezes what existed before a growth: "
                              "set growth.schedule too")


@dataclass
class EvalConfig:
    """Evaluation beyond the stage x domain matrix."""

    curve_every: int = 25
    """Every this many optimizer steps, log each domain's loss on a few fixed test blocks
    (`Curve/test_stream/DOMAIN` in metrics.csv): learning curves across the stream. 0 = off."""

    def __post_init__(self) -> None:
        if self.curve_every < 0:
            raise ConfigError(f"eval.curve_every must be >= 0, got {self.curve_every!r}")


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

    def __post_init__(self) -> None:
        _check_positive("checkpoint", keep=self.keep)
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")


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
        growing = self.growth.schedule != "none" or self.growth.freeze != "none"
        if growing and self.model.ffn == "dense":
            raise ConfigError("growth needs PEER or MoE layers, but model.ffn is 'dense'")
        if self.model.ffn == "peer" and self.model.peer.query_norm == "batchnorm" and self.stream.block_len < 2:
            # A micro-batch can be a single block; batch statistics of one token do not exist.
            raise ConfigError("model.peer.query_norm 'batchnorm' needs stream.block_len >= 2 "
                              "(or use layernorm, rmsnorm or none)")
        if self.train.parallel == "fsdp":
            if growing:
                raise ConfigError("growth with train.parallel 'fsdp' is not supported: growing a sharded expert "
                                  "table needs a re-shard of the model and optimizer (use train.parallel=ddp)")
            if self.strategy.name not in FSDP_STRATEGIES:
                raise ConfigError(f"strategy.name {self.strategy.name!r} with train.parallel 'fsdp' is not "
                                  f"supported: it keeps copies of the whole model or per-parameter state "
                                  f"(fsdp runs {', '.join(FSDP_STRATEGIES)}; use train.parallel=ddp)")
        if self.checkpoint.every_steps and self.strategy.name == "agem":
            raise ConfigError("checkpoint.every_steps is not supported with strategy.name 'agem': its memory "
                              "sampler cannot be put back mid-experience (agem checkpoints at stages only; "
                              "set checkpoint.every_steps=0)")
        if self.growth.schedule != "none" and self.strategy.name in PER_PARAMETER_STRATEGIES:
            raise ConfigError(f"growth.schedule with strategy.name {self.strategy.name!r} is not supported: its "
                              "per-parameter importances do not follow a growing expert table")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Building configs from nested dicts, with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if tp in (int, float, str, bool) and (type(value) is tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys{' of ' + where if where else ''}: "
                          f"{', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # defensive: dataclass signature mismatch
        raise ConfigError(f"{where or 'config'}: {err}") from None


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base`; nested mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(available_presets())})")
    return _read_yaml(path, "preset")


def parse_override(text: str) -> dict:
    """`a.b=c` -> {"a": {"b": c}}, with `c` parsed as a YAML scalar or flow collection."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: cannot parse the value {raw!r}") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def resolve(preset: str | None = "builtin", config_file: str | Path | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Layer preset, config file and `--set` overrides into a validated `RunConfig`."""
    values: dict = load_preset(preset) if preset else {}
    if config_file is not None:
        values = _merge(values, _read_yaml(Path(config_file), "config file"))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return from_dict(values)


def from_dict(values: dict) -> RunConfig:
    """Build and validate a `RunConfig` from a nested dict (e.g. a saved resolved config)."""
    return _build(RunConfig, values, "")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
