"""The validation split: held out of the train documents, never reading or touching test."""

import re
from pathlib import Path

import pytest

from lifelong.presets import resolve
from lifelong.build import stream_arguments
from scenarios import StreamError, build_stream
from scenarios.sources import make_source
from scenarios.spec import DomainSpec
from scenarios.validation import TrainDocuments

SMALL = dict(block_len=16, train_tokens=1024, test_tokens=256, progress=False)


def documents(root: Path, name: str = "a", n: int = 60) -> dict:
    """A folder domain whose every document carries a unique tag: '<name>:<i>;'."""
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i}.txt").write_text(f"<{name}:{i};> " + "word " * 12, encoding="utf-8")
    return {"name": name, "path": str(folder)}


def tags(blocks) -> set[str]:
    text = bytes(blocks.tokens.tolist()).decode("utf-8", errors="replace")
    return set(re.findall(r"<(\w+:\d+);>", text))


def test_validation_documents_are_train_documents_and_never_test(tmp_path):
    spec = documents(tmp_path)
    budget = dict(SMALL, train_tokens=8192, test_tokens=8192)  # room for every document
    test_run = build_stream([spec], **budget).blocks[0]
    val_run = build_stream([spec], evaluate_on="validation", **budget).blocks[0]
    test_docs, train_docs = tags(test_run.test), tags(test_run.train)
    val_docs, val_train_docs = tags(val_run.test), tags(val_run.train)
    assert test_docs and val_docs and val_train_docs
    assert not (val_docs | val_train_docs) & test_docs  # test is never read
    assert (val_docs | val_train_docs) <= train_docs
    assert not val_docs & val_train_docs  # a document-level split
    assert val_run.info["evaluated_on"] == "validation" and test_run.info["evaluated_on"] == "test"


def test_test_documents_are_not_even_read(tmp_path):
    spec = DomainSpec.coerce(documents(tmp_path))
    read = [d.doc_id for d in TrainDocuments(make_source(spec), 0.1).documents(0)]
    every = [d.doc_id for d in make_source(spec).documents(0)]
    assert 0 < len(read) < len(every) and all(r.startswith("validation/") for r in read)


def test_validation_blocks_are_cached_apart_from_test_blocks(tmp_path):
    spec = documents(tmp_path / "data")
    args = dict(SMALL, cache_dir=tmp_path / "cache")
    first = build_stream([spec], evaluate_on="validation", **args)
    assert not first.domain_info[0]["cached"]
    test = build_stream([spec], **args)
    assert not test.domain_info[0]["cached"]  # a different entry, not the validation one
    again = build_stream([spec], evaluate_on="validation", **args)
    assert again.domain_info[0]["cached"] and again.domain_info[0]["evaluated_on"] == "validation"
    assert again.blocks[0].test.tokens.tolist() == first.blocks[0].test.tokens.tolist()


def test_too_few_documents_for_a_validation_split_is_refused(tmp_path):
    spec = documents(tmp_path, n=2)
    with pytest.warns(UserWarning, match="split the text by position"):
        with pytest.raises(StreamError, match="too few documents for a validation split"):
            build_stream([spec], evaluate_on="validation", **SMALL)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(StreamError, match=r"unknown evaluate_on 'dev' \(valid: test, validation\)"):
        build_stream([documents(tmp_path)], evaluate_on="dev", **SMALL)


def test_config_key_reaches_the_stream():
    cfg = resolve("smoke", overrides=["stream.evaluate_on=validation"])
    assert stream_arguments(cfg)["evaluate_on"] == "validation"
    with pytest.raises(Exception, match="evaluate_on"):
        resolve("smoke", overrides=["stream.evaluate_on=dev"])
