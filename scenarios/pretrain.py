"""A pretraining phase at the head of a stream: one broad "general" domain, a mixture of
documents, learned before the stream's domains so that a study starts from a model that knows
something.

Its documents come from two places: a ``share`` of every stream domain's documents, chosen by a
hash of their id and then taken out of that domain (train and test alike, so no document is seen
in both phases), and any further ``domains`` read whole. The mixture visits its sources in turn,
one document each, so every source fills the budget about equally until it runs out. Its test
split is a column of the accuracy matrix like any domain's: forgetting on it is forgetting of
general knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .errors import StreamError
from .sources import Document, Source, hash_unit, make_source
from .spec import DomainSpec, check_fields, load_dataclass

_SALT = "pretrain"


@dataclass
class PretrainSpec:
    """Where the pretraining phase's text comes from (off unless ``share`` > 0 or ``domains``).

    Fields:
        share: fraction of each stream domain's documents moved into the phase (by a hash of
            the document id, independent of the seed); 0 keeps every domain whole.
        domains: further sources read whole into the phase (``DomainSpec`` mappings).
        name: the phase's domain name (a column of every matrix).
        train_tokens: train-split token budget of the phase; None = the stream's per-domain
            budget. Its test budget is the stream's.
    """

    share: float = 0.0
    domains: list[DomainSpec] = field(default_factory=list)
    name: str = "general"
    train_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        check_fields(self, "stream.pretrain", StreamError)  # also turns domain mappings into DomainSpecs
        if not 0 <= self.share < 1:
            raise StreamError(f"stream.pretrain.share must be in [0, 1), got {self.share!r}")
        if not self.name.strip():
            raise StreamError("stream.pretrain.name must be a non-empty domain name")
        if self.train_tokens is not None and self.train_tokens <= 0:
            raise StreamError(f"stream.pretrain.train_tokens must be a positive integer, got {self.train_tokens!r}")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise StreamError("stream.pretrain.domains: a domain name is used twice")

    @property
    def enabled(self) -> bool:
        return self.share > 0 or bool(self.domains)

    def key(self) -> dict:
        """What the phase's text depends on, for cache keys."""
        return {"pretrain": self.name, "share": self.share, "domains": [d.to_dict() for d in self.domains]}


def in_pretrain_share(doc_id: str, share: float) -> bool:
    """Whether a stream domain's document belongs to the pretraining phase."""
    return hash_unit(_SALT, doc_id) < share


class ShareSource(Source):
    """The documents of ``inner`` inside (``pretrain=True``) or outside the pretraining share."""

    def __init__(self, inner: Source, share: float, pretrain: bool):
        self.inner, self.share, self.pretrain = inner, float(share), bool(pretrain)
        self.domain = inner.domain
        part = "the pretraining share" if pretrain else "all but the pretraining share"
        self.description = f"{inner.description} ({part}, {share:.0%} of documents by hash)"

    def fingerprint(self) -> Any:
        return {"inner": self.inner.fingerprint(), "share": self.share, "pretrain": self.pretrain}

    def documents(self, seed: int) -> Iterator[Document]:
        for doc in self.inner.documents(seed):
            if in_pretrain_share(doc.doc_id, self.share) == self.pretrain:
                yield doc


class MixtureSource(Source):
    """Documents of several sources in turn (one each, skipping exhausted ones); ids are prefixed
    with their source's domain so that two sources' ids never collide."""

    def __init__(self, domain: str, sources: list[Source]):
        if not sources:
            raise StreamError(f"domain '{domain}': a mixture needs at least one source")
        self.domain, self.sources = domain, list(sources)
        self.description = "mixture of: " + "; ".join(f"{s.domain}: {s.description}" for s in self.sources)

    def fingerprint(self) -> Any:
        return [{"domain": s.domain, "source": s.fingerprint()} for s in self.sources]

    def documents(self, seed: int) -> Iterator[Document]:
        iterators = [(s.domain, s.documents(seed)) for s in self.sources]
        while iterators:
            alive = []
            for name, docs in iterators:
                doc = next(docs, None)
                if doc is None:
                    continue
                alive.append((name, docs))
                yield Document(f"{name}/{doc.doc_id}", load=doc.text)
            iterators = alive


def coerce_pretrain(obj: Any) -> Optional[PretrainSpec]:
    """A PretrainSpec from None, a PretrainSpec or a mapping of its fields; None when it is off."""
    if obj is None:
        return None
    spec = obj if isinstance(obj, PretrainSpec) else load_dataclass(PretrainSpec, obj, "stream.pretrain", StreamError)
    return spec if spec.enabled else None


def split_sources(pretrain: PretrainSpec, domains: list[DomainSpec], sources: list[Source]) -> tuple[Source, list[Source]]:
    """(the phase's mixture source, the stream domains' sources less the phase's share)."""
    names = {d.name for d in domains}
    if pretrain.name in names:
        raise StreamError(f"stream.pretrain.name '{pretrain.name}' is also a domain of the stream; name the phase apart")
    clash = [d.name for d in pretrain.domains if d.name in names]
    if clash:
        raise StreamError(f"stream.pretrain.domains: '{clash[0]}' is also a domain of the stream; a source read whole "
                          "into the phase cannot be learned again later (use pretrain.share for a part of it)")
    parts: list[Source] = []
    rest = list(sources)
    if pretrain.share > 0:
        parts = [ShareSource(s, pretrain.share, pretrain=True) for s in sources]
        rest = [ShareSource(s, pretrain.share, pretrain=False) for s in sources]
    parts += [make_source(d) for d in pretrain.domains]
    return MixtureSource(pretrain.name, parts), rest
