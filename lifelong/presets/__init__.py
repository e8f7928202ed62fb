"""Run presets and how a config is layered: the dataclass defaults, then a preset
(`lifelong/presets/NAME.yaml`, beside this file; `builtin.yaml` lists every key with its type and
default), then an optional user YAML file, then each `--set a.b=c` override, validated by
`lifelong.config.from_dict`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lifelong.errors import ConfigError

if TYPE_CHECKING:  # the config imports torch (the model's settings): only `resolve` needs it
    from lifelong.config import RunConfig

PRESET_DIR = Path(__file__).parent


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{at}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to read") from None
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
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"--set {text[:80]!r}: cannot parse the value") from None
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
    from lifelong.config import from_dict

    return from_dict(values)
