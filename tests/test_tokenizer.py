import sys

import numpy as np
import pytest
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
