"""Typed loading of dataclasses from mappings, and :class:`DomainSpec`, one domain of a stream.

:func:`load_dataclass` builds a dataclass from a mapping (a YAML section, a
dict): unknown keys are refused with the list of valid ones, and every value is
checked against its annotation. ``DomainSpec`` is read by it, and so is the
``lifelong`` run configuration. Rules that annotations cannot express stay in
each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from .errors import StreamError


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


def _short(value) -> str:
    """A bounded repr of a bad value for a one-line message (a YAML alias bomb must not print megabytes)."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


#: Names of the built-in offline domains (see :mod:`scenarios.sources.builtin`).
BuiltinName = Literal["python", "cpp", "prose", "legal"]
BUILTIN_DOMAINS: tuple[str, ...] = typing.get_args(BuiltinName)


# --------------------------------------------------------------------------- typed loader


class _Mismatch(Exception):
    """The value is not of the annotation's kind at all; the caller words the message."""

    def __init__(self, expected: Optional[str] = None):
        super().__init__(expected)
        self.expected = expected


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is Literal:
        return " or ".join(dict.fromkeys(type(a).__name__ for a in args))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def check_value(value: Any, tp: Any, where: str, error: type[Exception] = StreamError, noun: str = "key") -> Any:
    """``value`` checked against the annotation ``tp`` (ints are accepted, as floats,
    where floats are expected; mappings become nested dataclasses). Raises ``error``
    with a message starting ``"{where}: "``."""
    try:
        return _check(value, tp, where, error, noun)
    except _Mismatch as m:
        raise error(f"{where}: expected {m.expected or _type_name(tp)}, got {_short(value)}") from None


def _check(value: Any, tp: Any, where: str, error: type[Exception], noun: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        deeper = None  # the value has the kind of an alternative but fails its finer check
        for arg in args:
            try:
                return _check(value, arg, where, error, noun)
            except _Mismatch:
                continue
            except error as err:
                deeper = deeper or err
        if deeper is not None:
            raise deeper
        raise _Mismatch()
    if origin is Literal:
        if type(value) not in {type(a) for a in args}:
            raise _Mismatch()
        if not any(type(value) is type(a) and value == a for a in args):
            raise error(f"{where}: {_short(value)} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise error(f"{where}: expected a mapping of {tp.__name__} settings, got {_short(value)}")
        return load_dataclass(tp, value, where, error, noun)
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch("a list")
        item = args[0] if args else Any
        return [check_value(v, item, f"{where}[{i}]", error, noun) for i, v in enumerate(value)]
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, origin):
            raise _Mismatch("a mapping")
        if not args:
            return value
        key_tp, value_tp = args
        return {
            check_value(k, key_tp, f"{where} key", error, noun): check_value(v, value_tp, _join(where, k), error, noun)
            for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and type(value) is float and not math.isfinite(value):  # a NaN threshold compares false
        raise error(f"{where}: expected a finite number, got {_short(value)}")
    if tp in (int, float, str, bool):
        if type(value) is not tp:  # exact: True is no int, 1 no str
            raise _Mismatch()
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch()


def load_dataclass(
    cls: type, values: Mapping, where: str = "", error: type[Exception] = StreamError, noun: str = "key"
) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys refused, every value checked against
    its annotation (``typing.Literal`` choices included), nested dataclasses and lists of them
    built too. ``where`` names the mapping in messages (``"stream.domains[0]"``), ``noun`` its
    keys (``"config key"``). Errors of ``cls.__post_init__`` propagate unchanged."""
    at = f"{where}: " if where else ""
    if not isinstance(values, Mapping):
        raise error(f"{at}expected a mapping of {cls.__name__} settings, got {_short(values)}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    prefix = f"{where}." if where else ""
    for key in values:
        if not isinstance(key, str):
            raise error(f"{at}{noun}s must be strings, got {key!r}")
        if key not in names:
            raise error(f"unknown {noun} {prefix}{key} (valid keys{' of ' + where if where else ''}: "
                        f"{', '.join(names)})")
    for f in fields:
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"missing {noun} {prefix}{f.name}")
    hints = _hints(cls)
    kwargs = {k: check_value(v, hints[k], prefix + k, error, noun) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise error(f"{where or cls.__name__}: {err}") from None


def check_fields(obj: Any, where: str = "", error: type[Exception] = StreamError, noun: str = "key") -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation, as
    :func:`load_dataclass` does; converted values (an int given for a float) are stored
    back. Meant for ``__post_init__``, so that direct construction is checked too."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(value, hints[f.name], _join(where, f.name), error, noun)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


# --------------------------------------------------------------------------- DomainSpec


def _domain_where(name: Any) -> str:
    return f"domain '{name}'" if isinstance(name, str) and name.strip() else "domain"


@dataclass
class DomainSpec:
    """One domain of a stream: a name and exactly one of ``builtin``, ``path``, ``hf``.

    Fields:
        name: domain name, shown on every experience as ``exp.domain``.
        builtin: one of :data:`BUILTIN_DOMAINS`.
        path: a file or a folder of ``.txt`` (one document per file), ``.jsonl``
            (one document per line) or ``.parquet`` (one document per row) files.
        hf: a Hugging Face hub dataset name (``datasets.load_dataset``).
        text_field: field/column holding the text in ``.jsonl``/``.parquet``/hub rows.
        config, split, revision, data_dir, data_files: passed to
            ``datasets.load_dataset`` (``hf`` only). ``data_dir`` picks a
            sub-folder of a hub dataset (e.g. one language of a code corpus);
            ``data_files`` a glob, a list of them or a ``{split: files}`` mapping.
        max_tokens: per-domain cap on train+test tokens; overrides the stream's
            budgets, split between train and test by ``test_fraction``.
        filter: ``{field: allowed value or list of values}`` on row metadata, e.g.
            ``{"meta.pile_set_name": "Github"}``; dotted names reach nested fields.
        streaming: read hub datasets lazily (only as much as the budget needs).
    """

    name: str
    builtin: Optional[BuiltinName] = None
    path: Union[str, os.PathLike, None] = None
    hf: Optional[str] = None
    text_field: str = "text"
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Any = None
    max_tokens: Optional[int] = None
    filter: Optional[Mapping] = None
    streaming: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        self.data_files = _copy_data_files(self.data_files)
        if isinstance(self.filter, Mapping):
            self.filter = dict(self.filter)
        check_fields(self, _domain_where(self.name), StreamError)
        if not self.name.strip():
            raise StreamError(f"domain spec needs a non-empty name, got {self.name!r}")
        d = f"domain '{self.name}'"
        given = [k for k in ("builtin", "path", "hf") if getattr(self, k) not in (None, "")]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise StreamError(f"{d}: give exactly one source of builtin, path, hf (got {what})")
        if self.hf is None:
            given_hf = [k for k in ("config", "revision", "data_dir", "data_files") if getattr(self, k) is not None]
            if given_hf:
                raise StreamError(f"{d}: {', '.join(given_hf)} only apply to Hugging Face (hf) domains")
        if self.data_files is not None and not _valid_data_files(self.data_files):
            raise StreamError(
                f"{d}: data_files must be a glob, a non-empty list of globs or a mapping "
                f"split -> glob(s), got {self.data_files!r}"
            )
        for key in ("text_field", "split"):
            if not getattr(self, key):
                raise StreamError(f"{d}: {key} must be a non-empty string, got {getattr(self, key)!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise StreamError(f"{d}: max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.filter is not None:
            _check_filter(d, self.filter, self.builtin)

    @classmethod
    def coerce(cls, obj: Any, where: Optional[str] = None) -> "DomainSpec":
        """A DomainSpec from a DomainSpec or a mapping of its fields (read by
        :func:`load_dataclass`; ``where`` names it in messages, by default its name)."""
        if isinstance(obj, DomainSpec):
            return obj
        if isinstance(obj, Mapping):
            return load_dataclass(cls, obj, where=where or _domain_where(obj.get("name")), error=StreamError)
        raise StreamError(f"a domain must be a DomainSpec or a mapping, got {type(obj).__name__}: {obj!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_filter(d: str, filter: dict, builtin: Optional[str]) -> None:
    if not filter:
        raise StreamError(f"{d}: filter must be a non-empty mapping field -> value(s), got {filter!r}")
    for k, v in filter.items():
        if not isinstance(k, str) or not k:
            raise StreamError(f"{d}: filter field names must be non-empty strings, got {k!r}")
        values = list(v) if isinstance(v, (list, tuple, set, frozenset)) else [v]
        if not values:
            raise StreamError(f"{d}: filter on '{k}' allows no value")
        bad = [x for x in values if not isinstance(x, (str, int, float, bool, type(None)))]
        if bad:
            raise StreamError(f"{d}: filter on '{k}' must give scalar values, got {bad[0]!r}")
    if builtin is not None:
        raise StreamError(f"{d}: filter applies to .jsonl/.parquet/hub rows, not to built-in domains")


def _copy_data_files(value: Any) -> Any:
    """A plain (YAML/JSON-able) copy of a ``data_files`` value: tuples become lists."""
    if isinstance(value, Mapping):
        return {k: _copy_data_files(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def _valid_data_files(value: Any, nested: bool = False) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and v for v in value)
    if isinstance(value, dict) and not nested:
        return bool(value) and all(isinstance(k, str) and k and _valid_data_files(v, True) for k, v in value.items())
    return False
