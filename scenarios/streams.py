"""Domain streams: the named streams, :func:`build_stream` (plain PyTorch datasets, no
Avalanche) and :func:`build_benchmark` (the same stream as an Avalanche benchmark, one
experience per text domain, in order)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from .blocks import BlockDataset, DomainBlocks, blocks_of_source, build_domain_blocks
from .errors import StreamError
from .pretrain import PretrainSpec, coerce_pretrain, split_sources
from .sources import make_source, seeded_order
from .spec import BUILTIN_DOMAINS, DomainSpec
from .tokenizer import Tokenizer, get_tokenizer
from .validation import EVALUATE_ON, TrainDocuments

_BUILTIN = [DomainSpec(name, builtin=name) for name in BUILTIN_DOMAINS]

#: Tokens per domain (train + test, split by ``test_fraction``) that the hub streams
#: stream: 5 M tokens = about 5 MB of text with the byte tokenizer.
HUB_DOMAIN_TOKENS = 5_000_000

_PILE = "monology/pile-uncopyrighted"
#: Permissive licences (GitHub licence keys of the ``license`` column) kept by the code domain.
_PERMISSIVE = ["mit", "apache-2.0", "bsd-3-clause", "bsd-2-clause"]


def _hub(name: str, hf: str, **kw: Any) -> DomainSpec:
    return DomainSpec(name, hf=hf, streaming=True, max_tokens=HUB_DOMAIN_TOKENS, **kw)


#: Named streams. ``builtin`` and ``smoke`` are the same four offline domains (their
#: budgets come from :func:`build_stream`'s arguments; ``smoke`` is meant to be run
#: with tiny ones). The ``hub-*`` streams read public Hugging Face datasets that need
#: no loading script; they need the network (and ``zstandard`` for the Pile), and each
#: domain stops reading after ``max_tokens``. See :data:`STREAM_NOTES`.
STREAMS: dict[str, list[DomainSpec]] = {
    "builtin": list(_BUILTIN),
    "smoke": list(_BUILTIN),
    "hub-wiki-code-science": [
        _hub("wikipedia", "wikimedia/wikipedia", config="20231101.en"),
        _hub("code", "codeparrot/codeparrot-clean", text_field="content", filter={"license": _PERMISSIVE}),
        _hub("science", "common-pile/arxiv_papers_filtered"),
    ],
    "hub-pile": [
        _hub(name, _PILE, filter={"meta.pile_set_name": subset})
        for name, subset in (
            ("arxiv", "ArXiv"), ("github", "Github"), ("freelaw", "FreeLaw"), ("stackexchange", "StackExchange"),
        )
    ],
}

#: Size and licence of every named stream's data (one line each); the hub streams
#: are documented in more detail in examples/STREAMS.md.
STREAM_NOTES: dict[str, str] = {
    "builtin": "offline: text already on this machine (stdlib sources and docstrings, torch C++ headers, "
               "Python docs, licence files); each file keeps its own licence (PSF, BSD, MIT, ...).",
    "smoke": "same four offline domains as builtin, meant for tiny budgets.",
    "hub-wiki-code-science": "network: English Wikipedia 2023-11-01 (wikimedia/wikipedia, ~6.4 M articles, "
                             "~20 GB; CC BY-SA 3.0 and GFDL), Python files from GitHub "
                             "(codeparrot/codeparrot-clean, ~5.4 M files, ~50 GB; each file under its "
                             "repository's licence, only MIT/Apache-2.0/BSD kept), openly licensed arXiv "
                             "papers (common-pile/arxiv_papers_filtered, ~0.3 M papers, ~20 GB; CC BY, "
                             "CC BY-SA, CC0). 5 M tokens streamed per domain.",
    "hub-pile": "network: four subsets of the Pile without its copyrighted parts "
                "(monology/pile-uncopyrighted: the Pile less Books3, BookCorpus2, OpenSubtitles, "
                "YTSubtitles and OWT2, ~0.7 TB of text in jsonl.zst); each subset keeps its source's "
                "terms (arXiv: the authors' licences, mostly arXiv's non-exclusive one; GitHub: each "
                "repository's licence; FreeLaw: public-domain US court opinions; StackExchange: "
                "CC BY-SA). Every domain streams the same mixed files and keeps its subset's rows. "
                "Needs the zstandard package. 5 M tokens per domain.",
}

#: Named streams whose domains read the Hugging Face Hub.
HUB_STREAMS = tuple(name for name, domains in STREAMS.items() if any(d.hf for d in domains))

ORDERS = ("given", "shuffle")


def resolve_domains(spec: Union[str, Sequence[Union[DomainSpec, dict]]]) -> list[DomainSpec]:
    """A stream name (see :data:`STREAMS`) or a list of DomainSpec/dicts -> validated DomainSpecs."""
    if isinstance(spec, str):
        if spec not in STREAMS:
            raise StreamError(f"unknown stream '{spec}' (valid: {', '.join(STREAMS)})")
        return [DomainSpec.coerce(s.to_dict()) for s in STREAMS[spec]]
    if isinstance(spec, (DomainSpec, dict)) or not isinstance(spec, Sequence):
        raise StreamError(f"a stream is a stream name or a list of domains, got {type(spec).__name__}")
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


@dataclass
class Stream:
    """A built stream as plain PyTorch datasets (no Avalanche): per domain, in stream
    order, its name, spec, train/test :class:`BlockDataset` (``blocks[i].train``,
    ``blocks[i].test``) and ``domain_info`` record."""

    domains: list[str]
    domain_specs: list[DomainSpec | None]
    """None for the pretraining phase, a mixture of sources (its ``domain_info`` names them)."""
    blocks: list[DomainBlocks]
    domain_info: list[dict]
    vocab_size: int
    block_len: int
    tokenizer: Tokenizer
    experiences_per_domain: int = 1
    pretrain: str | None = None
    """The name of the pretraining phase's domain (always the first), or None."""

    def content_hashes(self) -> list[str]:
        """Each domain's SHA-256 of its train and test token ids: what a run trained and is tested on,
        so a run continued later can tell whether its data changed (a touched file that gives the
        same tokens does not count)."""
        out = []
        for b in self.blocks:
            h = hashlib.sha256()
            for split in (b.train, b.test):
                h.update(np.ascontiguousarray(split.tokens.numpy()).tobytes())
            out.append(h.hexdigest())
        return out

    def train_parts(self) -> list[tuple[int, int, BlockDataset]]:
        """``(domain_index, part, blocks)`` of every train experience, in order: each
        domain's train blocks cut into ``experiences_per_domain`` consecutive parts."""
        out = []
        for i, b in enumerate(self.blocks):
            n, k = b.train.num_blocks, self.experiences_per_domain
            out += [(i, part, b.train.slice(n * part // k, n * (part + 1) // k)) for part in range(k)]
        return out


def build_stream(
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
    lossy_tokenizer: bool = False,
    pretrain: Union[PretrainSpec, dict, None] = None,
    evaluate_on: str = "test",
) -> Stream:
    """Build the train and test blocks of every domain of a stream, without Avalanche.

    Args:
        spec: a stream name (see :data:`STREAMS`) or a list of DomainSpec / dicts.
        block_len: tokens per block ``T``; items are ``(input_ids[T], target_ids[T])`` int64.
        train_tokens, test_tokens: per-domain budgets of target tokens (upper bounds;
            a smaller domain gives fewer). A domain's ``max_tokens`` replaces both.
        test_fraction: share of documents (by a hash of their id) that go to test.
        seed: domain order for ``order="shuffle"`` and which documents fill the budgets.
        order: ``"given"`` or ``"shuffle"``.
        tokenizer: ``"byte"`` or a local Hugging Face tokenizer name/path.
        cache_dir: folder of cached token blocks (one file per domain); None = no cache.
        experiences_per_domain: how many consecutive train experiences each domain's
            train blocks make (online setting; see :meth:`Stream.train_parts`); the test
            stream keeps one experience per domain.
        progress: show tqdm bars while tokenising (only on a terminal).
        lossy_tokenizer: accept a tokenizer that does not give a document's text back
            (lowercasing, accent stripping, unknown tokens); refused by default.
        pretrain: a pretraining phase (:class:`scenarios.pretrain.PretrainSpec` or a mapping of
            it) that becomes the stream's first domain whatever the order; a share of each
            domain's documents moves into it. None or an empty phase: no phase.
        evaluate_on: ``"test"``, or ``"validation"``: the test documents are never read, and a
            ``test_fraction`` of the train documents (by an independent hash) stands in for the
            test split (scenarios/validation.py), for choosing settings without touching test.

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
    if evaluate_on not in EVALUATE_ON:
        raise StreamError(f"unknown evaluate_on '{evaluate_on}' (valid: {', '.join(EVALUATE_ON)})")
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
    phase = coerce_pretrain(pretrain)
    tok = get_tokenizer(tokenizer)
    common = dict(block_len=block_len, test_fraction=float(test_fraction), seed=seed, cache_dir=cache_dir,
                  progress=progress, lossy_tokenizer=bool(lossy_tokenizer))
    sources = [make_source(d) for d in domains]
    built: list[DomainBlocks] = []
    held_out = (lambda s: TrainDocuments(s, test_fraction)) if evaluate_on == "validation" else (lambda s: s)
    if phase is not None:
        mixture, sources = split_sources(phase, domains, sources)
        built.append(blocks_of_source(held_out(mixture), phase.key(), tok,
                                      train_budget=phase.train_tokens or train_tokens, test_budget=test_tokens,
                                      **common))
    sources = [held_out(s) for s in sources]
    built += [build_domain_blocks(d, tok, train_tokens=train_tokens, test_tokens=test_tokens, source=source, **common)
              for d, source in zip(domains, sources)]
    specs: list[DomainSpec | None] = ([None] if phase is not None else []) + list(domains)
    names = ([phase.name] if phase is not None else []) + [d.name for d in domains]
    for name, b in zip(names, built):
        b.info["evaluated_on"] = evaluate_on
        if evaluate_on == "validation" and b.info["split"] != "document":
            # a positional split would take validation text from where test text may lie
            raise StreamError(f"domain '{name}': too few documents for a validation split apart from the test "
                              "documents; evaluate it on test, or give it more documents")
        if b.train.num_blocks < experiences_per_domain:
            raise StreamError(
                f"domain '{name}': {b.train.num_blocks} train blocks cannot make "
                f"{experiences_per_domain} experiences"
            )
    return Stream(
        domains=names, domain_specs=specs, blocks=built, domain_info=[b.info for b in built],
        vocab_size=tok.vocab_size, block_len=block_len, tokenizer=tok, experiences_per_domain=experiences_per_domain,
        pretrain=phase.name if phase is not None else None,
    )


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


def build_benchmark(spec: Union[str, Sequence[Union[DomainSpec, dict]]], **stream_args: Any):
    """Build an Avalanche benchmark with one train and one test experience per domain:
    :func:`build_stream` (same arguments), wrapped.

    Returns:
        The Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``, plus
        ``domains`` (names in stream order), ``vocab_size``, ``domain_info`` (one dict
        per domain), ``block_len``, ``tokenizer`` and ``domain_specs``. Every
        experience carries ``domain`` (its domain's name), ``domain_index`` and
        ``domain_part`` (its part of the domain's train blocks; 0 for test).

    Raises:
        StreamError: any bad input, with a one-line message naming it.
    """
    stream = build_stream(spec, **stream_args)
    from avalanche.benchmarks import benchmark_from_datasets

    parts = stream.train_parts()
    bench = benchmark_from_datasets(
        train=[_avalanche_dataset(blocks) for _, _, blocks in parts],
        test=[_avalanche_dataset(b.test) for b in stream.blocks],
    )
    # Plain attributes (not Avalanche ExperienceAttributes) are never masked, and the
    # shallow copies Avalanche makes in train()/eval()/logging() keep them.
    for exp, (index, part, _) in zip(bench.train_stream, parts):
        exp.domain, exp.domain_index, exp.domain_part = stream.domains[index], index, part
    for index, exp in enumerate(bench.test_stream):
        exp.domain, exp.domain_index, exp.domain_part = stream.domains[index], index, 0

    bench.domains = list(stream.domains)
    bench.domain_specs = stream.domain_specs
    bench.domain_info = stream.domain_info
    bench.content_hashes = stream.content_hashes
    bench.pretrain = stream.pretrain
    bench.vocab_size = stream.vocab_size
    bench.block_len = stream.block_len
    bench.tokenizer = stream.tokenizer
    return bench
