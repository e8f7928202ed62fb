"""What every source shares: :class:`Document`, the :class:`Source` interface, and the
seeded orders and file digests that keep document order and cache keys stable."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from ..errors import StreamError


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
