"""Helpers shared by test modules."""

import math

import torch
import torch.nn.functional as F

from experts import PEER, MoE


def randomize_peer_(layer):
    """Randomise a PEER layer's norm affine, BatchNorm running statistics and score offsets in place,
    so that no component can hide behind an identity initialisation; returns the layer."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("norm."):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
        if layer.query_norm == "batchnorm":
            layer.norm.bn.running_mean.normal_(0.0, 0.3)
            layer.norm.bn.running_var.uniform_(0.5, 2.0)
        layer.codebooks.offset1.normal_(0.0, 0.3)
    return layer


# ---- tiny layers shared by the growth, freezing and surgery tests


def tiny_peer(grid=(4, 4), heads=2, top_k=2, key_dim=4, dim=8, seed=0, **kw):
    """A float32 PEER with randomised norm affine, BN running stats and score offsets."""
    torch.manual_seed(seed)
    layer = PEER(dim=dim, num_experts=grid, heads=heads, top_k=top_k, key_dim=key_dim, **kw)
    return randomize_peer_(layer)


def teacher(dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(dim, 4 * dim, generator=g), torch.randn(4 * dim, dim, generator=g)
    return lambda x: torch.tanh(x @ w1 / math.sqrt(dim)) @ w2 / math.sqrt(4 * dim)


def train(layer, optimizer, steps, x, target):
    layer.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target) + layer.aux_loss()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def tiny_moe(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoE(**(dict(dim=6, num_experts=4, hidden=5, top_k=2) | kw))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    return layer
