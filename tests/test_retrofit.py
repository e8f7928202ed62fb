"""experts.retrofit: PEER layers put into tiny randomly initialised Hugging Face causal LMs (built
locally from configs, nothing downloaded)."""

import pytest
import torch

from experts import PEER
from experts.retrofit import ParallelPEER, blocks_of, resolve_blocks, retrofit
from helpers import HF_KINDS, tiny_hf_model

transformers = pytest.importorskip("transformers")

PEER_ARGS = dict(num_experts=64, heads=2, top_k=4, key_dim=16)


def tiny(kind: str):
    return tiny_hf_model(kind)


ARCHS = HF_KINDS


@pytest.mark.parametrize("kind", ARCHS)
def test_parallel_insertion_leaves_the_logits_unchanged(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = {training: model.train(training)(ids).logits for training in (False, True)}
        layers = retrofit(model, blocks="all", mode="parallel", **PEER_ARGS)
        after = {training: model.train(training)(ids).logits for training in (False, True)}
    for training in (False, True):  # train mode: the query BatchNorm uses batch statistics
        assert torch.allclose(before[training], after[training], atol=1e-6, rtol=0)
    blocks, attr = blocks_of(model)
    assert sorted(layers) == [0, 1, 2] and all(isinstance(getattr(b, attr), ParallelPEER) for b in blocks)


@pytest.mark.parametrize("kind", ARCHS)
def test_a_retrofitted_model_trains_its_peer_layers(kind):
    model = tiny(kind)
    layers = retrofit(model, blocks=[-1], mode="replace", **PEER_ARGS)
    blocks, attr = blocks_of(model)
    assert list(layers) == [2] and isinstance(getattr(blocks[2], attr), PEER)
    ids = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layers[2].expert_u.grad is not None and layers[2].expert_u.grad.abs().sum() > 0


def test_parallel_experts_learn_from_zero_outputs():
    model = tiny("llama")
    peer = retrofit(model, mode="parallel", **PEER_ARGS)[1]  # "middle" of three blocks
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert peer.expert_v.grad.abs().sum() > 0  # v moves first; u's gradient is zero while v is


def test_bad_retrofits_say_what_is_wrong():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="block 7 is not a block of this model"):
        retrofit(model, blocks=[7], **PEER_ARGS)
    with pytest.raises(ValueError, match="mode"):
        retrofit(model, mode="beside", **PEER_ARGS)
    retrofit(model, blocks=[0], **PEER_ARGS)
    with pytest.raises(ValueError, match="block 0 already has a PEER layer"):
        retrofit(model, blocks=[0], **PEER_ARGS)
    bart = transformers.BartForCausalLM(transformers.BartConfig(vocab_size=64, d_model=32, decoder_layers=1,
                                                                encoder_layers=1, decoder_attention_heads=2,
                                                                encoder_attention_heads=2, decoder_ffn_dim=32,
                                                                encoder_ffn_dim=32))
    with pytest.raises(ValueError, match="model type 'bart' is not supported for PEER retrofit"):
        retrofit(bart, **PEER_ARGS)
    assert resolve_blocks("all", 3) == [0, 1, 2] and resolve_blocks([0, -3], 3) == [0]
