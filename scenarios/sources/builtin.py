"""The built-in offline corpus: text every installation already has on disk.

Four domains (:data:`scenarios.spec.BUILTIN_DOMAINS`): ``python`` (standard-library sources),
``cpp`` (the C/C++ headers shipped with torch), ``prose`` (the Python
documentation topics and a quarter of the stdlib modules' docstrings) and
``legal`` (licence files of installed packages). The corpus is machine-dependent,
which is why the content hash of the text used is recorded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import sysconfig
import tokenize
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .base import Document, Source, _stat_digest, _walk, hash_unit, seeded_order

_GENERATED = re.compile(
    r"@generated|do not edit|gencodec\.py|auto-?generated\s+by|this\s+file\s+(is|was)\s+(automatically\s+|auto-?)?generated",
    re.IGNORECASE,
)


def _head_is_generated(text: str) -> bool:
    # Machine-generated files (torchgen op headers, gencodec tables, ...) are
    # boilerplate, not the hand-written code a "code" domain should show the model.
    return _GENERATED.search(text[:1024]) is not None


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


#: The source class of each built-in domain name.
SOURCES: dict[str, Callable[[str], Source]] = {
    "python": PythonSource,
    "cpp": CppSource,
    "prose": ProseSource,
    "legal": LegalSource,
}
