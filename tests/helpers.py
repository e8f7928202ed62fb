"""Helpers shared by test modules."""

import torch


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
