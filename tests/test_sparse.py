"""experts.sparse (the ranking of sparse memory finetuning) and lifelong.plugins.sparse (the strategy
that updates only the top-t experts of each PEER layer per optimizer step)."""

import math
from types import SimpleNamespace

import pytest
import torch

import experts
from experts import RetrievalStats, kl_scores, select_top, tfidf_scores
from lifelong.config import from_dict
from lifelong.model import LanguageModel
from lifelong.plugins.sparse import SparseFinetunePlugin
from lifelong.training import build_optimizer


def test_tfidf_matches_a_hand_computed_example():
    tf = torch.tensor([3, 0, 1, 2, 5])
    df = torch.tensor([4, 0, 0, 1, 3])  # steps (of 4 background steps) that retrieved each expert
    scores = tfidf_scores(tf, df, batches=4)
    expected = [3 * math.log(5 / 5), 0.0, 1 * math.log(5 / 1), 2 * math.log(5 / 2), 5 * math.log(5 / 4)]
    assert scores.tolist() == pytest.approx(expected)
    # retrieved experts only, top 2: expert 3 (1.83) and expert 2 (1.61); expert 4 (1.12) is third
    assert select_top(scores, 2, tf > 0).tolist() == [2, 3]
    assert select_top(scores, 10, tf > 0).tolist() == [0, 2, 3, 4]  # fewer candidates than t: all
    assert select_top(torch.zeros(4), 2, torch.ones(4, dtype=torch.bool)).tolist() == [0, 1]  # ties: lower ids


def test_kl_scores_are_each_experts_term_of_the_divergence():
    tf, background = torch.tensor([2, 2, 0]), torch.tensor([5, 0, 3])
    p = [0.5, 0.5, 0.0]
    q = [(5 + 1) / 11, (0 + 1) / 11, (3 + 1) / 11]
    expected = [p[0] * math.log(p[0] / q[0]), p[1] * math.log(p[1] / q[1]), 0.0]
    assert kl_scores(tf, background).tolist() == pytest.approx(expected)
    assert float(kl_scores(tf, background).sum()) > 0


def test_retrieval_stats_count_steps_and_grow():
    stats = RetrievalStats(4)
    stats.record(torch.tensor([[0, 1], [1, 3]]))
    assert stats.tf_N.tolist() == [1, 2, 0, 1]
    stats.add_background(stats.tf_N)
    stats.add_background(torch.tensor([0, 5, 0, 0]))
    assert stats.df_N.tolist() == [1, 2, 0, 1] and stats.count_N.tolist() == [1, 7, 0, 1] and stats.batches == 2
    stats.grow_to(6)
    assert stats.df_N.tolist() == [1, 2, 0, 1, 0, 0]
    copy = RetrievalStats(0)
    copy.load_state_dict(stats.state_dict())
    assert torch.equal(copy.count_N, stats.count_N) and copy.batches == 2


def _model(seed=0, t=3):
    cfg = from_dict({"stream": {"block_len": 16},
                     "model": {"dim": 16, "n_layers": 2, "n_heads": 2,
                               "peer": {"num_experts": 64, "heads": 2, "top_k": 4, "key_dim": 8}},
                     "train": {"lr": 0.01, "weight_decay": 0.1, "device": "cpu"},
                     "strategy": {"name": "sparse", "sparse": {"top_t": t}}})
    torch.manual_seed(seed)
    model = LanguageModel(cfg.model, vocab_size=50, context=16)
    optimizer = build_optimizer(model, cfg)
    experts.attach(model, optimizer)
    return cfg, model, optimizer


def _step(model, optimizer, plugin, strategy, x):
    model.train()
    optimizer.zero_grad()
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    plugin.before_update(strategy)
    optimizer.step()
    strategy.optimizer_steps += 1
    plugin.after_update(strategy)


@pytest.mark.parametrize("optimizer_name", ["adamw", "rowwise_adamw", "sgd"])
def test_only_the_selected_experts_rows_change_in_a_sparse_step(optimizer_name):
    cfg, model, optimizer = _model()
    if optimizer_name == "rowwise_adamw":
        cfg.train.optimizer = optimizer_name
        optimizer = build_optimizer(model, cfg)
        experts.attach(model, optimizer)
    cfg.strategy.sparse.optimizer = "sgd" if optimizer_name == "sgd" else "run"
    cfg.strategy.sparse.sgd_lr = 0.5
    plugin = SparseFinetunePlugin(cfg.strategy.sparse)
    strategy = SimpleNamespace(model=model, optimizer_steps=0, evaluator=SimpleNamespace(loggers=[]),
                               experience=SimpleNamespace(current_experience=0), optimizer=optimizer)
    gen = torch.Generator().manual_seed(0)
    plugin.before_training_exp(strategy)
    for _ in range(3):  # a first experience: everything learns, its retrievals become the background
        _step(model, optimizer, plugin, strategy, torch.randint(0, 50, (4, 17), generator=gen))
    plugin.after_training_exp(strategy)
    layer = model.blocks[1].ffn
    assert plugin.background["blocks.1.ffn"].batches == 3

    strategy.experience.current_experience = 1
    plugin.before_training_exp(strategy)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
               for n, p in model.named_parameters() if p in optimizer.state}
    recorded = []
    layer.retrieval_hook = lambda ids, record=layer.retrieval_hook: (recorded.append(ids.clone()), record(ids))
    x = torch.randint(0, 50, (4, 17), generator=gen)
    _step(model, optimizer, plugin, strategy, x)

    stats = plugin.background["blocks.1.ffn"]
    tf = torch.bincount(torch.cat(recorded).reshape(-1), minlength=64)
    chosen = select_top(tfidf_scores(tf, stats.df_N, stats.batches), 3, tf > 0)
    assert chosen.numel() == 3
    for name, p in model.named_parameters():
        if name.endswith(("expert_u", "expert_v")) and name.startswith("blocks.1."):
            rows = (p.detach() != params[name]).any(dim=1).nonzero().reshape(-1)
            assert set(rows.tolist()) <= set(chosen.tolist()) and rows.numel() > 0, name
            if optimizer_name == "sgd":  # plain SGD: exactly old - 0.5 x gradient on the chosen rows
                assert torch.equal(p.detach()[chosen], params[name][chosen] - 0.5 * p.grad[chosen]), name
            for key, before in moments.get(name, {}).items():  # moments of every other row untouched
                if before.dim() == 2:
                    others = torch.ones(64, dtype=torch.bool)
                    others[chosen] = False
                    assert torch.equal(optimizer.state[p][key][others], before[others]), (name, key)
        else:
            assert torch.equal(p.detach(), params[name]), name  # every other parameter bit-identical
    assert not bool(layer.frozen.any())  # the layer's own frozen set is given back after the step


def test_sparse_needs_peer_and_a_background_of_the_stream(capsys, tmp_path):
    from lifelong import cli
    from lifelong.errors import ConfigError
    from lifelong.presets import resolve

    with pytest.raises(ConfigError, match="updates PEER experts, but model.ffn is 'dense'"):
        resolve("smoke", overrides=["strategy.name=sparse", "model.ffn=dense"])
    with pytest.raises(ConfigError, match="strategy.sparse.top_t must be > 0"):
        resolve("smoke", overrides=["strategy.name=sparse", "strategy.sparse.top_t=0"])
    assert cli.main(["run", "--preset", "smoke", "--set", "strategy.name=sparse", "--set",
                     "strategy.sparse.background=nowhere", "--out", str(tmp_path / "run")]) == 2
    assert "'nowhere' is not a domain of the stream (python, cpp, prose, legal)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
