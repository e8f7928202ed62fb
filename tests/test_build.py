"""From a config to the objects of a run: device, stream arguments, the Avalanche-free stream, the model."""

import subprocess
import sys

import pytest
import torch

from lifelong import build
from lifelong.presets import resolve
from lifelong.errors import ConfigError


def test_resolve_device():
    assert build.resolve_device("cpu") == torch.device("cpu")
    assert build.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            build.resolve_device("cuda")


def test_stream_arguments_follow_the_config(monkeypatch, tmp_path):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path))
    args = build.stream_arguments(resolve("smoke", overrides=["seed=3", "stream.order=shuffle"]))
    assert args["spec"] == "smoke" and args["seed"] == 3 and args["order"] == "shuffle"
    assert args["cache_dir"] == str(tmp_path) and args["block_len"] == 64
    domains = build.stream_arguments(resolve("smoke", overrides=["stream.domains=[{name: a, path: /x}]"]))
    assert [d["name"] if isinstance(d, dict) else d.name for d in domains["spec"]] == ["a"]
    assert build.stream_arguments(resolve("smoke", overrides=["stream.cache_dir=null"]))["cache_dir"] is None


def test_seed_everything_repeats_every_generator():
    import random

    import numpy as np

    build.seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    build.seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_build_model_is_the_configured_model():
    cfg = resolve("smoke")
    model = build.build_model(cfg, vocab_size=256)
    assert model.context == cfg.stream.block_len and model.vocab_size == 256
    assert list(model.expert_layers()) == ["blocks.1.ffn"]


def test_build_model_turns_an_expert_argument_error_into_a_config_error():
    cfg = resolve("smoke", overrides=["model.ffn=moe", "model.moe.capacity_factor=-1"])  # checked by MoE itself
    with pytest.raises(ConfigError, match="^model: .*capacity"):
        build.build_model(cfg, vocab_size=256)


def test_the_stream_and_the_model_are_built_without_avalanche():
    """What `lifelong flops` and `lifelong grow` need never imports Avalanche."""
    code = ("import sys; sys.modules['avalanche'] = None\n"
            "from lifelong import build\n"
            "from lifelong.presets import resolve\n"
            "cfg = resolve('smoke', overrides=['stream.train_tokens=1024', 'stream.test_tokens=512', "
            "'stream.cache_dir=null'])\n"
            "stream = build.load_stream(cfg)\n"
            "model = build.build_model(cfg, stream.vocab_size)\n"
            "print(len(stream.domains), len(stream.blocks[0].train), model.num_experts())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "16", "256"]


def test_a_model_too_large_for_memory_is_refused_before_allocation():
    cfg = resolve("smoke", overrides=["model.peer.num_experts=1000000000000"])
    meta = build.meta_model(cfg, vocab_size=256)  # shapes only: counted, not allocated
    assert meta.num_experts() == 10**12 and meta.param_counts()["total"] > 10**14
    with pytest.raises(ConfigError, match=r"^model: .* parameters need at least .* GiB .* model.peer.num_experts"):
        build.build_trainable_model(cfg, 256, torch.device("cpu"))
    small = build.build_trainable_model(resolve("smoke"), 256, torch.device("cpu"))
    assert small.param_counts() == build.build_model(resolve("smoke"), 256).param_counts()
