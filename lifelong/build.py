"""From a config to the objects a run trains: seed, device, stream and model.

No strategy and no Avalanche training code here: `lifelong flops` and `lifelong grow` build
through this module alone (`load_stream` reads the token blocks without Avalanche; the run
session wraps them into a benchmark with `load_benchmark`).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn

from lifelong.config import RunConfig
from lifelong.errors import ConfigError
from lifelong.model import LanguageModel


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (data order included: Avalanche's loaders draw from torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device ("auto": CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def model_source(cfg: RunConfig) -> str | None:
    """The local folder of `model.hf` (None without one), refused with one line when it cannot be
    loaded (missing, code of its own not allowed, an architecture without a retrofit table entry)
    before its tokenizer is read for the stream."""
    if cfg.model.hf is None:
        return None
    from lifelong.pretrained import load_config

    return load_config(cfg.model)[1]


def cache_dir(cfg: RunConfig) -> str | None:
    """The folder of the stream's caches: LIFELONG_CACHE or stream.cache_dir; None when that is null (no cache)."""
    s = cfg.stream
    return None if s.cache_dir is None else os.path.expanduser(os.environ.get("LIFELONG_CACHE", s.cache_dir))


def stream_arguments(cfg: RunConfig) -> dict:
    """The arguments of `scenarios.build_stream` / `build_benchmark` for the config's stream."""
    folder = model_source(cfg)
    s = cfg.stream
    # the model's own tokenizer, from the folder that holds it (a cached hub name's snapshot)
    tokenizer = folder if folder is not None and s.tokenizer == cfg.model.hf else s.tokenizer
    return dict(spec=list(s.domains) if s.domains else s.name, block_len=s.block_len,
                train_tokens=s.train_tokens, test_tokens=s.test_tokens, test_fraction=s.test_fraction,
                seed=cfg.seed, order=s.order, tokenizer=tokenizer, cache_dir=cache_dir(cfg),
                lossy_tokenizer=s.lossy_tokenizer, pretrain=s.pretrain if s.pretrain.enabled else None,
                evaluate_on=s.evaluate_on)


def load_stream(cfg: RunConfig):
    """The config's domains as token blocks (`scenarios.Stream`), without Avalanche."""
    from scenarios import build_stream

    return build_stream(**stream_arguments(cfg))


def load_benchmark(cfg: RunConfig):
    """The Avalanche benchmark the config describes (one experience per domain)."""
    from scenarios import build_benchmark

    return build_benchmark(**stream_arguments(cfg))


def build_model(cfg: RunConfig, vocab_size: int, meta: bool = False) -> nn.Module:
    """The configured language model: a LanguageModel, or with `model.hf` the pretrained model with
    its PEER layers (lifelong/pretrained.py); with its LoRA adapters under strategy `lora`. The
    experts' own argument checks become ConfigErrors. `meta`: shapes only (no pretrained weights read)."""
    try:
        if cfg.model.hf is not None:
            from lifelong.pretrained import load_pretrained

            model = load_pretrained(cfg.model, context=cfg.stream.block_len, vocab_size=vocab_size, meta=meta)
        else:
            model = LanguageModel(cfg.model, vocab_size=vocab_size, context=cfg.stream.block_len)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if cfg.strategy.name == "lora":
        from lifelong.adapters import add_lora

        add_lora(model, cfg.strategy.lora)
    return model


# fp32 weights plus AdamW's two moments: the least a training run holds per parameter
TRAIN_BYTES_PER_PARAM = 12
FROZEN_BYTES_PER_PARAM = 4  # a parameter no scope trains: its fp32 weight alone


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Python objects of one transformer block, meta tensors included (measured ~20 KiB; kept generous)
LAYER_OBJECT_BYTES = 64 * 1024


def meta_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The configured model with shapes only (meta tensors): its sizes and FLOPs at any scale, no memory.
    Even shapes cost Python objects per layer, and torch refuses a tensor whose size overflows 64 bits:
    both are refused with one line instead of hanging or failing inside torch."""
    free = available_memory(torch.device("cpu"))
    if free is not None and cfg.model.n_layers * LAYER_OBJECT_BYTES > free:
        raise ConfigError(f"model.n_layers: {cfg.model.n_layers:,} layers cannot even be described in the "
                          f"{free / 2**30:,.1f} GiB free")
    try:
        with torch.device("meta"):
            return build_model(cfg, vocab_size, meta=True)
    except RuntimeError as err:  # e.g. "Storage size calculation overflowed"
        raise ConfigError(f"model: too large to describe ({str(err).splitlines()[0][:120]}); "
                          "lower model.dim or the expert counts") from None


def check_fits(params: int, device: torch.device, what: str, hint: str, frozen: int = 0) -> None:
    """ConfigError when training `params` more parameters (and holding `frozen` ones that never train)
    needs more memory than `device` has free (fp32 weights and AdamW moments of what trains, fp32
    weights of the rest; gradients and activations come on top)."""
    free = available_memory(device)
    needed = params * TRAIN_BYTES_PER_PARAM + frozen * FROZEN_BYTES_PER_PARAM
    if free is not None and needed > free:
        also = f" (and {frozen:,} frozen ones)" if frozen else ""
        raise ConfigError(f"{what}: {params:,} trained parameters{also} need at least {needed / 2**30:,.1f} GiB "
                          f"for fp32 weights and AdamW moments, but {device} has {free / 2**30:,.1f} GiB free; {hint}")


def check_bootstrap_memory(samples: int, blocks: int) -> None:
    """Refuse, before training, intervals whose resampling (`samples` float64 resamplings of `blocks`
    test blocks, eval.bootstrap_samples) cannot fit in the free memory."""
    needed = 8 * samples * max(blocks, 1)
    free = available_memory(torch.device("cpu"))
    if free is not None and needed > free:
        raise ConfigError(f"eval.bootstrap_samples: {samples:,} resamplings of {blocks:,} test blocks need "
                          f"{needed / 2**30:,.1f} GiB, but {free / 2**30:,.1f} GiB are free")


def build_trainable_model(cfg: RunConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """`build_model`, refused with one line before any allocation when training it cannot fit in memory
    (a parameter that no scope of `train.trainable` trains is charged its weight only)."""
    from lifelong.scopes import trainable_names, trainable_of

    meta = meta_model(cfg, vocab_size)
    sizes = {name: p.numel() for name, p in meta.named_parameters()}
    scopes = trainable_of(cfg)
    trained = set().union(*(trainable_names(meta, scope)[0] for scope in scopes)) if scopes else set(sizes)
    frozen = sum(n for name, n in sizes.items() if name not in trained)
    hint = ("lower model.peer.num_experts, or freeze the pretrained weights (train.trainable)" if cfg.model.hf
            else "lower model.peer.num_experts (or model.moe.num_experts, model.dim)")
    check_fits(sum(sizes.values()) - frozen, device, "model", hint, frozen=frozen)
    return build_model(cfg, vocab_size)
