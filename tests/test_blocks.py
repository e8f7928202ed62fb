import json
import re

import numpy as np
import pytest
import torch

from scenarios import SEPARATOR, STATS, ByteTokenizer, DomainSpec, StreamError
from scenarios import blocks as B
from scenarios import make_source
from scenarios.sources import hub, local
from scenarios.blocks import BlockDataset, build_domain_blocks, is_test_doc

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
MARK = re.compile(r"<<(\d{3})>>")


def make_corpus(folder, n=60, seed=0):
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        body = " ".join(WORDS[j] for j in rng.randint(0, len(WORDS), size=rng.randint(20, 60)))
        texts[f"doc{i:03d}.txt"] = f"<<{i:03d}>> {body}"
        (folder / f"doc{i:03d}.txt").write_text(texts[f"doc{i:03d}.txt"], encoding="utf-8")
    return texts


def build(folder, **kw):
    args = dict(block_len=16, train_tokens=100_000, test_tokens=100_000, test_fraction=0.2, seed=0, progress=False)
    args.update(kw)
    spec = kw.pop("spec", None) or DomainSpec("w", path=str(folder))
    args.pop("spec", None)
    return build_domain_blocks(spec, ByteTokenizer(), **args)


def text_of(ds: BlockDataset) -> str:
    return ByteTokenizer().decode(ds.tokens.numpy())


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    return folder, make_corpus(folder)


def test_block_dataset_shapes_dtypes_and_shift():
    tokens = torch.arange(0, 3 * 8 + 1 + 5, dtype=torch.int32)[: 3 * 8 + 1]
    ds = BlockDataset(tokens, 8)
    assert len(ds) == 3
    for i in range(3):
        x, y = ds[i]
        assert x.shape == y.shape == (8,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, tokens[i * 8 : i * 8 + 8].long())
        assert torch.equal(y, tokens[i * 8 + 1 : i * 8 + 9].long())
    assert torch.equal(ds[-1][0], ds[2][0])
    assert torch.equal(ds[np.int64(1)][0], ds[1][0])
    with pytest.raises(IndexError):
        ds[3]
    part = ds.slice(1, 3)
    assert len(part) == 2 and torch.equal(part[0][0], ds[1][0]) and torch.equal(part[1][1], ds[2][1])
    assert len(BlockDataset(torch.zeros(0, dtype=torch.uint8), 8)) == 0


def test_blocks_tile_the_stream_without_overlap(corpus):
    folder, _ = corpus
    out = build(folder)
    ds = out.train
    T = ds.block_len
    assert len(ds.tokens) == len(ds) * T + 1
    for i in range(len(ds) - 1):
        x, y = ds[i]
        x2, _ = ds[i + 1]
        assert torch.equal(y[:-1], x[1:])
        assert y[-1] == x2[0]  # stride T: the next block starts where this one's targets end
    rebuilt = torch.cat([ds[i][0] for i in range(len(ds))] + [ds[len(ds) - 1][1][-1:]])
    assert torch.equal(rebuilt, ds.tokens.long())


def test_documents_are_joined_with_separator_in_visiting_order(corpus):
    folder, texts = corpus
    out = build(folder)
    src = make_source(DomainSpec("w", path=str(folder)))
    order = [d.doc_id for d in src.documents(0)]
    train_ids = [i for i in order if not is_test_doc(i, 0.2)]
    test_ids = [i for i in order if is_test_doc(i, 0.2)]
    for ds, ids in ((out.train, train_ids), (out.test, test_ids)):
        pieces = text_of(ds).split(SEPARATOR)
        assert pieces[:-1] == [texts[i] for i in ids[: len(pieces) - 1]]
        assert texts[ids[len(pieces) - 1]].startswith(pieces[-1])  # ragged tail dropped
    assert out.info["split"] == "document"
    assert out.info["train_docs"] == len(train_ids) and out.info["test_docs"] == len(test_ids)


def test_split_is_deterministic_and_disjoint(corpus):
    folder, _ = corpus
    a, b = build(folder, seed=3), build(folder, seed=3)
    assert torch.equal(a.train.tokens, b.train.tokens) and torch.equal(a.test.tokens, b.test.tokens)
    assert a.info["content_hash"] == b.info["content_hash"]
    train_docs = set(MARK.findall(text_of(a.train)))
    test_docs = set(MARK.findall(text_of(a.test)))
    assert train_docs and test_docs and not train_docs & test_docs
    for m in train_docs | test_docs:
        assert is_test_doc(f"doc{m}.txt", 0.2) == (m in test_docs)


def test_seed_changes_order_but_not_which_documents_are_test(corpus):
    folder, _ = corpus
    a, b = build(folder, seed=0), build(folder, seed=1)  # budgets cover the whole corpus
    assert not torch.equal(a.train.tokens[:200], b.train.tokens[:200])
    expected = {f"{i:03d}" for i in range(60) if is_test_doc(f"doc{i:03d}.txt", 0.2)}
    assert 0 < len(expected) < 60
    assert set(MARK.findall(text_of(a.test))) == set(MARK.findall(text_of(b.test))) == expected
    assert MARK.findall(text_of(a.test)) != MARK.findall(text_of(b.test))


def test_small_budget_samples_by_seed_and_respects_budget(corpus):
    folder, _ = corpus
    a = build(folder, train_tokens=400, test_tokens=100, seed=0)
    b = build(folder, train_tokens=400, test_tokens=100, seed=1)
    assert a.info["train_tokens"] == len(a.train) * 16 <= 400 and len(a.train) == 400 // 16
    assert a.info["test_tokens"] == len(a.test) * 16 <= 100 and len(a.test) == 100 // 16
    assert MARK.findall(text_of(a.train)) != MARK.findall(text_of(b.train))


def test_documents_of_a_full_split_are_not_read(corpus, monkeypatch):
    folder, _ = corpus
    reads = []
    real = local.LocalSource._read_txt
    monkeypatch.setattr(local.LocalSource, "_read_txt", lambda self, rel: reads.append(rel) or real(self, rel))
    out = build(folder, train_tokens=100_000, test_tokens=32)  # all train docs, one test doc
    # Every file read ends up in a block: test documents met after the test split
    # was full were skipped unread.
    assert out.info["test_docs"] == 1
    assert len(reads) == out.info["train_docs"] + 1 == 61 - sum(is_test_doc(f"doc{i:03d}.txt", 0.2) for i in range(60))


def test_max_tokens_overrides_budgets(corpus):
    folder, _ = corpus
    out = build(folder, spec=DomainSpec("w", path=str(folder), max_tokens=800))
    assert out.info["train_tokens"] == (800 - 160) // 16 * 16
    assert out.info["test_tokens"] == 160 // 16 * 16
    assert B.split_budgets(10, 5, 0.25, None) == (10, 5)
    assert B.split_budgets(10, 5, 0.25, 400) == (300, 100)


def test_byte_accounting_for_byte_tokenizer(corpus):
    folder, _ = corpus
    info = build(folder).info
    assert info["test_bytes"] == info["test_tokens"] and info["bytes_per_token"] == 1.0


class CharTokenizer:
    """One token per Unicode character (BMP only): tokens stand for 1-3 bytes, and the
    vocabulary needs uint16 storage."""

    name = "char"
    vocab_size = 65536
    identity = "char-test-v1"

    def encode_with_bytes(self, text):
        ids = np.fromiter((ord(c) for c in text), dtype=np.int64, count=len(text))
        return ids, np.fromiter((len(c.encode()) for c in text), dtype=np.int32, count=len(text))

    def encode(self, text):
        return self.encode_with_bytes(text)[0]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_test_bytes_follow_the_tokenizer(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.txt").write_text(f"{i} déjà vu — 東京 naïve café " * 3, encoding="utf-8")
    tok = CharTokenizer()
    out = build_domain_blocks(DomainSpec("u", path=str(folder)), tok, block_len=8, train_tokens=10_000,
                              test_tokens=10_000, test_fraction=0.3, seed=0, progress=False)
    assert out.test.tokens.dtype == torch.int32
    targets = out.test.tokens[1:].tolist()
    assert out.info["test_bytes"] == len(tok.decode(targets).encode("utf-8"))
    assert out.info["bytes_per_token"] == out.info["test_bytes"] / out.info["test_tokens"] > 1.2
    x, y = out.test[0]
    assert x.dtype == torch.int64 and tok.decode(y.tolist()) == tok.decode(out.test.tokens[1:9].tolist())


def test_single_file_falls_back_to_positional_split(tmp_path):
    f = tmp_path / "book.txt"
    lines = [f"line {i} of the only document" for i in range(200)]
    f.write_text("\n".join(lines), encoding="utf-8")
    with pytest.warns(UserWarning, match="domain 'book': too few documents"):
        out = build(f, spec=DomainSpec("book", path=str(f)), test_fraction=0.1)
    assert out.info["split"] == "position"
    assert len(out.train) > 0 and len(out.test) > 0
    full = f.read_text()
    train, test = text_of(out.train), text_of(out.test)
    assert full.startswith(train) and test in full and full.index(test) >= len(train)
    assert 0.05 < len(test) / len(full) <= 0.1 + 16 / len(full)
    assert out.info["train_docs"] == out.info["test_docs"] == 1


def test_too_little_text_is_stream_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words")
    with pytest.raises(StreamError, match="domain 'tiny': only 16 tokens of text"):
        build(tmp_path, spec=DomainSpec("tiny", path=str(tmp_path)))


def test_empty_domain_after_filtering_is_stream_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "x" * 50, "lang": "de"}) + "\n" for _ in range(5)))
    with pytest.raises(StreamError, match="domain 'en': no text after filtering"):
        build(tmp_path, spec=DomainSpec("en", path=str(tmp_path), filter={"lang": "en"}))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "  \n"}) + "\n" for _ in range(5)))
    with pytest.raises(StreamError, match="domain 'blank': no text"):
        build(tmp_path, spec=DomainSpec("blank", path=str(tmp_path)))


# --------------------------------------------------------------------------- cache


def cache_files(d):
    return sorted(p.name for p in d.iterdir())


def test_cache_hit_does_not_read_the_source(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    cache = tmp_path / "cache"
    first = build(folder, cache_dir=cache)
    assert first.info["cached"] is False and len(cache_files(cache)) == 1

    def boom(self, seed):
        raise AssertionError("source read despite a cache hit")

    monkeypatch.setattr(local.LocalSource, "documents", boom)
    before = STATS["documents_tokenized"]
    second = build(folder, cache_dir=cache)
    assert STATS["documents_tokenized"] == before
    assert second.info["cached"] is True
    assert torch.equal(first.train.tokens, second.train.tokens) and torch.equal(first.test.tokens, second.test.tokens)
    assert {k: v for k, v in first.info.items() if k != "cached"} == {
        k: v for k, v in second.info.items() if k != "cached"
    }


def test_cache_invalidated_by_changed_source(corpus, tmp_path):
    folder, texts = corpus
    cache = tmp_path / "cache"
    first = build(folder, cache_dir=cache)
    changed = next(i for i in sorted(texts) if not is_test_doc(i, 0.2))
    (folder / changed).write_text(texts[changed] + " omega omega", encoding="utf-8")
    second = build(folder, cache_dir=cache)
    assert second.info["cached"] is False
    assert second.info["content_hash"] != first.info["content_hash"]
    assert "omega" in text_of(second.train) and "omega" not in text_of(first.train)
    assert len(cache_files(cache)) == 2


def test_cache_key_covers_build_parameters(corpus, tmp_path):
    folder, _ = corpus
    cache = tmp_path / "cache"
    build(folder, cache_dir=cache)
    for kw in ({"block_len": 32}, {"seed": 1}, {"train_tokens": 1000}, {"test_fraction": 0.3}):
        assert build(folder, cache_dir=cache, **kw).info["cached"] is False
    assert len(cache_files(cache)) == 5
    assert build(folder, cache_dir=cache, seed=1).info["cached"] is True


def test_failed_cache_write_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    cache = tmp_path / "cache"
    real_savez = np.savez

    def half_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 partial zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(B.np, "savez", half_then_fail)
    with pytest.warns(UserWarning, match="domain 'w': could not write cache entry"):
        out = build(folder, cache_dir=cache)
    assert len(out.train) > 0 and cache_files(cache) == []

    def interrupted(f, **arrays):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(B.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(folder, cache_dir=cache)
    assert cache_files(cache) == []

    monkeypatch.setattr(B.np, "savez", real_savez)
    assert build(folder, cache_dir=cache).info["cached"] is False
    names = cache_files(cache)
    assert len(names) == 1 and names[0].endswith(".npz") and not names[0].startswith(".")


def test_corrupt_cache_entry_is_rebuilt(corpus, tmp_path):
    folder, _ = corpus
    cache = tmp_path / "cache"
    first = build(folder, cache_dir=cache)
    path = cache / cache_files(cache)[0]
    path.write_bytes(path.read_bytes()[:100])
    again = build(folder, cache_dir=cache)
    assert again.info["cached"] is False and torch.equal(again.train.tokens, first.train.tokens)
    assert build(folder, cache_dir=cache).info["cached"] is True


def test_a_cache_entry_with_ids_the_tokenizer_cannot_produce_is_rebuilt(corpus, tmp_path):
    from scenarios.cache import write_cache

    folder, _ = corpus
    cache = tmp_path / "cache"
    first = build(folder, cache_dir=cache)
    path = cache / cache_files(cache)[0]
    with np.load(path) as z:  # the right key and sizes, one id past the byte vocabulary
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        train, test = z["train"].astype(np.int32), z["test"]
    train[0] = 100_000
    write_cache(path, meta["key"], train, test, meta["info"])
    again = build(folder, cache_dir=cache)
    assert again.info["cached"] is False and torch.equal(again.train.tokens, first.train.tokens)


def test_cache_dir_that_is_a_file(corpus, tmp_path):
    folder, _ = corpus
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StreamError, match="cache_dir"):
        build(folder, cache_dir=f)


def test_cache_entries_hold_no_pickles(corpus, tmp_path):
    folder, _ = corpus
    cache = tmp_path / "cache"
    build(folder, cache_dir=cache)
    with np.load(cache / cache_files(cache)[0], allow_pickle=False) as z:
        assert set(z.files) == {"train", "test", "meta"}
        assert z["train"].dtype == np.uint8
        json.loads(z["meta"].tobytes())


def test_hub_stream_stops_once_budgets_are_full(monkeypatch):
    consumed = []

    def endless_hub(spec):
        for i in range(100_000):
            consumed.append(i)
            yield {"text": f"row {i}: " + "lorem ipsum dolor sit amet " * 4}

    monkeypatch.setattr(hub, "_load_hf", endless_hub)
    out = build_domain_blocks(DomainSpec("hub", hf="org/huge"), ByteTokenizer(), block_len=32, train_tokens=2048,
                              test_tokens=512, test_fraction=0.1, seed=0, progress=False)
    assert len(out.train) == 64 and len(out.test) == 16
    assert len(consumed) < 500  # ~120 bytes per row: the stream was not read to its end
