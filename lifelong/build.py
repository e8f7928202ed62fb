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


def stream_arguments(cfg: RunConfig) -> dict:
    """The arguments of `scenarios.build_stream` / `build_benchmark` for the config's stream."""
    s = cfg.stream
    cache_dir = None if s.cache_dir is None else os.path.expanduser(os.environ.get("LIFELONG_CACHE", s.cache_dir))
    return dict(spec=list(s.domains) if s.domains else s.name, block_len=s.block_len,
                train_tokens=s.train_tokens, test_tokens=s.test_tokens, test_fraction=s.test_fraction,
                seed=cfg.seed, order=s.order, tokenizer=s.tokenizer, cache_dir=cache_dir,
                lossy_tokenizer=s.lossy_tokenizer)


def load_stream(cfg: RunConfig):
    """The config's domains as token blocks (`scenarios.Stream`), without Avalanche."""
    from scenarios import build_stream

    return build_stream(**stream_arguments(cfg))


def load_benchmark(cfg: RunConfig):
    """The Avalanche benchmark the config describes (one experience per domain)."""
    from scenarios import build_benchmark

    return build_benchmark(**stream_arguments(cfg))


def build_model(cfg: RunConfig, vocab_size: int) -> LanguageModel:
    """The configured language model; the experts' own argument checks become ConfigErrors."""
    try:
        return LanguageModel(cfg.model, vocab_size=vocab_size, context=cfg.stream.block_len)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
