"""Hugging Face datasets (``hf:``) read through ``datasets.load_dataset``, streaming by
default, and the classification of the errors loading or reading them raises."""

from __future__ import annotations

import glob
import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import StreamError
from ..spec import DomainSpec
from .base import Document, Source, _seeded_permutation, _stat_digest, _walk
from .local import RowReader


def _data_file_patterns(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _data_file_patterns(v)]
    return list(value)


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
    needs; map-style ones (``streaming: false``) are downloaded whole, then visited
    in a seeded order. Document ids are content hashes. The cache cannot see a hub
    dataset change: pin ``revision``. Details: docs/streams.md.
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

