"""The validation split: a held-out share of each domain's *train* documents, for choosing
hyperparameters without ever reading the test split.

A stream built with ``evaluate_on="validation"`` keeps only each domain's train documents (the
test documents, chosen by the usual hash of their id, are never read) and splits those again,
train vs validation, with the same ``test_fraction`` and an independent hash (the ids are
prefixed before hashing). The validation blocks then stand where the test blocks stand, so every
metric, report and interval works unchanged; ``domain_info["evaluated_on"]`` records which split
a run measured. Settings chosen this way are then run on the full train split and reported on
test.
"""

from __future__ import annotations

from typing import Any, Iterator

from .blocks import is_test_doc
from .sources import Document, Source

EVALUATE_ON = ("test", "validation")
_PREFIX = "validation/"


class TrainDocuments(Source):
    """The documents of ``inner`` that are not test documents, renamed so that the train/test split
    of the blocks builder divides them again into train and validation."""

    def __init__(self, inner: Source, test_fraction: float):
        self.inner, self.test_fraction = inner, float(test_fraction)
        self.domain = inner.domain
        self.description = f"{inner.description} (train documents only; a share held out for validation)"

    def fingerprint(self) -> Any:
        return {"validation_of": self.inner.fingerprint(), "test_fraction": self.test_fraction}

    def documents(self, seed: int) -> Iterator[Document]:
        for doc in self.inner.documents(seed):
            if not is_test_doc(doc.doc_id, self.test_fraction):
                yield Document(_PREFIX + doc.doc_id, load=doc.text)
