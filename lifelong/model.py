"""A small decoder-only transformer whose feed-forward blocks are swappable.

Pre-norm GPT (nanoGPT layout): token + learned position embeddings, causal
self-attention, and per block one FFN built from the config: dense by default,
PEER or MoE in the blocks named by `model.ffn_layers` (the paper puts one PEER
layer in place of the middle block's FFN). The LM head is tied to the token
embedding. The model's settings (`model.*` of a run config) are defined here, next
to what they build; everything about training lives elsewhere.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import PEER, DenseFFN, MoE
from lifelong.adapters import is_adapter
from lifelong.errors import ConfigError, check_positive

Activation = Literal["gelu", "relu"]


@dataclass
class DenseConfig:
    """Dense feed-forward block: dim -> hidden_mult * dim -> dim."""

    hidden_mult: int = 4
    activation: Activation = "gelu"

    def __post_init__(self) -> None:
        check_positive("model.dense", hidden_mult=self.hidden_mult)


@dataclass
class PEERConfig:
    """PEER layer (He 2024): a product-key pool of single-neuron experts (docs/peer.md)."""

    num_experts: int = 64 * 64
    """Pool size; a perfect square n*n (an n x n grid of product keys)."""
    heads: int = 4
    """Retrieval heads sharing the pool."""
    top_k: int = 8
    """Experts retrieved per head (must not exceed a codebook side, sqrt(num_experts))."""
    key_dim: int = 64
    """Query/key width, split into two halves for the two sub-key codebooks."""
    activation: Activation = "gelu"
    query_norm: Literal["batchnorm", "layernorm", "rmsnorm", "none"] = "batchnorm"
    """"batchnorm" (paper), "layernorm", "rmsnorm" or "none"."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """"softmax" over each head's top-k scores (paper) or "sigmoid"."""

    def __post_init__(self) -> None:
        check_positive("model.peer", num_experts=self.num_experts, heads=self.heads,
                       top_k=self.top_k, key_dim=self.key_dim)
        side = math.isqrt(self.num_experts)
        if side * side != self.num_experts:
            raise ConfigError(f"model.peer.num_experts: {self.num_experts} is not a perfect square "
                              f"(the pool is an n x n grid of product keys; e.g. {side * side} or {(side + 1) ** 2})")
        if self.top_k > side:
            raise ConfigError(f"model.peer.top_k ({self.top_k}) exceeds the codebook side "
                              f"sqrt(model.peer.num_experts) = {side}")
        if self.key_dim % 2:
            raise ConfigError(f"model.peer.key_dim must be even (two halves), got {self.key_dim}")


@dataclass
class MoEConfig:
    """Coarse top-k mixture of experts with the ST-MoE stabilisers."""

    num_experts: int = 8
    top_k: int = 2
    hidden_mult: int = 2
    """Each expert is a dense FFN of width hidden_mult * dim."""
    activation: Activation = "gelu"
    balance_coef: float = 0.01
    z_coef: float = 0.001
    capacity_factor: float | None = None
    """null = dropless (default); e.g. 1.25 drops tokens past capacity in training."""
    eval_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        check_positive("model.moe", num_experts=self.num_experts, top_k=self.top_k, hidden_mult=self.hidden_mult)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) exceeds model.moe.num_experts ({self.num_experts})")


@dataclass
class ModelConfig:
    """Decoder-only transformer; each block's FFN is dense, PEER or MoE."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.0
    ffn: Literal["peer", "moe", "dense"] = "peer"
    """FFN kind of the blocks named by `ffn_layers`: "peer", "moe" or "dense"; the rest are dense."""
    ffn_layers: str | int = "middle"
    """Which blocks get `ffn`: "middle" (paper), "all", or comma-separated indices like "1,3"."""
    hf: str | None = None
    """A pretrained Hugging Face causal LM to continue training (a local folder, or a name in the local
    Hugging Face cache; nothing is downloaded): its blocks named by `ffn_layers` get PEER layers
    (`ffn` "peer") or none (`ffn` "dense": the pretrained model as it is), its tokenizer becomes the
    stream's, and dim, n_layers, n_heads and dropout are its own (lifelong/pretrained.py)."""
    hf_insert: Literal["replace", "parallel"] = "parallel"
    """How PEER enters a pretrained block: "parallel" (added to the block's MLP with every expert's
    output vector at zero: the model computes what the pretrained one did) or "replace" (in place of
    the MLP: a new model that must be trained)."""
    hf_revision: str | None = None
    """The branch, tag or commit of a cached hub name `hf` to load (None: the cache's "main"); a
    folder has none."""
    hf_trust_remote_code: bool = False
    """Run the code a model folder ships (transformers' trust_remote_code); never on unless set."""
    dense: DenseConfig = field(default_factory=DenseConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        check_positive("model", dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads)
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.hf is not None and not self.hf.strip():
            raise ConfigError("model.hf must name a model folder or a cached model (or be null)")
        if self.hf is not None and os.path.isdir(os.path.expanduser(self.hf)):
            # a folder by its absolute path: a run resumed from elsewhere finds it (transformers expands no ~)
            self.hf = os.path.abspath(os.path.expanduser(self.hf))
        if self.hf_revision is not None and (self.hf is None or os.path.isdir(self.hf)):
            raise ConfigError("model.hf_revision chooses a version of a model in the local Hugging Face cache, "
                              "but model.hf " + ("is not set" if self.hf is None else "is a folder"))
        if self.hf is not None and self.ffn == "moe":
            raise ConfigError("model.hf takes PEER layers (model.ffn=peer) or none (model.ffn=dense), not 'moe'")
        # validates ffn_layers (a pretrained model's depth, known once it is loaded, bounds it then)
        self._layers(None if self.hf is not None else self.n_layers)

    def special_layers(self, n_layers: int | None = None) -> list[int]:
        """Indices of the blocks whose FFN is `ffn` (the others are dense), of `n_layers` blocks
        (default `model.n_layers`; a pretrained model's own depth)."""
        return self._layers(self.n_layers if n_layers is None else n_layers)

    def _layers(self, n_layers: int | None) -> list[int]:
        """`special_layers` of `n_layers` blocks; None: the depth is not known yet (only the spelling
        and the sign of indices are checked)."""
        spec = str(self.ffn_layers).strip()
        if spec == "middle":
            return [] if n_layers is None else [n_layers // 2]
        if spec == "all":
            return [] if n_layers is None else list(range(n_layers))
        try:
            layers = sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(f"model.ffn_layers: {spec!r} is not 'middle', 'all' or a list like '1,3'") from None
        bad = [i for i in layers if i < 0 or (n_layers is not None and i >= n_layers)]
        if bad or not layers:
            blocks = f"0..{n_layers - 1}" if n_layers is not None else "0, 1, ..."
            raise ConfigError(f"model.ffn_layers: {spec!r} names no block in {blocks}")
        return layers


def build_ffn(cfg: ModelConfig, kind: str) -> nn.Module:
    """One feed-forward block of the given kind; every kind maps [..., dim] -> [..., dim]."""
    if kind == "dense":
        return DenseFFN(cfg.dim, hidden=cfg.dense.hidden_mult * cfg.dim,
                        activation=cfg.dense.activation, dropout=cfg.dropout)
    if kind == "peer":
        p = cfg.peer
        return PEER(dim=cfg.dim, num_experts=p.num_experts, heads=p.heads, top_k=p.top_k,
                    key_dim=p.key_dim, activation=p.activation, query_norm=p.query_norm,
                    score=p.score, dropout=cfg.dropout)
    if kind == "moe":
        m = cfg.moe
        return MoE(dim=cfg.dim, num_experts=m.num_experts, hidden=m.hidden_mult * cfg.dim,
                   top_k=m.top_k, activation=m.activation, balance_coef=m.balance_coef,
                   z_coef=m.z_coef, capacity_factor=m.capacity_factor,
                   eval_capacity_factor=m.eval_capacity_factor, dropout=cfg.dropout)
    raise ValueError(f"unknown FFN kind {kind!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=-1)
        # [B, T, D] -> [B, n_heads, T, D / n_heads]
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def flops_per_token(self, context: int) -> int:
        dim = self.qkv.in_features
        # projections (2 FLOPs per multiply-add) + scores and mixing over on average context/2 keys
        return 2 * 4 * dim * dim + 2 * 2 * dim * (context // 2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_kind: str):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ln_ffn = nn.LayerNorm(cfg.dim)
        self.ffn_kind = ffn_kind
        self.ffn = build_ffn(cfg, ffn_kind)  # the swap point: dense, PEER or MoE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.ffn(self.ln_ffn(x))


class LanguageModel(nn.Module):
    """Decoder-only transformer LM: `logits = model(input_ids)`, [B, T] -> [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, context: int):
        super().__init__()
        self.cfg, self.vocab_size, self.context = cfg, vocab_size, context
        special = set(cfg.special_layers())
        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(context, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.ffn if i in special else "dense") for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init for the transformer's own linears; the FFN modules keep
        # their own init (PEER's is chosen to match a dense FFN's output scale).
        for name, module in self.named_modules():
            if ".ffn" in name or name.endswith("ffn"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        # Residual projections scaled by depth so the residual stream stays O(1).
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.context}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    # -- what the harness needs to know about the FFNs ---------------------

    def ffns(self) -> list[nn.Module]:
        return [block.ffn for block in self.blocks]

    def expert_layers(self) -> dict[str, nn.Module]:
        """The PEER and MoE layers by name, e.g. {"blocks.2.ffn": PEER(...)}."""
        return {f"blocks.{i}.ffn": block.ffn for i, block in enumerate(self.blocks)
                if isinstance(block.ffn, (PEER, MoE))}

    def expert_inputs(self, blocks_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each expert layer's input [tokens, dim] when the model, in eval mode, reads `blocks_BT`."""
        return capture_expert_inputs(self, blocks_BT)

    def num_experts(self) -> int:
        """Total experts over every PEER and MoE layer."""
        return sum(layer.num_experts for layer in self.expert_layers().values())

    def aux_loss(self) -> torch.Tensor:
        """Sum of the FFNs' auxiliary losses from the last forward (MoE balance and z-loss)."""
        return sum((ffn.aux_loss() for ffn in self.ffns()), torch.zeros((), device=self.head.weight.device))

    def flops_per_token(self, convention: Literal["all", "matmul"] = "all") -> dict[str, int]:
        """Forward FLOPs per token by component (a multiply-add is 2 FLOPs). "all" also counts what is
        not a matrix product (norms, activations, PEER's selection and score function); "matmul" counts
        matrix products only, the convention of most scaling studies. Attention counts its matrix
        products in both (docs/flops.md)."""
        out = {}
        for i, block in enumerate(self.blocks):
            ffn = block.ffn.matmul_flops_per_token() if convention == "matmul" else block.ffn.flops_per_token()
            out[f"blocks.{i}.attn"] = block.attn.flops_per_token(self.context)
            out[f"blocks.{i}.ffn ({block.ffn_kind})"] = int(ffn)
        out["head"] = 2 * self.cfg.dim * self.vocab_size
        # LoRA adapters (strategy lora): each weight of A and B is one multiply-add per token
        adapters = sum(2 * p.numel() for name, p in self.named_parameters() if is_adapter(name))
        if adapters:
            out["adapters (LoRA)"] = adapters
        return out

    def ffn_breakdowns(self) -> dict[str, dict[str, int]]:
        """The PEER layers' forward FLOPs per token by stage, under their `flops_per_token` keys."""
        return {f"blocks.{i}.ffn ({b.ffn_kind})": b.ffn.flops_breakdown() for i, b in enumerate(self.blocks)
                if isinstance(b.ffn, PEER)}

    def param_counts(self) -> dict[str, int]:
        """Total parameters and parameters touched per token (tied head counted once)."""
        total = sum(p.numel() for p in self.parameters())
        ffn_total = sum(ffn.num_params() for ffn in self.ffns())
        ffn_active = sum(ffn.active_params_per_token() for ffn in self.ffns())
        # The tied token table is read whole by the LM head; of the position table one row per token.
        active = total - ffn_total + ffn_active - self.pos_emb.weight.numel() + self.cfg.dim
        return {"total": total, "active_per_token": active, "ffn_total": ffn_total, "ffn_active": ffn_active}


@torch.no_grad()
def capture_expert_inputs(model: nn.Module, blocks_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each of `model.expert_layers()`'s inputs [tokens, dim] when `model`, in eval mode, reads `blocks_BT`."""
    captured: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, name=name: captured.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, layer in model.expert_layers().items()]
    try:
        with eval_mode(model):
            model(blocks_BT)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextmanager
def eval_mode(module: nn.Module):
    """Run a block in eval mode (running statistics, no dropout), restoring the previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
