"""Tokenizers: UTF-8 bytes by default, optionally a local Hugging Face tokenizer.

Every tokenizer reports, next to the token ids, how many raw UTF-8 bytes of the
text each token stands for (``encode_with_bytes``). Summed over the target
tokens of the test blocks this gives the byte count that bits-per-byte divides
by, so losses stay comparable across tokenizers.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

from .errors import StreamError


@runtime_checkable
class Tokenizer(Protocol):
    """What the block builder needs from a tokenizer."""

    name: str
    vocab_size: int

    @property
    def identity(self) -> str:
        """A string that changes whenever the token ids of some text would change (cache key)."""

    def encode(self, text: str) -> np.ndarray: ...

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def utf8_len(text: str) -> int:
    """Number of bytes of ``text`` in UTF-8."""
    return len(text.encode("utf-8"))


def round_trip_error(tokenizer: "Tokenizer", text: str, ids: np.ndarray) -> str | None:
    """None when ``tokenizer`` decodes ``ids`` back to ``text`` exactly; otherwise where and how
    they first differ. Tokenizers that say ``lossless = True`` are not checked."""
    if getattr(tokenizer, "lossless", False):
        return None
    back = tokenizer.decode(ids)
    if back == text:
        return None
    i = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    return f"character {i}: {text[i:i + 24]!r} came back as {back[i:i + 24]!r}"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no unknown tokens, one byte per token."""

    name = "byte"
    lossless = True  # every text's bytes come back as they were
    vocab_size = 256

    @property
    def identity(self) -> str:
        return "byte-utf8-v1"

    def encode(self, text: str) -> np.ndarray:
        """Token ids (uint8 array) of ``text``."""
        # frombuffer on an immutable bytes object is read-only; copy so callers may write.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        return ids, np.ones(len(ids), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; a block can start or end inside a multi-byte character, so
        undecodable bytes become U+FFFD instead of raising."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("byte token ids must lie in [0, 255]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def bytes_of(self, text: str) -> int:
        """Raw UTF-8 bytes behind ``text`` (== its number of tokens for this tokenizer)."""
        return utf8_len(text)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """``out[i]`` = byte offset of character ``i`` in UTF-8; ``out[len(text)]`` = total bytes."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


class HFTokenizer:
    """Wraps a *fast* Hugging Face tokenizer (loaded from local files only).

    Bytes per token come from the tokenizer's character offsets: token ``i`` is
    charged the bytes from its start to the next token's start (the last token to
    the end of the text), so whitespace a tokenizer drops is still counted and the
    bytes of a text add up exactly to its UTF-8 length.
    """

    def __init__(self, tokenizer, name: str):
        if not getattr(tokenizer, "is_fast", False):
            raise StreamError(
                f"tokenizer '{name}' is not a fast tokenizer: bits per byte needs the "
                "character offsets only fast tokenizers give"
            )
        self._tok = tokenizer
        self.name = name
        self.vocab_size = int(len(tokenizer))
        self._identity: str | None = None

    @classmethod
    def from_pretrained(cls, name: str) -> "HFTokenizer":
        try:
            import transformers  # noqa: F401  (optional dependency)
        except ImportError:
            raise StreamError(
                f"tokenizer '{name}' needs the 'transformers' package, which is not "
                "installed (pip install transformers), or use tokenizer='byte'"
            ) from None
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... for missing files
            raise StreamError(
                f"tokenizer '{name}' cannot be loaded from local files: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        return cls(tok, name)

    @property
    def identity(self) -> str:
        if self._identity is None:
            backend = getattr(self._tok, "backend_tokenizer", None)
            blob = backend.to_str() if backend is not None else repr(sorted(self._tok.get_vocab().items()))
            self._identity = f"hf:{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        return self._identity

    def encode(self, text: str) -> np.ndarray:
        return self.encode_with_bytes(text)[0]

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok(
            text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if ids.size == 0:
            return ids, np.zeros(0, dtype=np.int32)
        starts = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 0]
        # Byte-level BPE can give several tokens the same (or a non-monotone) start
        # when one character spans tokens; a running max keeps the charges >= 0.
        starts = np.maximum.accumulate(starts)
        starts[0] = 0
        char_to_byte = _char_to_byte_offsets(text)
        bounds = np.append(char_to_byte[np.minimum(starts, len(text))], char_to_byte[-1])
        return ids, np.diff(bounds).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        # no clean-up of spaces around punctuation: the text as the tokens hold it
        return self._tok.decode(list(map(int, ids)), clean_up_tokenization_spaces=False)

    def bytes_of(self, text: str) -> int:
        return utf8_len(text)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def get_tokenizer(tokenizer: Union[str, Tokenizer, None]) -> Tokenizer:
    """``"byte"`` (or None) -> ByteTokenizer; any other string -> local HF tokenizer;
    an object already implementing the protocol is returned unchanged."""
    if tokenizer is None or tokenizer == "byte":
        return ByteTokenizer()
    if isinstance(tokenizer, str):
        if not tokenizer.strip():
            raise StreamError("tokenizer name is empty (use 'byte' or a Hugging Face tokenizer name/path)")
        return HFTokenizer.from_pretrained(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    raise StreamError(f"tokenizer must be 'byte', a tokenizer name/path or a tokenizer object, got {tokenizer!r}")


#: Alias of :func:`get_tokenizer`.
load_tokenizer = get_tokenizer
