"""Text -> tokens -> fixed-length blocks -> Avalanche benchmarks, one experience per domain.

Does not import ``experts`` or ``lifelong``; Avalanche is imported only when a
benchmark is built.
"""

from .blocks import SEPARATOR, STATS, BlockDataset, build_domain_blocks
from .errors import StreamError
from .sources import BUILTIN_DOMAINS, DomainSpec, make_source
from .streams import HUB_PRESETS, PRESET_NOTES, PRESETS, build_benchmark, resolve_domains
from .tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "BlockDataset",
    "ByteTokenizer",
    "DomainSpec",
    "HFTokenizer",
    "HUB_PRESETS",
    "PRESETS",
    "PRESET_NOTES",
    "SEPARATOR",
    "STATS",
    "StreamError",
    "build_benchmark",
    "build_domain_blocks",
    "get_tokenizer",
    "load_tokenizer",
    "make_source",
    "resolve_domains",
]
