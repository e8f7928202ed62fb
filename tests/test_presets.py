"""Run presets and layering: preset, then YAML file, then `--set` overrides; builtin.yaml
documents every key with its default."""

import pytest

from lifelong import config
from lifelong.config import ConfigError
from lifelong.presets import available_presets, load_preset, resolve


def test_every_preset_resolves():
    for name in available_presets():
        cfg = resolve(name)
        assert isinstance(cfg, config.RunConfig)


def test_builtin_preset_equals_dataclass_defaults():
    # builtin.yaml documents every key with its default; they must not drift apart.
    assert resolve("builtin").to_dict() == config.RunConfig().to_dict()


def test_layers_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.5, batch_size: 3}\nmodel: {peer: {top_k: 2}}\n")
    cfg = resolve("smoke", f, ["train.lr=3e-4", "model.ffn=dense"])
    assert cfg.train.lr == pytest.approx(3e-4)       # override beats file
    assert cfg.train.batch_size == 3                  # file beats preset
    assert cfg.model.peer.top_k == 2
    assert cfg.model.peer.num_experts == 256          # preset kept where not overridden
    assert cfg.model.ffn == "dense"


def test_int_accepted_for_float_and_strings_parsed_as_floats():
    cfg = resolve("smoke", overrides=["train.lr=1", "train.weight_decay=1e-2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(0.01)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope' \(presets: .*builtin.*smoke"):
        resolve("nope")


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("smoke", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve("smoke", bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve("smoke", scalar)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        resolve("smoke", overrides=["train.lr"])


def test_builtin_preset_documents_every_key():
    """builtin.yaml is the reference of every setting: each dataclass field appears in it."""
    import dataclasses

    import typing

    listed = load_preset("builtin")

    def walk(cls, values, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in values, f"{where}{f.name} missing from builtin.yaml"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], values[f.name], f"{where}{f.name}.")

    walk(config.RunConfig, listed, "")
