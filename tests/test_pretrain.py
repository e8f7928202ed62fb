"""The pretraining phase: a mixture domain at the head of the stream, disjoint from the domains it
borrows from, trained with its own epochs and learning rate."""

from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin

from lifelong.config import ConfigError, from_dict
from lifelong.strategies import stream_steps
from scenarios import StreamError, build_benchmark, build_stream
from scenarios.pretrain import MixtureSource, PretrainSpec, ShareSource, coerce_pretrain
from scenarios.sources import LocalSource

from test_strategies import BLOCK, make_run, tiny_cfg

SMALL = dict(block_len=16, train_tokens=1024, test_tokens=256, progress=False)


def folder(root: Path, name: str, docs: int = 40) -> dict:
    path = root / name
    path.mkdir(parents=True)
    for i in range(docs):
        (path / f"{i}.txt").write_text(f"<{name}:{i}> " + f"{name} text {i} " * 12, encoding="utf-8")
    return {"name": name, "path": str(path)}


def doc_ids(source) -> list[str]:
    return [d.doc_id for d in source.documents(0)]


def test_a_share_splits_a_domain_into_two_disjoint_parts(tmp_path):
    inner = LocalSource("a", folder(tmp_path, "a")["path"])
    taken, kept = ShareSource(inner, 0.4, pretrain=True), ShareSource(inner, 0.4, pretrain=False)
    assert sorted(doc_ids(taken) + doc_ids(kept)) == sorted(doc_ids(inner))
    assert not set(doc_ids(taken)) & set(doc_ids(kept))
    assert 0 < len(doc_ids(taken)) < len(doc_ids(inner))
    assert taken.fingerprint() != kept.fingerprint() != inner.fingerprint()


def test_the_mixture_takes_one_document_of_each_source_in_turn(tmp_path):
    a = LocalSource("a", folder(tmp_path, "a", docs=3)["path"])
    b = LocalSource("b", folder(tmp_path, "b", docs=1)["path"])
    ids = doc_ids(MixtureSource("general", [a, b]))
    assert [i.split("/")[0] for i in ids] == ["a", "b", "a", "a"]
    assert {i.split("/", 1)[1] for i in ids if i.startswith("a/")} == set(doc_ids(a))


def test_the_phase_is_the_first_domain_and_shares_no_text_with_the_others(tmp_path):
    domains = [folder(tmp_path, "a"), folder(tmp_path, "b")]
    extra = folder(tmp_path / "extra", "web")
    stream = build_stream(domains, pretrain={"share": 0.5, "domains": [extra], "train_tokens": 512}, **SMALL)
    assert stream.domains == ["general", "a", "b"] and stream.pretrain == "general"
    assert stream.domain_specs[0] is None and [s.name for s in stream.domain_specs[1:]] == ["a", "b"]
    text = {name: stream.tokenizer.decode(b.train.tokens.tolist() + b.test.tokens.tolist())
            for name, b in zip(stream.domains, stream.blocks)}
    general_docs = set(_doc_marks(text["general"]))
    assert {m.split(":")[0] for m in general_docs} == {"a", "b", "web"}  # a real mixture
    for name in ("a", "b"):
        assert not general_docs & set(_doc_marks(text[name]))  # no document in both phases
    assert stream.blocks[0].train.num_blocks == 512 // 16  # the phase's own budget
    plain = build_stream(domains, **SMALL)
    assert plain.domains == ["a", "b"] and plain.pretrain is None
    assert plain.content_hashes() != stream.content_hashes()[1:]  # the share left the domains


def _doc_marks(text: str) -> list[str]:
    import re

    return re.findall(r"<(\w+:\d+)>", text)


def test_the_phase_stays_first_in_a_shuffled_stream_and_reaches_the_benchmark(tmp_path):
    domains = [folder(tmp_path, n) for n in ("a", "b", "c")]
    bench = build_benchmark(domains, order="shuffle", seed=3, pretrain={"share": 0.3, "name": "base"}, **SMALL)
    assert bench.domains[0] == "base" and sorted(bench.domains[1:]) == ["a", "b", "c"]
    assert bench.pretrain == "base" and bench.train_stream[0].domain == "base"


@pytest.mark.parametrize("values, message", [
    ({"share": 1.0}, "stream.pretrain.share must be in [0, 1)"),
    ({"share": 0.2, "name": " "}, "stream.pretrain.name must be a non-empty"),
    ({"share": 0.2, "train_tokens": 0}, "stream.pretrain.train_tokens must be a positive"),
    ({"share": "half"}, "stream.pretrain.share: expected float"),
    ({"shares": 0.2}, "unknown key stream.pretrain.shares"),
    ({"domains": [{"name": "w"}]}, "give exactly one source"),
])
def test_bad_phases_are_one_line(values, message):
    with pytest.raises(StreamError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        coerce_pretrain(values)


def test_an_empty_phase_is_no_phase_and_names_may_not_clash(tmp_path):
    assert coerce_pretrain({}) is None and coerce_pretrain(PretrainSpec()) is None
    domains = [folder(tmp_path, "a")]
    with pytest.raises(StreamError, match="stream.pretrain.name .a. is also a domain"):
        build_stream(domains, pretrain={"share": 0.5, "name": "a"}, **SMALL)
    with pytest.raises(StreamError, match="'a' is also a domain of the stream"):
        build_stream(domains, pretrain={"domains": [domains[0]]}, **SMALL)


def test_joint_training_has_no_phase_before_the_others():
    with pytest.raises(ConfigError, match="stream.pretrain with strategy.name 'joint'"):
        from_dict({"stream": {"pretrain": {"share": 0.5}}, "strategy": {"name": "joint"}})
    with pytest.raises(ConfigError, match="train.pretrain_epochs must be > 0"):
        from_dict({"train": {"pretrain_epochs": 0}})


class LearningRates(SupervisedPlugin):
    """Per optimizer step: the experience's domain and the first group's learning rate."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def after_update(self, strategy, **kwargs):
        self.rows.append((strategy.experience.domain, strategy.optimizer.param_groups[0]["lr"]))


def test_the_phase_trains_its_own_epochs_at_its_own_learning_rate(tmp_path):
    domains = [folder(tmp_path, "a", docs=60), folder(tmp_path, "b", docs=60)]
    bench = build_benchmark(domains, block_len=BLOCK, train_tokens=1024, test_tokens=256, progress=False,
                            pretrain={"share": 0.5, "train_tokens": 1024})
    cfg = tiny_cfg("naive", pretrain_epochs=2, pretrain_lr=4e-3, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    cfg.stream.pretrain = PretrainSpec(share=0.5)
    *_, strategy = make_run(cfg, bench=bench)
    rates = LearningRates()
    strategy.plugins.append(rates)
    for exp in bench.train_stream:
        strategy.train(exp)
    by_domain = {d: [lr for dd, lr in rates.rows if dd == d] for d in bench.domains}
    steps = {d: -(-len(exp.dataset) // 8) for d, exp in zip(bench.domains, bench.train_stream)}
    assert len(by_domain["general"]) == 2 * steps["general"]  # two epochs
    assert [len(by_domain[d]) for d in ("a", "b")] == [steps["a"], steps["b"]]
    assert by_domain["general"] == pytest.approx([4e-3] * len(by_domain["general"]))
    assert by_domain["a"] + by_domain["b"] == pytest.approx([1e-3] * (steps["a"] + steps["b"]))
    assert stream_steps(cfg, [len(exp.dataset) for exp in bench.train_stream]) == len(rates.rows)
    assert torch.isfinite(torch.tensor([lr for _, lr in rates.rows])).all()
