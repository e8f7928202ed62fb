"""Feed-forward layers for the lifelong-experts platform: PEER (He 2024, a product-key pool of
single-neuron experts), a coarse top-k MoE and a dense FFN baseline, plus expert-usage tools.

Depends on torch only; every layer maps x [..., dim] -> [..., dim] and exposes aux_loss(),
aux_metrics(), flops_per_token(), num_params() and active_params_per_token().

PEER and MoE grow online (``layer.grow(n, optimizer=opt)``, function-preserving, docs/growth.md)
and experts can be frozen (``freeze``); after loading a checkpoint in a fresh process re-install
the optimizer hooks with ``attach(model, optimizer)`` (docs/growth.md, 'Hooks and checkpoints').

PEER's compute path (``PEER(..., kernel="auto" | "reference" | "bag" | "triton")``, or the
EXPERTS_KERNEL environment variable) is described in docs/kernels.md; triton is optional.
"""

from . import kernels
from .dense import DenseFFN
from .freezing import (attach, attached_layers, attached_optimizers, detach, freeze, freeze_existing, freeze_top_used,
                     frozen_ids, unfreeze)
from .growth import kmeans
from .isolation import row_contrast_loss
from .moe import MoE, load_balancing_loss, router_z_loss
from .peer import PEER, QueryNorm, parse_grid
from .product_keys import ProductKeys, product_scores, product_topk, split_ids
from .retrofit import ParallelPEER, retrofit
from .sparse import RetrievalStats, kl_scores, select_top, tfidf_scores
from .surgery import append_rows_
from .usage import UsageCounter, expert_set, jaccard_overlap, kl_to_uniform, track_usage, usage_fraction

__all__ = [
    "PEER", "MoE", "DenseFFN", "UsageCounter",
    "ProductKeys", "product_topk", "product_scores", "split_ids", "QueryNorm", "parse_grid",
    "load_balancing_loss", "router_z_loss",
    "track_usage", "jaccard_overlap", "expert_set", "usage_fraction", "kl_to_uniform",
    "attach", "detach", "attached_layers", "attached_optimizers", "freeze", "unfreeze", "frozen_ids",
    "freeze_existing", "freeze_top_used", "append_rows_", "kmeans", "row_contrast_loss", "kernels",
    "RetrievalStats", "tfidf_scores", "kl_scores", "select_top", "retrofit", "ParallelPEER",
]
