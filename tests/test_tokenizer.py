import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from scenarios import ByteTokenizer, HFTokenizer, StreamError, get_tokenizer, load_tokenizer
from scenarios.tokenizer import _char_to_byte_offsets


def test_byte_tokenizer_roundtrip_and_vocab():
    tok = ByteTokenizer()
    text = "déjà vu — 東京 🚀\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256
    assert ids.dtype == np.uint8
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.bytes_of(text) == len(text.encode("utf-8")) == len(ids)
    ids2, nbytes = tok.encode_with_bytes(text)
    assert np.array_equal(ids, ids2) and nbytes.sum() == len(ids) and set(nbytes.tolist()) == {1}


def test_byte_decode_tolerates_cut_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é")  # two bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([300])


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_char_to_byte_offsets_match_utf8(text):
    offs = _char_to_byte_offsets(text)
    assert len(offs) == len(text) + 1
    for i in range(len(text) + 1):
        assert offs[i] == len(text[:i].encode("utf-8"))


class FakeFastTokenizer:
    """Mimics a Hugging Face fast tokenizer: words and single spaces are tokens,
    other whitespace is dropped (as some tokenizers do), offsets are char spans."""

    is_fast = True

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __len__(self):
        return 1000

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False, return_attention_mask=False):
        import re

        ids, offsets = [], []
        for m in re.finditer(r"\w+|[^\w\s]| ", text):
            ids.append(self.vocab.setdefault(m.group(), len(self.vocab)))
            offsets.append((m.start(), m.end()))
        return {"input_ids": ids, "offset_mapping": offsets}

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é東🚀\n\t.,"))))
def test_hf_wrapper_charges_every_byte_exactly_once(text):
    tok = HFTokenizer(FakeFastTokenizer(), "fake")
    ids, nbytes = tok.encode_with_bytes(text)
    assert len(ids) == len(nbytes)
    assert (nbytes >= 0).all()
    if len(ids):
        assert nbytes.sum() == len(text.encode("utf-8"))


def test_hf_wrapper_bytes_per_token_example():
    tok = HFTokenizer(FakeFastTokenizer(), "fake")
    ids, nbytes = tok.encode_with_bytes("\n\nhé  wo")
    # tokens: "hé", " ", " ", "wo"; the leading newlines are charged to the first token
    assert nbytes.tolist() == [2 + 3, 1, 1, 2]
    assert tok.vocab_size == 1000
    assert tok.identity.startswith("hf:fake:")


def test_hf_wrapper_rejects_slow_tokenizer():
    slow = FakeFastTokenizer()
    slow.is_fast = False
    with pytest.raises(StreamError, match="not a fast tokenizer"):
        HFTokenizer(slow, "slow-tok")


def test_missing_transformers_is_a_stream_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(StreamError, match="gpt2.*transformers"):
        get_tokenizer("gpt2")


def test_get_tokenizer_variants():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    assert isinstance(get_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert get_tokenizer(tok) is tok
    with pytest.raises(StreamError):
        get_tokenizer("  ")
    with pytest.raises(StreamError):
        get_tokenizer(42)


@pytest.fixture(scope="module")
def local_hf_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE trained here and saved like a hub tokenizer (no network)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "déjà vu — 東京 🚀", "def f(x):\n    return x + 1"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return str(path)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("the quick fox é東🚀\n\t  .,"))))
def test_real_hf_tokenizer_charges_every_byte_once(local_hf_tokenizer, text):
    tok = get_tokenizer(local_hf_tokenizer)
    ids, nbytes = tok.encode_with_bytes(text)
    assert len(ids) == len(nbytes) and (nbytes >= 0).all()
    assert int(nbytes.sum()) == (len(text.encode("utf-8")) if len(ids) else 0)
    assert tok.decode(ids) == text


def test_real_hf_tokenizer_in_a_stream(local_hf_tokenizer, tmp_path):
    from scenarios import build_benchmark

    tok = get_tokenizer(local_hf_tokenizer)
    assert isinstance(tok, HFTokenizer) and 256 < tok.vocab_size <= 400
    assert tok.identity == get_tokenizer(local_hf_tokenizer).identity
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog — déjà vu\n" * 3)
    bench = build_benchmark([{"name": "fox", "path": str(tmp_path)}], block_len=16, train_tokens=320,
                            test_tokens=64, tokenizer=local_hf_tokenizer, progress=False)
    info = bench.domain_info[0]
    assert bench.vocab_size == tok.vocab_size and info["tokenizer"] == tok.identity
    assert info["bytes_per_token"] > 1.5  # merges make tokens longer than one byte
    x, y = bench.test_stream[0].dataset[0]
    assert x.dtype == y.dtype == torch.int64 and int(x.max()) < tok.vocab_size
    # Bits per byte divides by the raw bytes behind the test targets: the bytes of their
    # text, up to a character cut at either end of the split.
    ds = bench.test_stream[0].dataset
    targets = torch.cat([ds[j][1] for j in range(len(ds))])
    assert len(targets) == info["test_tokens"] == info["test_blocks"] * 16
    assert abs(info["test_bytes"] - len(tok.decode(targets.tolist()).encode("utf-8"))) <= 8


@pytest.fixture(scope="module")
def lossy_hf_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer that lowercases and strips accents, as BERT's uncased ones do."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("lossy")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_a_tokenizer_that_does_not_give_the_text_back_is_refused_unless_accepted(lossy_hf_tokenizer, tmp_path):
    from scenarios import build_stream

    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"The Quick brown fox {i} jumps over the lazy dog\n" * 3)
    args = dict(block_len=8, train_tokens=160, test_tokens=32, tokenizer=lossy_hf_tokenizer, progress=False,
                cache_dir=tmp_path / "cache")
    spec = [{"name": "fox", "path": str(tmp_path)}]
    with pytest.raises(StreamError, match=r"^domain 'fox': tokenizer .* does not give the text back .*'The Quick"
                                          r".*lossy_tokenizer"):
        build_stream(spec, **args)
    stream = build_stream(spec, lossy_tokenizer=True, **args)
    assert stream.domain_info[0]["tokenizer_round_trip"] is False
    with pytest.raises(StreamError, match="found when its blocks were cached"):  # the cache does not launder it
        build_stream(spec, **args)


def test_byte_and_lossless_tokenizers_round_trip(local_hf_tokenizer, tmp_path):
    from scenarios import build_stream

    (tmp_path / "a.txt").write_text("Déjà vu — the quick brown fox\n" * 40)
    for tokenizer in ("byte", local_hf_tokenizer):
        stream = build_stream([{"name": "a", "path": str(tmp_path)}], block_len=8, train_tokens=64, test_tokens=16,
                              tokenizer=tokenizer, progress=False)
        assert stream.domain_info[0]["tokenizer_round_trip"] is True
