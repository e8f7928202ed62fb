"""benchmarks/pretrained.py: the variants it measures and the 0.5B plan it writes down (sizes only;
nothing here times anything)."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import pretrained  # noqa: E402

pytest.importorskip("transformers")

TINY_PEER = ["model.peer.num_experts=256", "model.peer.heads=2", "model.peer.top_k=4", "model.peer.key_dim=32"]


def test_the_plan_builds_qwen2_5_0_5b_and_counts_its_peer_layer():
    base, peer = pretrained.plan([256 * 256])
    assert base["params"] == 494_032_768  # Qwen2.5-0.5B's published parameter count
    # two expert tables of 896 + query net + two codebooks of 256 half-keys per head + query BatchNorm
    assert peer["peer_params"] == 2 * 65536 * 896 + 896 * 8 * 128 + 2 * 8 * 256 * 64 + 2 * 8 * 128
    assert peer["params"] == base["params"] + peer["peer_params"]
    extra = peer["logits_gib"] + peer["activations_gib"]
    assert peer["full_finetune_gib"] == pytest.approx(16 * peer["params"] / 2**30 + extra)
    assert peer["peer_only_gib"] == pytest.approx((4 * base["params"] + 16 * peer["peer_params"]) / 2**30 + extra)
    assert base["peer_only_gib"] is None


@pytest.mark.parametrize("variant", list(pretrained.VARIANTS))
def test_each_variant_trains_what_it_says(tiny_hf, variant):
    args = Namespace(model=tiny_hf("llama"), blocks="middle", device="cpu", batch=2, block_len=16, steps=2, warmup=0,
                     set=TINY_PEER)
    row = pretrained.measure(args, variant)
    assert row["experts"] == (0 if variant == "pretrained" else 256)
    peer_params = 2 * 256 * 32 + 32 * 2 * 32 + 2 * 2 * 16 * 16 + 2 * 2 * 32
    if variant == "parallel, base frozen":
        assert row["trained_params"] == peer_params
    else:
        assert row["trained_params"] == row["params"]
    assert row["state_mib"] > 0 and row["step_ms"] > 0
