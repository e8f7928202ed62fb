"""Local files (``path:``): a file or a folder of ``.txt``, ``.jsonl`` and ``.parquet``
files, read without the ``datasets`` library (why: see docs/streams.md), and
:class:`RowReader`, which turns ``.jsonl``/``.parquet``/hub rows into text.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Optional

import numpy as np

from ..errors import StreamError
from .base import (
    Document,
    Source,
    _file_problem,
    _open_regular,
    _seeded_permutation,
    _stat_digest,
    _walk,
    seeded_order,
)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

_MISSING = object()

_SKIP_EXAMPLES = 3  # skipped entries named in the warning; the rest are only counted


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
        # os.path, not Path.exists(): that says "missing" for looping links and raises on EACCES
        if not os.path.lexists(self.path):
            raise self._err(f"path {path} does not exist")
        if os.path.isdir(self.path):
            self.root = self.path
            skipped: list[tuple[str, str]] = []
            self.files = _walk(
                self.path,
                accept=lambda fn: fn.lower().endswith(LOCAL_SUFFIXES) and not fn.startswith("."),
                prune=lambda rel, d: d.startswith(".") or d == "__pycache__",
                skipped=skipped,
            )
            if not self.files:
                why = f" that can be read; {_skipped_summary(skipped)}" if skipped else ""
                raise self._err(f"folder {path} contains no .txt, .jsonl or .parquet files{why}")
            if skipped:
                warnings.warn(f"domain '{domain}': {_skipped_summary(skipped)}", UserWarning, stacklevel=3)
        else:
            problem = _file_problem(self.path)
            if problem is not None:
                raise self._err(f"path {path} is not a readable file or folder ({problem})")
            if self.path.suffix.lower() not in LOCAL_SUFFIXES:
                raise self._err(f"file {path} is not a .txt, .jsonl or .parquet file")
            self.root, self.files = self.path.parent, [self.path.name]
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

    def _read_error(self, path: Path, e: OSError) -> StreamError:
        return self._err(f"{path}: cannot read file ({e.strerror or e})")

    def _read_txt(self, rel: str) -> str:
        try:
            with _open_regular(self.root / rel) as f:
                raw = f.read()
        except OSError as e:
            raise self._read_error(self.root / rel, e) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._err(f"{self.root / rel}: not valid UTF-8 at byte offset {e.start}") from None
        return text.removeprefix("\ufeff")

    def _jsonl(self, rel: str, seed: int) -> Iterator[Document]:
        path = self.root / rel
        try:
            starts, size = _line_starts(path)
            f = _open_regular(path)
        except OSError as e:
            raise self._read_error(path, e) from None
        with f:
            for i in _seeded_permutation(len(starts), seed, rel):
                i = int(i)
                end = int(starts[i + 1]) if i + 1 < len(starts) else size
                try:
                    f.seek(int(starts[i]))
                    raw = f.read(end - int(starts[i]))
                except OSError as e:
                    raise self._read_error(path, e) from None
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
                except RecursionError:
                    raise self._err(f"{where}: JSON nested too deeply") from None
                except ValueError as e:  # e.g. an integer with more digits than int() allows
                    raise self._err(f"{where}: invalid JSON ({e})") from None
                text = self.rows.text(row, where)
                if text is not None:
                    yield Document(f"{rel}:{i + 1}", text=text)

    def _parquet(self, rel: str, seed: int) -> Iterator[Document]:
        path = self.root / rel
        try:
            f = _open_regular(path)
        except OSError as e:
            raise self._read_error(path, e) from None
        with f:
            yield from self._parquet_rows(f, path, rel, seed)

    def _parquet_rows(self, f: BinaryIO, path: Path, rel: str, seed: int) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
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
            try:
                rows = pf.read_row_group(g, columns=sorted(needed)).to_pylist()
            except (OSError, pa.ArrowException) as e:  # a corrupt row group, or a read error
                raise self._err(f"{path}: cannot read parquet file ({e})") from None
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
    with _open_regular(path) as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            found.append(np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(buf)
    starts = np.concatenate(found)
    return starts[starts < pos], pos


def _skipped_summary(skipped: list[tuple[str, str]]) -> str:
    """One line counting the skipped folder entries and naming the first few."""
    n = len(skipped)
    what = "entry that is not a regular readable file" if n == 1 else "entries that are not regular readable files"
    # ascii() for names with control characters: the message must stay one line
    shown = [f"{rel if rel.isprintable() else ascii(rel)} ({why})" for rel, why in skipped[:_SKIP_EXAMPLES]]
    more = f", and {n - _SKIP_EXAMPLES} more" if n > _SKIP_EXAMPLES else ""
    return f"skipped {n} {what}: {', '.join(shown)}{more}"
