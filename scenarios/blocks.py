"""Documents -> fixed-length (input, target) token blocks, with a document-level
train/test split and an on-disk cache.

A split's documents are tokenised in visiting order, joined with
:data:`SEPARATOR` and cut into blocks of ``T`` inputs and ``T`` targets (stride
``T``); a document goes to test by a hash of its id, independent of the seed.
Packing, the positional fallback split and the cache key: see docs/streams.md.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import cache_key, cache_path, prepare_cache_dir, read_cache, write_cache
from .errors import StreamError
from .sources import Source, hash_unit, make_source
from .spec import DomainSpec
from .tokenizer import Tokenizer, round_trip_error

#: Bump when packing, splitting or the cache format changes: old entries are then ignored.
#: Text put between two documents of a split.
SEPARATOR = "\n\n"

#: Process-wide counters (documents tokenised, cache hits/misses/writes); tests and
#: users can check that a cached build did not re-read its source.
STATS: collections.Counter = collections.Counter()


class BlockDataset(Dataset):
    """Blocks of one split: item ``i`` is ``(input_ids[T], target_ids[T])`` int64,
    ``target = input`` shifted left by one token."""

    def __init__(self, tokens: torch.Tensor, block_len: int):
        if tokens.dim() != 1:
            raise ValueError("tokens must be a flat 1-D tensor")
        self.tokens = tokens
        self.block_len = int(block_len)
        self.num_blocks = max(0, (len(tokens) - 1) // self.block_len)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)  # Avalanche passes numpy and torch integers too
        if i < 0:
            i += self.num_blocks
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {index} out of range (0..{self.num_blocks - 1})")
        start = i * self.block_len
        chunk = self.tokens[start : start + self.block_len + 1].to(torch.int64)
        return chunk[:-1], chunk[1:]

    def slice(self, start: int, stop: int) -> "BlockDataset":
        """Blocks ``start..stop-1`` as a dataset sharing this one's memory."""
        start, stop = max(0, start), min(stop, self.num_blocks)
        if stop <= start:
            return BlockDataset(self.tokens[:0], self.block_len)
        return BlockDataset(self.tokens[start * self.block_len : stop * self.block_len + 1], self.block_len)


@dataclass
class DomainBlocks:
    """The blocks of one domain and its ``domain_info`` record."""

    train: BlockDataset
    test: BlockDataset
    info: dict


def is_test_doc(doc_id: str, test_fraction: float) -> bool:
    """The split of a document: deterministic in its id, independent of the seed."""
    return hash_unit("split", doc_id) < test_fraction


def split_budgets(train_tokens: int, test_tokens: int, test_fraction: float, max_tokens: Optional[int]) -> tuple[int, int]:
    """Token budgets (train, test); a domain's ``max_tokens`` replaces both and is
    divided by ``test_fraction``."""
    if max_tokens is None:
        return int(train_tokens), int(test_tokens)
    test = int(round(max_tokens * test_fraction))
    return int(max_tokens) - test, test


def _storage_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    # torch has only partial uint16 support: widen to int32, which indexes and casts everywhere.
    if arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(arr))


class _Packer:
    """Accumulates one split's documents (token ids and bytes per token)."""

    def __init__(self, need: int, sep_ids: np.ndarray, sep_bytes: np.ndarray):
        self.need = need
        self.sep_ids, self.sep_bytes = sep_ids, sep_bytes
        self.ids: list[np.ndarray] = []
        self.nbytes: list[np.ndarray] = []
        self.doc_starts: list[int] = []  # offset of each document in the joined stream
        self.n = 0

    @property
    def full(self) -> bool:
        return self.n >= self.need

    def add(self, ids: np.ndarray, nbytes: np.ndarray) -> int:
        before = self.n
        if self.doc_starts:
            self.ids.append(self.sep_ids)
            self.nbytes.append(self.sep_bytes)
            self.n += len(self.sep_ids)
        self.doc_starts.append(self.n)
        self.ids.append(ids)
        self.nbytes.append(nbytes)
        self.n += len(ids)
        return self.n - before

    def joined(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if not self.ids:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
        return np.concatenate(self.ids).astype(dtype, copy=False), np.concatenate(self.nbytes).astype(np.int64)


def _num_blocks(n_tokens: int, budget: int, block_len: int) -> int:
    return max(0, min(budget // block_len, (n_tokens - 1) // block_len))


def _docs_overlapping(doc_starts: list[int], lo: int, hi: int) -> int:
    """Number of documents with at least one token in ``[lo, hi)``."""
    starts = np.asarray(doc_starts + [np.iinfo(np.int64).max], dtype=np.int64)
    return int(np.sum((starts[:-1] < hi) & (starts[1:] > lo))) if hi > lo else 0


def _pack(
    source: Source,
    tokenizer: Tokenizer,
    *,
    block_len: int,
    train_budget: int,
    test_budget: int,
    test_fraction: float,
    seed: int,
    has_filter: bool,
    progress: bool,
    lossy_tokenizer: bool,
) -> tuple[np.ndarray, np.ndarray, dict]:
    d = f"domain '{source.domain}'"
    round_trip = True  # until a document does not come back from its tokens
    T = block_len
    dtype = _storage_dtype(tokenizer.vocab_size)
    sep_ids, sep_bytes = tokenizer.encode_with_bytes(SEPARATOR)
    need = {s: (b // T) * T + 1 for s, b in (("train", train_budget), ("test", test_budget))}
    packers = {s: _Packer(need[s], sep_ids, sep_bytes) for s in ("train", "test")}
    content = hashlib.sha256()
    read = 0

    from tqdm.auto import tqdm

    bar = tqdm(
        total=need["train"] + need["test"], unit="tok", unit_scale=True, leave=False,
        desc=f"tokenising {source.domain}", disable=not (progress and sys.stderr.isatty()),
    )
    try:
        for doc in source.documents(seed):
            split = "test" if is_test_doc(doc.doc_id, test_fraction) else "train"
            p = packers[split]
            if p.full:  # don't even read it
                continue
            text = doc.text()
            read += 1
            if not text.strip():
                continue
            ids, nbytes = tokenizer.encode_with_bytes(text)
            STATS["documents_tokenized"] += 1
            if len(ids) == 0:
                continue
            if round_trip and (diff := round_trip_error(tokenizer, text, ids)) is not None:
                if not lossy_tokenizer:
                    raise StreamError(_lossy_message(d, tokenizer, f"{doc.doc_id}, {diff}"))
                round_trip = False
            content.update(f"{split}\0".encode() + text.encode("utf-8") + b"\0")
            grew = p.add(ids, nbytes)
            bar.update(min(grew, max(0, need[split] - (p.n - grew))))
            if packers["train"].full and packers["test"].full:
                break
    finally:
        bar.close()

    tr, te = packers["train"], packers["test"]
    if tr.n + te.n == 0:
        if has_filter:
            raise StreamError(f"{d}: no text after filtering ({read} documents read)")
        raise StreamError(f"{d}: no text (all {read} documents are empty)")

    train_ids, train_bytes = tr.joined(dtype)
    test_ids, test_bytes = te.joined(dtype)
    k_train = _num_blocks(len(train_ids), train_budget, T)
    k_test = _num_blocks(len(test_ids), test_budget, T)
    mode = "document"
    if k_train and k_test:
        train_docs = _docs_overlapping(tr.doc_starts, 0, k_train * T + 1)
        test_docs = _docs_overlapping(te.doc_starts, 0, k_test * T + 1)
    else:
        # Too few documents for a document-level split: split the joined text by position.
        mode = "position"
        starts = list(tr.doc_starts)
        pieces_ids, pieces_bytes = [train_ids], [train_bytes]
        if tr.n and te.n:
            pieces_ids.append(sep_ids.astype(dtype))
            pieces_bytes.append(sep_bytes.astype(np.int64))
        offset = tr.n + (len(sep_ids) if tr.n and te.n else 0)
        starts += [offset + s for s in te.doc_starts]
        pieces_ids.append(test_ids)
        pieces_bytes.append(test_bytes)
        all_ids, all_bytes = np.concatenate(pieces_ids), np.concatenate(pieces_bytes)
        n = len(all_ids)
        if n < 2 * (T + 1):
            raise StreamError(
                f"{d}: only {n} tokens of text, fewer than the {2 * (T + 1)} that one train and one "
                f"test block of block_len={T} need"
            )
        test_len = min(max(T + 1, int(round(test_fraction * n))), n - (T + 1))
        cut = n - test_len
        train_ids, train_bytes = all_ids[:cut], all_bytes[:cut]
        test_ids, test_bytes = all_ids[cut:], all_bytes[cut:]
        k_train = _num_blocks(len(train_ids), train_budget, T)
        k_test = _num_blocks(len(test_ids), test_budget, T)
        if not (k_train and k_test):
            raise StreamError(
                f"{d}: train_tokens/test_tokens/max_tokens leave no room for one block of block_len={T}"
            )
        train_docs = _docs_overlapping(starts, 0, k_train * T + 1)
        test_docs = _docs_overlapping(starts, cut, cut + k_test * T + 1)
        warnings.warn(
            f"{d}: too few documents for a document-level train/test split; "
            f"split the text by position instead (last {test_fraction:.0%} to test)",
            stacklevel=4,
        )

    train_ids = train_ids[: k_train * T + 1]
    test_ids = test_ids[: k_test * T + 1]
    test_target_bytes = int(test_bytes[1 : k_test * T + 1].sum())
    info = {
        "name": source.domain,
        "source": source.description,
        "content_hash": content.hexdigest(),
        "split": mode,
        "train_docs": int(train_docs),
        "test_docs": int(test_docs),
        "train_blocks": int(k_train),
        "test_blocks": int(k_test),
        "train_tokens": int(k_train * T),
        "test_tokens": int(k_test * T),
        "test_bytes": test_target_bytes,
        "bytes_per_token": test_target_bytes / (k_test * T),
        "tokenizer": tokenizer.identity,
        "tokenizer_round_trip": round_trip,
        "block_len": T,
        # the test blocks themselves: two runs are compared pairwise only on the same ones
        "test_hash": hashlib.sha256(np.ascontiguousarray(test_ids).tobytes()).hexdigest(),
    }
    return np.ascontiguousarray(train_ids), np.ascontiguousarray(test_ids), info


def _lossy_message(d: str, tokenizer: Tokenizer, where: str) -> str:
    return (f"{d}: tokenizer '{tokenizer.name}' does not give the text back ({where}), so bits "
            "per byte would divide by bytes the model never predicted; use a tokenizer that keeps the "
            "text, or accept it with lossy_tokenizer (stream.lossy_tokenizer=true)")


def build_domain_blocks(
    spec: Union[DomainSpec, dict],
    tokenizer: Tokenizer,
    *,
    block_len: int,
    train_tokens: int,
    test_tokens: int,
    test_fraction: float,
    seed: int,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    lossy_tokenizer: bool = False,
    source: Optional[Source] = None,
) -> DomainBlocks:
    """Train and test blocks of one domain, from the cache when an entry with the
    same key exists. The key hashes the spec, the source's fingerprint (paths, sizes
    and mtimes of its files), the tokenizer, the separator, block_len, the budgets,
    test_fraction, the seed and the cache format (scenarios/cache.py). A tokenizer that does not give a
    document's text back (lowercasing, accent stripping, unknown tokens) is refused unless
    ``lossy_tokenizer``; ``info["tokenizer_round_trip"]`` records which. ``source`` replaces the
    spec's own source (a part of it: its fingerprint then says which)."""
    spec = DomainSpec.coerce(spec)
    train_budget, test_budget = split_budgets(train_tokens, test_tokens, test_fraction, spec.max_tokens)
    return blocks_of_source(
        source or make_source(spec), spec.to_dict(), tokenizer, block_len=block_len, train_budget=train_budget,
        test_budget=test_budget, test_fraction=test_fraction, seed=seed, cache_dir=cache_dir, progress=progress,
        lossy_tokenizer=lossy_tokenizer, has_filter=bool(spec.filter),
    )


def blocks_of_source(
    source: Source,
    key_spec: dict,
    tokenizer: Tokenizer,
    *,
    block_len: int,
    train_budget: int,
    test_budget: int,
    test_fraction: float,
    seed: int,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    lossy_tokenizer: bool = False,
    has_filter: bool = False,
) -> DomainBlocks:
    """The blocks of any source (named ``source.domain``), cached under a key that hashes
    ``key_spec`` with everything :func:`build_domain_blocks` lists."""
    name = source.domain
    params = dict(block_len=int(block_len), train_budget=int(train_budget), test_budget=int(test_budget),
                  test_fraction=float(test_fraction), seed=int(seed))
    cache = prepare_cache_dir(cache_dir)
    key = cache_key(key_spec, source, tokenizer, SEPARATOR, **params) if cache is not None else None
    path = cache_path(cache, name, key) if cache is not None else None

    hit = read_cache(path, key) if path is not None else None
    if hit is not None and any(len(ids) and int(ids.max()) >= tokenizer.vocab_size for ids in hit[:2]):
        hit = None  # ids the tokenizer cannot produce: a foreign or crafted entry, rebuilt like a damaged one
    if hit is not None:
        STATS["cache_hits"] += 1
        train, test, info = hit
        if not info["tokenizer_round_trip"] and not lossy_tokenizer:
            raise StreamError(_lossy_message(f"domain '{name}'", tokenizer, "found when its blocks were cached"))
        info = dict(info, cached=True, cache_file=str(path))
    else:
        STATS["cache_misses"] += 1
        train, test, info = _pack(
            source, tokenizer, block_len=int(block_len), train_budget=int(train_budget),
            test_budget=int(test_budget), test_fraction=float(test_fraction), seed=int(seed), has_filter=has_filter,
            progress=progress, lossy_tokenizer=lossy_tokenizer,
        )
        if path is not None:
            try:
                write_cache(path, key, train, test, info)
                STATS["cache_writes"] += 1
            except OSError as e:  # the blocks are built: a full disk should not lose them
                warnings.warn(f"domain '{name}': could not write cache entry {path}: {e}", stacklevel=2)
        info = dict(info, cached=False, cache_file=str(path) if path is not None else None)
    return DomainBlocks(
        train=BlockDataset(_to_tensor(train), block_len),
        test=BlockDataset(_to_tensor(test), block_len),
        info=info,
    )
