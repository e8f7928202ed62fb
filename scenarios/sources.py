"""Where the text of a domain comes from.

A source yields :class:`Document` objects: a stable ``doc_id`` (relative path,
``file:line``, ``file#row`` or a content hash) plus a lazy loader for the text.
The block builder assigns each document to train or test from a hash of its
``doc_id`` *before* loading it, so documents of a split that is already full are
never read. That is what keeps a small budget over a large corpus fast.

Three kinds of source:

* the built-in offline corpus (:data:`BUILTIN_DOMAINS`): text every installation
  already has on disk (the Python standard library, the C++ headers shipped with
  torch, the Python docs, licence files of installed packages);
* local files (``path:``): a file or a folder of ``.txt`` / ``.jsonl`` /
  ``.parquet`` files;
* Hugging Face datasets (``hf:``) through ``datasets.load_dataset``, streaming
  by default, with ``config``, ``split``, ``revision``, ``data_dir``,
  ``data_files``, ``text_field`` and a metadata ``filter``.

Why ``path:`` does not go through the ``datasets`` library's local ``json`` /
``parquet`` builders: those builders either convert every file to an Arrow
cache under ``~/.cache/huggingface`` before the first row is seen (map-style),
or read the files front to back (streaming). :class:`LocalSource` instead
visits files, ``.jsonl`` lines and ``.parquet`` row groups in a seeded order
and stops as soon as the budget is filled, writes nothing outside the block
cache, names the file and line of a bad row, and works without ``datasets``
installed (only ``pyarrow`` for parquet). The builders remain one line away:
``{hf: json, data_files: "data/*.jsonl"}`` (or ``parquet``) reads local files
through ``datasets.load_dataset`` like any hub dataset, and its cache entry
follows the local files' sizes and mtimes.

All three are deterministic for a given seed and machine; the built-in corpus is
machine-dependent, which is why the content hash of the text used is recorded.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import sys
import sysconfig
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from .errors import StreamError

BUILTIN_DOMAINS = ("python", "cpp", "prose", "legal")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


# --------------------------------------------------------------------------- spec


@dataclass(init=False)
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
    builtin: Optional[str] = None
    path: Optional[str] = None
    hf: Optional[str] = None
    text_field: str = "text"
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Optional[Any] = None
    max_tokens: Optional[int] = None
    filter: Optional[dict] = None
    streaming: bool = True

    # A hand-written __init__ so that an unknown key (a typo in a YAML config) is a
    # StreamError listing the valid keys rather than a bare TypeError.
    def __init__(
        self,
        name: str = "",
        builtin: Optional[str] = None,
        path: Optional[str] = None,
        hf: Optional[str] = None,
        text_field: str = "text",
        config: Optional[str] = None,
        split: str = "train",
        revision: Optional[str] = None,
        data_dir: Optional[str] = None,
        data_files: Optional[Any] = None,
        max_tokens: Optional[int] = None,
        filter: Optional[dict] = None,
        streaming: bool = True,
        **unknown: Any,
    ):
        if unknown:
            label = f"domain '{name}'" if isinstance(name, str) and name else "domain spec"
            raise StreamError(
                f"{label}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(valid: {', '.join(f.name for f in dataclasses.fields(DomainSpec))})"
            )
        self.name = name
        self.builtin = builtin
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else path
        self.hf = hf
        self.text_field = text_field
        self.config = config
        self.split = split
        self.revision = revision
        self.data_dir = data_dir
        self.data_files = _copy_data_files(data_files)
        self.max_tokens = max_tokens
        self.filter = None if filter is None else dict(filter) if isinstance(filter, Mapping) else filter
        self.streaming = streaming
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise StreamError(f"domain spec needs a non-empty name, got {self.name!r}")
        d = f"domain '{self.name}'"
        given = [k for k in ("builtin", "path", "hf") if getattr(self, k) not in (None, "")]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise StreamError(f"{d}: give exactly one source of builtin, path, hf (got {what})")
        if self.builtin is not None and self.builtin not in BUILTIN_DOMAINS:
            raise StreamError(
                f"{d}: unknown built-in domain '{self.builtin}' (valid: {', '.join(BUILTIN_DOMAINS)})"
            )
        for key in ("builtin", "path", "hf", "config", "revision", "data_dir"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise StreamError(f"{d}: {key} must be a string, got {v!r}")
        if self.hf is None:
            given_hf = [k for k in ("config", "revision", "data_dir", "data_files") if getattr(self, k) is not None]
            if given_hf:
                raise StreamError(f"{d}: {', '.join(given_hf)} only apply to Hugging Face (hf) domains")
        if self.data_files is not None and not _valid_data_files(self.data_files):
            raise StreamError(
                f"{d}: data_files must be a glob, a non-empty list of globs or a mapping "
                f"split -> glob(s), got {self.data_files!r}"
            )
        if not isinstance(self.text_field, str) or not self.text_field:
            raise StreamError(f"{d}: text_field must be a non-empty string, got {self.text_field!r}")
        if not isinstance(self.split, str) or not self.split:
            raise StreamError(f"{d}: split must be a non-empty string, got {self.split!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0
        ):
            raise StreamError(f"{d}: max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.streaming, bool):
            raise StreamError(f"{d}: streaming must be true or false, got {self.streaming!r}")
        if self.filter is not None:
            if not isinstance(self.filter, dict) or not self.filter:
                raise StreamError(f"{d}: filter must be a non-empty mapping field -> value(s), got {self.filter!r}")
            for k, v in self.filter.items():
                if not isinstance(k, str) or not k:
                    raise StreamError(f"{d}: filter field names must be non-empty strings, got {k!r}")
                values = list(v) if isinstance(v, (list, tuple, set, frozenset)) else [v]
                if not values:
                    raise StreamError(f"{d}: filter on '{k}' allows no value")
                bad = [x for x in values if not isinstance(x, (str, int, float, bool, type(None)))]
                if bad:
                    raise StreamError(f"{d}: filter on '{k}' must give scalar values, got {bad[0]!r}")
            if self.builtin is not None:
                raise StreamError(f"{d}: filter applies to .jsonl/.parquet/hub rows, not to built-in domains")

    @classmethod
    def coerce(cls, obj: Any) -> "DomainSpec":
        """A DomainSpec from a DomainSpec or a mapping of its fields."""
        if isinstance(obj, DomainSpec):
            return obj
        if isinstance(obj, Mapping):
            bad = [k for k in obj if not isinstance(k, str)]
            if bad:
                raise StreamError(f"domain spec keys must be strings, got {bad!r}")
            return cls(**obj)
        raise StreamError(f"a domain must be a DomainSpec or a mapping, got {type(obj).__name__}: {obj!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _data_file_patterns(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _data_file_patterns(v)]
    return list(value)


# --------------------------------------------------------------------------- helpers


def hash_unit(salt: str, key: str) -> float:
    """A stable pseudo-uniform number in [0, 1) from ``key`` (no dependence on PYTHONHASHSEED)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def seeded_order(ids: Iterable[str], seed: int) -> list[str]:
    """``ids`` in a pseudo-random order fixed by ``seed`` (independent of the input order)."""
    return sorted(ids, key=lambda i: (hashlib.blake2b(f"{seed}\0{i}".encode("utf-8"), digest_size=8).digest(), i))


def _seeded_permutation(n: int, seed: int, key: str) -> np.ndarray:
    # RandomState's stream is frozen by NumPy's compatibility policy, unlike Generator's.
    s = int(hash_unit(f"perm{seed}", key) * 2**32) & 0xFFFFFFFF
    return np.random.RandomState(s).permutation(n)


def _stat_digest(root: Path, relpaths: Iterable[str]) -> str:
    """Digest of paths, sizes and mtimes: changes when any file is added, removed or edited."""
    h = hashlib.sha256(str(root).encode())
    for rel in relpaths:
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def _walk(root: Path, accept: Callable[[str], bool], prune: Callable[[str, str], bool]) -> list[str]:
    """Sorted POSIX relative paths of files under ``root`` that ``accept`` their name;
    ``prune(rel_dir, name)`` drops a sub-folder without visiting it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirnames[:] = [d for d in dirnames if not prune(rel_dir, d)]
        for fn in filenames:
            if accept(fn):
                out.append(f"{rel_dir}/{fn}" if rel_dir else fn)
    return sorted(out)


_GENERATED = re.compile(
    r"@generated|do not edit|gencodec\.py|auto-?generated\s+by|this\s+file\s+(is|was)\s+(automatically\s+|auto-?)?generated",
    re.IGNORECASE,
)


def _head_is_generated(text: str) -> bool:
    # Machine-generated files (torchgen op headers, gencodec tables, ...) are
    # boilerplate, not the hand-written code a "code" domain should show the model.
    return _GENERATED.search(text[:1024]) is not None


class Document:
    """A document: a stable id and its text, loaded on first use (an empty text is skipped)."""

    __slots__ = ("doc_id", "_load", "_text")

    def __init__(self, doc_id: str, load: Optional[Callable[[], str]] = None, text: Optional[str] = None):
        if (load is None) == (text is None):
            raise ValueError("give exactly one of load, text")
        self.doc_id = doc_id
        self._load = load
        self._text = text

    def text(self) -> str:
        if self._text is None:
            self._text = self._load()
            self._load = None
        return self._text

    def __repr__(self) -> str:
        return f"Document({self.doc_id!r})"


class Source:
    """Base class. Subclasses set ``domain`` and ``description`` and implement
    :meth:`fingerprint` and :meth:`documents`."""

    domain: str
    description: str

    def fingerprint(self) -> Any:
        """JSON-able and cheap to compute; it changes whenever the text would change
        (paths, sizes, mtimes; hub name/config/revision). Part of the cache key."""
        raise NotImplementedError

    def documents(self, seed: int) -> Iterator[Document]:
        """Documents in a deterministic order that depends only on ``seed``."""
        raise NotImplementedError

    def _err(self, msg: str) -> StreamError:
        return StreamError(f"domain '{self.domain}': {msg}")


# --------------------------------------------------------------------------- built-in corpus

_TEST_DIRS = {"test", "tests", "idle_test"}
# pydoc_data holds the documentation topics, which are the prose domain's text.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
# Share of stdlib modules whose docstrings become prose instead of being code
# documents: keeps the two domains from containing the same text.
_DOCSTRING_SHARE = 0.25


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_py_files(root: Path) -> list[str]:
    return _walk(
        root,
        accept=lambda fn: fn.endswith(".py") and not fn.startswith("test_"),
        prune=lambda rel, d: d in _TEST_DIRS or d in _STDLIB_SKIP_DIRS or d.startswith("."),
    )


def _is_docstring_module(rel: str) -> bool:
    return hash_unit("prose-docstrings", rel) < _DOCSTRING_SHARE


def _read_python(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few sources declare another encoding in a coding cookie.
        try:
            enc, _ = tokenize.detect_encoding(iter(raw.splitlines(True)).__next__)
            return raw.decode(enc)
        except (SyntaxError, LookupError, UnicodeDecodeError):
            return ""


def _read_text_lenient(path: Path) -> str:
    """Built-in corpus files that are not valid UTF-8 are skipped (returned empty)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


class PythonSource(Source):
    """Standard-library ``.py`` sources, tests and site-packages excluded."""

    def __init__(self, domain: str):
        self.domain = domain
        self.root = _stdlib_root()
        self.description = f"built-in: Python standard library sources in {self.root} (tests excluded)"

    def _files(self) -> list[str]:
        return [r for r in _stdlib_py_files(self.root) if not _is_docstring_module(r)]

    def fingerprint(self) -> Any:
        return {"kind": "builtin-python", "digest": _stat_digest(self.root, self._files())}

    def documents(self, seed: int) -> Iterator[Document]:
        for rel in seeded_order(self._files(), seed):
            yield Document(rel, load=functools.partial(self._load, rel))

    def _load(self, rel: str) -> str:
        text = _read_python(self.root / rel)
        return "" if _head_is_generated(text) else text


def torch_include_dir() -> Optional[Path]:
    """``torch/include`` of the installed torch, found without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "include"
        if inc.is_dir():
            return inc
    return None


_CPP_SUFFIXES = (".h", ".hpp", ".cuh", ".hxx")


class CppSource(Source):
    """C/C++ headers shipped in ``torch/include``; generated headers (ATen/ops,
    files marked ``@generated``) are skipped."""

    def __init__(self, domain: str):
        self.domain = domain
        root = torch_include_dir()
        if root is None:
            raise self._err("the built-in C++ corpus reads torch/include, but no installed torch package was found")
        self.root = root
        self.description = f"built-in: C/C++ headers in {self.root} (generated headers excluded)"

    def _files(self) -> list[str]:
        return _walk(
            self.root,
            accept=lambda fn: fn.endswith(_CPP_SUFFIXES),
            prune=lambda rel, d: (rel == "ATen" and d == "ops") or d.startswith("."),
        )

    def fingerprint(self) -> Any:
        return {"kind": "builtin-cpp", "digest": _stat_digest(self.root, self._files())}

    def documents(self, seed: int) -> Iterator[Document]:
        for rel in seeded_order(self._files(), seed):
            yield Document(rel, load=functools.partial(self._load, rel))

    def _load(self, rel: str) -> str:
        text = _read_text_lenient(self.root / rel)
        return "" if _head_is_generated(text) else text


def module_docstrings(source: str) -> str:
    """Module, class and function docstrings of a Python source, in source order,
    separated by blank lines. The code is parsed, never imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid-escape SyntaxWarnings in old sources
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return "\n\n".join(out)


class ProseSource(Source):
    """English technical prose: the Python documentation topics
    (``pydoc_data.topics``) plus docstrings of a quarter of the stdlib modules
    (those modules are left out of the ``python`` domain)."""

    def __init__(self, domain: str):
        self.domain = domain
        self.root = _stdlib_root()
        spec = importlib.util.find_spec("pydoc_data.topics")
        self.topics_file = Path(spec.origin) if spec is not None and spec.origin else None
        self.description = (
            f"built-in: Python documentation topics (pydoc_data) and stdlib docstrings in {self.root}"
        )

    def _modules(self) -> list[str]:
        return [r for r in _stdlib_py_files(self.root) if _is_docstring_module(r)]

    def fingerprint(self) -> Any:
        topics = None
        if self.topics_file is not None:
            st = self.topics_file.stat()
            topics = [str(self.topics_file), st.st_size, st.st_mtime_ns]
        return {"kind": "builtin-prose", "topics": topics, "digest": _stat_digest(self.root, self._modules())}

    def documents(self, seed: int) -> Iterator[Document]:
        try:
            from pydoc_data.topics import topics  # a plain dict of str: safe to import
        except ImportError:
            topics = {}
        ids = [f"topics/{k}" for k in topics] + [f"docstrings/{r}" for r in self._modules()]
        for doc_id in seeded_order(ids, seed):
            kind, _, key = doc_id.partition("/")
            if kind == "topics":
                yield Document(doc_id, text=str(topics[key]))
            else:
                yield Document(doc_id, load=functools.partial(self._load, key))

    def _load(self, rel: str) -> str:
        return module_docstrings(_read_python(self.root / rel))


_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice)", re.IGNORECASE)
# Code/data files that happen to be called license.py, LICENSE.json, ...
_NOT_LICENSE_SUFFIXES = {".py", ".pyc", ".pyi", ".so", ".dll", ".json", ".js", ".html", ".h", ".c", ".cpp", ".pxd"}


def _dist_name(dist: importlib.metadata.Distribution) -> str:
    name = dist.metadata["Name"] if dist.metadata is not None else None
    return re.sub(r"[-_.]+", "-", name or "unknown").lower()


class LegalSource(Source):
    """Licence and notice files of installed distributions (``LICENSE*``,
    ``LICENCE*``, ``COPYING*``, ``NOTICE*`` and ``License-File`` entries),
    deduplicated by content (the copy with the smallest id is kept)."""

    def __init__(self, domain: str):
        self.domain = domain
        self.description = "built-in: licence/notice files of installed Python distributions"

    def fingerprint(self) -> Any:
        # Listing *.dist-info folders is much cheaper than reading every RECORD file,
        # and any install, upgrade or removal changes it.
        h = hashlib.sha256()
        for entry in sys.path:
            try:
                names = sorted(os.listdir(entry or "."))
            except OSError:
                continue
            for n in names:
                if n.endswith((".dist-info", ".egg-info")):
                    try:
                        mtime = os.stat(os.path.join(entry or ".", n)).st_mtime_ns
                    except OSError:
                        mtime = -1
                    h.update(f"{entry}\0{n}\0{mtime}\n".encode())
        return {"kind": "builtin-legal", "digest": h.hexdigest()}

    def _files(self) -> list[tuple[str, Path]]:
        found: dict[str, Path] = {}
        for dist in importlib.metadata.distributions():
            try:
                files = dist.files or []
                meta = dist.metadata
                declared = (meta.get_all("License-File") or []) if meta is not None else []
            except Exception:  # a broken install must not break the built-in stream
                continue
            name = _dist_name(dist)
            for f in files:
                p = str(f).replace("\\", "/")
                is_declared = any(p == x or p.endswith("/" + x) for x in declared)
                if not (is_declared or _LICENSE_NAME.match(f.name)):
                    continue
                if Path(p).suffix.lower() in _NOT_LICENSE_SUFFIXES:
                    continue
                found.setdefault(f"{name}/{p}", Path(dist.locate_file(f)))
        return sorted(found.items())

    def documents(self, seed: int) -> Iterator[Document]:
        # Deduplication needs every file's content; licence files are small (a few MB
        # in all), so they are read up front.
        by_content: dict[str, tuple[str, str]] = {}
        for doc_id, path in self._files():
            text = _read_text_lenient(path)
            if not text.strip():
                continue
            key = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if key not in by_content:  # _files() is sorted: the smallest id wins
                by_content[key] = (doc_id, text)
        texts = dict(by_content.values())
        for doc_id in seeded_order(texts, seed):
            yield Document(doc_id, text=texts[doc_id])


_BUILTIN_SOURCES: dict[str, Callable[[str], Source]] = {
    "python": PythonSource,
    "cpp": CppSource,
    "prose": ProseSource,
    "legal": LegalSource,
}


# --------------------------------------------------------------------------- rows (jsonl, parquet, hub)


_MISSING = object()


def _lookup(row: Mapping, field: str) -> Any:
    """``row[field]``, or a nested lookup for dotted names (``meta.pile_set_name``)."""
    if field in row:
        return row[field]
    cur: Any = row
    for part in field.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


class RowReader:
    """Turns a row (mapping) into document text, applying the metadata filter.

    Errors name the domain and ``where`` (file and line/row, or the hub row index).
    """

    def __init__(self, domain: str, text_field: str, filter: Optional[dict]):
        self.domain = domain
        self.text_field = text_field
        self.filter = {
            k: (frozenset(v) if isinstance(v, (list, tuple, set, frozenset)) else frozenset([v]))
            for k, v in (filter or {}).items()
        }

    def text(self, row: Any, where: str) -> Optional[str]:
        """The row's text, or None when the filter rejects it or the text is null."""
        d = f"domain '{self.domain}'"
        if not isinstance(row, Mapping):
            raise StreamError(f"{d}: {where}: expected an object with a '{self.text_field}' field, got {type(row).__name__}")
        for field, allowed in self.filter.items():
            value = _lookup(row, field)
            if value is _MISSING:
                raise StreamError(
                    f"{d}: {where}: filter field '{field}' not found (fields: {', '.join(map(str, row))})"
                )
            try:
                if value not in allowed:
                    return None
            except TypeError:  # unhashable metadata value (list, dict)
                return None
        value = _lookup(row, self.text_field)
        if value is _MISSING:
            raise StreamError(
                f"{d}: {where}: no text field '{self.text_field}' (fields: {', '.join(map(str, row))})"
            )
        if value is None:
            return None
        if not isinstance(value, str):
            raise StreamError(f"{d}: {where}: text field '{self.text_field}' is {type(value).__name__}, not a string")
        return value


# --------------------------------------------------------------------------- local files


class LocalSource(Source):
    """A file or a folder (recursive, sorted, hidden entries skipped) of ``.txt``,
    ``.jsonl`` and ``.parquet`` files.

    Files are visited in seeded order, and the lines/rows of each ``.jsonl`` and
    ``.parquet`` file in a seeded order too, so a small budget reads a random
    sample without loading a large file into memory.
    """

    def __init__(self, domain: str, path: str, text_field: str = "text", filter: Optional[dict] = None):
        self.domain = domain
        self.path = Path(path).expanduser()
        self.rows = RowReader(domain, text_field, filter)
        self.filter = filter
        if not self.path.exists():
            raise self._err(f"path {path} does not exist")
        if self.path.is_file():
            if self.path.suffix.lower() not in LOCAL_SUFFIXES:
                raise self._err(f"file {path} is not a .txt, .jsonl or .parquet file")
            self.root, self.files = self.path.parent, [self.path.name]
        elif self.path.is_dir():
            self.root = self.path
            self.files = _walk(
                self.path,
                accept=lambda fn: fn.lower().endswith(LOCAL_SUFFIXES) and not fn.startswith("."),
                prune=lambda rel, d: d.startswith(".") or d == "__pycache__",
            )
            if not self.files:
                raise self._err(f"folder {path} contains no .txt, .jsonl or .parquet files")
        else:
            raise self._err(f"path {path} is neither a file nor a folder")
        if filter and all(f.lower().endswith(".txt") for f in self.files):
            raise self._err(f"filter needs .jsonl or .parquet rows with metadata, but {path} has only .txt files")
        self.description = f"local: {self.path.resolve()}"

    def fingerprint(self) -> Any:
        return {"kind": "local", "digest": _stat_digest(self.root.resolve(), self.files)}

    def documents(self, seed: int) -> Iterator[Document]:
        for rel in seeded_order(self.files, seed):
            suffix = Path(rel).suffix.lower()
            if suffix == ".txt":
                if not self.filter:  # plain text has no metadata, so a filter excludes it
                    yield Document(rel, load=functools.partial(self._read_txt, rel))
            elif suffix == ".jsonl":
                yield from self._jsonl(rel, seed)
            else:
                yield from self._parquet(rel, seed)

    def _read_txt(self, rel: str) -> str:
        raw = (self.root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._err(f"{self.root / rel}: not valid UTF-8 at byte offset {e.start}") from None
        return text.removeprefix("\ufeff")

    def _jsonl(self, rel: str, seed: int) -> Iterator[Document]:
        path = self.root / rel
        starts, size = _line_starts(path)
        with open(path, "rb") as f:
            for i in _seeded_permutation(len(starts), seed, rel):
                i = int(i)
                end = int(starts[i + 1]) if i + 1 < len(starts) else size
                f.seek(int(starts[i]))
                raw = f.read(end - int(starts[i]))
                where = f"{path} line {i + 1}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise self._err(f"{where}: not valid UTF-8 at byte offset {int(starts[i]) + e.start}") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise self._err(f"{where}: invalid JSON ({e.msg})") from None
                text = self.rows.text(row, where)
                if text is not None:
                    yield Document(f"{rel}:{i + 1}", text=text)

    def _parquet(self, rel: str, seed: int) -> Iterator[Document]:
        import pyarrow.parquet as pq

        path = self.root / rel
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for broken files
            raise self._err(f"{path}: cannot read parquet file ({e})") from None
        columns = pf.schema_arrow.names
        needed = {self.rows.text_field.split(".")[0] if self.rows.text_field not in columns else self.rows.text_field}
        needed |= {k if k in columns else k.split(".")[0] for k in self.rows.filter}
        missing = [c for c in needed if c not in columns]
        if missing:
            raise self._err(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)})")
        offsets = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        for g in _seeded_permutation(pf.num_row_groups, seed, rel):
            g = int(g)
            rows = pf.read_row_group(g, columns=sorted(needed)).to_pylist()
            for j in _seeded_permutation(len(rows), seed, f"{rel}#{g}"):
                row_no = int(offsets[g]) + int(j)
                text = self.rows.text(rows[int(j)], f"{path} row {row_no}")
                if text is not None:
                    yield Document(f"{rel}#{row_no}", text=text)


def _line_starts(path: Path, chunk: int = 1 << 24) -> tuple[np.ndarray, int]:
    """Byte offsets where the lines of ``path`` start (no empty line after a final
    newline), found in fixed-size chunks so huge files need little memory."""
    found = [np.zeros(1, dtype=np.int64)]
    pos = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            found.append(np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(buf)
    starts = np.concatenate(found)
    return starts[starts < pos], pos


# --------------------------------------------------------------------------- Hugging Face hub


def _load_hf(spec: DomainSpec):
    """``datasets.load_dataset`` for a spec; remote code is never trusted."""
    try:
        import datasets
    except ImportError:
        raise StreamError(
            f"domain '{spec.name}': Hugging Face domains need the 'datasets' package, which is not "
            "installed (pip install datasets)"
        ) from None
    extra = {k: getattr(spec, k) for k in ("data_dir", "data_files") if getattr(spec, k) is not None}
    return datasets.load_dataset(
        spec.hf, spec.config, split=spec.split, streaming=spec.streaming, revision=spec.revision, **extra
    )


# Exception class names (anywhere in the MRO) that mean "the network or the Hub
# could not be reached": builtins, requests, httpx, aiohttp and huggingface_hub.
_NETWORK_ERRORS = {
    "ConnectionError", "TimeoutError", "gaierror", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
    "ReadTimeout", "TimeoutException", "TransportError", "NetworkError", "ClientConnectionError",
    "ServerDisconnectedError", "Timeout",
}
_NOT_FOUND_ERRORS = {
    "DatasetNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "DataFilesNotFoundError",
}


def _error_kind(e: BaseException) -> str:
    """``"network"``, ``"gated"``, ``"not-found"`` or ``"other"`` for an exception
    raised while loading or reading a hub dataset."""
    names = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in names:
        return "gated"
    if names & _NETWORK_ERRORS or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
        return "network"
    if names & _NOT_FOUND_ERRORS:
        return "not-found"
    return "other"


def _local_data_files(spec: DomainSpec) -> tuple[Optional[Path], list[str]]:
    """Root and sorted relative paths of the local files a hub spec reads, if any:
    ``hf`` naming a local folder, or ``data_files`` globs matching local files."""
    hf_dir = Path(spec.hf).expanduser()
    root = hf_dir if hf_dir.is_dir() else Path.cwd()
    if spec.data_dir:
        root = root / spec.data_dir
    patterns = _data_file_patterns(spec.data_files)
    if not patterns:
        if not hf_dir.is_dir():
            return None, []
        return root, _walk(root, accept=lambda fn: not fn.startswith("."), prune=lambda rel, d: d.startswith("."))
    found: set[str] = set()
    for pat in patterns:
        full = Path(pat).expanduser()
        full = full if full.is_absolute() else root / full
        for match in glob.glob(str(full), recursive=True):
            if os.path.isfile(match):
                found.add(os.path.relpath(match, root))
    return (root, sorted(found)) if found else (None, [])


class HubSource(Source):
    """A Hugging Face dataset read through ``datasets.load_dataset``.

    Streaming datasets are read in their own order and only as far as the budget
    needs (the block builder stops iterating, so nothing more is downloaded than
    the shards, row groups or compressed blocks holding the rows read);
    map-style datasets (``streaming: false``) are downloaded whole, then visited
    in a seeded order. Document ids are content hashes, so duplicated documents
    share a split. The cache cannot see a hub dataset change: pin ``revision``
    for reproducible runs. Local files named by ``data_files`` (or a local
    folder given as ``hf``) are fingerprinted by size and mtime like ``path:``.
    """

    def __init__(self, spec: DomainSpec):
        self.domain = spec.name
        self.spec = spec
        self.rows = RowReader(spec.name, spec.text_field, spec.filter)
        extra = "".join(
            f", {k}={getattr(spec, k)}" for k in ("config", "data_dir", "revision") if getattr(spec, k) is not None
        )
        self.description = f"hf: {spec.hf} (split={spec.split}{extra})"

    def fingerprint(self) -> Any:
        s = self.spec
        fp = {"kind": "hf", "hf": s.hf, "config": s.config, "split": s.split, "revision": s.revision,
              "data_dir": s.data_dir, "data_files": s.data_files, "streaming": s.streaming}
        root, files = _local_data_files(s)
        if files:
            fp["local"] = _stat_digest(root.resolve(), files)
        return fp

    def _fail(self, e: BaseException, doing: str) -> StreamError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        name = self.spec.hf
        kind = _error_kind(e)
        if kind == "network":
            return self._err(
                f"cannot reach the Hugging Face Hub while {doing} dataset '{name}' (no network, a proxy or "
                f"firewall, or HF_HUB_OFFLINE=1 without a local copy): {detail}"
            )
        if kind == "gated":
            return self._err(
                f"Hugging Face dataset '{name}' is gated: accept its terms on the Hub and log in "
                f"(hf auth login, or set HF_TOKEN): {detail}"
            )
        if kind == "not-found":
            return self._err(
                f"Hugging Face dataset '{name}' not found (check the name, config, data_dir/data_files "
                f"and revision; private datasets need a login): {detail}"
            )
        return self._err(f"{doing} Hugging Face dataset '{name}' failed: {detail}")

    def documents(self, seed: int) -> Iterator[Document]:
        try:
            ds = _load_hf(self.spec)
        except StreamError:
            raise
        except Exception as e:  # network, unknown name, bad config/split, ...
            raise self._fail(e, "loading") from None
        try:
            import datasets

            map_style = isinstance(ds, datasets.Dataset)
        except ImportError:
            map_style = False
        if map_style:
            order: Iterable[int] = _seeded_permutation(len(ds), seed, self.spec.hf)
            rows = ((int(i), ds[int(i)]) for i in order)
        else:
            rows = enumerate(ds)
        while True:
            try:
                i, row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # connection dropped mid-stream, corrupt shard, ...
                raise self._fail(e, "reading") from None
            text = self.rows.text(row, f"row {i}")
            if text:
                yield Document("sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest(), text=text)


# --------------------------------------------------------------------------- factory


def make_source(spec: DomainSpec) -> Source:
    """The source a domain spec describes (StreamError if it cannot be opened)."""
    if spec.builtin is not None:
        return _BUILTIN_SOURCES[spec.builtin](spec.name)
    if spec.path is not None:
        return LocalSource(spec.name, spec.path, spec.text_field, spec.filter)
    return HubSource(spec)
