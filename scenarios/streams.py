"""Domain streams -> Avalanche benchmarks (one experience per text domain, in order)."""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

from .blocks import BlockDataset, DomainBlocks, build_domain_blocks
from .errors import StreamError
from .sources import DomainSpec, seeded_order
from .tokenizer import Tokenizer, get_tokenizer

_BUILTIN = [DomainSpec(name, builtin=name) for name in ("python", "cpp", "prose", "legal")]

#: Named streams. Token budgets come from :func:`build_benchmark`'s arguments, so
#: ``smoke`` is the same four domains meant to be run with tiny budgets.
PRESETS: dict[str, list[DomainSpec]] = {
    "builtin": list(_BUILTIN),
    "smoke": list(_BUILTIN),
}

ORDERS = ("given", "shuffle")


def resolve_domains(spec: Union[str, Sequence[Union[DomainSpec, dict]]]) -> list[DomainSpec]:
    """A preset name or a list of DomainSpec/dicts -> validated DomainSpecs."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise StreamError(f"unknown stream preset '{spec}' (valid: {', '.join(PRESETS)})")
        return [DomainSpec.coerce(s.to_dict()) for s in PRESETS[spec]]
    if isinstance(spec, (DomainSpec, dict)) or not isinstance(spec, Sequence):
        raise StreamError(f"a stream is a preset name or a list of domains, got {type(spec).__name__}")
    domains = [DomainSpec.coerce(s) for s in spec]
    if not domains:
        raise StreamError("the stream has no domains")
    seen: set[str] = set()
    for d in domains:
        if d.name in seen:
            raise StreamError(f"domain '{d.name}': name used twice in the stream")
        seen.add(d.name)
    return domains


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StreamError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _avalanche_dataset(blocks: BlockDataset):
    from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    # Items stay (input_ids, target_ids): the task label is a data attribute that is
    # *not* appended to items, so task-balanced loaders work while the experience
    # has no `task_labels`, and Avalanche calls model(x) rather than model(x, t).
    return AvalancheDataset(
        [blocks],
        data_attributes=[DataAttribute(ConstantSequence(0, len(blocks)), "targets_task_labels")],
    )


def build_benchmark(
    spec: Union[str, Sequence[Union[DomainSpec, dict]]],
    block_len: int = 128,
    train_tokens: int = 200_000,
    test_tokens: int = 20_000,
    test_fraction: float = 0.1,
    seed: int = 0,
    order: str = "given",
    tokenizer: Union[str, Tokenizer] = "byte",
    cache_dir: Union[str, os.PathLike, None] = None,
    experiences_per_domain: int = 1,
    progress: bool = True,
):
    """Build an Avalanche benchmark with one train and one test experience per domain.

    Args:
        spec: a preset name (see :data:`PRESETS`) or a list of DomainSpec / dicts.
        block_len: tokens per block ``T``; items are ``(input_ids[T], target_ids[T])`` int64.
        train_tokens, test_tokens: per-domain budgets of target tokens (upper bounds;
            a smaller domain gives fewer). A domain's ``max_tokens`` replaces both.
        test_fraction: share of documents (by a hash of their id) that go to test.
        seed: domain order for ``order="shuffle"`` and which documents fill the budgets.
        order: ``"given"`` or ``"shuffle"``.
        tokenizer: ``"byte"`` or a local Hugging Face tokenizer name/path.
        cache_dir: folder of cached token blocks (one file per domain); None = no cache.
        experiences_per_domain: split each domain's train blocks into this many
            consecutive train experiences (online setting); the test stream keeps one
            experience per domain.
        progress: show tqdm bars while tokenising (only on a terminal).

    Returns:
        The Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``, plus
        ``domains`` (names in stream order), ``vocab_size``, ``domain_info`` (one dict
        per domain), ``block_len``, ``tokenizer`` and ``domain_specs``. Every
        experience carries ``domain`` (its domain's name) and ``domain_index``.

    Raises:
        StreamError: any bad input, with a one-line message naming it.
    """
    domains = resolve_domains(spec)
    _check_int("block_len", block_len, 1)
    _check_int("train_tokens", train_tokens, block_len)
    _check_int("test_tokens", test_tokens, block_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StreamError(f"seed must be an integer, got {seed!r}")
    _check_int("experiences_per_domain", experiences_per_domain, 1)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise StreamError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    if order not in ORDERS:
        raise StreamError(f"unknown domain order '{order}' (valid: {', '.join(ORDERS)})")
    for d in domains:
        if d.max_tokens is not None:
            train_b = d.max_tokens - round(d.max_tokens * test_fraction)
            if min(train_b, d.max_tokens - train_b) < block_len:
                raise StreamError(
                    f"domain '{d.name}': max_tokens={d.max_tokens} leaves fewer than block_len={block_len} "
                    f"tokens for train or test (test_fraction={test_fraction})"
                )
    if order == "shuffle":
        by_name = {d.name: d for d in domains}
        domains = [by_name[n] for n in seeded_order(by_name, seed)]
    tok = get_tokenizer(tokenizer)

    built: list[DomainBlocks] = [
        build_domain_blocks(
            d, tok, block_len=block_len, train_tokens=train_tokens, test_tokens=test_tokens,
            test_fraction=float(test_fraction), seed=seed, cache_dir=cache_dir, progress=progress,
        )
        for d in domains
    ]

    train_sets, train_meta = [], []
    for i, (d, b) in enumerate(zip(domains, built)):
        if b.train.num_blocks < experiences_per_domain:
            raise StreamError(
                f"domain '{d.name}': {b.train.num_blocks} train blocks cannot make "
                f"{experiences_per_domain} experiences"
            )
        n = b.train.num_blocks
        for part in range(experiences_per_domain):
            lo, hi = n * part // experiences_per_domain, n * (part + 1) // experiences_per_domain
            train_sets.append(_avalanche_dataset(b.train.slice(lo, hi)))
            train_meta.append((d.name, i, part))

    from avalanche.benchmarks import benchmark_from_datasets

    bench = benchmark_from_datasets(
        train=train_sets, test=[_avalanche_dataset(b.test) for b in built]
    )
    # Plain attributes (not Avalanche ExperienceAttributes) are never masked, and the
    # shallow copies Avalanche makes in train()/eval()/logging() keep them.
    for exp, (name, index, part) in zip(bench.train_stream, train_meta):
        exp.domain, exp.domain_index, exp.domain_part = name, index, part
    for index, (exp, d) in enumerate(zip(bench.test_stream, domains)):
        exp.domain, exp.domain_index, exp.domain_part = d.name, index, 0

    bench.domains = [d.name for d in domains]
    bench.domain_specs = domains
    bench.domain_info = [b.info for b in built]
    bench.vocab_size = tok.vocab_size
    bench.block_len = block_len
    bench.tokenizer = tok
    return bench
