"""lifelong: a decoder-only LM with PEER experts trained over a stream of text domains with Avalanche."""

__version__ = "0.1.0"

import warnings

# Avalanche imports qpsolvers, which warns at import time that no QP solver is installed; only
# GEM needs one. Silence that one message so the command line's stderr stays one clear line.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
