"""Text -> tokens -> fixed-length blocks -> streams of domains -> Avalanche benchmarks,
one experience per domain.

Does not import ``experts`` or ``lifelong``; Avalanche is imported only by
:func:`build_benchmark`, never by :func:`build_stream`. See docs/streams.md.
"""

from .blocks import SEPARATOR, STATS, BlockDataset, DomainBlocks, build_domain_blocks
from .errors import StreamError
from .sources import make_source
from .spec import BUILTIN_DOMAINS, DomainSpec, check_fields, check_value, load_dataclass
from .streams import HUB_STREAMS, STREAM_NOTES, STREAMS, Stream, build_benchmark, build_stream, resolve_domains
from .tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "BlockDataset",
    "ByteTokenizer",
    "DomainBlocks",
    "DomainSpec",
    "HFTokenizer",
    "HUB_STREAMS",
    "SEPARATOR",
    "STATS",
    "STREAMS",
    "STREAM_NOTES",
    "Stream",
    "StreamError",
    "build_benchmark",
    "build_domain_blocks",
    "build_stream",
    "check_fields",
    "check_value",
    "get_tokenizer",
    "load_dataclass",
    "load_tokenizer",
    "make_source",
    "resolve_domains",
]
