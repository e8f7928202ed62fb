"""Where the text of a domain comes from, one module per kind of source.

A source yields :class:`Document` objects: a stable ``doc_id`` (relative path,
``file:line``, ``file#row`` or a content hash) plus a lazy loader for the text.
The block builder assigns each document to train or test from a hash of its
``doc_id`` before loading it, so documents of a split that is already full are
never read. Kinds: :mod:`.builtin` (the offline corpus), :mod:`.local`
(``path:``) and :mod:`.hub` (``hf:``); all are deterministic for a given seed
and machine. See docs/streams.md.
"""

from __future__ import annotations

from ..spec import BUILTIN_DOMAINS, DomainSpec
from . import builtin
from .base import Document, Source, hash_unit, seeded_order
from .builtin import CppSource, LegalSource, ProseSource, PythonSource, module_docstrings, torch_include_dir
from .hub import HubSource
from .local import LOCAL_SUFFIXES, LocalSource, RowReader

__all__ = [
    "BUILTIN_DOMAINS",
    "CppSource",
    "Document",
    "HubSource",
    "LOCAL_SUFFIXES",
    "LegalSource",
    "LocalSource",
    "ProseSource",
    "PythonSource",
    "RowReader",
    "Source",
    "hash_unit",
    "make_source",
    "module_docstrings",
    "seeded_order",
    "torch_include_dir",
]


def make_source(spec: DomainSpec) -> Source:
    """The source a domain spec describes (StreamError if it cannot be opened)."""
    if spec.builtin is not None:
        return builtin.SOURCES[spec.builtin](spec.name)
    if spec.path is not None:
        return LocalSource(spec.name, spec.path, spec.text_field, spec.filter)
    return HubSource(spec)
