"""What every source shares: :class:`Document`, the :class:`Source` interface, and the
seeded orders and file digests that keep document order and cache keys stable."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

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
    # surrogateescape: file names that are not valid UTF-8 must not break the cache key
    h = hashlib.sha256(str(root).encode(errors="surrogateescape"))
    for rel in relpaths:
        try:
            st = os.stat(root / rel)
            line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError:
            line = f"{rel}\0missing\n"
        h.update(line.encode(errors="surrogateescape"))
    return h.hexdigest()


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _file_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a regular readable file, or None when it is one (symlinks
    followed). Only stats the path: opening a named pipe would block."""
    try:
        st = os.stat(path)
    except OSError as e:
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link and e.errno == errno.ELOOP:
            return "looping link"
        if is_link and e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling link"
        return f"cannot be read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return _kind(st.st_mode)
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading; OSError if it is not a regular file. Opened
    non-blocking so that a named pipe swapped in after the folder walk cannot hang us."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _walk(
    root: Path,
    accept: Callable[[str], bool],
    prune: Callable[[str, str], bool],
    skipped: Optional[list[tuple[str, str]]] = None,
) -> list[str]:
    """Sorted POSIX relative paths of the regular readable files under ``root`` that
    ``accept`` their name; ``prune(rel_dir, name)`` drops a sub-folder without visiting
    it. Accepted names that are not regular readable files (pipes, sockets, devices,
    dangling or looping links) and unreadable folders go to ``skipped`` as (path, why)."""

    def rel_of(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    def folder_error(e: OSError) -> None:
        if skipped is not None:
            skipped.append((rel_of(e.filename or root), f"unreadable folder: {e.strerror or e}"))

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=folder_error):
        rel_dir = rel_of(dirpath)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if not prune(rel_dir, d)]
        for fn in filenames:
            if accept(fn):
                rel = f"{rel_dir}/{fn}" if rel_dir else fn
                problem = _file_problem(Path(dirpath, fn))
                if problem is None:
                    out.append(rel)
                elif skipped is not None:
                    skipped.append((rel, problem))
    if skipped is not None:
        skipped.sort()
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
