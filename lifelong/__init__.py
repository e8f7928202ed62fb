"""lifelong: a decoder-only LM with PEER experts trained over a stream of text domains with Avalanche."""

__version__ = "0.1.0"
