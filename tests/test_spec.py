from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest

from scenarios import STREAMS, DomainSpec, StreamError, check_fields, check_value, load_dataclass

# --------------------------------------------------------------------------- load_dataclass


class ConfigError(ValueError):
    pass


@dataclass
class Inner:
    size: int = 1
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    tag: Optional[Literal["x", "y"]] = None

    def __post_init__(self) -> None:
        if self.size > 100:
            raise ValueError("size too big")  # a semantic rule: propagates unchanged
        if self.size < 0:
            raise TypeError("negative size")


@dataclass
class Outer:
    name: str = "n"
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    anything: Any = None
    maybe: Union[int, str, None] = None


@dataclass
class Required:
    key: str
    value: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "required", ConfigError)


def load(values, **kw):
    return load_dataclass(Outer, values, error=ConfigError, **kw)


def test_builds_nested_dataclasses_and_lists_of_them():
    out = load({"name": "run", "inner": {"size": 3, "rate": 1, "mode": "b", "tag": "y"},
                "items": [{"size": 2}, {}], "tags": ["p", "q"], "extra": {"k": [1]}, "counts": {"a": 1},
                "anything": object, "maybe": "s"})
    assert out.inner == Inner(3, 1.0, "b", "y") and type(out.inner.rate) is float  # int accepted for float
    assert out.items == [Inner(size=2), Inner()] and out.tags == ["p", "q"]
    assert out.extra == {"k": [1]} and out.counts == {"a": 1} and out.anything is object and out.maybe == "s"
    assert load({}) == Outer() and load({"inner": Inner(size=5)}).inner.size == 5


@pytest.mark.parametrize(
    "values, where, message",
    [
        ({"nme": 1}, "", "unknown key nme (valid keys: name, inner, items, tags, extra, counts, anything, maybe)"),
        ({"inner": {"sise": 1}}, "", "unknown key inner.sise (valid keys of inner: size, rate, mode, tag)"),
        ({"items": [{}, {"bad": 1}]}, "", "unknown key items[1].bad (valid keys of items[1]: size, rate, mode, tag)"),
        ({"nme": 1}, "run", "unknown key run.nme (valid keys of run: name, inner, items, tags, extra, counts, "
                            "anything, maybe)"),
        ({"inner": {"size": "big"}}, "", "inner.size: expected int, got 'big'"),
        ({"inner": {"size": True}}, "", "inner.size: expected int, got True"),
        ({"inner": {"rate": "1"}}, "cfg", "cfg.inner.rate: expected float, got '1'"),
        ({"name": 3}, "", "name: expected str, got 3"),
        ({"maybe": 1.5}, "", "maybe: expected int or str or NoneType, got 1.5"),
        ({"items": 3}, "", "items: expected a list, got 3"),
        ({"tags": ["a", 2]}, "", "tags[1]: expected str, got 2"),
        ({"extra": [1]}, "", "extra: expected dict, got [1]"),
        ({"counts": {"a": "1"}}, "", "counts.a: expected int, got '1'"),
        ({"inner": 3}, "", "inner: expected a mapping of Inner settings, got 3"),
        ({"inner": {"mode": "c"}}, "", "inner.mode: 'c' is not one of a, b"),
        ({"inner": {"mode": 1}}, "", "inner.mode: expected str, got 1"),
        ({"inner": {"tag": "z"}}, "", "inner.tag: 'z' is not one of x, y"),
        ({"inner": {"tag": 1}}, "", "inner.tag: expected str or NoneType, got 1"),
        ({1: 2}, "", "keys must be strings, got 1"),
        ({"inner": {1: 2}}, "", "inner: keys must be strings, got 1"),
        ({"inner": {"size": -1}}, "", "inner: negative size"),  # a TypeError of the constructor
        ({"inner": {"rate": float("nan")}}, "", "inner.rate: expected a finite number, got nan"),
        ({"inner": {"rate": float("-inf")}}, "", "inner.rate: expected a finite number, got -inf"),
    ],
)
def test_errors(values, where, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load(values, where=where)


def test_noun_error_class_and_optional_literal():
    with pytest.raises(ConfigError, match=r"^unknown config key inner\.x \(valid keys of inner: size"):
        load({"inner": {"x": 1}}, noun="config key")
    with pytest.raises(StreamError, match="^expected a mapping of Outer settings, got 3$"):
        load_dataclass(Outer, 3)
    assert load({"inner": {"tag": None}}).inner.tag is None


def test_post_init_errors_propagate_unchanged():
    with pytest.raises(ValueError, match="^size too big$") as err:
        load({"inner": {"size": 101}})
    assert type(err.value) is ValueError


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"^missing key x\.key$"):
        load_dataclass(Required, {"value": 1}, where="x", error=ConfigError)
    assert load_dataclass(Required, {"key": "k", "value": 2}, error=ConfigError) == Required("k", 2.0)


def test_check_fields_on_direct_construction():
    r = Required("k", 3)
    assert type(r.value) is float and r.value == 3.0
    with pytest.raises(ConfigError, match=r"^required\.key: expected str, got 1$"):
        Required(1)


def test_check_value():
    assert check_value([1, 2], list[float], "w") == [1.0, 2.0]
    assert check_value(Path("p"), Union[str, Path], "w") == Path("p")
    with pytest.raises(StreamError, match=r"^w\[0\]: expected float, got 'a'$"):
        check_value(["a"], list[float], "w")
    with pytest.raises(ConfigError, match=r"^w key: expected str, got 1$"):
        check_value({1: 1}, dict[str, int], "w", ConfigError)


# --------------------------------------------------------------------------- DomainSpec


def test_domain_spec_accepts_each_source_kind():
    assert DomainSpec("a", builtin="python").builtin == "python"
    assert DomainSpec(name="b", path="x").path == "x"
    assert DomainSpec(**{"name": "c", "hf": "org/ds", "filter": {"m": ["x", "y"]}}).filter == {"m": ["x", "y"]}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "", "builtin": "python"}, "non-empty name"),
        ({"name": "w"}, "domain 'w': give exactly one source.*none"),
        ({"name": "w", "builtin": "python", "path": "p"}, "domain 'w': give exactly one.*builtin and path"),
        ({"name": "w", "builtin": "cobol"}, r"domain 'w'\.builtin: 'cobol' is not one of python, cpp, prose, legal"),
        ({"name": "w", "path": "p", "max_tokens": 0}, "domain 'w': max_tokens"),
        ({"name": "w", "path": "p", "text_field": ""}, "domain 'w': text_field"),
        ({"name": "w", "builtin": "legal", "filter": {"a": 1}}, "domain 'w': filter applies"),
        ({"name": "w", "hf": "x", "filter": {"a": []}}, "domain 'w': filter on 'a' allows no value"),
        ({"name": "w", "hf": "x", "streaming": "yes"}, r"domain 'w'\.streaming: expected bool, got 'yes'"),
        ({"name": "w", "hf": "x", "filter": {"a": [{"b": 1}]}}, "domain 'w': filter on 'a' must give scalar"),
    ],
)
def test_domain_spec_validation(kwargs, match):
    with pytest.raises(StreamError, match=match):
        DomainSpec(**kwargs)
    with pytest.raises(StreamError, match=match):
        DomainSpec.coerce(kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": 3, "path": "p"}, "domain.name: expected str, got 3"),
        ({"name": "w", "path": 3}, "domain 'w'.path: expected str or PathLike or NoneType, got 3"),
        ({"name": "w", "hf": "x", "config": 1}, "domain 'w'.config: expected str or NoneType, got 1"),
        ({"name": "w", "hf": "x", "max_tokens": True}, "domain 'w'.max_tokens: expected int or NoneType, got True"),
        ({"name": "w", "hf": "x", "max_tokens": 1.0}, "domain 'w'.max_tokens: expected int or NoneType, got 1.0"),
        ({"name": "w", "builtin": 1}, "domain 'w'.builtin: expected str or NoneType, got 1"),
        ({"name": "w", "hf": "x", "filter": ["a"]}, "domain 'w'.filter: expected Mapping or NoneType, got ['a']"),
    ],
)
def test_domain_spec_types_are_checked_by_annotation(kwargs, message):
    with pytest.raises(StreamError, match=f"^{re.escape(message)}$"):
        DomainSpec(**kwargs)
    with pytest.raises(StreamError, match=f"^{re.escape(message)}$"):
        DomainSpec.coerce(kwargs)


def test_unknown_domain_spec_key_lists_valid_keys():
    valid = ("name, builtin, path, hf, text_field, config, split, revision, data_dir, data_files, max_tokens, "
             "filter, streaming")
    message = f"unknown key domain 'wiki'.pth (valid keys of domain 'wiki': {valid})"
    with pytest.raises(StreamError, match=f"^{re.escape(message)}$"):
        DomainSpec.coerce({"name": "wiki", "pth": "data/wiki"})
    message = f"unknown key stream.domains[0].pth (valid keys of stream.domains[0]: {valid})"
    with pytest.raises(StreamError, match=f"^{re.escape(message)}$"):
        DomainSpec.coerce({"name": "wiki", "pth": "data/wiki"}, where="stream.domains[0]")
    with pytest.raises(StreamError, match=r"^unknown key domain\.textfield \(valid keys of domain: name, "):
        DomainSpec.coerce({"path": "p", "textfield": "t"})
    with pytest.raises(StreamError, match=r"^missing key domain\.name$"):
        DomainSpec.coerce({"path": "p"})
    with pytest.raises(StreamError, match=r"^domain: keys must be strings, got 3$"):
        DomainSpec.coerce({3: "p"})
    with pytest.raises(StreamError, match="a domain must be a DomainSpec or a mapping"):
        DomainSpec.coerce(["wiki"])


def test_domain_spec_copies_path_filter_and_data_files():
    assert DomainSpec("w", path=Path("a/b")).path == "a/b"
    assert DomainSpec.coerce({"name": "w", "path": Path("a/b")}).path == "a/b"
    proxy = types.MappingProxyType({"lang": ("en", "fr")})
    for spec in (DomainSpec("w", hf="x", filter=proxy), DomainSpec.coerce({"name": "w", "hf": "x", "filter": proxy})):
        assert type(spec.filter) is dict and spec.filter == {"lang": ("en", "fr")}
    spec = DomainSpec.coerce({"name": "w", "hf": "x", "data_files": {"train": ("a", "b")}})
    assert spec.data_files == {"train": ["a", "b"]}


def test_domain_specs_of_named_streams_round_trip():
    for domains in STREAMS.values():
        for d in domains:
            assert DomainSpec.coerce(d.to_dict()) == d == DomainSpec(**d.to_dict())


def test_stream_error_is_a_value_error():
    assert issubclass(StreamError, ValueError)


def test_data_dir_and_data_files_validation():
    spec = DomainSpec("c", hf="org/code", data_dir="data/python", data_files=("a/*.jsonl", "b/*.jsonl"))
    assert spec.data_files == ["a/*.jsonl", "b/*.jsonl"] and spec.to_dict()["data_dir"] == "data/python"
    assert DomainSpec("c", hf="json", data_files={"train": "x.jsonl"}).data_files == {"train": "x.jsonl"}
    for bad in ([], [""], {"train": []}, {"train": {"a": "b"}}, 3):
        with pytest.raises(StreamError, match="domain 'c': data_files must be"):
            DomainSpec("c", hf="json", data_files=bad)
    with pytest.raises(StreamError, match="domain 'p': data_dir, data_files only apply to Hugging Face"):
        DomainSpec("p", path="x", data_dir="d", data_files="f")
    with pytest.raises(StreamError, match="domain 'p': config only apply"):
        DomainSpec("p", path="x", config="en")
