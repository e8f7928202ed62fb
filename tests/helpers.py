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


# ---- tiny randomly initialised Hugging Face causal LMs, built from configs (nothing downloaded)

HF_KINDS = ["gpt2", "llama", "gpt_neox"]
MORE_HF_KINDS = ["qwen2", "qwen3", "mistral"]  # the other architectures of the retrofit table


def tiny_hf_model(kind: str, vocab: int = 64, layers: int = 3, seed: int = 0):
    """A tiny causal LM of architecture `kind` (HF_KINDS or MORE_HF_KINDS), grouped KV heads where the
    architecture has them, no dropout."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2, n_positions=128,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
    elif kind == "llama":
        config = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=1, **common)
    elif kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0, **common)
    elif kind == "qwen2":  # tied embeddings, biases on q, k, v
        config = transformers.Qwen2Config(intermediate_size=64, num_key_value_heads=1, tie_word_embeddings=True,
                                          **common)
    elif kind == "qwen3":  # heads x head_dim (2 x 24) differs from the hidden size
        config = transformers.Qwen3Config(intermediate_size=64, num_key_value_heads=1, head_dim=24, **common)
    elif kind == "mistral":
        config = transformers.MistralConfig(intermediate_size=64, num_key_value_heads=1, **common)
    else:
        raise ValueError(kind)
    return transformers.AutoModelForCausalLM.from_config(config)


def save_tiny_hf(kind: str, path) -> str:
    """A tiny model of `kind` saved in folder `path` with a byte-level BPE tokenizer trained here on a
    little code and prose (so a stream of the built-in domains reads in it); returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The court held that the contract was void, and the parties were returned to where they stood.",
              "def load(path):\n    with open(path) as f:\n        return [line.strip() for line in f]",
              "int main(void) { for (int i = 0; i < n; ++i) { total += values[i]; } return 0; }",
              "She walked along the river in the morning light, thinking of the letters she had not sent."] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)
    tiny_hf_model(kind, vocab=len(fast), layers=2).save_pretrained(path)
    return str(path)
