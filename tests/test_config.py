import pytest

from lifelong import config
from lifelong.config import ConfigError


def test_every_preset_resolves():
    for name in config.available_presets():
        cfg = config.resolve(name)
        assert isinstance(cfg, config.RunConfig)


def test_builtin_preset_equals_dataclass_defaults():
    # builtin.yaml documents every key with its default; they must not drift apart.
    assert config.resolve("builtin").to_dict() == config.RunConfig().to_dict()


def test_layers_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.5, batch_size: 3}\nmodel: {peer: {top_k: 2}}\n")
    cfg = config.resolve("smoke", f, ["train.lr=3e-4", "model.ffn=dense"])
    assert cfg.train.lr == pytest.approx(3e-4)       # override beats file
    assert cfg.train.batch_size == 3                  # file beats preset
    assert cfg.model.peer.top_k == 2
    assert cfg.model.peer.num_experts == 256          # preset kept where not overridden
    assert cfg.model.ffn == "dense"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key train.lrr .*valid keys of train: batch_size, grad_accum, epochs, lr"):
        config.resolve("smoke", overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key foo"):
        config.resolve("smoke", overrides=["foo=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'big'"):
        config.resolve("smoke", overrides=["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"model.peer: expected a mapping"):
        config.resolve("smoke", overrides=["model.peer=3"])


def test_int_accepted_for_float_and_strings_parsed_as_floats():
    cfg = config.resolve("smoke", overrides=["train.lr=1", "train.weight_decay=1e-2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(0.01)


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
])
def test_semantic_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve("smoke", overrides=[override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope' \(presets: .*builtin.*smoke"):
        config.resolve("nope")


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve("smoke", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.resolve("smoke", bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.resolve("smoke", scalar)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        config.resolve("smoke", overrides=["train.lr"])


def test_special_layers():
    m = config.ModelConfig(n_layers=5)
    assert m.special_layers() == [2]
    assert config.ModelConfig(n_layers=4, ffn_layers="all").special_layers() == [0, 1, 2, 3]
    assert config.ModelConfig(n_layers=4, ffn_layers="3, 1").special_layers() == [1, 3]


def test_resolved_config_round_trips():
    cfg = config.resolve("smoke", overrides=["stream.domains=[{name: a, path: /x}]"])
    again = config.from_dict(cfg.to_dict())
    assert again == cfg
    assert config.from_dict(config.yaml.safe_load(config.dump_yaml(cfg))) == cfg


def test_builtin_preset_documents_every_key():
    """builtin.yaml is the reference of every setting: each dataclass field appears in it."""
    import dataclasses

    listed = config.load_preset("builtin")

    def walk(cls, values, where):
        for f in dataclasses.fields(cls):
            assert f.name in values, f"{where}{f.name} missing from builtin.yaml"
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else getattr(config, f.type, None)):
                sub = f.type if not isinstance(f.type, str) else getattr(config, f.type)
                walk(sub, values[f.name], f"{where}{f.name}.")

    walk(config.RunConfig, listed, "")
