"""A pretrained Hugging Face causal LM in the harness (`model.hf`, lifelong/pretrained.py): tiny random
GPT-2, Llama and GPT-NeoX models saved locally with their own tokenizer (nothing downloaded), run
through the command line and every part of a run."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import HF_KINDS, MORE_HF_KINDS
from lifelong import checkpoint, cli, experiment
from lifelong.build import build_model, meta_model
from lifelong.errors import ConfigError
from lifelong.model import ModelConfig
from lifelong.presets import resolve
from lifelong.scopes import _group_of
from lifelong.strategy_config import STRATEGIES

transformers = pytest.importorskip("transformers")

SMALL = ["stream.train_tokens=4096", "stream.test_tokens=2048", "eval.bootstrap_samples=50"]


def quiet(*_):
    pass


def config(folder, *overrides):
    return resolve("smoke", overrides=[f"model.hf={folder}", *SMALL, *overrides])


def run(out, folder, *overrides):
    return experiment.run(config(folder, *overrides), out, progress=False, echo=quiet)


@pytest.mark.parametrize("kind", HF_KINDS + MORE_HF_KINDS)
def test_parallel_insertion_leaves_the_logits_unchanged(tiny_hf, kind):
    folder = tiny_hf(kind)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    cfg = config(folder, "model.ffn_layers=all", "model.hf_insert=parallel")
    model = build_model(cfg, vocab_size=plain.config.vocab_size)
    assert len(model.expert_layers()) == 2
    ids = torch.randint(0, plain.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for training in (False, True):  # train mode: the query BatchNorm uses batch statistics
            before = plain.train(training)(input_ids=ids).logits
            after = model.train(training)(ids)
            assert torch.allclose(before, after, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["parallel", "replace"])
@pytest.mark.parametrize("kind", HF_KINDS)
def test_a_smoke_run_continues_a_pretrained_model(tiny_hf, tmp_path, kind, mode):
    folder = tiny_hf(kind)
    out = tmp_path / "run"
    code = cli.main(["run", "--preset", "smoke", "--set", f"model.hf={folder}", "--set", f"model.hf_insert={mode}",
                     *(arg for o in SMALL for arg in ("--set", o)), "--out", str(out), "--no-progress"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stages"] == ["init"] + [f"after:{d}" for d in res["domains"]]
    assert all(math.isfinite(v) for row in res["bpb_matrix"] for v in row)
    assert res["config"]["stream"]["tokenizer"] == folder  # the model's own tokenizer
    (layer,) = res["experts"]
    assert layer.endswith(".mlp.peer" if mode == "parallel" else ".mlp")
    assert res["num_experts"] == [256] * 5
    # the model learns its stream: every domain ends below where it started
    assert all(after < before for before, after in zip(res["bpb_matrix"][0], res["bpb_matrix"][-1]))
    assert (out / "checkpoints").is_dir() and (out / "bpb_matrix.png").is_file()


def test_parallel_peer_starts_where_the_pretrained_model_is(tiny_hf, tmp_path):
    """Stage 0 of a parallel retrofit evaluates exactly as the model without PEER (model.ffn dense)."""
    folder = tiny_hf("llama")
    peer = run(tmp_path / "peer", folder, "model.hf_insert=parallel")
    plain = run(tmp_path / "plain", folder, "model.ffn=dense")
    assert plain["num_experts"] == [0] * 5 and plain["experts"] == {}
    assert peer["loss_matrix"][0] == pytest.approx(plain["loss_matrix"][0], abs=1e-6)
    assert peer["params"]["total"] > plain["params"]["total"]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_every_parameter_of_a_pretrained_model_has_a_scope_group(tiny_hf, kind):
    folder = tiny_hf(kind)
    cfg = config(folder, "strategy.name=lora", "strategy.lora.targets=[attention, dense, queries]")
    model = build_model(cfg, vocab_size=10)
    groups = {}
    for name, _ in model.named_parameters():
        groups.setdefault(_group_of(model, name), []).append(name)
    assert set(groups) == {"embeddings", "attention", "norms", "dense", "queries", "keys", "experts", "adapters"}
    assert all(".peer." in name for group in ("queries", "keys", "experts") for name in groups[group])
    assert all(".mlp." in name for name in groups["dense"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_a_pretrained_model(tiny_hf, tmp_path, strategy):
    extra = {"sparse": ["strategy.sparse.top_t=8"], "replay": ["strategy.replay.buffer_tokens=2048"]}
    res = run(tmp_path, tiny_hf("gpt2"), f"strategy.name={strategy}", "train.batch_size=8",
              *extra.get(strategy, []))
    assert all(math.isfinite(v) for row in res["bpb_matrix"] for v in row)
    assert res["bpb_matrix"][-1][-1] < res["bpb_matrix"][0][-1] or strategy == "lora"


def test_growth_on_a_pretrained_model_preserves_its_output(tiny_hf, tmp_path):
    res = run(tmp_path, tiny_hf("gpt_neox"), "growth.schedule=boundary", "growth.experts=32",
              "growth.warmup_steps=5", "train.trainable=[all, 'new_experts,new_keys']")
    assert res["num_experts"] == [256, 256, 288, 320, 352]
    assert all(e["output_change"] <= 1e-6 for e in res["growth_events"])


def test_resume_inside_an_experience_with_referenced_base_weights(tiny_hf, tmp_path, monkeypatch, capsys):
    """Checkpoints that reference the frozen pretrained weights instead of copying them resume to the
    results of an uninterrupted run; a changed base model is refused on resume."""
    from test_experiment import _run_cut_at

    folder = str(shutil.copytree(tiny_hf("llama"), tmp_path / "model"))
    overrides = ["checkpoint.base_weights=reference", "train.trainable=['queries,keys,experts']",
                 "checkpoint.every_steps=3", "train.batch_size=4", "growth.schedule=boundary", "growth.experts=16"]
    cfg = config(folder, *overrides)
    experiment.run(cfg, tmp_path / "full", progress=False, echo=quiet)
    steps = json.loads((tmp_path / "full" / "results.json").read_text())["experience_steps"]
    _run_cut_at(cfg, tmp_path / "cut", steps[0] + steps[1] // 2 + 1, monkeypatch)
    newest = checkpoint.latest(tmp_path / "cut")
    state = checkpoint.load_state(newest)
    assert state["position"] is not None and state["base_weights"]["hf"] == folder
    saved = load_file(str(newest / "model.safetensors"))
    assert saved and all(".peer." in name for name in saved)  # only the PEER layer is written
    cut_copy = shutil.copytree(tmp_path / "cut", tmp_path / "cut-copy")
    experiment.resume(tmp_path / "cut", progress=False, echo=quiet)
    assert (tmp_path / "full" / "results.json").read_bytes() == (tmp_path / "cut" / "results.json").read_bytes()
    # the pretrained weights the checkpoints point to change: resuming is refused with one line
    weights = load_file(f"{folder}/model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(cut_copy), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "references the weights of" in err[0] and folder in err[0]


def test_scratch_references_start_from_the_pretrained_weights_they_were_trained_from(tiny_hf, tmp_path):
    folder = str(shutil.copytree(tiny_hf("gpt_neox"), tmp_path / "model"))
    cfg = config(folder, "eval.reference=scratch", "stream.train_tokens=2048")
    said = []
    res = experiment.run(cfg, tmp_path / "a", progress=False, echo=said.append)
    assert sum("alone" in line for line in said) == 4 and math.isfinite(res["fwt_zero_shot"])
    said.clear()
    experiment.run(cfg, tmp_path / "b", progress=False, echo=said.append)
    assert not any("alone" in line for line in said)  # cached
    weights = load_file(f"{folder}/model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, f"{folder}/model.safetensors", metadata={"format": "pt"})
    experiment.run(cfg, tmp_path / "c", progress=False, echo=said.append)
    assert sum("alone" in line for line in said) == 4  # other weights, other references


def test_referenced_base_weights_must_stay_frozen(tiny_hf, tmp_path, capsys):
    folder = tiny_hf("gpt2")
    code = cli.main(["run", "--preset", "smoke", "--set", f"model.hf={folder}", "--set",
                     "checkpoint.base_weights=reference", "--set", "train.trainable=[all, experts]",
                     "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trains" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", HF_KINDS)  # GPT-2 ties its LM head to the token embedding
def test_lifelong_grow_and_report_on_a_pretrained_run(tiny_hf, tmp_path, capsys, kind):
    folder = tiny_hf(kind)
    run(tmp_path / "a", folder, "checkpoint.keep=5")
    run_dir = shutil.copytree(tmp_path / "a", tmp_path / "cut")
    for name in ("ckpt-000002", "ckpt-000003", "ckpt-000004"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    (run_dir / "results.json").unlink()
    assert cli.main(["grow", str(run_dir), "--experts", "32", "--warmup-steps", "5"]) == 0
    assert cli.main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_experts"] == [256, 256, 288, 288, 288]
    assert res["growth_events"][0]["output_change"] <= 1e-6
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "a"), str(run_dir)]) == 0
    assert "final" in capsys.readouterr().out.lower()


def test_flops_of_a_pretrained_model(tiny_hf, capsys):
    folder = tiny_hf("gpt2")
    assert cli.main(["flops", "--preset", "smoke", "--set", f"model.hf={folder}"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.ffn (mlp+peer)" in out and "pretrained MLP" in out and "experts: 256" in out
    model = meta_model(config(folder), vocab_size=10)
    flops = model.flops_per_token()
    # GPT-2's MLP: two matrices of dim x 4 dim; attention: four of dim x dim plus the scores
    assert flops["blocks.0.ffn (mlp)"] == 2 * 2 * 32 * 128
    assert flops["blocks.0.attn"] == 2 * 4 * 32 * 32 + 2 * 2 * 32 * 32
    # LoRA's matrices are counted once, on their own line: 2 FLOPs per adapter weight
    lora = meta_model(config(folder, "strategy.name=lora"), vocab_size=10)
    adapters = sum(p.numel() for name, p in lora.named_parameters() if ".lora_" in name)
    assert sum(lora.flops_per_token().values()) - sum(flops.values()) == 2 * adapters > 0
    # Qwen3's attention is 2 heads x 24 wide in a 32-wide model: scores and mixing run at 48
    qwen3 = meta_model(config(tiny_hf("qwen3"), "model.ffn=dense"), vocab_size=10)
    matrices = sum(2 * p.numel() for p in qwen3.blocks[0].self_attn.parameters() if p.dim() == 2)
    assert qwen3.flops_per_token()["blocks.0.attn"] == matrices + 2 * 2 * 48 * 32


def test_active_parameters_count_one_row_of_a_table_read_by_lookup(tiny_hf):
    gpt2 = build_model(config(tiny_hf("gpt2"), "model.ffn=dense"), vocab_size=10).param_counts()
    # the token table is the tied head, read whole; of the 128 positions one row
    assert gpt2["active_per_token"] == gpt2["total"] - 127 * 32
    llama = build_model(config(tiny_hf("llama"), "model.ffn=dense"), vocab_size=10)
    vocab = llama.vocab_size  # untied: the input table is a lookup, the head a matrix read whole
    assert llama.param_counts()["active_per_token"] == llama.param_counts()["total"] - (vocab - 1) * 32


def _without_weights(folder, copy):
    shutil.copytree(folder, copy)
    (copy / "model.safetensors").unlink()
    return copy


def _damaged(folder, copy, truncate: bool):
    """A copy of `folder` with its weights cut short, or with a config that disagrees with them."""
    shutil.copytree(folder, copy)
    if truncate:
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        cfg = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**cfg, "n_inner": 48}))
    return copy


def _saved(folder, config_json: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_json))
    return str(folder)


@pytest.mark.parametrize("case, message", [
    ("missing", "neither a model folder nor a model in the local Hugging Face cache"),
    ("bert", "model type 'bert'"),
    ("remote", "trust_remote_code"),
    ("unknown", "cannot be read"),
    ("no-weights", "weights"),
    ("truncated", "weights"),
    ("mismatched", "weights"),
    ("tokenizer", "embeddings"),
])
def test_a_bad_pretrained_model_is_one_line(tiny_hf, tmp_path, capsys, case, message):
    folder = {
        "missing": lambda: str(tmp_path / "nowhere"),
        "bert": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64).save_pretrained(tmp_path / "b") or tmp_path / "b",
        "remote": lambda: _saved(tmp_path / "r", {"model_type": "mything", "auto_map": {"AutoConfig": "x.MyConfig"}}),
        "unknown": lambda: _saved(tmp_path / "u", {"model_type": "not-a-model"}),
        "no-weights": lambda: _without_weights(tiny_hf("gpt2"), tmp_path / "w"),
        "truncated": lambda: _damaged(tiny_hf("gpt2"), tmp_path / "t", truncate=True),
        "mismatched": lambda: _damaged(tiny_hf("gpt2"), tmp_path / "m", truncate=False),
        "tokenizer": lambda: tiny_hf("gpt2"),
    }[case]()
    extra = []
    if case == "tokenizer":  # a vocabulary larger than the model's embeddings
        extra = ["--set", f"stream.tokenizer={folder}", "--set", "model.hf_insert=replace"]
        small = tmp_path / "small"
        shutil.copytree(folder, small)
        cfg = json.loads((small / "config.json").read_text())
        (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
        folder = small
    code = cli.main(["run", "--preset", "smoke", "--set", f"model.hf={folder}", *extra,
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_hf_settings_are_checked(tiny_hf):
    with pytest.raises(ConfigError, match="not 'moe'"):
        config(tiny_hf("gpt2"), "model.ffn=moe")
    with pytest.raises(ConfigError, match="needs a pretrained model"):
        resolve("smoke", overrides=["checkpoint.base_weights=reference", "train.trainable=[experts]"])
    with pytest.raises(ConfigError, match="frozen"):
        config(tiny_hf("gpt2"), "checkpoint.base_weights=reference")
    with pytest.raises(ConfigError, match="positions"):
        build_model(config(tiny_hf("gpt2"), "stream.block_len=512"), vocab_size=10)
    with pytest.raises(ConfigError, match="names no block in 0, 1, ..."):
        config(tiny_hf("gpt2"), "model.ffn_layers=-1")
    with pytest.raises(ConfigError, match="names no block in 0..1"):
        build_model(config(tiny_hf("gpt2"), "model.ffn_layers=2"), vocab_size=10)


def test_a_model_folder_is_kept_by_its_absolute_path(tiny_hf, tmp_path, monkeypatch):
    shutil.copytree(tiny_hf("gpt2"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    cfg = config("model")
    assert cfg.model.hf == str(tmp_path / "model") == cfg.stream.tokenizer  # a resume from elsewhere finds it


def test_a_native_type_that_also_ships_code_loads_without_it(tiny_hf, tmp_path):
    folder = shutil.copytree(tiny_hf("llama"), tmp_path / "model")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "mine.MyConfig"}}))
    model = build_model(config(str(folder)), vocab_size=10)
    assert type(model.hf).__name__ == "LlamaForCausalLM"


def test_a_model_in_the_local_hub_cache_is_read_from_its_snapshot(tiny_hf, tmp_path, monkeypatch):
    """A hub name resolves to its cached snapshot (a cache laid out as huggingface_hub keeps one) and
    its commit is recorded as the revision; nothing is asked of the hub."""
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--llama"
    shutil.copytree(tiny_hf("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run(tmp_path / "run", "tiny/llama", "checkpoint.base_weights=reference",
              "train.trainable=['queries,keys,experts']")
    assert res["config"]["model"]["hf"] == "tiny/llama" and all(math.isfinite(v) for v in res["bpb_matrix"][-1])
    state = checkpoint.load_state(checkpoint.latest(tmp_path / "run"))
    assert state["base_weights"]["revision"] == commit and state["base_weights"]["hf"] == "tiny/llama"
    with pytest.raises(ConfigError, match="neither a model folder nor a model in the local"):
        build_model(config("tiny/other"), vocab_size=10)
    # another version in the cache, chosen by model.hf_revision (a commit here; a tag or branch names one)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(tiny_hf("gpt2"), repo / "snapshots" / other)
    model = build_model(config("tiny/llama", f"model.hf_revision={other}"), vocab_size=10)
    assert model.source["revision"] == other and model.source["model_type"] == "gpt2"
    with pytest.raises(ConfigError, match="cache at revision 'v9'"):
        build_model(config("tiny/llama", "model.hf_revision=v9"), vocab_size=10)
    for hf in (None, str(tiny_hf("gpt2"))):  # a revision of nothing, or of a folder
        with pytest.raises(ConfigError, match="model.hf_revision chooses a version"):
            ModelConfig(hf=hf, hf_revision="main")
