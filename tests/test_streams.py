import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from scenarios import STREAMS, DomainSpec, Stream, StreamError, build_benchmark, build_stream

SMALL = dict(block_len=32, train_tokens=2048, test_tokens=512, progress=False)
INFO_KEYS = {"name", "source", "content_hash", "train_docs", "test_docs", "train_tokens", "test_tokens",
             "test_bytes", "bytes_per_token"}


@pytest.fixture(scope="module")
def smoke():
    return build_benchmark("smoke", **SMALL)


def local_domains(root: Path, names=("a", "b", "c", "d")):
    """Small folder domains; each document names its domain so blocks can be traced."""
    specs = []
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(30):
            (folder / f"{i}.txt").write_text(f"[{name}] document {i} " + f"{name}-word " * 30, encoding="utf-8")
        specs.append({"name": name, "path": str(folder)})
    return specs


def test_offline_streams_are_the_four_builtin_domains():
    assert {"builtin", "smoke"} <= set(STREAMS)
    for name in ("builtin", "smoke"):
        assert [d.name for d in STREAMS[name]] == ["python", "cpp", "prose", "legal"]
        assert all(d.builtin == d.name for d in STREAMS[name])


def test_builtin_stream_structure(smoke):
    bench = smoke
    assert bench.domains == ["python", "cpp", "prose", "legal"]
    assert bench.vocab_size == 256 and bench.block_len == 32
    assert len(bench.train_stream) == len(bench.test_stream) == 4
    for i, name in enumerate(bench.domains):
        tr, te = bench.train_stream[i], bench.test_stream[i]
        assert tr.domain == te.domain == name and tr.domain_index == te.domain_index == i
        assert len(tr.dataset) == 2048 // 32 and len(te.dataset) == 512 // 32
        x, y = tr.dataset[0]
        assert x.shape == y.shape == (32,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[1:], y[:-1])
        info = bench.domain_info[i]
        assert INFO_KEYS <= set(info) and info["name"] == name
        assert info["train_tokens"] == len(tr.dataset) * 32 and info["test_tokens"] == len(te.dataset) * 32
        assert info["test_bytes"] == info["test_tokens"] and info["bytes_per_token"] == 1.0
        assert len(info["content_hash"]) == 64 and info["train_docs"] > 0 and info["test_docs"] > 0


def test_default_collate_batches_blocks(smoke):
    xb, yb = next(iter(DataLoader(smoke.test_stream[2].dataset, batch_size=5)))
    assert xb.shape == yb.shape == (5, 32) and xb.dtype == torch.int64


def test_task_label_attribute_without_task_aware_experiences(smoke):
    exp = smoke.train_stream[1]
    assert set(exp.dataset.targets_task_labels) == {0}
    assert len(exp.dataset[0]) == 2  # items stay (input_ids, target_ids)
    # No `task_labels` on the experience: Avalanche then calls model(x), not model(x, t).
    assert not hasattr(exp, "task_labels")


def test_domain_survives_avalanche_experience_copies(smoke):
    exp = smoke.train_stream[3]
    for view in (exp.train(), exp.eval(), exp.logging()):
        assert view.domain == "legal" and view.domain_index == 3


class TinyLM(nn.Module):
    def __init__(self, vocab=256, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(self.emb(x))


class FlatCrossEntropy(nn.Module):
    def forward(self, logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_domain_is_visible_in_a_real_naive_run(smoke):
    from avalanche.evaluation.metrics import loss_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

    seen = []

    class Recorder(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            seen.append(("train", strategy.experience.domain))

        def after_training_iteration(self, strategy, **kw):
            seen.append(("train-iter", strategy.experience.domain))

        def before_eval_exp(self, strategy, **kw):
            seen.append(("eval", strategy.experience.domain))

        def after_eval_iteration(self, strategy, **kw):
            seen.append(("eval-iter", strategy.experience.domain))

    torch.manual_seed(0)
    model = TinyLM()
    evaluator = EvaluationPlugin(loss_metrics(experience=True, stream=True), loggers=[])
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=FlatCrossEntropy(),
        train_mb_size=16, train_epochs=1, eval_mb_size=16, evaluator=evaluator, plugins=[Recorder()], device="cpu",
    )
    for exp in smoke.train_stream[:2]:
        strategy.train(exp)
        strategy.eval(smoke.test_stream)

    train_order = [d for kind, d in seen if kind == "train"]
    eval_order = [d for kind, d in seen if kind == "eval"]
    assert train_order == ["python", "cpp"]
    assert eval_order == smoke.domains * 2
    assert {d for kind, d in seen if kind == "train-iter"} == {"python", "cpp"}
    assert {d for kind, d in seen if kind == "eval-iter"} == set(smoke.domains)
    losses = {k: v for k, v in evaluator.get_last_metrics().items() if k.startswith("Loss_Exp/eval_phase")}
    assert len(losses) == 4 and all(math.isfinite(v) and 0 < v < 10 for v in losses.values())


def test_order_given_and_shuffled_by_seed(tmp_path):
    specs = local_domains(tmp_path)
    given = build_benchmark(specs, order="given", seed=5, **SMALL)
    assert given.domains == ["a", "b", "c", "d"]
    orders = {}
    for seed in range(6):
        bench = build_benchmark(specs, order="shuffle", seed=seed, **SMALL)
        assert sorted(bench.domains) == ["a", "b", "c", "d"]
        assert build_benchmark(specs, order="shuffle", seed=seed, **SMALL).domains == bench.domains
        orders[seed] = bench.domains
        for i, name in enumerate(bench.domains):
            assert bench.train_stream[i].domain == bench.test_stream[i].domain == name
            assert bench.domain_info[i]["name"] == name
            x, _ = bench.train_stream[i].dataset[0]
            text = bytes(x.tolist()).decode("utf-8", errors="replace")
            assert f"{name}-word" in text or f"[{name}]" in text  # the blocks follow their domain
    assert len({tuple(o) for o in orders.values()}) > 1


def test_same_seed_gives_identical_blocks(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    one, two = build_benchmark(specs, seed=2, **SMALL), build_benchmark(specs, seed=2, **SMALL)
    for s1, s2 in ((one.train_stream, two.train_stream), (one.test_stream, two.test_stream)):
        for e1, e2 in zip(s1, s2):
            assert len(e1.dataset) == len(e2.dataset)
            assert all(torch.equal(e1.dataset[i][0], e2.dataset[i][0]) for i in range(len(e1.dataset)))


def test_content_hashes_follow_the_token_blocks(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    first = build_stream(specs, seed=2, **SMALL).content_hashes()
    assert len(set(first)) == 2 and first == build_stream(specs, seed=2, **SMALL).content_hashes()
    text = Path(specs[1]["path"])
    for f in sorted(text.rglob("*.txt"))[:1]:
        f.write_text(f.read_text() + " changed")
    again = build_stream(specs, seed=2, **SMALL).content_hashes()
    assert again[0] == first[0] and again[1] != first[1]


def test_domain_specs_and_dicts_mix(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    bench = build_benchmark([DomainSpec(**specs[0]), specs[1]], **SMALL)
    assert bench.domains == ["a", "b"]
    assert [d.name for d in bench.domain_specs] == ["a", "b"]


def test_experiences_per_domain_splits_train_only(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    one = build_benchmark(specs, **SMALL)
    bench = build_benchmark(specs, experiences_per_domain=3, **SMALL)
    assert [e.domain for e in bench.train_stream] == ["a"] * 3 + ["b"] * 3
    assert [e.domain_part for e in bench.train_stream] == [0, 1, 2] * 2
    assert [e.domain for e in bench.test_stream] == ["a", "b"]
    parts = [bench.train_stream[i].dataset for i in range(3)]
    assert sum(len(p) for p in parts) == len(one.train_stream[0].dataset)
    stacked = torch.stack([p[j][0] for p in parts for j in range(len(p))])
    full = torch.stack([one.train_stream[0].dataset[j][0] for j in range(len(one.train_stream[0].dataset))])
    assert torch.equal(stacked, full)
    with pytest.raises(StreamError, match="domain 'a': .*train blocks cannot make 1000 experiences"):
        build_benchmark(specs, experiences_per_domain=1000, **SMALL)


def test_cached_rebuild(tmp_path):
    specs = local_domains(tmp_path / "data", ("a", "b"))
    first = build_benchmark(specs, cache_dir=tmp_path / "cache", **SMALL)
    second = build_benchmark(specs, cache_dir=tmp_path / "cache", **SMALL)
    assert [i["cached"] for i in first.domain_info] == [False, False]
    assert [i["cached"] for i in second.domain_info] == [True, True]
    assert torch.equal(first.test_stream[1].dataset[3][1], second.test_stream[1].dataset[3][1])


def test_unknown_stream():
    valid = ", ".join(STREAMS)
    assert valid.startswith("builtin, smoke, hub-")
    with pytest.raises(StreamError, match=rf"^unknown stream 'foo' \(valid: {re.escape(valid)}\)$"):
        build_benchmark("foo")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_len": 0}, "block_len must be an integer >= 1"),
        ({"train_tokens": 16}, "train_tokens must be an integer >= 32"),
        ({"test_tokens": 2.5}, "test_tokens must be"),
        ({"test_fraction": 1.0}, "test_fraction must be a number strictly between 0 and 1"),
        ({"order": "random"}, r"unknown domain order 'random' \(valid: given, shuffle\)"),
        ({"experiences_per_domain": 0}, "experiences_per_domain"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(SMALL, **kwargs)
    with pytest.raises(StreamError, match=match):
        build_benchmark(local_domains(tmp_path, ("a",)), **args)


def test_bad_stream_specs(tmp_path):
    specs = local_domains(tmp_path, ("a",))
    with pytest.raises(StreamError, match="domain 'a': name used twice"):
        build_benchmark(specs + specs, **SMALL)
    with pytest.raises(StreamError, match="no domains"):
        build_benchmark([], **SMALL)
    with pytest.raises(StreamError, match="stream name or a list"):
        build_benchmark(specs[0], **SMALL)
    unknown = r"^unknown key domain 'a'\.fitler \(valid keys of domain 'a': name, builtin, "
    with pytest.raises(StreamError, match=unknown):
        build_benchmark([dict(specs[0], fitler={"x": 1})], **SMALL)
    with pytest.raises(StreamError, match="domain 'wiki': path .* does not exist"):
        build_benchmark([{"name": "wiki", "path": str(tmp_path / "missing")}], **SMALL)
    with pytest.raises(StreamError, match="domain 'a': max_tokens=40 leaves fewer than block_len=32"):
        build_benchmark([dict(specs[0], max_tokens=40)], **SMALL)


def test_scenarios_does_not_import_experts_or_lifelong():
    pkg = Path(__file__).resolve().parents[1] / "scenarios"
    files = sorted(pkg.rglob("*.py"))
    assert {"spec.py", "streams.py", "base.py", "local.py", "hub.py", "builtin.py"} <= {p.name for p in files}
    for py in files:
        for node in ast.walk(ast.parse(py.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in {"experts", "lifelong"} for n in names), py


def blocks_of(ds):
    return [ds[i] for i in range(len(ds))]


def test_build_stream_blocks_are_the_benchmark_items(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    stream = build_stream(specs, experiences_per_domain=2, seed=1, **SMALL)
    bench = build_benchmark(specs, experiences_per_domain=2, seed=1, **SMALL)
    assert isinstance(stream, Stream) and stream.domains == bench.domains == ["a", "b"]
    assert stream.domain_specs == bench.domain_specs and stream.domain_info == bench.domain_info
    assert (stream.vocab_size, stream.block_len, stream.tokenizer.identity) == (256, 32, bench.tokenizer.identity)
    parts = stream.train_parts()
    assert [(i, part) for i, part, _ in parts] == [(e.domain_index, e.domain_part) for e in bench.train_stream]
    for (_, _, blocks), exp in zip(parts, bench.train_stream):
        assert len(blocks) == len(exp.dataset)
        assert all(torch.equal(x, ex) and torch.equal(y, ey)
                   for (x, y), (ex, ey) in zip(blocks_of(blocks), blocks_of(exp.dataset)))
    for i, exp in enumerate(bench.test_stream):
        whole = stream.blocks[i]
        assert sum(len(b) for j, _, b in parts if j == i) == len(whole.train)
        assert len(whole.test) == len(exp.dataset)
        assert all(torch.equal(x, ex) and torch.equal(y, ey)
                   for (x, y), (ex, ey) in zip(blocks_of(whole.test), blocks_of(exp.dataset)))


def test_build_stream_does_not_need_avalanche(tmp_path):
    specs = local_domains(tmp_path, ("a", "b"))
    code = (
        "import json, sys\n"
        "sys.modules['avalanche'] = None  # any import of avalanche now fails\n"
        "import scenarios\n"
        f"args = ({specs!r},)\n"
        "kw = dict(block_len=32, train_tokens=2048, test_tokens=512, progress=False)\n"
        "s = scenarios.build_stream(*args, **kw)\n"
        "print(json.dumps([s.domains, [len(b.train) for b in s.blocks], [len(b.test) for b in s.blocks]]))\n"
        "try:\n"
        "    scenarios.build_benchmark(*args, **kw)\n"
        "except ImportError:\n"
        "    print('no avalanche')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0]) == [["a", "b"], [64, 64], [16, 16]] and lines[1] == "no avalanche"


def make_three_folders(root: Path) -> None:
    """Small stand-ins for the folders examples/make_text_folders.py writes: chapters
    as .txt, fortunes as .jsonl rows, man pages as .txt in section folders."""
    verses = ["In the beginning was the word.", "And the light shone upon the waters.",
              "And the people went up unto the mountain.", "Blessed are they that keep the law."]
    for book in range(1, 4):
        folder = root / "scripture" / f"{book:02d}-book"
        folder.mkdir(parents=True)
        for ch in range(1, 13):
            lines = [f"{verses[(book + ch + k) % 4]} ({book}:{ch}:{k})" for k in range(6)]
            (folder / f"chapter-{ch:03d}.txt").write_text(f"Book{book} {ch}\n\n" + "\n".join(lines) + "\n")
    (root / "quotes").mkdir()
    for cat in ("wisdom", "science", "humorists"):
        rows = [{"text": f"A {cat} saying, number {i}: the fool doth think he is wise.\n\t\t-- Someone",
                 "category": cat} for i in range(15)]
        (root / "quotes" / f"{cat}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for sec in ("man1", "man7"):
        (root / "manuals" / sec).mkdir(parents=True)
        for i in range(20):
            body = (f"NAME\n       tool{i} - do a thing\n\nSYNOPSIS\n       tool{i} [OPTION]... FILE\n\n"
                    f"DESCRIPTION\n       The tool{i} command reads FILE and writes its summary. " * 3)
            (root / "manuals" / sec / f"tool{i}.{sec[-1]}.txt").write_text(body)


def test_three_local_folders_stream_from_the_example_config(tmp_path, monkeypatch):
    """examples/three_folders.yaml over three folders of text: one experience per folder,
    document-level splits, blocks traceable to their folder, and a cached rebuild."""
    import yaml

    example = Path(__file__).resolve().parents[1] / "examples" / "three_folders.yaml"
    domains = yaml.safe_load(example.read_text())["stream"]["domains"]
    assert [d["name"] for d in domains] == ["scripture", "quotes", "manuals"]
    monkeypatch.chdir(tmp_path)  # the example's paths are relative: data/...
    make_three_folders(tmp_path / "data")
    args = dict(block_len=32, train_tokens=1024, test_tokens=256, test_fraction=0.2, progress=False,
                cache_dir=tmp_path / "cache")
    bench = build_benchmark(domains, **args)
    assert bench.domains == ["scripture", "quotes", "manuals"]
    assert [e.domain for e in bench.train_stream] == [e.domain for e in bench.test_stream] == bench.domains
    markers = {"scripture": "Book", "quotes": "saying", "manuals": "DESCRIPTION"}
    for i, name in enumerate(bench.domains):
        info = bench.domain_info[i]
        assert info["split"] == "document" and info["train_docs"] > 0 and info["test_docs"] > 0
        assert len(bench.train_stream[i].dataset) == 1024 // 32 and len(bench.test_stream[i].dataset) == 256 // 32
        assert info["source"] == f"local: {(tmp_path / 'data' / name).resolve()}"
        for stream in (bench.train_stream, bench.test_stream):
            ds = stream[i].dataset
            text = "".join(bytes(ds[j][0].tolist()).decode("utf-8", errors="replace") for j in range(len(ds)))
            assert markers[name] in text
            assert not {markers[o] for o in markers if o != name} & set(re.findall(r"[A-Za-z]+", text))
    again = build_benchmark(domains, **args)
    assert [i["cached"] for i in again.domain_info] == [True] * 3
    assert [i["content_hash"] for i in again.domain_info] == [i["content_hash"] for i in bench.domain_info]
