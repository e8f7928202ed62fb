"""The block cache: one file per domain, keyed by everything its blocks depend on, written
atomically and read back only when the key and the sizes match (docs/streams.md, "The block cache")."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import StreamError
from .sources import Source
from .spec import DomainSpec
from .tokenizer import Tokenizer

CACHE_VERSION = 2  # 2: info records whether the tokenizer gave the text back and the test blocks' hash


def cache_key(spec: Union[DomainSpec, dict], source: Source, tokenizer: Tokenizer, separator: str,
              **params: Any) -> str:
    """What a domain's blocks depend on, hashed: spec, source fingerprint, tokenizer, separator, settings."""
    spec_d = spec.to_dict() if isinstance(spec, DomainSpec) else dict(spec)
    if spec_d.get("path") is not None:
        spec_d["path"] = str(Path(spec_d["path"]).expanduser().resolve())
    blob = {
        "version": CACHE_VERSION,
        "spec": spec_d,
        "source": source.fingerprint(),
        "tokenizer": tokenizer.identity,
        "separator": separator,
        **params,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, domain: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", domain)[:48] or "domain"
    return cache_dir / f"{safe}-{key[:32]}.npz"


def read_cache(path: Path, key: str) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    """The cached entry, or None when absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            train, test = z["train"], z["test"]
        T = meta["info"]["block_len"]
        ok = (
            meta.get("key") == key
            and len(train) == meta["info"]["train_blocks"] * T + 1
            and len(test) == meta["info"]["test_blocks"] * T + 1
        )
        return (train, test, meta["info"]) if ok else None
    except Exception:  # truncated/corrupt file, foreign content: treat as a miss
        return None


def write_cache(path: Path, key: str, train: np.ndarray, test: np.ndarray, info: dict) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace, so a
    crash or a concurrent reader never sees half an entry."""
    meta = np.frombuffer(json.dumps({"key": key, "info": info}).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train=train, test=test, meta=meta)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache is often shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def prepare_cache_dir(cache_dir: Union[str, os.PathLike, None]) -> Optional[Path]:
    """The cache folder, created if needed (StreamError if it cannot be)."""
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StreamError(f"cache_dir {cache_dir}: cannot create folder ({e.strerror or e})") from None
    if not path.is_dir():
        raise StreamError(f"cache_dir {cache_dir}: not a folder")
    return path
