"""The typed run configuration: unknown keys, types, Literal choices, semantic and cross-section
rules, renamed keys, round trips."""

import pytest

from lifelong import config, strategy_config
from lifelong.config import ConfigError
from lifelong.presets import resolve


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key train.lrr .*valid keys of train: batch_size, grad_accum, epochs, lr"):
        resolve("smoke", overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key foo"):
        resolve("smoke", overrides=["foo=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'big'"):
        resolve("smoke", overrides=["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"model.peer: expected a mapping"):
        resolve("smoke", overrides=["model.peer=3"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0"),
    ("model.ffn=sparse", "model.ffn: 'sparse' is not one of peer, moe, dense"),
    ("model.peer.query_norm=group", "model.peer.query_norm"),
    ("model.dim=129", "divisible"),
    ("model.ffn_layers=7", "names no block"),
    ("model.peer.top_k=100", "exceeds the codebook side"),
    ("stream.test_fraction=1.5", "stream.test_fraction"),
    ("stream.order=random", "stream.order"),
    ("train.optimizer_impl=apex", "train.optimizer_impl: 'apex' is not one of auto, single, foreach, fused"),
    ("strategy.name=lwf", "strategy.name: 'lwf' is not one of naive, replay, ewc, si, mas, agem, cumulative, joint"),
    ("strategy.ewc.mode=offline", "strategy.ewc.mode: 'offline' is not one of separate, online"),
    ("strategy.ewc.decay=2", "strategy.ewc.decay must be in"),
    ("strategy.agem.patterns=0", "strategy.agem.patterns must be > 0"),
    ("growth.init=zeros", "growth.init: 'zeros' is not one of random, copy, kmeans"),
    ("train.precision=True", "train.precision: expected str, got True"),
])
def test_semantic_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("smoke", overrides=[override])


def test_resolved_config_round_trips():
    cfg = resolve("smoke", overrides=["stream.domains=[{name: a, path: /x}]"])
    again = config.from_dict(cfg.to_dict())
    assert again == cfg
    assert config.from_dict(config.yaml.safe_load(config.dump_yaml(cfg))) == cfg


def test_every_choice_is_a_literal_checked_by_the_loader():
    """No section checks its own choices: every str setting with a fixed set of values is a Literal."""
    import dataclasses
    import typing

    choices = {}

    def walk(cls, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{where}{f.name}.")
            elif typing.get_origin(tp) is typing.Literal:
                choices[where + f.name] = typing.get_args(tp)

    walk(config.RunConfig, "")
    assert {"stream.order", "model.ffn", "model.peer.query_norm", "model.peer.score", "model.dense.activation",
            "train.precision", "train.device", "train.optimizer", "train.optimizer_impl", "train.parallel",
            "strategy.name", "strategy.ewc.mode", "growth.schedule", "growth.init", "growth.trigger",
            "growth.freeze"} <= set(choices)
    assert choices["strategy.name"] == strategy_config.STRATEGIES


@pytest.mark.parametrize("old, new", sorted(config.RENAMED_KEYS.items()))
def test_a_key_of_an_earlier_version_is_refused_with_its_new_name(old, new):
    value = "builtin" if old == "stream.preset" else 1
    with pytest.raises(ConfigError, match=rf"^config key {old} was renamed: use {new}$"):
        resolve("smoke", overrides=[f"{old}={value}"])


def test_strategy_settings_are_nested_per_strategy():
    cfg = resolve("smoke", overrides=["strategy.ewc.weight=5", "strategy.ewc.mode=online",
                                              "strategy.si.weight=2", "strategy.agem.sample_size=8",
                                              "stream.name=builtin"])
    assert (cfg.strategy.ewc.weight, cfg.strategy.ewc.mode, cfg.strategy.si.weight) == (5.0, "online", 2.0)
    assert cfg.strategy.agem.sample_size == 8 and cfg.stream.name == "builtin"
